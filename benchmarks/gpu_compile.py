"""What XLA:GPU makes of a model's train step, compiled on a machine without a GPU (deviceless AOT).

    python -m benchmarks.gpu_compile [--model gpt124m] [--card h200] [--set KEY=VALUE] [--hlo FILE] [--top 25]
                                     [--steps-per-call N] [--on-device]   # the runner's call as a run makes it

Needs JAX's CUDA plugin at the installed jax's version (`pip install "jax[cuda13]==<jax version>"`); no GPU,
no driver. The step is the runner's (`Experiment.train_step`, with dlfx's GPU code paths, as on a GPU), compiled
for the card's description without autotuning: fusion and layout decisions are XLA:GPU's own, the GEMM
kernels are not the ones a card picks after autotuning. Prints the kernels of one step by kind with the bytes
they read and write (their time at the card's memory bandwidth is a lower bound), the transposing kernels
(a layout XLA could not keep: before its layout fix the gpt124m step had 175 here, as many as an H200's
profile showed), and the memory-bound kernels grouped by the model op they come from, layers merged.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Any

from benchmarks.run import MODELS
from dlfx.cli import int_at_least

CARDS = {  # XLA's GpuTargetConfig fields of the cards dlfx was measured on (cuDNN and CUDA of the GPU image)
    "h100": {"core_count": 132, "memory_bandwidth": 3352320000000, "device_memory_size": 84929347584,
             "description": "NVIDIA H100 80GB HBM3"},
    "h200": {"core_count": 132, "memory_bandwidth": 4800000000000, "device_memory_size": 150754820096,
             "description": "NVIDIA H200"},
}
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
        "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
         "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
ARRAY = re.compile(r"\b(" + "|".join(BYTES) + r")\[([\d,]*)\]")
# an H200's bare step time / kernels per step (2026-11-27): MLP 41 kernels 2.9 us, digits CNN 77 and char-GPT
# 392-446 3.5-3.9 us; their bandwidth floors were a fraction of that (char-GPT 0.38 of 1.55 ms)
KERNEL_US = (3, 4)
KINDS = ("GEMM", "convolution", "attention", "transposing", "other memory-bound", "collective")


@dataclasses.dataclass
class Instruction:
    """One HLO instruction: its name, result shape text, opcode, operand names and the rest of its line."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


def target_config(card: str) -> str:
    """The text of XLA's GpuTargetConfig proto for `card` (Hopper: compute capability 9.0)."""
    c = CARDS[card]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {c['core_count']} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {c['memory_bandwidth']} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {c['device_memory_size']} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 19 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{c['description']}"
"""


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def parse_module(text: str) -> dict[str, list[Instruction]]:
    """Computation name -> its instructions, from an HLO module's text; the entry computation is 'ENTRY'."""
    computations: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        header = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault("ENTRY" if header.group(1) else header.group(2), [])
            continue
        found = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = ", line)
        if current is None or not found:
            continue
        rest = line[found.end():]
        end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        opcode = re.match(r"([\w\-]+)\(", rest)
        if not opcode:
            continue
        close = _balanced(rest, opcode.end() - 1)
        operands = re.findall(r"%([\w.\-]+)", rest[opcode.end():close - 1])
        current.append(Instruction(found.group(1), shape, opcode.group(1), operands, rest[close:]))
    return computations


def launched(computations: dict[str, list[Instruction]]) -> list[str]:
    """The computations whose instructions run as kernels: the entry, and the bodies of its loops,
    conditionals and calls (not fused computations, which are parts of one kernel)."""
    order, todo = [], ["ENTRY"]
    while todo:
        name = todo.pop()
        if name in order or name not in computations:
            continue
        order.append(name)
        for instruction in computations[name]:
            if instruction.opcode in ("while", "conditional", "call"):
                todo += re.findall(r"(?:body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)",
                                   instruction.attrs)
                branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.attrs)
                todo += re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
    return order


def _array_bytes(arrays: list[tuple[str, str]]) -> int:
    return sum(BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in arrays)


