"""Train metrics between log points: stacked on the device, read as one array, checked for NaN/Inf."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dlfx.errors import NonFiniteError

# The metric vectors of the steps since the last log, stacked on the device and fetched as one array:
# one transfer per log instead of one per metric and step (~4.6 ms -> ~0.5 ms per 50 steps on CPU).
stack = jax.jit(lambda records: jax.numpy.concatenate([r.reshape(-1, r.shape[-1]) for r in records]))


def check_finite(records: list[dict], first_step: int, config: ml_collections.ConfigDict, in_row: int,
                 groups: list[str]) -> tuple[int, int]:
    """Apply `train.nan_policy` to fetched step metrics; return (skipped in these records, skipped in a row)."""
    skipped = 0
    for offset, record in enumerate(records):
        if not record["nonfinite"]:
            in_row = 0
            continue
        skipped, in_row = skipped + 1, in_row + 1
        step = first_step + offset
        group = int(record["first_nonfinite_group"])
        what = "gradient of " + groups[group] if group >= 0 else "loss"
        if config.train.nan_policy == "error":
            raise NonFiniteError(f"non-finite {what} at step {step} (train.nan_policy='error'); the run stopped "
                                 f"before any checkpoint or evaluation held that update")
        if in_row >= config.train.max_skipped:
            raise NonFiniteError(f"{in_row} non-finite steps in a row up to step {step}, last one in the {what} "
                                 f"(train.max_skipped={config.train.max_skipped})")
    return skipped, in_row


def read_window(window: tuple, names: list[str], config: ml_collections.ConfigDict, in_row: int,
                groups: list[str]) -> tuple[dict[str, float], int]:
    """Train metrics of a closed log window (stacked metric vectors, first/last step, start/end time),
    after `train.nan_policy`; and the non-finite steps in a row so far."""
    stacked, first, last, start, end = window
    fetched = [dict(zip(names, row.tolist())) for row in np.asarray(stacked)]
    skipped, in_row = check_finite(fetched, first + 1, config, in_row, groups)
    return mean(fetched) | {"skipped_steps": float(skipped), "steps_per_sec": (last - first) / (end - start)}, in_row


def mean(records: list[dict]) -> dict[str, float]:
    """Mean of each metric over the steps whose update was applied."""
    finite = [r for r in records if not r["nonfinite"]] or records
    return {k: float(np.mean([r[k] for r in finite])) for k in records[0]
            if k not in ("nonfinite", "first_nonfinite_group")}
