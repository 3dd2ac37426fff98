"""Probe one model's train step on the current device: XLA option variants against the default, then a profile.

    python -m benchmarks.step_probe --model gpt124m \
        --option triton_gemm_off:xla_gpu_enable_triton_gemm=false \
        --option cublaslt:xla_gpu_enable_cublaslt=true --profile OUT/trace

Every variant compiles the runner's own call (`exp.train_step(k, tables)`: `--steps-per-call` steps, rows
gathered inside the call when the train split lives on the device) with its own XLA compiler options
(`name:key=value;key=value`), so all of them are timed in one process on the same warm device, cycling four
batches from the runner's feed: `--windows` rounds of `--steps` steps each, the order rotating every round,
then steps/s from the median window and the median of each variant's paired ratio to the default's window of
the same round. An option the compiler does not know fails only its own variant.

`--profile DIR` traces `--profile-steps` default steps (`jax.profiler.trace`) and prints where the device
time goes: the sum of device-side events per step against the step's wall time (what is left is idle time:
launch gaps, host syncs), then the heaviest events grouped by their HLO op's name (from the compiled HLO's
metadata). DIR keeps the trace (`trace.json.gz`, Perfetto's JSON) and the compiled HLO
(`step_hlo.txt.gz`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import time
from typing import Any, Callable

import jax

from benchmarks.run import MODELS
from dlfx import config as config_lib, data, feed
from dlfx.cli import int_at_least
from dlfx.errors import DlfxError
from dlfx.experiment import build


def parse_option(text: str) -> tuple[str, dict]:
    """'name:key=value;key=value' -> (name, {key: value}); true/false become bools, digits ints."""
    name, colon, rest = text.partition(":")
    if not (name and colon and rest):
        raise ValueError(f"--option {text!r}: expected name:key=value[;key=value]")
    options = {}
    for item in filter(None, rest.split(";")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--option {text!r}: expected name:key=value[;key=value]")
        value = value.strip()
        options[key.strip()] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return name, options


def _window(step: Callable, state: Any, batches: list, calls: int) -> tuple[Any, float]:
    """Run `calls` calls; the new state and the seconds they took."""
    start = time.perf_counter()
    out = None
    for i in range(calls):
        state, out = step(state, batches[i % len(batches)])
    jax.block_until_ready(out)
    return state, time.perf_counter() - start


def compile_call(exp: Any, batches: list, per_call: int, tables: Any, options: dict) -> tuple[Callable, str]:
    """The runner's compiled call (`per_call` steps; rows gathered from `tables` when the split lives on the
    device) under XLA `options`, as `call(state, batch)`, and its compiled HLO text."""
    step = exp.train_step(per_call, tables)
    extra = () if tables is None else (tables,)
    lowered = step.lower(exp.abstract_state, batches[0], *extra)
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    return (lambda state, batch: compiled(state, batch, *extra)), compiled.as_text()


def rotate(runs: dict[str, list], calls: int, windows: int) -> dict[str, list[float]]:
    """`windows` rounds timing `calls` calls of every run (`[call, state, batches]`, its state kept up to
    date), the order rotating each round; each run's window seconds, round by round."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(windows):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call, state, batches = runs[name]
            runs[name][1], seconds = _window(call, state, batches, calls)
            times[name].append(seconds)
    return times


def paired_ratio(base: list[float], times: list[float]) -> float:
    """Median over the rounds of base window / this window: the speed-up over the base run."""
    return statistics.median(b / t for b, t in zip(base, times))


def time_variants(exp: Any, batches: list, fresh: Any, variants: dict[str, dict], calls: int, windows: int,
                  per_call: int = 1, tables: Any = None) -> list[dict]:
    """Compile each variant, then time `calls` calls of each in rotating order; one row per variant."""
    runs, rows = {}, {}
    for name, options in variants.items():
        start = time.perf_counter()
        try:
            compiled, _ = compile_call(exp, batches, per_call, tables, options)
            compile_s = time.perf_counter() - start
            state, _ = _window(compiled, jax.device_put(fresh, exp.state_sharding), batches, 2)
        except Exception as e:  # an unknown or malformed option fails this variant alone
            rows[name] = {"variant": name, "options": options, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        runs[name] = [compiled, state, batches]
        rows[name] = {"variant": name, "options": options, "compile_s": compile_s}
    if not runs:  # every variant failed: nothing to time
        return list(rows.values())
    times = rotate(runs, calls, windows)
    for name in runs:
        rows[name]["steps_per_s"] = calls * per_call / statistics.median(times[name])
        rows[name]["paired"] = paired_ratio(times[next(iter(runs))], times[name])
    return list(rows.values())


def _op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its op_name metadata, from compiled HLO text; also under the name with '.' as '_',
    as XLA:GPU names a fusion's kernel (`loop_add_fusion.3` runs as `loop_add_fusion_3`)."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', line)
        if m:
            names[m.group(1)] = names[m.group(1).replace(".", "_")] = m.group(2)
    return names


def _short(op_name: str) -> str:
    """An op_name without the jit prefix and with layer indices folded, so layers sum together."""
    op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    return re.sub(r"(h_|/)\d+(/|$)", r"\1*\2", op_name)[-110:]