def shape_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape (a tuple's elements summed)."""
    return _array_bytes(ARRAY.findall(shape))


def output_bytes(instruction: Instruction) -> int:
    """Bytes a kernel writes: its result, less the scratch buffer that library calls (cuBLAS, cuDNN) return as
    the last element of a tuple (a 1-D u8 or s8 array), which is not data."""
    arrays = ARRAY.findall(instruction.shape)
    library = instruction.opcode == "custom-call" or '"kind":"__cudnn$fusion"' in instruction.attrs
    if library and instruction.shape.startswith("(") and len(arrays) > 1 and arrays[-1][0] in ("u8", "s8") \
            and "," not in arrays[-1][1]:
        arrays = arrays[:-1]
    return _array_bytes(arrays)


def _first(pattern: str, text: str, default: str = "") -> str:
    """The first group (or the whole match, without groups) of `pattern` in `text`, else `default`."""
    found = re.search(pattern, text)
    return default if found is None else found.group(1 if found.re.groups else 0)


def _layout(shape: str) -> str:
    return _first(r"\{[\d,]*\}", shape)


def kind(instruction: Instruction, operand_shapes: list[str] = ()) -> str | None:
    """The kernel kind of a launched instruction (`KINDS`), or None for one that launches nothing (a copy
    counts as transposing only when it changes the layout of its operand, `operand_shapes[0]`)."""
    op, attrs = instruction.opcode, instruction.attrs
    if op in FREE or op.endswith("-done"):  # an async op's work is counted at its start
        return None
    if op == "custom-call":
        target = _first(r'custom_call_target="([^"]+)"', attrs)
        if "fmha" in target or "flash" in target:
            return "attention"
        if "conv" in target:
            return "convolution"
        return "GEMM" if re.search(r"gemm|matmul|cublas", target) else "other memory-bound"
    if op == "fusion" and re.search(r'"kind":"__(triton_gemm|triton_nested_gemm_fusion|cudnn\$fusion|cublas)', attrs):
        return "GEMM"
    if op == "copy":
        same = operand_shapes and _layout(operand_shapes[0]) == _layout(instruction.shape)
        return "other memory-bound" if same else "transposing"
    if op == "transpose" or (op == "fusion" and "transpose" in _first(r"calls=%([\w.\-]+)", attrs)):
        return "transposing"
    if op.startswith(COLLECTIVES):
        return "collective"
    return "other memory-bound"


def op_group(instruction: Instruction) -> str:
    """The model op a kernel comes from, layers merged (`h_3` -> `h_*`), from its `op_name` metadata."""
    name = _first(r'op_name="([^"]+)"', instruction.attrs, instruction.opcode)
    name = re.sub(r"^jit\([^)]*\)/", "", name)
    return re.sub(r"_\d+(?=/|$)", "_*", name)


def kernels(text: str) -> list[tuple[str, str, int]]:
    """(kind, model op, bytes read and written, library workspaces left out) of every kernel in the compiled
    module: a loop's body and each branch of a conditional counted once."""
    computations = parse_module(text)
    rows = []
    for name in launched(computations):
        shapes = {i.name: i.shape for i in computations[name]}
        for instruction in computations[name]:
            operand_shapes = [shapes.get(o, "") for o in instruction.operands]
            k = kind(instruction, operand_shapes)
            if k is not None:
                moved = output_bytes(instruction) + sum(shape_bytes(shape) for shape in operand_shapes)
                rows.append((k, op_group(instruction), moved))
    return rows


def tables(rows: list[tuple[str, str, int]], bandwidth: float, top: int) -> str:
    """Markdown: kernels by kind, then the memory-bound kernels' `top` model ops by bytes."""
    per_kind: dict[str, list[int]] = {k: [0, 0] for k in KINDS}
    per_op: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for k, op, moved in rows:
        per_kind[k][0] += 1
        per_kind[k][1] += moved
        if k in ("transposing", "other memory-bound"):
            per_op[op][0] += 1
            per_op[op][1] += moved
    ms = 1e3 / bandwidth
    out = [f"| kernels (loop bodies once) | count | MB read + written | ms at {bandwidth / 1e12:.2f} TB/s |",
           "|---|---|---|---|"]
    out += [f"| {k} | {n} | {b / 1e6:,.0f} | {b * ms:.2f} |" for k, (n, b) in per_kind.items()]
    out += [f"| all | {len(rows)} | {sum(r[2] for r in rows) / 1e6:,.0f} | {sum(r[2] for r in rows) * ms:.2f} |", "",
            "| memory-bound kernels by model op (layers merged) | count | MB | ms |", "|---|---|---|---|"]
    ranked = sorted(per_op.items(), key=lambda item: -item[1][1])[:top]
    out += [f"| `{op}` | {n} | {b / 1e6:,.0f} | {b * ms:.2f} |" for op, (n, b) in ranked]
    return "\n".join(out)


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (CUDA 13 or 12) can be imported."""
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12))
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def call_arguments(exp: Any, steps_per_call: int = 1) -> tuple:
    """Abstract arguments of the runner's train call of `exp` as one device's run passes them: whole batches
    (stacked per call for `steps_per_call > 1`), or, for a split kept on the device (`exp.resident`), a placed
    chunk of row indices with the call's slot, and the split itself."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from dlfx import data, feed

    size, stack = exp.config.data.batch_size, (steps_per_call,) if steps_per_call > 1 else ()
    if not exp.resident:
        spec = data.access.element_spec(exp.dataset.train)
        return (exp.abstract_state,
                {k: jax.ShapeDtypeStruct((*stack, size, *shape), dtype) for k, (shape, dtype) in spec.items()})
    whole = NamedSharding(exp.mesh, PartitionSpec())
    tables = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=whole)
              for k, v in data.resident.split_arrays(exp.dataset.train).items()}
    chunk = (feed.CALL_CHUNK, *stack) if stack else (feed.transfer_chunk(exp),)
    batch = {data.resident.INDEX_KEY: jax.ShapeDtypeStruct((*chunk, size), np.int32),
             data.resident.SLOT_KEY: jax.ShapeDtypeStruct((1, 1) if stack else (1,), np.int32)}
    return exp.abstract_state, batch, tables


