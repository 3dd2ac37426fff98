"""Train one config over several seeds and report final eval metrics as mean ± std.

    python -m experiments.seed_study --config configs/digits_cnn.py --seeds 0,1,2 \
        [--workdir-root runs/seeds] [--out results.md] [--config.a.b=value ...]

Each seed gets its own workdir, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from dlfx import config as config_lib, runner
from dlfx.cli import split_overrides
from dlfx.errors import DlfxError


def run_seeds(config_spec: str, seeds: list[int], workdir_root: str, overrides: list[str]) -> list[dict]:
    """Train the config once per seed; return each run's summary (state dropped)."""
    summaries = []
    for seed in seeds:
        config = config_lib.load(config_spec, [*overrides, f"seed={seed}"])
        summary = runner.train(config, os.path.join(workdir_root, f"seed{seed}"))
        summary.pop("state")
        summaries.append(summary | {"seed": seed})
    return summaries


def table(config_spec: str, summaries: list[dict]) -> str:
    """A markdown table: one row per seed and a mean ± std row."""
    metrics = sorted(summaries[0]["eval"])
    lines = [f"Config `{config_spec}`, {len(summaries)} seeds", "",
             "| seed | " + " | ".join(metrics) + " | wall time (s) |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for s in summaries:
        lines.append(f"| {s['seed']} | " + " | ".join(f"{s['eval'][m]:.4f}" for m in metrics)
                     + f" | {s['wall_time']:.1f} |")
    stats = [np.array([s["eval"][m] for s in summaries]) for m in metrics]
    lines.append("| mean ± std | " + " | ".join(f"{v.mean():.4f} ± {v.std():.4f}" for v in stats) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir-root", default=None)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args, extra = parser.parse_known_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
        root = args.workdir_root or os.path.join("runs", f"seeds-{name}")
        result = table(args.config, run_seeds(args.config, seeds, root, split_overrides(extra)))
    except (DlfxError, ValueError) as e:
        print(f"seed_study: error: {e}", file=sys.stderr)
        return 2
    print(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(result + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
