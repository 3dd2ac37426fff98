"""Speed harness: dlfx runner and bare step against a hand-written JAX loop, with FLOP/s and MFU.

    python -m benchmarks.run [--models mlp,cnn,resnet18,lstm,gpt] [--out benchmarks/RESULTS.md]
                             [--peak-tflops 989]   # e.g. an H100/H200's dense bf16 peak; gpt124m on a GPU
    python -m benchmarks.run --pipeline-only --repeats 15 --models mlp,cnn,...   # the pipeline column alone

Per model, after warm-up, with the median of interleaved repeats:
  compile   first call of the bare dlfx step (trace + compile + run)
  runner    steps/s of `dlfx.runner.train` at the config's defaults (grain pipeline, device prefetch,
            train.steps_per_call (the column: what the runner used, auto included), logging, checkpoints at
            the config's cadence), steady state between
            its first and last log point
  bare      steps/s of the dlfx train step (one step per call) on device-resident batches
  baseline  steps/s of benchmarks/baseline.py (plain jax.jit step, same model/optimizer/batch)
  overhead  runner / baseline: each runner run is paired with a baseline timing of as many steps right
            after it; the median of the paired ratios, [min-max] over the pairs. Windows: timed loops
            run >= 0.5 s, the runner >= 3 s of steady state (more steps than --steps/--runner-steps for
            fast models). Where that window holds checkpoint saves, "saves only at the end" repeats the
            pairs with train.checkpoint_every=0, separating the loop's overhead from the saves' cost
  step ratio  bare / baseline
  pipeline  the runner's call fed by the runner's device feed (grain + device prefetch; for a split kept on
            the devices, `data.on_device`, row indices gathered inside the call) / the same call cycling over
            device-resident batches (interleaved repeats, the order alternating): the ratio of the median
            windows, and of the fastest windows (the least disturbed by the rest of the machine);
            --pipeline-only adds the median of the paired ratios (each fed window against the on-device
            window beside it, so a machine whose speed drifts over the minute cancels out)
  save ms   one Orbax checkpoint save of the state: how long it blocks the loop / until committed
  FLOP/s    XLA cost analysis of the compiled step x bare steps/s (for GPT models the analytic
            6N + 12*L*D*T FLOPs per token: XLA does not count library GEMMs on a GPU); MFU against
            --peak-tflops, or else a measured f32 matmul peak
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import baseline
from dlfx import config as config_lib, data, feed, parallel, runner, tasks
from dlfx.checkpoint import Checkpointer
from dlfx.cli import int_at_least
from dlfx.errors import DlfxError
from dlfx.experiment import build

MIN_WINDOW_S = 0.5  # shortest timed window of the bare step, the baseline and the pipeline loops
RUNNER_WINDOW_S = 3.0  # shortest steady-state window of a runner run

# name -> (config spec, overrides, examples-or-tokens per example)
MODELS = {
    "mlp": ("configs/digits_mlp.py", [], 1),
    "cnn": ("configs/digits_cnn.py", [], 1),
    "resnet18": ("configs/digits_resnet.py", ["data.name=synthetic", "data.shape=(32, 32, 3)", "data.num_train=2048",
                                              "data.num_test=256", "data.batch_size=32", "data.crop_padding=0",
                                              "model.width=64"], 1),
    "lstm": ("configs/char_lstm.py", [], "seq"),
    "gpt": ("configs/char_gpt.py", [], "seq"),
    "gpt124m": ("configs/gpt2_124m.py", [], "seq"),  # accelerators only: minutes per step on a laptop CPU
    "vit": ("configs/digits_vit.py", [], 1),
    "mnist1d": ("configs/mnist1d.py", [], 1),
    "vae": ("configs/digits_vae.py", [], 1),  # tasks without a baseline: runner, bare and pipeline only
    "sines": ("configs/sines.py", [], 1),
}
DEFAULT_MODELS = ("mlp", "cnn", "resnet18", "lstm", "gpt")


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """Best float32 FLOP/s of a square matmul on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def dlfx_stepper(exp, placed: list, num_steps: int = 1, state=None, tables=None) -> Callable[[int], None]:
    """`run(n)`: n calls of the experiment's compiled train step (`num_steps` steps each) over `placed`,
    a list of device-resident batches or an iterator of them, from `state` (default: a fresh one);
    with `tables` (a device-resident split) the batches are row indices."""
    step, state = exp.train_step(num_steps, tables), (exp.init() if state is None else state)

    def run(n: int) -> None:
        nonlocal state
        out = None
        for i in range(n):
            state, out = step(state, placed[i % len(placed)] if isinstance(placed, list) else next(placed))
        jax.block_until_ready(out)

    return run


