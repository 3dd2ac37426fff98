"""Input-pipeline throughput and memory: dlfx's file sources against torchvision's ImageFolder + DataLoader.

    python -m benchmarks.data [--images 512] [--size 64] [--batch 32] [--workers 0,1,2] [--token-gb 1] [--rss-images 5000]

images/s  `image_folder` batches (Pillow decode + random resized crop + flip, as the runner reads them,
          through `dlfx.data.train_iterator` with `workers`) against torchvision's `ImageFolder` +
          `DataLoader` with the same transforms, batch size and worker count on the same JPEG files (the
          peer needs the `[torch]` extra); each side reads 2 warm-up batches, then the median of 3 timed
          passes over the set
windows/s `tokens` training windows (random offsets, memory-mapped) through the same iterator
RSS       peak resident memory of a child process that trains a tiny GPT for a few steps on a token file
          of --token-gb GB, against the same on a 1 MB file (the file is memory-mapped: pages are read,
          not held); and of one that trains a small CNN on an image folder of --rss-images files
          against one of 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from dlfx.data import files, images, pipeline


def write_images(root: str, count: int, size: int, classes: int = 4) -> None:
    """`count` random JPEGs of about `size` pixels in an ImageFolder layout (train/ and a small val/)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", max(classes, count // 10))):
        for i in range(n):
            folder = os.path.join(root, split, f"class{i % classes}")
            os.makedirs(folder, exist_ok=True)
            w, h = (int(size * rng.uniform(0.9, 1.4)) for _ in range(2))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.jpg"))


def _timed_passes(next_batch, batches: int, repeats: int = 3) -> float:
    for _ in range(2):
        next_batch()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next_batch()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dlfx_images_per_s(root: str, size: int, batch: int, workers: int) -> float:
    """image_folder through dlfx's training iterator."""
    dataset = images.image_folder(root, image_size=size)
    iterator = pipeline.train_iterator(dataset.train, batch, seed=0, workers=workers)
    batches = len(dataset.train) // batch
    try:
        seconds = _timed_passes(lambda: next(iterator), batches)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    return batches * batch / seconds


def torchvision_images_per_s(root: str, size: int, batch: int, workers: int) -> float | None:
    """The peer: torchvision ImageFolder + DataLoader, the same augmentation, uint8 tensors out."""
    try:
        import torch
        from torchvision import datasets, transforms
    except ImportError:
        return None
    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.PILToTensor()])
    folder = datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    return len(loader) * batch / _timed_passes(next_batch, len(loader))


def token_windows_per_s(folder: str, seq_len: int, batch: int) -> float:
    """Random training windows of a memory-mapped token folder."""
    dataset = files.tokens(folder, seq_len=seq_len)
    iterator = pipeline.train_iterator(dataset.train, batch, seed=0)
    seconds = _timed_passes(lambda: next(iterator), 200)
    return 200 * batch / seconds


def write_token_folder(folder: str, num_tokens: int, vocab: int = 256) -> None:
    """A token folder of `num_tokens` random uint16 ids (written in chunks)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "train.bin"), "wb") as f:
        for start in range(0, num_tokens, 1 << 26):
            f.write(rng.integers(0, vocab, min(1 << 26, num_tokens - start), dtype=np.uint16).tobytes())
    rng.integers(0, vocab, 1 << 16, dtype=np.uint16).tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"vocab_size": vocab, "encoding": "bytes"}, f)


RSS_CHILD = """
import json, resource, sys
from dlfx import config, runner
spec, overrides, workdir = json.loads(sys.argv[1])
runner.train(config.load(spec, overrides), workdir)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
      int(status["RssAnon"].split()[0]) // 1024, int(status["RssFile"].split()[0]) // 1024)
