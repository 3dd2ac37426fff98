"""dlfx: a hackable JAX research framework (Flax linen models, pmap/shard_map steps, Orbax checkpoints)."""

__version__ = "0.1.0"
