"""Reproduce the MNIST-1D results table (Greydanus 2020) with dlfx configs, several seeds each.

    python -m experiments.mnist1d_table [--models mlp,cnn,gru,resnet,transformer] [--seeds 0,1,2]
        [--workdir-root runs/mnist1d_table] [--out experiments/mnist1d_table.md] [--config.a.b=v ...]

Runs are resumable (one workdir per model and seed); the table compares test accuracy with the
published numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from dlfx.cli import split_overrides
from experiments.seed_study import run_seeds

# Test accuracy (%) reported in the MNIST-1D paper (Greydanus, 2020), Table 1.
PUBLISHED = {"logistic regression": 32.0, "mlp": 68.0, "cnn": 94.0, "gru": 91.0, "human": 96.0}


def main(argv: list[str] | None = None) -> int:
    """Run every model over the seeds and print/write the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,gru,resnet,transformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--seeds-for", action="append", default=[],
                        help="per-model seeds, e.g. transformer=0,1 (overrides --seeds for that model)")
    parser.add_argument("--workdir-root", default="runs/mnist1d_table")
    parser.add_argument("--out", default="experiments/mnist1d_table.md")
    args, extra = parser.parse_known_args(argv)
    overrides = split_overrides(extra)
    per_model = dict(item.split("=", 1) for item in args.seeds_for)
    rows = []
    for model in args.models.split(","):
        seeds = [int(s) for s in per_model.get(model, args.seeds).split(",")]
        start = time.time()
        summaries = run_seeds(f"configs/mnist1d.py:{model}", seeds, os.path.join(args.workdir_root, model), overrides)
        accuracy = 100 * np.array([s["eval"]["accuracy"] for s in summaries])
        speeds = [s["steps_per_sec"] for s in summaries if s["steps_per_sec"]]
        rows.append((model, accuracy, PUBLISHED.get(model), np.median(speeds) if speeds else float("nan"),
                     time.time() - start))
        print(f"{model}: {accuracy.mean():.1f} ± {accuracy.std():.1f} % over seeds {seeds}", flush=True)
    lines = ["| model | dlfx test accuracy (%) | seeds | published (%) | steps/s | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for model, accuracy, published, speed, wall in rows:
        lines.append(f"| {model} | {accuracy.mean():.1f} ± {accuracy.std():.1f} | {len(accuracy)} | "
                     f"{published if published is not None else '—'} | {speed:.1f} | {wall:.0f} |")
    lines.append(f"| human | — | — | {PUBLISHED['human']} | | |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# MNIST-1D with dlfx\n\nData generated locally with `mnist1d.data.make_dataset` "
                    "(4000 train / 1000 test). Mean ± std over seeds; steps/s on this machine.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
