"""Headless matplotlib plots of runs: train/eval curves of one or more workdirs, a metric vs a swept value."""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from etils import epath

from dlfx import log, remote
from dlfx.errors import ConfigError, one_line


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard-style exponential moving average, debiased so the first point is not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)) if weight > 0 else v)
    return np.asarray(out)


def run_name(workdir: str) -> str:
    """The label of a run in legends and tables: its folder name."""
    return os.path.basename(os.path.normpath(workdir))


IMAGE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def output_path(out: str, default_name: str = "curves.png") -> str:
    """Where a figure given by `-o` goes: a folder gets `default_name` inside it, a bare name gets `.png`;
    an extension matplotlib cannot write is refused."""
    if not out.strip():
        raise ConfigError(f"-o is empty: give a file name (e.g. {default_name}) or a folder")
    if remote.is_remote(out):
        try:
            is_dir = out.endswith("/") or epath.Path(out).is_dir()
        except Exception as e:
            raise ConfigError(f"cannot reach {out}: {one_line(e)}") from None
        if is_dir:
            return remote.join(out, default_name)
    elif out.endswith(os.sep) or os.path.isdir(out):
        return os.path.join(out, default_name)
    ext = os.path.splitext(out)[1].lstrip(".").lower()
    if not ext:
        return out + ".png"
    if ext not in IMAGE_FORMATS:
        raise ConfigError(f"-o {out}: cannot write a .{ext} figure (use one of .{', .'.join(IMAGE_FORMATS)})")
    return out