def compile_step(config: Any, card: str, steps_per_call: int = 1) -> str:
    """The runner's train call of `config` (`steps_per_call` steps; the train split gathered on the device where
    `config.data.on_device` keeps it there) compiled for `card` without a GPU: the optimized HLO text."""
    import jax
    from jax.experimental import topologies

    from dlfx.experiment import build

    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(card), topology="1x1x1")
    exp = build(config, devices=topology.devices)
    args = call_arguments(exp, steps_per_call)
    backend = jax.default_backend
    jax.default_backend = lambda: "gpu"  # dlfx picks its GPU code paths (cuDNN attention, ...) while tracing
    try:
        step = exp.train_step(steps_per_call, args[2] if exp.resident else None)
        lowered = step.lower(*args)
    finally:
        jax.default_backend = backend
    return lowered.compile().as_text()


def main(argv: list[str] | None = None) -> int:
    """Compile the step for the card and print its kernel tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt124m", choices=sorted(MODELS), help="a benchmarks.run model")
    parser.add_argument("--card", default="h200", choices=sorted(CARDS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps-per-call", type=int_at_least(1), default=1, help="steps in one compiled call (lax.scan)")
    parser.add_argument("--on-device", action="store_true",
                        help="the runner's call with the train split kept on the device, its rows gathered inside "
                             "(data.on_device=on); else whole batches")
    parser.add_argument("--hlo", default=None, metavar="FILE", help="also write the compiled HLO text here")
    parser.add_argument("--top", type=int_at_least(1), default=25, help="rows of the by-op table")
    args = parser.parse_args(argv)
    if not cuda_plugin_installed():
        print("benchmarks.gpu_compile: needs JAX's CUDA plugin (pip install \"jax[cuda13]==<the installed jax "
              "version>\"); it compiles for the GPU without one", file=sys.stderr)
        return 2
    import jax

    from dlfx import config as config_lib
    from dlfx.errors import DlfxError

    # CUDA without a device: the plugin registers (no version checks against a driver), the CPU stays the default
    os.environ.update(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", CUDA_VISIBLE_DEVICES="-1")
    jax.config.update("jax_platforms", "cpu,cuda")
    spec, overrides, _ = MODELS[args.model]
    start = time.perf_counter()
    on_device = "data.on_device=" + ("on" if args.on_device else "off")
    try:
        config = config_lib.load(spec, list(overrides) + [on_device] + list(args.set))
        text = compile_step(config, args.card, args.steps_per_call)
    except DlfxError as e:
        print(f"benchmarks.gpu_compile: {e}", file=sys.stderr)
        return 2
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    call = f"{args.steps_per_call}-step call" if args.steps_per_call > 1 else "train step"
    where = ", rows gathered on the device" if args.on_device else ""
    print(f"{args.model} {call}{where} for an {CARDS[args.card]['description']} (deviceless, no autotuning), "
          f"compiled in {time.perf_counter() - start:.1f} s\n")
    rows = kernels(text)
    print(tables(rows, CARDS[args.card]["memory_bandwidth"], args.top))
    low, high = (len(rows) * us / 1e3 for us in KERNEL_US)
    print(f"\nKernel floor: {len(rows)} kernels at {KERNEL_US[0]}-{KERNEL_US[1]} us each = {low:.2f}-{high:.2f} ms a step "
          "(small models' cost per kernel on an H200: where this is above the bandwidth floor, kernel count bounds the step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