def save_cost(state) -> tuple[float, float]:
    """Milliseconds one checkpoint save of `state` blocks the loop, and until it is committed."""
    with tempfile.TemporaryDirectory() as folder:
        checkpointer = Checkpointer(os.path.join(folder, "checkpoints"))
        blocking, committed = [], []
        for step in range(1, 4):
            start = time.perf_counter()
            checkpointer.save(step, state)
            blocking.append(time.perf_counter() - start)
            checkpointer.wait()
            committed.append(time.perf_counter() - start)
        checkpointer.close()
    return 1e3 * statistics.median(blocking), 1e3 * statistics.median(committed)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_model(name: str, steps_per_repeat: int, repeats: int, runner_steps: int, peak: float,
                runner_repeats: int = 1, extra: tuple[str, ...] = ()) -> dict:
    """Measure one model (its config with the `extra` overrides); see the module docstring."""
    spec, overrides, unit = MODELS[name]
    overrides = list(overrides) + list(extra)
    config = config_lib.load(spec, overrides + ["train.epochs=0", f"train.steps={runner_steps}",
                                                "train.eval_every=0", "optimizer.warmup_steps=1"])
    exp = build(config)
    per_example = exp.dataset.example_shape[0] if unit == "seq" else 1
    it = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed)
    host_batches = [next(it) for _ in range(4)]

    fresh = jax.device_get(exp.init())  # host copy: the dlfx step donates its input state
    flops = _step_flops(exp, parallel.shard_batch(host_batches[0], exp.mesh, exp.mode), config)

    # bare dlfx step on device-resident batches
    placed = [parallel.shard_batch(b, exp.mesh, exp.mode) for b in host_batches]
    run_dlfx = dlfx_stepper(exp, placed)
    compile_s = _timed(run_dlfx, 1)  # the first call traces and compiles

    # hand-written baseline, same model / optimizer / batches (plain arrays on the default device); it
    # trains with cross-entropy, so other tasks (autoencoder, regression) get no baseline columns
    has_baseline = isinstance(exp.task, (tasks.Classification, tasks.LanguageModel))
    plain_model = exp.model.clone(axis_name=None) if hasattr(exp.model, "axis_name") else exp.model
    base_step = baseline.make_baseline_step(plain_model, exp.tx)  # one device, no collectives
    base_batches = [jax.device_put({k: v for k, v in b.items()}) for b in host_batches]
    params, batch_stats, opt_state = fresh.params, fresh.batch_stats, fresh.opt_state
    rng = jax.random.PRNGKey(0)
    if has_baseline:
        params, batch_stats, opt_state = baseline.run(base_step, params, batch_stats, opt_state, base_batches, 2,
                                                      rng)

    def run_base(n):
        nonlocal params, batch_stats, opt_state
        if not has_baseline:
            time.sleep(1e-3)  # keeps the table's arithmetic; its baseline columns are blanked
            return
        params, batch_stats, opt_state = baseline.run(base_step, params, batch_stats, opt_state, base_batches, n, rng)

    # timed windows of at least MIN_WINDOW_S, and a runner window of at least RUNNER_WINDOW_S: a 20-step
    # window of a 1 ms step is shorter than this VM's speed swings
    per_step = _timed(run_dlfx, 3) / 3
    steps_per_repeat = max(steps_per_repeat, math.ceil(MIN_WINDOW_S / per_step))
    log_every = config.train.log_every
    runner_steps = max(runner_steps, log_every * (math.ceil(RUNNER_WINDOW_S / per_step / log_every) + 1))
    config = config_lib.load(spec, overrides + ["train.epochs=0", f"train.steps={runner_steps}",
                                                "train.eval_every=0", "optimizer.warmup_steps=1"])
    base_times, dlfx_times = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        base_times.append(_timed(run_base, steps_per_repeat))
        dlfx_times.append(_timed(run_dlfx, steps_per_repeat))
    base_rate = steps_per_repeat / statistics.median(base_times)
    bare_rate = steps_per_repeat / statistics.median(dlfx_times)

    # the full runner, in a throwaway workdir, `runner_repeats` times, each paired with a baseline timing
    # taken right after it: the overhead is the median of the paired ratios (this machine drifts)
    # When the window holds checkpoint saves, the same pairs are also taken with saves only at the end,
    # which separates the loop's own overhead from the cost of the saves.
    no_saves = config.copy_and_resolve_references()
    with no_saves.unlocked():
        no_saves.train.checkpoint_every = 0
    window_saves = config.train.checkpoint_every and runner_steps > config.train.checkpoint_every
    runner_rates, paired, paired_no_saves, runner_calls = [], [], [], []
    base_steps = max(steps_per_repeat, runner_steps - config.train.log_every)  # as long as the runner's window
    for _ in range(runner_repeats):
        for run_config, ratios in [(config, paired)] + ([(no_saves, paired_no_saves)] if window_saves else []):
            with tempfile.TemporaryDirectory() as workdir:
                summary = runner.train(run_config, os.path.join(workdir, "run"))
            rate = summary["steps_per_sec"] or float("nan")
            if ratios is paired:
                runner_rates.append(rate)
                runner_calls.append(summary.get("steps_per_call", 1))
            ratios.append(rate / (base_steps / _timed(run_base, base_steps)))
    runner_rate = statistics.median(runner_rates)

    pipeline, pipeline_best, _ = pipeline_ratio(exp, fresh, it, placed, steps_per_repeat, repeats)
    save_ms = save_cost(jax.device_put(fresh, exp.state_sharding))
    examples = config.data.batch_size * per_example
    return {
        "model": name, "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params)),
        "batch": config.data.batch_size, "unit": "tokens" if unit == "seq" else "examples",
        "compile_s": compile_s, "runner": runner_rate, "bare": bare_rate, "baseline": base_rate,
        "overhead": statistics.median(paired), "step_ratio": bare_rate / base_rate, "pipeline": pipeline,
        "pipeline_best": pipeline_best,
        "steps_per_call": "/".join(str(c) for c in sorted(set(runner_calls))), "save_ms": save_ms, "runner_steps": runner_steps,
        "overhead_no_saves": statistics.median(paired_no_saves) if paired_no_saves else None, "runner_min": min(paired), "runner_max": max(paired),
        "per_s": runner_rate * examples, "flops": flops, "tflops": flops * bare_rate / 1e12,
        "mfu": flops * bare_rate / peak, "has_baseline": has_baseline,
    }


