"""Transfer study on real text: a byte-level GPT pretrained on CPython's documentation prose, fine-tuned on
CPython's own standard-library source code, against training from scratch with the same budget.

    python -m experiments.transfer_text [--fractions 0.01,0.1,1] [--seeds 0,1,2] [--pretrain-steps 800]
        [--steps 300] [--workdir-root runs/transfer_text] [--out experiments/transfer_text]

Both corpora ship with Python: the prose is `pydoc_data.topics`; the code is the `.py` files of a few
standard-library packages (`PACKAGES`). Both become byte token folders (`dlfx data tokens --vocab bytes`: the
same 256 ids, so every parameter transfers). The fine-tune corpus keeps the first `fraction` of its training
tokens; validation is always its whole validation split. Reported: validation bits per byte. Writes
`<out>.md` (table) and `experiments/figures/<name>.png` (plot). Finished runs are read back, not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig

import numpy as np

from dlfx import config as config_lib, runner
from dlfx.data import files, sources

CONFIG = "configs/char_gpt.py"
PACKAGES = ("json", "email", "http", "urllib", "logging", "asyncio")
MODEL = ["model.embed_dim=96", "model.num_layers=3", "model.num_heads=4", "model.max_len=128",
         "model.dropout_rate=0.0", "data.name=tokens", "data.seq_len=128", "data.batch_size=32",
         "optimizer.learning_rate=2e-3", "optimizer.warmup_steps=50", "train.epochs=0", "train.eval_every=0",
         "train.log_every=50", "train.checkpoint_every=0"]


def _corpora(root: str) -> dict[str, str]:
    """Token folders of the two corpora (bytes vocabulary), written once under `root`."""
    folders = {"prose": os.path.join(root, "prose_tokens"), "code": os.path.join(root, "code_tokens")}
    if not os.path.isdir(folders["prose"]):
        prose = os.path.join(root, "prose.txt")
        with open(prose, "w", encoding="utf-8") as f:
            f.write(sources._default_corpus())
        files.write_tokens(prose, folders["prose"], "bytes", val_fraction=0.05)
    if not os.path.isdir(folders["code"]):
        code = os.path.join(root, "code")
        stdlib = sysconfig.get_paths()["stdlib"]
        for package in PACKAGES:
            shutil.copytree(os.path.join(stdlib, package), os.path.join(code, package),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        files.write_tokens(code, folders["code"], "bytes", val_fraction=0.1)
    return folders


def _prefix(folder: str, fraction: float, out: str) -> str:
    """A copy of a token folder whose train.bin keeps its first `fraction` of tokens."""
    if not os.path.isdir(out):
        os.makedirs(out)
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        tokens = np.fromfile(os.path.join(folder, "train.bin"), np.dtype(meta["dtype"]))
        tokens[:max(int(len(tokens) * fraction), 1024)].tofile(os.path.join(out, "train.bin"))
        shutil.copy(os.path.join(folder, "val.bin"), out)
        shutil.copy(os.path.join(folder, "meta.json"), out)
    return out


def _train(overrides: list[str], workdir: str) -> dict:
    summary = runner.train(config_lib.load(CONFIG, MODEL + overrides), workdir)
    if summary["status"] != "finished":  # preempted: rerun the same command to continue
        sys.exit(f"{workdir}: {summary['status']}; rerun the same command to resume")
    with open(os.path.join(workdir, "status.json")) as f:  # training time, also of a run read back
        summary["wall_time"] = json.load(f).get("wall_time") or 0.0
    return summary


def _zero_shot(pretrain_dir: str, data_path: str) -> float:
    """Validation bits per byte on the code of the prose model as it is (no fine-tuning step)."""
    from dlfx.experiment import build, evaluate, init_from_pretrained

    exp = build(config_lib.load(CONFIG, MODEL + [f"data.path={data_path}", f"init_from.path={pretrain_dir}"]))
    return float(evaluate(exp, init_from_pretrained(exp, exp.init()), exp.eval_step())["bits_per_token"])


def main(argv: list[str] | None = None) -> int:
    """Pretrain on prose once, then fine-tune / train from scratch on code per fraction and seed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.01,0.1,1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir-root", default="runs/transfer_text")
    parser.add_argument("--out", default="experiments/transfer_text")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.workdir_root, exist_ok=True)
    corpora = _corpora(args.workdir_root)

    pretrain_dir = os.path.join(args.workdir_root, "pretrain")
    train_seconds = 0.0
    pre = _train([f"data.path={corpora['prose']}", f"train.steps={args.pretrain_steps}"], pretrain_dir)
    train_seconds += pre["wall_time"]
    print(f"pretrained on prose: validation {pre['eval']['bits_per_token']:.3f} bits/byte", flush=True)
    with open(os.path.join(corpora["code"], "meta.json")) as f:
        code_train_tokens = json.load(f)["num_train"]
    zero_shot = _zero_shot(pretrain_dir, corpora["code"])
    print(f"prose model on the code, no fine-tuning: {zero_shot:.3f} bits/byte", flush=True)

    results: dict[tuple[str, float], list[float]] = {}
    for fraction in fractions:
        data = _prefix(corpora["code"], fraction, os.path.join(args.workdir_root, f"code_{fraction:g}"))
        for seed in seeds:
            for method, extra in (("scratch", []), ("fine-tune", [f"init_from.path={pretrain_dir}"])):
                name = f"{method.replace(' ', '_')}_f{fraction:g}_s{seed}"
                summary = _train([f"data.path={data}", f"train.steps={args.steps}", f"seed={seed}", *extra],
                                 os.path.join(args.workdir_root, name))
                results.setdefault((method, fraction), []).append(summary["eval"]["bits_per_token"])
                train_seconds += summary["wall_time"]
                print(f"{name}: {summary['eval']['bits_per_token']:.3f} bits/byte", flush=True)

    lines = [f"Byte-level GPT (3 x 96, context 128), pretrained {args.pretrain_steps} steps on CPython's doc prose "
             f"({pre['eval']['bits_per_token']:.3f} bits/byte on its validation split), then {args.steps} steps on "
             f"the source of {', '.join(PACKAGES)} ({code_train_tokens:,} training bytes at fraction 1). Validation "
             f"bits per byte on the code, mean ± std over seeds {seeds}; {train_seconds:.0f} s of training on this machine (2 cores) in all. The "
             f"prose model on the code without fine-tuning: {zero_shot:.3f} bits/byte.", "",
             "| fraction of code training bytes | bytes | scratch | fine-tune from prose | gain (bits/byte) |",
             "|---|---|---|---|---|"]
    for fraction in fractions:
        scratch, tuned = np.array(results[("scratch", fraction)]), np.array(results[("fine-tune", fraction)])
        lines.append(f"| {fraction:g} | {max(int(code_train_tokens * fraction), 1024):,} | {scratch.mean():.3f} ± "
                     f"{scratch.std():.3f} | {tuned.mean():.3f} ± {tuned.std():.3f} | "
                     f"{scratch.mean() - tuned.mean():+.3f} |")
    steps_tokens = args.steps * 32 * 128  # data.batch_size x data.seq_len tokens per step
    lines += ["", f"Each run reads {steps_tokens:,} tokens ({args.steps} steps x 32 x 128): "
              + ", ".join(f"{steps_tokens / max(int(code_train_tokens * f), 1024):.1f} epochs at {f:g}"
                          for f in fractions)
              + ". Where a fine-tune ends above the prose model's own "
              f"{zero_shot:.3f} bits/byte it has overfitted its few training bytes: the budget is fixed, with no "
              "early stopping (the validation split is what the table reports, so it cannot also pick the step)."]
    table = "\n".join(lines)
    print(table)
    with open(args.out + ".md", "w") as f:
        f.write("# Transfer on real text (`python -m experiments.transfer_text`)\n\n" + table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.axhline(zero_shot, color="gray", linestyle=":", label="prose model, no fine-tuning")
    for method in ("scratch", "fine-tune"):
        values = [np.array(results[(method, f)]) for f in fractions]
        ax.errorbar(fractions, [v.mean() for v in values], yerr=[v.std() for v in values], marker="o", capsize=3,
                    label=method if method == "scratch" else "fine-tune from prose")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the code training split")
    ax.set_ylabel("validation bits per byte")
    ax.legend()
    fig.tight_layout()
    figure = os.path.join("experiments", "figures", os.path.basename(args.out) + ".png")
    fig.savefig(figure, dpi=120)
    print(f"wrote {args.out}.md and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
