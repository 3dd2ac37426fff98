"""dlfx: a hackable JAX research framework (Flax linen models, pmap/shard_map steps, Orbax checkpoints)."""

__version__ = "0.1.0"


def load_run(workdir: str, step: int | None = None):
    """A trained run (config, model, variables, jitted `predict`); see `dlfx.api.load_run`."""
    from dlfx.api import load_run as _load_run  # keeps `import dlfx` free of JAX

    return _load_run(workdir, step)