def pipeline_ratio(exp, fresh, it, placed: list, steps_per_repeat: int, repeats: int) -> tuple[float, float, dict]:
    """The runner's call (train.steps_per_call steps) fed by the real pipeline (the runner's device feed) against
    the same call cycling over the device-resident batches `placed` (a multi-step call stacks fresh ones
    from `it`), in `repeats` interleaved windows: (ratio of the median windows, ratio of the fastest
    windows, a description of the feed). The fastest windows are the ones least disturbed by the rest of
    the machine, on a VM whose speed moves by several % between windows."""
    k = max(exp.config.train.steps_per_call, 1)  # auto (0) is one step per call until the runner has timed it
    mesh, mode = exp.mesh, exp.mode
    # (a device-resident split: the runner's feed is row indices, gathered inside the call)
    tables = data.resident.place(exp.dataset.train, mesh) if exp.resident else None
    prefetcher = feed.device_prefetcher(exp, exp.train_iterator(), group=(lambda position: k) if k > 1 else None)
    if k > 1:
        group = [next(it) for _ in range(k)]
        placed = [parallel.shard_batch({key: np.stack([b[key] for b in group]) for key in group[0]}, mesh, mode,
                                       stacked=True)]
    fed = dlfx_stepper(exp, prefetcher, k, jax.device_put(fresh, exp.state_sharding), tables)
    on_device = dlfx_stepper(exp, placed, k, jax.device_put(fresh, exp.state_sharding))
    calls = max(1, steps_per_repeat // k)
    fed(1), on_device(1)
    fed_times, resident_times = [], []
    for i in range(repeats):  # the order alternates, so a machine that drifts favours neither side
        if i % 2:
            resident_times.append(_timed(on_device, calls))
        fed_times.append(_timed(fed, calls))
        if not i % 2:
            resident_times.append(_timed(on_device, calls))
    how = {"feed": ("row indices" if exp.resident else "batches") + (" inline" if not prefetcher._threaded else ", thread")
           + (f", {feed.transfer_chunk(exp)} per transfer" if k == 1 else ""),
           "fed": calls * k / statistics.median(fed_times), "on_device": calls * k / statistics.median(resident_times)}
    prefetcher.close()
    how["pipeline_paired"] = statistics.median(r / f for r, f in zip(resident_times, fed_times))
    return (statistics.median(resident_times) / statistics.median(fed_times), min(resident_times) / min(fed_times),
            how)


def bench_pipeline(name: str, repeats: int, extra: tuple[str, ...] = ()) -> dict:
    """Only the pipeline ratio of one model (`--pipeline-only`), with timed windows of `MIN_WINDOW_S`."""
    spec, overrides, _ = MODELS[name]
    config = config_lib.load(spec, list(overrides) + list(extra) + ["train.epochs=0", "train.steps=1000000",
                                                                     "train.eval_every=0"])
    exp = build(config)
    it = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed)
    placed = [parallel.shard_batch(next(it), exp.mesh, exp.mode) for _ in range(4)]
    fresh = jax.device_get(exp.init())
    run_dlfx = dlfx_stepper(exp, placed)
    run_dlfx(1)
    steps = math.ceil(MIN_WINDOW_S / (_timed(run_dlfx, 3) / 3))
    median, best, how = pipeline_ratio(exp, fresh, it, placed, steps, repeats)
    return {"model": name, "steps_per_call": max(config.train.steps_per_call, 1), "pipeline": median,
            "pipeline_best": best, **how}


