"""Probe one model's train step on the current device: XLA option variants against the default, then a profile.

    python -m benchmarks.step_probe --model gpt124m \
        --option triton_gemm_off:xla_gpu_enable_triton_gemm=false \
        --option cublaslt:xla_gpu_enable_cublaslt=true --profile OUT/trace

Every variant compiles the same dlfx step (`exp.train_step()`) with its own XLA compiler options, so all of
them are timed in one process on the same warm device: `--windows` rounds of `--steps` steps each, the order
rotating every round, then steps/s from the median window and the median of each variant's paired ratio to
the default's window of the same round. An option the compiler does not know fails only its own variant.

`--profile DIR` traces `--profile-steps` default steps (`jax.profiler.trace`) and prints where the device
time goes: the sum of device-side events per step against the step's wall time (what is left is idle time:
launch gaps, host syncs), then the heaviest events grouped by their HLO op's name (from the compiled HLO's
metadata). DIR keeps the trace (`trace.json.gz`, for https://ui.perfetto.dev) and the compiled HLO
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

import jax
import numpy as np

from benchmarks.run import MODELS
from dlfx import config as config_lib, data, parallel
from dlfx.experiment import build


def parse_option(text: str) -> tuple[str, dict]:
    """'name:key=value;key=value' -> (name, {key: value}); true/false become bools, digits ints (a value may
    hold commas: XLA's list-valued options)."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--option {text!r}: expected name:key=value[;key=value]")
        value = value.strip()
        options[key.strip()] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return name, options


def _window(step, state, batches, calls: int):
    """Run `calls` calls; the new state and the seconds they took."""
    start = time.perf_counter()
    out = None
    for i in range(calls):
        state, out = step(state, batches[i % len(batches)])
    jax.block_until_ready(out)
    return state, time.perf_counter() - start


def time_variants(exp, batches: list, fresh, variants: dict[str, dict], calls: int, windows: int,
                  per_call: int = 1) -> list[dict]:
    """Compile each variant (`per_call` steps a call), then time them in rotating order; one row per variant
    (errors included)."""
    step = exp.train_step(per_call)
    lowered = step.lower(exp.abstract_state, batches[0])
    runs, rows = {}, {}
    for name, options in variants.items():
        start = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
            state, _ = _window(compiled, jax.device_put(fresh, exp.state_sharding), batches, 2)
        except Exception as e:  # an unknown or malformed option fails this variant alone
            rows[name] = {"variant": name, "options": options, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        runs[name] = [compiled, state, []]
        rows[name] = {"variant": name, "options": options, "compile_s": time.perf_counter() - start}
    names = list(runs)
    for r in range(windows):
        for name in names[r % len(names):] + names[:r % len(names)]:
            compiled, state, times = runs[name]
            runs[name][1], seconds = _window(compiled, state, batches, calls)
            times.append(seconds)
    base = runs[names[0]][2] if names else []
    for name in names:
        times = runs[name][2]
        rows[name]["steps_per_s"] = calls * per_call / statistics.median(times)
        rows[name]["paired"] = statistics.median(b / t for b, t in zip(base, times))
    return list(rows.values())


def _op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its op_name metadata, from compiled HLO text."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def _short(op_name: str) -> str:
    """An op_name without the jit prefix and with layer indices folded, so layers sum together."""
    op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    return re.sub(r"(h_|/)\d+(/|$)", r"\1*\2", op_name)[-110:]


def profile(exp, batches: list, fresh, folder: str, calls: int, top: int, per_call: int = 1) -> str:
    """Trace `calls` default calls into `folder`; a text report of device time per step."""
    step = exp.train_step(per_call)
    steps = calls * per_call
    compiled = step.lower(exp.abstract_state, batches[0]).compile()
    with gzip.open(os.path.join(folder, "step_hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
    names = _op_names(compiled.as_text())
    state, _ = _window(compiled, jax.device_put(fresh, exp.state_sharding), batches, 3)
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        state, wall = _window(compiled, state, batches, calls)
    found = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        return f"no trace file under {folder}"
    shutil.copy(found[0], os.path.join(folder, "trace.json.gz"))  # next to the HLO, out of the dated folders
    trace = json.load(gzip.open(found[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M"
               and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process.items() if "/device:" in name and "host" not in name.lower()}
    by_op, count, streams = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (device_pids and e.get("pid") not in device_pids) or e["name"].startswith("$"):
            continue
        args = e.get("args", {})
        hlo = args.get("hlo_op") or e["name"]
        key = (re.sub(r"[._]\d+$", "", e["name"])[:40], _short(names.get(hlo, hlo)))
        by_op[key] += e.get("dur", 0)
        count[key] += 1
        streams[(e.get("pid"), e.get("tid"))] += e.get("dur", 0)
    busy = max(streams.values(), default=0) / steps / 1e3
    lines = [f"profile: {steps} steps, wall {1e3 * wall / steps:.2f} ms/step; busiest device stream "
             f"{busy:.2f} ms/step; device events {sum(count.values()) / steps:.0f}/step, all streams "
             f"{sum(by_op.values()) / steps / 1e3:.2f} ms/step; processes: {sorted(set(process.values()))[:8]}",
             "| ms/step | events/step | event | op |", "|---|---|---|---|"]
    for key, us in by_op.most_common(top):
        lines.append(f"| {us / steps / 1e3:.3f} | {count[key] / steps:.0f} | {key[0]} | {key[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time the variants, print their table, then profile if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt124m", help=f"of {','.join(MODELS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--option", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                        help="a variant compiled with these XLA options (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--steps-per-call", type=int, default=1,
                        help="steps per compiled call (the runner's multi-step calls: lax.scan over stacked batches)")
    parser.add_argument("--windows", type=int, default=5, help="rounds; each times every variant once")
    parser.add_argument("--profile", default=None, metavar="DIR", help="trace the default step into DIR")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=40, help="rows of the profile table")
    args = parser.parse_args(argv)
    spec, overrides, _ = MODELS[args.model]
    config = config_lib.load(spec, list(overrides) + list(args.set) + ["train.epochs=0", "train.steps=1000",
                                                                         "train.eval_every=0"])
    exp = build(config)
    it = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed)
    k = args.steps_per_call
    if k > 1:  # stacks of k batches, as the runner's multi-step calls take them
        groups = [[next(it) for _ in range(k)] for _ in range(2)]
        batches = [parallel.shard_batch({key: np.stack([b[key] for b in g]) for key in g[0]}, exp.mesh, exp.mode,
                                        stacked=True) for g in groups]
    else:
        batches = [parallel.shard_batch(next(it), exp.mesh, exp.mode) for _ in range(4)]
    calls = max(1, args.steps // k)
    fresh = jax.device_get(exp.init())
    variants = dict([("default", {})] + [parse_option(o) for o in args.option])
    rows = time_variants(exp, batches, fresh, variants, calls, args.windows, k)
    print(f"{args.model} on {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.windows} rotating windows "
          f"of {calls * k} steps, {k} per call" + (f"; overrides {' '.join(args.set)}" if args.set else ""))
    print("| variant | options | compile s | steps/s | paired ratio to default |\n|---|---|---|---|---|")
    for r in rows:
        opts = "; ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        if "error" in r:
            print(f"| {r['variant']} | {opts} | failed: {r['error']} | | |")
        else:
            print(f"| {r['variant']} | {opts} | {r['compile_s']:.1f} | {r['steps_per_s']:.2f} | {r['paired']:.3f} |")
    sys.stdout.flush()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        print(profile(exp, batches, fresh, args.profile, max(1, args.profile_steps // k), args.top, k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