def save_figure(fig, out: str) -> None:
    """Write a figure atomically (a temp file renamed into place): a kill never leaves half an image."""
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(tmp, format=os.path.splitext(out)[1].lstrip(".").lower())
        os.replace(tmp, out)
    except OSError as e:
        raise ConfigError(f"cannot write figure {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


DEFAULT_METRICS = ("loss", "accuracy", "r2", "elbo")  # plotted when a run logged them


def plot_curves(workdirs: Sequence[str], out: str, metrics: Sequence[str] | None = None,
                smoothing: float = 0.0, log_y: bool = False) -> str:
    """One panel per metric; train (solid, smoothed) and eval (dashed, markers) curves per run.

    Returns the path written (see `output_path`)."""
    if not 0 <= smoothing < 1:
        raise ConfigError(f"--smooth must be in [0, 1), got {smoothing}")
    if metrics is not None and not metrics:
        raise ConfigError("--metrics names no metric (give e.g. --metrics loss,accuracy)")
    out = output_path(out)
    runs = {}
    for workdir in workdirs:
        records = log.read_metrics(workdir)
        if not records:
            raise ConfigError(f"no metrics in {workdir} (metrics.jsonl is missing or empty)")
        runs[workdir] = records
    available = {k for records in runs.values() for r in records for k in r} - {"step", "split", "wall_time"}
    if metrics is None:  # the task's headline metrics that these runs logged
        metrics = [m for m in DEFAULT_METRICS if m in available] or sorted(available)[:1]
    missing = [m for m in metrics if m not in available]
    if missing:
        raise ConfigError(f"metric(s) {', '.join(missing)} not logged by these runs (available: "
                          f"{', '.join(sorted(available))})")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        for i, (workdir, records) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            for split, style in (("train", "-"), ("eval", "--o")):
                points = [(r["step"], r[metric]) for r in records if r["split"] == split and metric in r]
                if not points:
                    continue
                steps, values = np.array(points).T
                if split == "train" and smoothing:
                    values = smooth(values, smoothing)
                ax.plot(steps, values, style, color=color, markersize=3, label=f"{run_name(workdir)} {split}")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def write_run_plots(workdir: str, model, state, dataset, task=None) -> bool:
    """`plots/curves.png`; `plots/confusion.png` for classifiers, `plots/reconstructions.png` for
    autoencoders of images. A failure is a warning, never an error; returns whether all were written."""
    from dlfx import tasks
    from dlfx import data
    from dlfx.data import access

    try:
        plot_curves([workdir], os.path.join(workdir, "plots", "curves.png"))
        import jax

        variables = {"params": jax.device_get(state.params)}
        if state.batch_stats:
            variables["batch_stats"] = jax.device_get(state.batch_stats)
        if isinstance(task, tasks.Classification) and dataset.num_classes <= 50:
            from dlfx import interpret

            counts = np.zeros((dataset.num_classes, dataset.num_classes), np.int64)
            transform = data.input_transform(dataset.metadata) or np.asarray
            for batch in access.batches(dataset.test, 256):  # streamed: a file-backed split is never held whole
                predicted = interpret.predictions(model, variables, transform(batch["x"]))
                counts += interpret.confusion_matrix(batch["y"], predicted, dataset.num_classes)
            plot_confusion(counts, os.path.join(workdir, "plots", "confusion.png"))
        if isinstance(task, tasks.Autoencoder) and len(dataset.example_shape) == 3:
            test = dataset.test
            plot_reconstructions(model, variables, access.read(test, range(min(8, access.length(test))))["x"], task,
                                 os.path.join(workdir, "plots", "reconstructions.png"))
    except Exception as e:
        print(f"dlfx: warning: could not write plots in {workdir}: {e} (rerun the same command to write them)",
              file=sys.stderr)
        return False
    return True


def plot_reconstructions(model, variables: dict, x: np.ndarray, task, out: str, seed: int = 0) -> str:
    """Rows of images: inputs, their reconstructions and, for a VAE, decodings of codes drawn from N(0, I)."""
    import jax

    recon = np.asarray(model.apply(variables, x))
    rows = [("input", np.asarray(x)), ("reconstruction", recon)]
    if task.variational:
        z = jax.random.normal(jax.random.PRNGKey(seed), (len(x), model.latent_dim))
        rows.append(("sample", np.asarray(model.apply(variables, z, method="decode"))))
    if task.reconstruction == "bce":  # the decoder gives logits
        rows = [(name, images if name == "input" else 1 / (1 + np.exp(-images))) for name, images in rows]
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(x), figsize=(1.1 * len(x), 1.2 * len(rows)), dpi=110, squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(len(x)):
            ax = axes[r][c]
            ax.imshow(images[c, ..., 0] if images.shape[-1] == 1 else images[c], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def plot_sweep(rows: Sequence[dict], key: str, metric: str, out: str) -> str:
    """Final eval `metric` against the swept `key` (one line per combination of the other swept keys)."""
    plt = _pyplot()
    groups: dict[str, list[tuple]] = {}
    for row in rows:
        rest = ", ".join(f"{k}={v}" for k, v in row["params"].items() if k != key)
        if metric in row and row[metric] is not None:
            groups.setdefault(rest, []).append((row["params"][key], row[metric]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    numeric = all(isinstance(x, (int, float)) for pts in groups.values() for x, _ in pts)
    for label, points in groups.items():
        points.sort(key=lambda p: p[0] if numeric else str(p[0]))
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs if numeric else [str(x) for x in xs], ys, "o-", label=label or metric)
    if numeric and all(x > 0 for pts in groups.values() for x, _ in pts) and len({x for p in groups.values() for x, _ in p}) > 2:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"final eval {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def plot_confusion(counts: np.ndarray, out: str, class_names: Sequence[str] | None = None) -> str:
    """A confusion-matrix heat map with the counts written in each cell."""
    plt = _pyplot()
    n = counts.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.45 * n), dpi=110)
    ax.imshow(counts, cmap="Blues")
    names = list(class_names or range(n))
    ax.set_xticks(range(n), names, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"accuracy {100 * accuracy:.1f} % ({counts.sum()} examples)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def plot_attributions(x: np.ndarray, maps: dict[str, np.ndarray], titles: Sequence[str], out: str) -> str:
    """Inputs (first row) and one row of attribution heat maps per method; images or 1-D sequences."""
    plt = _pyplot()
    n, rows = len(x), 1 + len(maps)
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n, 1.6 * rows), dpi=110, squeeze=False)
    for j in range(n):
        image = x[j]
        if image.ndim == 3:  # HWC image
            axes[0, j].imshow(image[..., 0] if image.shape[-1] == 1 else np.clip(image, 0, 1), cmap="gray")
        else:  # (T, C) sequence
            axes[0, j].plot(image.reshape(len(image), -1))
        axes[0, j].set_title(titles[j], fontsize=7)
        for i, (name, values) in enumerate(maps.items(), start=1):
            a = np.asarray(values[j])
            heat = np.abs(a).sum(-1) if a.ndim >= 2 else np.abs(a)
            if heat.ndim == 1:  # sequence attributions: a 1-row heat strip
                heat = heat[None]
            axes[i, j].imshow(heat, cmap="magma", aspect="auto")
            if j == 0:
                axes[i, j].set_ylabel(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def plot_attention(x: np.ndarray, rollout: np.ndarray, grid: tuple[int, int] | None, titles: Sequence[str],
                   out: str) -> str:
    """Inputs and their attention rollout: the cls token's attention over the patch grid (ViT), or the
    full query x key rollout matrix (sequence models)."""
    plt = _pyplot()
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.2), dpi=110, squeeze=False)
    for j in range(n):
        image = x[j]
        if image.ndim == 3:
            axes[0, j].imshow(image[..., 0] if image.shape[-1] == 1 else np.clip(image, 0, 1), cmap="gray")
        else:
            axes[0, j].plot(image.reshape(len(image), -1))
        axes[0, j].set_title(titles[j], fontsize=7)
        r = np.asarray(rollout[j])
        heat = r[0, 1:].reshape(grid) if grid else r
        axes[1, j].imshow(heat, cmap="magma")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1, 0].set_ylabel("rollout", fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out
