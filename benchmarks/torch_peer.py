"""dlfx vs the same model written in PyTorch on this machine (digits CNN, char-GPT, GPT-2 small).

    python -m benchmarks.torch_peer [--models cnn,gpt,gpt124m] [--steps 20] [--repeats 5] [--threads N]
                                    [--device cpu|cuda] [--compile]

Both sides train the same architecture (layer sizes, batch, AdamW, dropout, clipping where the config
clips) on batches already in memory; the median of interleaved repeats is reported. On the CPU torch
runs eager with `torch.set_num_threads(--threads)` (default: the CPU count) and dlfx on one CPU device
with XLA's own thread pool. With `--device cuda` the peer is what a PyTorch user runs on a GPU: bf16
autocast where the config computes in bfloat16, `scaled_dot_product_attention`, fused AdamW and, with
`--compile`, `torch.compile`. Needs the `[torch]` extra.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import jax
import torch
from torch import nn

from benchmarks.run import dlfx_stepper
from dlfx import config as config_lib, data, parallel, runner
from dlfx.cli import int_at_least
from dlfx.experiment import build

CONFIGS = {"cnn": "configs/digits_cnn.py", "gpt": "configs/char_gpt.py", "gpt124m": "configs/gpt2_124m.py"}


class TorchCNN(nn.Module):
    """dlfx `CNN` in PyTorch: [conv3x3-BN-ReLU-maxpool] x2, dense, dropout, head (NCHW)."""

    def __init__(self, features=(32, 64), hidden=128, num_classes=10, dropout=0.1, size=8):
        super().__init__()
        layers, channels = [], 1
        for width in features:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, momentum=0.1),
                       nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.dense = nn.Linear(channels * size * size, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.head(self.dropout(torch.relu(self.dense(x))))


class TorchBlock(nn.Module):
    """Pre-LN block with the same fused qkv projection, tanh GELU and dropout as dlfx's `Block`."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.fc2(nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh")))


class TorchGPT(nn.Module):
    """dlfx `GPT` in PyTorch: token + position embeddings, pre-LN blocks, final LN, tied head."""

    def __init__(self, vocab, max_len, layers, heads, dim, dropout):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList(TorchBlock(dim, heads, dropout) for _ in range(layers))
        self.ln_f, self.dropout = nn.LayerNorm(dim), nn.Dropout(dropout)

    def forward(self, tokens):
        x = self.dropout(self.wte(tokens) + self.wpe[: tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def torch_model(name: str, config, exp) -> nn.Module:
    """The PyTorch twin of the dlfx model the config builds."""
    if name == "cnn":
        return TorchCNN(tuple(config.model.features), config.model.hidden_dim, exp.dataset.num_classes,
                        config.model.dropout_rate, exp.dataset.example_shape[0])
    m = exp.model
    return TorchGPT(m.vocab_size, m.max_len, m.num_layers, m.num_heads, m.embed_dim, m.dropout_rate)


def bench(name: str, steps_per_repeat: int, repeats: int, runner_steps: int, device: str = "cpu",
          compile_torch: bool = False) -> dict:
    """Interleaved timings of the torch peer and the bare dlfx step; then the dlfx runner."""
    config = config_lib.load(CONFIGS[name], ["train.epochs=0", f"train.steps={runner_steps}", "train.eval_every=0",
                                             "optimizer.warmup_steps=1"])
    exp = build(config)
    it = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed)
    host = [next(it) for _ in range(4)]

    placed = [parallel.shard_batch(b, exp.mesh, exp.mode) for b in host]
    run_dlfx = dlfx_stepper(exp, placed)

    model = torch_model(name, config, exp).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.learning_rate, betas=(config.optimizer.b1,
                            config.optimizer.b2), eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay,
                            fused=device == "cuda")
    forward = torch.compile(model) if compile_torch else model
    autocast = device == "cuda" and config.precision.compute_dtype == "bfloat16"
    if name == "cnn":
        tbatches = [(torch.from_numpy(b["x"].transpose(0, 3, 1, 2).copy()), torch.from_numpy(b["y"]).long())
                    for b in host]
    else:
        tbatches = [(torch.from_numpy(b["x"]).long(), torch.from_numpy(b["y"]).long()) for b in host]
    tbatches = [(x.to(device), y.to(device)) for x, y in tbatches]

    def run_torch(n):
        for i in range(n):
            x, y = tbatches[i % len(tbatches)]
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                logits = forward(x)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.optimizer.clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_norm)
            opt.step()
        return float(loss.detach())

    start = time.perf_counter()
    run_dlfx(1)
    compile_dlfx = time.perf_counter() - start
    start = time.perf_counter()
    run_torch(1)
    compile_torch_s = time.perf_counter() - start
    run_dlfx(2), run_torch(2)  # warm up
    t_torch, t_dlfx = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run_torch(steps_per_repeat)
        t_torch.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_dlfx(steps_per_repeat)
        t_dlfx.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as workdir:
        summary = runner.train(config, os.path.join(workdir, "run"))
    torch_rate = steps_per_repeat / statistics.median(t_torch)
    bare_rate = steps_per_repeat / statistics.median(t_dlfx)
    runner_rate = summary["steps_per_sec"] or math.nan
    return {"model": name, "batch": config.data.batch_size, "torch": torch_rate, "bare": bare_rate,
            "compile_dlfx": compile_dlfx, "compile_torch": compile_torch_s,
            "runner": runner_rate, "ratio_runner": runner_rate / torch_rate, "ratio_bare": bare_rate / torch_rate}


def main(argv: list[str] | None = None) -> int:
    """Print the dlfx / PyTorch steps-per-second table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,gpt", help=f"of {','.join(CONFIGS)}")
    parser.add_argument("--steps", type=int_at_least(1), default=20)
    parser.add_argument("--repeats", type=int_at_least(1), default=5)
    parser.add_argument("--runner-steps", type=int_at_least(1), default=150)
    parser.add_argument("--threads", type=int_at_least(1), default=os.cpu_count())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the PyTorch peer runs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the peer")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models.split(",") if name not in CONFIGS]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not among {', '.join(CONFIGS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch finds no CUDA GPU here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [bench(name, args.steps, args.repeats, args.runner_steps, args.device, args.compile)
            for name in args.models.split(",")]
    peer = f"PyTorch {'compiled' if args.compile else 'eager'} ({args.device})"
    lines = [f"| model | batch | {peer} steps/s | dlfx bare steps/s | dlfx runner steps/s | runner / PyTorch | "
             "bare / PyTorch | compile s (dlfx / torch) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['torch']:.1f} | {r['bare']:.1f} | {r['runner']:.1f} | "
                     f"{r['ratio_runner']:.2f} | {r['ratio_bare']:.2f} | "
                     f"{r['compile_dlfx']:.1f} / {r['compile_torch']:.1f} |")
    print("\n".join(lines))
    print(f"torch {torch.__version__} ({args.threads} threads), jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
