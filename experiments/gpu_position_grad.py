"""Does the position embedding's gradient set the GPT's activation layout on a GPU?

On an H200 the gpt124m step (with the plain broadcast add) kept its residual stream batch-minor (`bf16[1024,768,32]`): XLA's layout choice
for the one reduction over the batch axis (the gradient of the broadcast position embeddings) spread along
the residual chain, and every dense layer's input and output went through a transposing fusion. This
compiles the step with `transformer.add_positions` swapped for variants whose gradient is no reduction over
the batch axis, counts the transposing fusions in each compiled step, and times them in rotating windows:

    python -m experiments.gpu_position_grad [--model gpt124m] [--steps 10] [--windows 5]

Variants: `broadcast` (the plain broadcast add of sliced rows: its gradient reduces the batch axis into a
slice of `wpe`), `add` (dlfx's `add_positions`: on a GPU the rows are gathered, so the batch sum is
scattered into `wpe`), `gather` (positions gathered per token: a scatter-add gradient, no batch sum), `dot` (a
custom VJP summing the batch axis with a matmul, which XLA:GPU turns back into a reduction at small sizes) and
`none` (no position embedding: the bound, not a model). A variant name ending in `+plain_gelu` also swaps the
MLP's recomputed GELU (`dense.recomputed_gelu`) for the plain one (`dense.biased_gelu`, whose backward pass
reads the biased sum the forward stored): `--variants broadcast,add,add+plain_gelu` times both GPU changes
against each other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import step_probe
from benchmarks.run import MODELS
from dlfx import config as config_lib, data, parallel
from dlfx.experiment import build
from dlfx.models import dense, transformer


def _as(x: jax.Array, dtype: Any) -> jax.Array:
    return x if dtype is None else x.astype(dtype)


def gather_positions(x: jax.Array, wpe: jax.Array, start: Any = 0, decode: bool = False,
                     dtype: Any = None) -> jax.Array:
    """Positions gathered for every token: the gradient is a scatter-add into `wpe`."""
    index = start + jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return _as(x + jnp.take(wpe, index, axis=0), dtype)


def _sliced(wpe: jax.Array, length: int, start: Any, decode: bool) -> jax.Array:
    """The rows as a slice of `wpe` (dlfx's `position_rows` gathers them on a GPU)."""
    return lax.dynamic_slice_in_dim(wpe, start, length) if decode else wpe[:length]


@jax.custom_vjp
def _add_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    return x + rows


def _add_rows_fwd(x: jax.Array, rows: jax.Array) -> tuple[jax.Array, None]:
    return x + rows, None


def _add_rows_bwd(_: None, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    ones = jnp.ones((g.shape[0],), g.dtype)
    return g, lax.dot_general(ones, g, (((0,), (0,)), ((), ())))


_add_rows.defvjp(_add_rows_fwd, _add_rows_bwd)


def dot_positions(x: jax.Array, wpe: jax.Array, start: Any = 0, decode: bool = False,
                  dtype: Any = None) -> jax.Array:
    """A broadcast add whose `wpe` gradient sums the batch axis with a matmul."""
    return _as(_add_rows(x, _sliced(wpe, x.shape[1], start, decode)), dtype)


def broadcast_positions(x: jax.Array, wpe: jax.Array, start: Any = 0, decode: bool = False,
                        dtype: Any = None) -> jax.Array:
    """The plain broadcast add (dlfx before this study): its `wpe` gradient reduces the batch axis."""
    return _as(x + _sliced(wpe, x.shape[1], start, decode), dtype)


VARIANTS = {"broadcast": broadcast_positions, "add": transformer.add_positions, "gather": gather_positions,
            "dot": dot_positions, "none": lambda x, wpe, start=0, decode=False, dtype=None: _as(x, dtype)}


def main(argv: list[str] | None = None) -> int:
    """Compile each variant, count its transposing fusions, time them in rotating windows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt124m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    spec, overrides, _ = MODELS[args.model]
    config = config_lib.load(spec, list(overrides) + ["train.epochs=0", "train.steps=1000", "train.eval_every=0"])
    runs, info = {}, {}
    original, recomputed = transformer.add_positions, dense.recomputed_gelu
    for name in args.variants.split(","):
        positions, _, gelu = name.partition("+")
        if gelu not in ("", "plain_gelu"):
            raise SystemExit(f"--variants: {name!r}: the only suffix is '+plain_gelu'")
        # both are read while the step is traced, inside compile_call
        transformer.add_positions = VARIANTS[positions]
        if gelu:
            dense.recomputed_gelu = dense.biased_gelu
        try:
            exp = build(config)
            it = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed)
            batches = [parallel.shard_batch(next(it), exp.mesh, exp.mode) for _ in range(4)]
            start = time.perf_counter()
            compiled, text = step_probe.compile_call(exp, batches, 1, None, {})
            compile_s = time.perf_counter() - start
        finally:
            transformer.add_positions, dense.recomputed_gelu = original, recomputed
        state, out = exp.init(), None
        for batch in batches[:2]:
            state, out = compiled(state, batch)
        info[name] = (compile_s, text.count("input_transpose_fusion"), text.count(" transpose("), float(out[0]))
        runs[name] = [compiled, state, batches]
    times = step_probe.rotate(runs, args.steps, args.windows)
    base = times[next(iter(runs))]
    print(f"{args.model} on {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.windows} rotating windows "
          f"of {args.steps} steps")
    print("| variant | compile s | transposing fusions | transposes | first loss | steps/s | paired ratio to first |")
    print("|---|---|---|---|---|---|---|")
    for name, (compile_s, fusions, transposes, loss) in info.items():
        print(f"| {name} | {compile_s:.1f} | {fusions} | {transposes} | {loss:.4f} | "
              f"{args.steps / statistics.median(times[name]):.2f} | {step_probe.paired_ratio(base, times[name]):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
