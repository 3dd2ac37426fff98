"""`dlfx runs`: one row per run under a folder, read from `config.json`, `metrics.jsonl` and `status.json`."""

from __future__ import annotations

import csv
import io
import os
import sys
from typing import Any

import jax
import numpy as np

from dlfx import config as config_lib, log, remote, tasks
from dlfx.errors import ConfigError
from dlfx.workdir import read_status

COLUMNS = ("name", "model", "data", "steps", "status", "final_loss", "final_accuracy", "best_accuracy",
           "wall_time", "path")

LOWER_IS_BETTER = ("final_loss", "wall_time")


def find_runs(root: str) -> list[str]:
    """Every workdir (a folder holding config.json) under `root`, `root` itself included."""
    if not os.path.isdir(root):
        raise ConfigError(f"no such folder: {root}")
    found, seen = [], set()
    for folder, subdirs, files in os.walk(root, followlinks=True):  # a symlinked run is a run
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            subdirs[:] = []
            continue
        seen.add(real)
        if "config.json" in files:
            found.append(folder)
            subdirs[:] = []  # a run's own folders hold no runs
        else:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found)


def summarize(workdir: str) -> dict:
    """One run's row: identity, progress, final and best eval metrics, wall time, status; a run whose files
    are damaged gets the status `damaged` and the reason in `error`."""
    try:
        config = config_lib.read_workdir_config(workdir, import_roots=False)
        records = log.read_metrics(workdir)
    except ConfigError as e:
        row = {c: None for c in COLUMNS}
        return {**row, "name": os.path.basename(os.path.normpath(workdir)), "model": "?", "data": "?", "steps": "?",
                "status": "damaged", "path": workdir, "error": str(e), "config": None}
    evals = [r for r in records if r["split"] == "eval"]
    status = read_status(workdir)
    last_step = max((r["step"] for r in records), default=0)
    total = status.get("total_steps")
    if status["status"] == "unknown":  # a run from before status files, or one that never started
        status["status"] = "finished" if evals and total is None and last_step else "unknown"
    final = evals[-1] if evals else {}
    accuracies = [r["accuracy"] for r in evals if "accuracy" in r]
    wall = status.get("wall_time")
    if wall is None and len(records) > 1:
        wall = records[-1].get("wall_time", 0.0) - records[0].get("wall_time", 0.0)
    return {"name": os.path.basename(os.path.normpath(workdir)), "model": config.model.name, "data": config.data.name,
            "steps": f"{last_step}/{total}" if total else str(last_step), "status": status["status"],
            **{f"final_{k}": v for k, v in final.items() if k not in ("step", "split", "wall_time")},
            "final_loss": final.get("loss"), "final_accuracy": final.get("accuracy"),
            "best_accuracy": max(accuracies) if accuracies else None, "wall_time": wall, "path": workdir,
            "error": status.get("error", ""), "config": config}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict], sort: str | None = None, as_csv: bool = False, extra: tuple[str, ...] = ()) -> str:
    """The rows as an aligned text table (or CSV), optionally sorted by a column: numbers best first (losses
    and wall time ascending, accuracies descending), missing values last. `extra`: columns after the usual ones
    (e.g. `final_<metric>` of a task's own eval metric)."""
    columns = COLUMNS + tuple(c for c in extra if c not in COLUMNS)
    rows = [{**{c: None for c in columns}, **r} for r in rows]
    if sort:
        if sort not in columns:
            raise ConfigError(f"--sort {sort!r} is not a column ({', '.join(columns)})")
        numeric = all(isinstance(r[sort], (int, float)) or r[sort] is None for r in rows)
        metric = sort.removeprefix("final_")
        sign = 1 if sort in LOWER_IS_BETTER or metric in tasks.LOWER_IS_BETTER or metric.endswith("loss") else -1
        key = (lambda r: (r[sort] is None, sign * (r[sort] or 0))) if numeric else (lambda r: str(r[sort]))
        rows = sorted(rows, key=key)
    if as_csv:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([["" if r[c] is None else r[c] for c in columns] for r in rows])
        return out.getvalue().rstrip("\n")
    cells = [list(columns)] + [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def final_eval(workdir: str, total_steps: int) -> dict[str, float] | None:
    """The eval metrics logged at the last step, if the final evaluation already ran."""
    records = [r for r in log.read_metrics(workdir) if r["split"] == "eval" and r["step"] == total_steps]
    if not records:
        return None
    return {k: v for k, v in records[-1].items() if k not in ("step", "split", "wall_time")}


def is_finished(workdir: str, total_steps: int) -> bool:
    """True if the run in `workdir` did everything: all steps, final eval, plots and status."""
    status = read_status(workdir)
    return status["status"] == "finished" and status.get("step") == total_steps and \
        status.get("plots") != "failed" and final_eval(workdir, total_steps) is not None


def logged_final_eval(workdir: str, step: int, is_main: bool, metric: str) -> dict[str, float] | None:
    """The final eval a killed run already logged (None if not): every process gets the same answer, and
    the keep_best metric's value, since every process takes part in the eval and in the saves, or none."""
    logged = final_eval(workdir, step) if is_main else None
    if jax.process_count() == 1:
        return logged
    from jax.experimental import multihost_utils

    if not multihost_utils.broadcast_one_to_all(logged is not None):
        return None
    value = multihost_utils.broadcast_one_to_all(np.float64(logged.get(metric, np.nan) if is_main else 0.0))
    return logged if is_main else ({metric: float(value)} if metric else {})


def finished_summary(exp: Any, workdir: str, state: Any) -> dict[str, Any]:
    """The summary of a finished run, read back from its files (nothing is written)."""
    status = read_status(workdir)
    trains = [r for r in log.read_metrics(workdir) if r["split"] == "train"]
    train = {k: v for k, v in (trains[-1] if trains else {}).items() if k not in ("step", "split", "wall_time")}
    if jax.process_index() == 0:
        print(f"dlfx: {remote.shown(workdir)} already finished all {exp.total_steps} steps; nothing to do "
              "(raise train.steps, or use a new --workdir)", file=sys.stderr)
    return {"status": "finished", "step": exp.total_steps, "total_steps": exp.total_steps, "train": train,
            "eval": final_eval(workdir, exp.total_steps), "wall_time": status.get("wall_time") or 0.0,
            "steps_per_sec": status.get("steps_per_sec"), "workdir": workdir, "mode": exp.mode,
            "devices": exp.mesh.devices.size, "state": state, "step_traces": 0, "time_to_first_step": None,
            "process_index": jax.process_index()}


def timing(workdir: str) -> dict[str, Any]:
    """The wall time and speed `status.json` records: a rerun after the last step (its final eval or plots
    missing) keeps those of the run that trained."""
    return {k: v for k, v in read_status(workdir).items() if k in ("wall_time", "steps_per_sec")}
