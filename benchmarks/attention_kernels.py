"""The XLA attention kernel: dlfx's `softmax_attention` against `jax.nn.dot_product_attention`'s XLA path.

    python -m benchmarks.attention_kernels [--config configs/char_gpt.py] [--set KEY=VALUE] [--steps 5]
                                           [--windows 4]

Both train steps are compiled in one process from the same config (JAX's kernel patched in for the second)
and timed in rotating windows on the same batches, so the ratio is paired; then each kernel's attention alone
(forward, and gradient of q, k and v) at the config's shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.run import dlfx_stepper, int_at_least
from dlfx import config as config_lib, data, parallel
from dlfx.experiment import build
from dlfx.models import transformer

OURS = transformer.softmax_attention


def jax_attention(q, k, v, mask=None, drop=None, record=None):
    """`jax.nn.dot_product_attention`'s XLA path with `softmax_attention`'s arguments (no dropout, no record)."""
    if drop is not None or record is not None:
        raise SystemExit("benchmarks.attention_kernels: set model.dropout_rate=0 (JAX's kernel has no dropout)")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _timed(run, steps: int) -> float:
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Print the paired train-step table and the attention-alone table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/char_gpt.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int_at_least(1), default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int_at_least(1), default=4)
    args = parser.parse_args(argv)
    config = config_lib.load(args.config, ["model.dropout_rate=0.0", "train.epochs=0", *args.set])
    exp = build(config)
    it = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed)
    placed = [parallel.shard_batch(next(it), exp.mesh, exp.mode) for _ in range(2)]
    runs = {}
    for name, kernel in (("dlfx softmax_attention", OURS), ("jax.nn.dot_product_attention (xla)", jax_attention)):
        transformer.softmax_attention = kernel  # read when the step is traced, on its first call
        runs[name] = dlfx_stepper(exp, placed)
        runs[name](2)
    transformer.softmax_attention = OURS
    times = {name: [] for name in runs}
    for _ in range(args.windows):
        for name, run in runs.items():
            times[name].append(_timed(run, args.steps))
    first = next(iter(times))
    print(f"| kernel | train steps/s | paired ratio to {first} |\n|---|---|---|")
    for name, spent in times.items():
        ratio = statistics.median(a / b for a, b in zip(times[first], spent))
        print(f"| {name} | {args.steps / statistics.median(spent):.2f} | {ratio:.3f} |")

    m = config.model
    shape = (config.data.batch_size, config.data.seq_len, m.num_heads, m.embed_dim // m.num_heads)
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(3))
    keep = jnp.tril(jnp.ones(shape[1:2] * 2, bool))[None, None]
    print(f"\n| attention alone {shape}, causal | forward ms | gradient ms |\n|---|---|---|")
    for name, kernel in (("dlfx softmax_attention", OURS), ("jax.nn.dot_product_attention (xla)", jax_attention)):
        forward = jax.jit(lambda q, k, v, kernel=kernel: kernel(q, k, v, keep))
        grad = jax.jit(jax.grad(lambda q, k, v, kernel=kernel: jnp.sum(jnp.sin(kernel(q, k, v, keep))),
                                argnums=(0, 1, 2)))
        row = []
        for fn in (forward, grad):
            jax.block_until_ready(fn(q, k, v))
            spent = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready([fn(q, k, v) for _ in range(5)])
                spent.append((time.perf_counter() - start) / 5 * 1e3)
            row.append(statistics.median(spent))
        print(f"| {name} | {row[0]:.2f} | {row[1]:.2f} |")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
