"""Transfer study: a digits CNN pretrained on classes 0-4, fine-tuned on 5-9, vs. training from scratch.

    python -m experiments.transfer_digits [--fractions 0.01,0.05,0.2,1] [--seeds 0,1,2] [--steps 300]
        [--workdir-root runs/transfer_digits] [--out experiments/transfer_digits]

Three curves over the fraction of the target (5-9) training split: scratch (fresh init), fine-tune
(pretrained backbone, fresh head, all layers trained) and linear probe (backbone frozen, batch norm in
inference mode, only the head trained). Writes `<out>.md` (table) and `<out>.png` (plot). Runs are
resumable: a finished workdir is evaluated again, not retrained.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from dlfx import config as config_lib, runner
from dlfx.data import load as load_data

CONFIG = "configs/digits_cnn.py"
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
BACKBONE = ("conv.*", "bn.*", "dense/.*")
METHODS = {
    "scratch": [],
    "fine-tune": ["init_from.skip=('head/.*',)"],
    "fine-tune, lr/10": ["init_from.skip=('head/.*',)", "optimizer.learning_rate=3e-4"],
    "linear probe": ["init_from.skip=('head/.*',)", f"optimizer.freeze={BACKBONE}", "model.freeze_bn=True"],
}


def _train(overrides: list[str], workdir: str) -> dict:
    config = config_lib.load(CONFIG, overrides)
    summary = runner.train(config, workdir)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Pretrain once, then run every method x fraction x seed and write the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.01,0.05,0.2,1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir-root", default="runs/transfer_digits")
    parser.add_argument("--out", default="experiments/transfer_digits")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.time()

    pretrain_dir = os.path.join(args.workdir_root, "pretrain")
    pre = _train([f"data.classes={SOURCE}", "train.epochs=0", "train.steps=600", "train.eval_every=0"], pretrain_dir)
    print(f"pretrained on digits {SOURCE}: test accuracy {100 * pre['eval']['accuracy']:.1f} %", flush=True)

    results: dict[tuple[str, float], list[float]] = {}
    for fraction in fractions:
        num_train = len(load_data({"name": "digits", "classes": TARGET, "train_fraction": fraction}).train["y"])
        batch = min(64, num_train)
        for method, extra in METHODS.items():
            for seed in seeds:
                overrides = [f"data.classes={TARGET}", f"data.train_fraction={fraction}", f"data.batch_size={batch}",
                             f"seed={seed}", "train.epochs=0", f"train.steps={args.steps}", "train.eval_every=0",
                             "train.checkpoint_every=1000", "optimizer.warmup_steps=20"] + extra
                if method != "scratch":
                    overrides.append(f"init_from.path={pretrain_dir}")
                workdir = os.path.join(args.workdir_root, f"{method.replace(' ', '_').replace(',', '').replace('/', '')}-f{fraction}-s{seed}")
                summary = _train(overrides, workdir)
                results.setdefault((method, fraction), []).append(100 * summary["eval"]["accuracy"])
            accs = np.array(results[(method, fraction)])
            print(f"fraction {fraction:g} ({num_train} examples), {method}: {accs.mean():.1f} ± {accs.std():.1f} %",
                  flush=True)

    lines = ["| target train fraction | examples | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 2) + "|"]
    for fraction in fractions:
        num_train = len(load_data({"name": "digits", "classes": TARGET, "train_fraction": fraction}).train["y"])
        cells = [f"{np.mean(results[(m, fraction)]):.1f} ± {np.std(results[(m, fraction)]):.1f}" for m in METHODS]
        lines.append(f"| {fraction:g} | {num_train} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Transfer on digits: pretrain 0-4, fine-tune 5-9\n\nTest accuracy (%) on digits 5-9, mean ± std "
                f"over seeds {seeds}; {args.steps} steps per run, AdamW, batch min(64, examples). Pretrained CNN: "
                f"{100 * pre['eval']['accuracy']:.1f} % on digits 0-4. Wall time {time.time() - start:.0f} s.\n\n"
                + table + "\n\n![accuracy vs data fraction](transfer_digits.png)\n")
    _plot(results, fractions, args.out + ".png")
    return 0


def _plot(results: dict, fractions: list[float], path: str) -> None:
    """Accuracy vs target data fraction, one curve (mean ± std band) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in METHODS:
        accs = np.array([results[(method, f)] for f in fractions])
        ax.plot(fractions, accs.mean(1), marker="o", label=method)
        ax.fill_between(fractions, accs.mean(1) - accs.std(1), accs.mean(1) + accs.std(1), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the digits 5-9 training split")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("CNN pretrained on digits 0-4, transferred to 5-9")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
