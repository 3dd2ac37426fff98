"""`dlfx sweep`: the cross product of `--grid key=v1,v2,...` over one config; resumable, sequential or N at a time."""

from __future__ import annotations

import ast
import itertools
import os
import re
import subprocess
import sys
import time
from typing import Sequence

from dlfx import config as config_lib, plot, runs
from dlfx.errors import ConfigError, DlfxError
from dlfx.workdir import read_status


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`['optimizer.learning_rate=0.1,0.03', 'seed=0,1']` -> [(key, [values...]), ...] in the given order."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not parts:
            raise ConfigError(f"--grid {item!r} is not of the form key=v1,v2,...")
        if key in [k for k, _ in grid]:
            raise ConfigError(f"--grid key {key!r} is given twice")
        grid.append((key, parts))
    if not grid:
        raise ConfigError("dlfx sweep needs at least one --grid key=v1,v2,...")
    return grid


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_name(params: dict[str, str]) -> str:
    """A folder name for one grid point: `learning_rate=0.1-seed=0` (last part of each key)."""
    name = "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items())
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


def points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the grid values, first key varying slowest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in grid])]


def sweep(config_spec: str, grid_items: Sequence[str], root: str, overrides: Sequence[str] = (),
          parallel: int = 1, metric: str = "accuracy") -> list[dict]:
    """Run every grid point not yet finished under `root`; return one `dlfx runs` row per point."""
    grid = parse_grid(grid_items)
    if "://" in root:
        raise ConfigError(f"--workdir-root {root}: a sweep's root must be a local folder (each `dlfx train "
                          "--workdir gs://...` can be remote; copy the sweep with gsutil rsync)")
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"--workdir-root {root} is a file, not a folder")
    plan, names = [], {}
    for params in points(grid):  # every config is validated before anything runs
        config = config_lib.load(config_spec, list(overrides) + [f"{k}={v}" for k, v in params.items()])
        name = run_name(params)
        if name in names:  # two values that differ only in characters a folder name cannot hold
            raise ConfigError(f"--grid points {names[name]} and {params} would share the run folder {name!r}; "
                              "give values that differ in letters, digits or . = + -")
        names[name] = params
        plan.append((params, config, os.path.join(root, name)))
    todo = [(p, c, w) for p, c, w in plan if read_status(w)["status"] != "finished"]
    print(f"sweep: {len(plan)} runs, {len(plan) - len(todo)} already finished, {len(todo)} to run under {root}",
          file=sys.stderr)
    failed: set[str] = set()  # points whose train failed now (a refused one may leave another run's files)
    if parallel > 1:
        failed = _run_subprocesses(config_spec, overrides, todo, parallel)
    else:
        from dlfx import runner

        for params, config, workdir in todo:
            print(f"sweep: {os.path.basename(workdir)}", file=sys.stderr)
            try:
                runner.train(config, workdir)
            except DlfxError as e:  # one bad point does not stop the sweep
                failed.add(workdir)
                print(f"sweep: {os.path.basename(workdir)} failed: {e}", file=sys.stderr)
    rows = []
    for params, _, workdir in plan:
        row = runs.summarize(workdir) if os.path.isfile(os.path.join(workdir, "config.json")) else {
            **{c: None for c in runs.COLUMNS}, "name": os.path.basename(workdir), "status": "failed", "path": workdir}
        if workdir in failed:
            row = {**row, "status": "failed"}
        row["params"] = {k: _value(v) for k, v in params.items()}
        row[metric] = row.get(f"final_{metric}")
        rows.append(row)
    logged = sorted({k[len("final_"):] for row in rows for k, v in row.items() if k.startswith("final_") and v is not None})
    if logged and metric not in logged:
        print(f"sweep: warning: --metric {metric} is not an eval metric of these runs (they log "
              f"{', '.join(logged)}); rerun the sweep with one of them to tabulate and plot it", file=sys.stderr)
    for key, values in grid:
        if len(values) > 1 and any(row[metric] is not None for row in rows):
            plot.plot_sweep(rows, key, metric, os.path.join(root, f"sweep_{key.rsplit('.', 1)[-1]}.png"))
    return rows


def _run_subprocesses(config_spec: str, overrides: Sequence[str], todo: list, parallel: int) -> set[str]:
    """`dlfx train` per grid point, at most `parallel` at once; returns the workdirs whose run failed."""
    pending, active, failed = list(todo), [], set()
    while pending or active:
        while pending and len(active) < parallel:
            params, _, workdir = pending.pop(0)
            args = [f"--config.{o}" for o in overrides] + [f"--config.{k}={v}" for k, v in params.items()]
            cmd = [sys.executable, "-m", "dlfx", "train", "--config", config_spec, "--workdir", workdir, *args]
            log_path = workdir.rstrip("/") + ".log"
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            out = open(log_path, "w")
            active.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out, workdir))
            print(f"sweep: started {os.path.basename(workdir)} (log {log_path})", file=sys.stderr)
        time.sleep(0.2)
        for proc, out, workdir in list(active):
            if proc.poll() is not None:
                out.close()
                active.remove((proc, out, workdir))
                if proc.returncode:
                    failed.add(workdir)
                    print(f"sweep: {os.path.basename(workdir)} exited {proc.returncode}", file=sys.stderr)
    return failed