def pipeline_table(rows: list[dict]) -> str:
    """Markdown table of `--pipeline-only` measurements."""
    lines = ["| model | steps/call | feed | on-device steps/s | fed steps/s | pipeline (median windows) | "
             "pipeline (fastest windows) | pipeline (median of paired windows) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps_per_call']} | {r['feed']} | {r['on_device']:.1f} | {r['fed']:.1f} | "
                     f"{r['pipeline']:.3f} | {r['pipeline_best']:.3f} | {r['pipeline_paired']:.3f} |")
    return "\n".join(lines)


def _step_flops(exp, batch, config) -> float:
    """FLOPs of one train step: analytic for a GPT, else XLA's cost analysis (lax.scan bodies counted once)."""
    if config.model.name == "gpt":
        m = exp.model
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))
        tokens = batch["x"].size
        return tokens * (6 * n + 12 * m.num_layers * m.embed_dim * batch["x"].shape[1])
    step = exp.train_step()
    cost = step.lower(exp.abstract_state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def table(rows: list[dict], peak: float) -> str:
    """Markdown table of the measurements."""
    head = ("| model | params | batch | steps/call | compile (s) | runner steps/s | bare steps/s | baseline steps/s | "
            "overhead (runner/baseline) [range] | overhead, saves only at the end | step ratio (bare/baseline) | pipeline (real/on-device; fastest windows) | "
            "save ms (blocking/committed) | throughput | GFLOP/step | achieved GFLOP/s | MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if not r.get("has_baseline", True):
            r = r | {"baseline": math.nan, "overhead": math.nan, "runner_min": math.nan, "runner_max": math.nan,
                     "overhead_no_saves": None, "step_ratio": math.nan}
        lines.append(f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['steps_per_call']} | {r['compile_s']:.2f} | "
                     f"{r['runner']:.1f} | {r['bare']:.1f} | {r['baseline']:.1f} | {r['overhead']:.3f} "
                     f"[{r['runner_min']:.2f}-{r['runner_max']:.2f}] | "
                     f"{'-' if r['overhead_no_saves'] is None else format(r['overhead_no_saves'], '.3f')} | "
                     f"{r['step_ratio']:.3f} | {r['pipeline']:.3f}; {r['pipeline_best']:.3f} | "
                     f"{r['save_ms'][0]:.0f} / {r['save_ms'][1]:.0f} | {r['per_s']:,.0f} {r['unit']}/s | "
                     f"{r['flops'] / 1e9:.2f} | {r['tflops'] * 1e3:.1f} | {100 * r['mfu']:.1f} % |")
    lines.append(f"\nPeak: {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].device_kind} (given, or else the best "
                 f"of 10 float32 2048^3 matmuls).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected models and print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {','.join(MODELS)}")
    parser.add_argument("--steps", type=int_at_least(1), default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int_at_least(1), default=5)
    parser.add_argument("--runner-steps", type=int_at_least(1), default=150)
    parser.add_argument("--runner-repeats", type=int_at_least(1), default=3, help="runner runs, each paired with a baseline timing")
    parser.add_argument("--out", default=None)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (0: measure f32 matmul)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every model, e.g. train.steps_per_call=10 (repeatable)")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="measure only the pipeline ratio (real feed / on-device batches), --repeats windows")
    args = parser.parse_args(argv)
    if args.peak_tflops < 0:
        parser.error(f"--peak-tflops must be >= 0 (0: measure), got {args.peak_tflops}")
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not among {', '.join(MODELS)}")
    try:
        return _run(args)
    except DlfxError as e:  # a bad --set, a model's data missing
        print(f"benchmarks.run: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """The pipeline table, or the full table (printed, and written to --out)."""
    if args.pipeline_only:
        rows = []
        for name in args.models.split(","):
            rows.append(bench_pipeline(name, args.repeats, tuple(args.set)))
            print(f"{name}: {pipeline_table(rows[-1:]).splitlines()[2]}", flush=True)
        print(pipeline_table(rows) + f"\n\n{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
              f"{jax.devices()[0].platform}; {time.strftime('%Y-%m-%d')}; {args.repeats} interleaved windows of "
              f">= {MIN_WINDOW_S} s each." + (f" Overrides: {' '.join(args.set)}." if args.set else ""))
        return 0
    peak = args.peak_tflops * 1e12 or matmul_peak()
    rows = []
    for name in args.models.split(","):
        rows.append(bench_model(name, args.steps, args.repeats, args.runner_steps, peak, args.runner_repeats,
                                tuple(args.set)))
        print(f"{name}: {table(rows[-1:], peak).splitlines()[2]}", flush=True)  # kept if a later model is cut off
    result = table(rows, peak)
    info = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; jax {jax.__version__}, "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s); date {time.strftime('%Y-%m-%d')}; "
            f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.")
    if args.set:
        info += f" Overrides: {' '.join(args.set)}."
    print(result + "\n" + info)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# dlfx benchmarks\n\n" + (__doc__ or "") + "\n" + result + "\n\n" + info + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