"""
RUN = ["train.epochs=0", "train.steps=20", "train.log_every=10", "train.eval_every=0", "train.checkpoint_every=0",
       "optimizer.warmup_steps=1", "parallel.num_devices=1"]
TOKENS_RUN = ("configs/char_gpt.py", ["data.name=tokens", "data.seq_len=64", "data.batch_size=16", "model.embed_dim=32",
                                      "model.num_layers=1", "model.num_heads=2", "model.max_len=64"] + RUN)
IMAGES_RUN = ("configs/digits_cnn.py", ["data.name=image_folder", "data.image_size=32", "data.batch_size=32",
                                        "model.features=(8, 16)", "model.hidden_dim=32"] + RUN)


def peak_rss_mib(run: tuple[str, list[str]], folder: str, workdir: str) -> tuple[int, int, int]:
    """(peak RSS, anonymous RSS at the end, file-backed RSS at the end), MiB, of a child process training
    `run` (config, overrides) for 20 steps on `folder`. File-backed pages are page cache of memory-mapped
    files (the kernel maps a whole large folio per touched window and may drop them any time); anonymous
    memory is the process's own."""
    spec, overrides = run
    argument = json.dumps([spec, overrides + [f"data.path={folder}"], workdir])
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, argument], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    peak, anon, mapped = (int(v) for v in out.stdout.strip().splitlines()[-1].split())
    return peak, anon, mapped


def main(argv: list[str] | None = None) -> int:
    """Print the throughput and memory tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64, help="crop size (the files are ~1.1x larger)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--token-gb", type=float, default=1.0, help="token file size for the RSS figure (0: skip)")
    parser.add_argument("--rss-images", type=int, default=5000,
                        help="training images of the image_folder RSS figure (0: skip)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_images(os.path.join(tmp, "img"), args.images, int(args.size * 1.15))
        lines = ["| workers | dlfx image_folder images/s | torchvision ImageFolder + DataLoader images/s | dlfx / torchvision |",
                 "|---|---|---|---|"]
        for workers in (int(w) for w in args.workers.split(",")):
            ours = dlfx_images_per_s(os.path.join(tmp, "img"), args.size, args.batch, workers)
            peer = torchvision_images_per_s(os.path.join(tmp, "img"), args.size, args.batch, workers)
            ratio = f"{ours / peer:.2f}" if peer else "-"
            lines.append(f"| {workers} | {ours:,.0f} | {'-' if peer is None else format(peer, ',.0f')} | {ratio} |")
        write_token_folder(os.path.join(tmp, "small"), 1 << 19)
        windows = token_windows_per_s(os.path.join(tmp, "small"), 1024, 32)
        lines.append(f"\n`tokens`: {windows:,.0f} training windows/s of 1024 tokens (batch 32, memory-mapped)")
        if args.token_gb > 0:
            big = int(args.token_gb * (1 << 30)) // 2
            write_token_folder(os.path.join(tmp, "big"), big)
            small_rss = peak_rss_mib(TOKENS_RUN, os.path.join(tmp, "small"), os.path.join(tmp, "run_small"))
            big_rss = peak_rss_mib(TOKENS_RUN, os.path.join(tmp, "big"), os.path.join(tmp, "run_big"))
            lines.append(f"\nTiny GPT, 20 steps: peak RSS {small_rss[0]} MiB on a 1 MiB token file, {big_rss[0]} MiB "
                         f"on a {args.token_gb:g} GiB one ({big:,} tokens); at the end anonymous "
                         f"{small_rss[1]} / {big_rss[1]} MiB, file-backed (page cache of the mapped file) "
                         f"{small_rss[2]} / {big_rss[2]} MiB")
        if args.rss_images > 0:
            write_images(os.path.join(tmp, "few"), 40, 37)
            write_images(os.path.join(tmp, "many"), args.rss_images, 37)
            few = peak_rss_mib(IMAGES_RUN, os.path.join(tmp, "few"), os.path.join(tmp, "run_few"))
            many = peak_rss_mib(IMAGES_RUN, os.path.join(tmp, "many"), os.path.join(tmp, "run_many"))
            lines.append(f"\nSmall CNN on `image_folder` (32 px crops, batch 32), 20 steps and the final eval: peak "
                         f"RSS {few[0]} MiB with 40 training images, {many[0]} MiB with {args.rss_images:,} "
                         f"(+{args.rss_images // 10:,} val); anonymous at the end {few[1]} / {many[1]} MiB")
    print("\n".join(lines))
    print(f"\n{args.images} JPEGs ~{int(args.size * 1.15)} px, crops of {args.size}, batch {args.batch}; "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