def profile(exp: Any, batches: list, fresh: Any, folder: str, calls: int, top: int, per_call: int = 1,
            tables: Any = None) -> str:
    """Trace `calls` default calls into `folder`; a text report of device time per step."""
    steps = calls * per_call
    compiled, hlo = compile_call(exp, batches, per_call, tables, {})
    with gzip.open(os.path.join(folder, "step_hlo.txt.gz"), "wt") as f:
        f.write(hlo)
    names = _op_names(hlo)
    state, _ = _window(compiled, jax.device_put(fresh, exp.state_sharding), batches, 3)
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        state, wall = _window(compiled, state, batches, calls)
    found = glob.glob(os.path.join(folder, "plugins", "**", "*.trace.json.gz"), recursive=True)
    if not found:
        return f"no trace file under {folder}"
    newest = max(found, key=os.path.getmtime)  # a reused folder keeps earlier runs' traces
    shutil.copy(newest, os.path.join(folder, "trace.json.gz"))  # next to the HLO, out of the dated folders
    return device_time_table(newest, names, steps, 1e3 * wall / steps, top)


def device_time_table(trace_path: str, names: dict[str, str], steps: int, wall_ms: float, top: int) -> str:
    """Device time per step of a perfetto trace (`jax.profiler.trace`) grouped by kernel and HLO op name."""
    trace = json.load(gzip.open(trace_path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M"
               and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process.items() if "/device:" in name and "host" not in name.lower()}
    if not device_pids:  # e.g. CUPTI could not trace: host events are no device time
        return f"profile: no device events in the trace (processes: {sorted(set(process.values()))[:8]})"
    by_op, count, streams = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        # a kernel's own name first: inside a command buffer (a CUDA graph) `hlo_op` names only the buffer
        hlo = e["name"] if e["name"] in names else e.get("args", {}).get("hlo_op") or e["name"]
        key = (re.sub(r"[._]\d+$", "", e["name"])[:40], _short(names.get(hlo, hlo)))
        by_op[key] += e.get("dur", 0)
        count[key] += 1
        streams[(e.get("pid"), e.get("tid"))] += e.get("dur", 0)
    busy = max(streams.values(), default=0) / steps / 1e3
    lines = [f"profile: {steps} steps, wall {wall_ms:.2f} ms/step; busiest device stream "
             f"{busy:.2f} ms/step; device events {sum(count.values()) / steps:.0f}/step, all streams "
             f"{sum(by_op.values()) / steps / 1e3:.2f} ms/step; processes: {sorted(set(process.values()))[:8]}",
             "| ms/step | events/step | event | op |", "|---|---|---|---|"]
    for key, us in by_op.most_common(top):
        lines.append(f"| {us / steps / 1e3:.3f} | {count[key] / steps:g} | {key[0]} | {key[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time the variants, print their table, then profile if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt124m", choices=sorted(MODELS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--option", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                        help="a variant compiled with these XLA options (repeatable)")
    parser.add_argument("--steps", type=int_at_least(1), default=10, help="steps per timed window")
    parser.add_argument("--steps-per-call", type=int_at_least(1), default=1,
                        help="steps per compiled call (the runner's multi-step calls: lax.scan over stacked batches)")
    parser.add_argument("--windows", type=int_at_least(1), default=5, help="rounds; each times every variant once")
    parser.add_argument("--profile", default=None, metavar="DIR", help="trace the default step into DIR")
    parser.add_argument("--profile-steps", type=int_at_least(1), default=3)
    parser.add_argument("--top", type=int, default=40, help="rows of the profile table")
    args = parser.parse_args(argv)
    try:
        variants = [parse_option(o) for o in args.option]
    except ValueError as e:
        parser.error(str(e))
    spec, overrides, _ = MODELS[args.model]
    try:
        config = config_lib.load(spec, list(overrides) + list(args.set) + ["train.epochs=0", "train.steps=1000",
                                                                             "train.eval_every=0"])
        exp = build(config)
    except DlfxError as e:
        print(f"benchmarks.step_probe: {e}", file=sys.stderr)
        return 2
    k = args.steps_per_call
    # the runner's own call and feed: a split that lives on the device is gathered inside the call from row
    # indices; four placed batches (stacks of k for multi-step calls) are cycled
    tables = data.resident.place(exp.dataset.train, exp.mesh) if exp.resident else None
    prefetcher = feed.device_prefetcher(exp, exp.train_iterator(), group=(lambda position: k) if k > 1 else None)
    batches = [next(prefetcher) for _ in range(4)]
    prefetcher.close()
    calls = max(1, args.steps // k)
    fresh = jax.device_get(exp.init())
    if any(name == "default" for name, _ in variants):
        raise SystemExit("--option: 'default' names the variant without options; choose another name")
    rows = time_variants(exp, batches, fresh, dict([("default", {})] + variants), calls, args.windows, k, tables)
    print(f"{args.model} on {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.windows} rotating windows "
          f"of {calls * k} steps, {k} per call" + (", rows gathered on the device" if tables is not None else "")
          + (f"; overrides {' '.join(args.set)}" if args.set else ""))
    base = next((r["variant"] for r in rows if "error" not in r), "-")
    print(f"| variant | options | compile s | steps/s | paired ratio to {base} |\n|---|---|---|---|---|")
    for r in rows:
        opts = "; ".join(f"{key}={value}" for key, value in r["options"].items()) or "-"
        if "error" in r:
            print(f"| {r['variant']} | {opts} | failed: {r['error']} | | |")
        else:
            print(f"| {r['variant']} | {opts} | {r['compile_s']:.1f} | {r['steps_per_s']:.2f} | {r['paired']:.3f} |")
    sys.stdout.flush()
    if all("error" in r for r in rows):
        return 1
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        print(profile(exp, batches, fresh, args.profile, max(1, args.profile_steps // k), args.top, k, tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
