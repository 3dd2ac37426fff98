"""The `dlfx` command: train, eval, inspect."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from dlfx.errors import ConfigError, DlfxError


def _split_overrides(extra: list[str]) -> list[str]:
    """Collect `--config.a.b=v` / `--config.a.b v` arguments as `a.b=v` strings."""
    overrides, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognized argument {arg!r} (overrides look like --config.optimizer.learning_rate=0.01)")
        if "=" in arg:
            overrides.append(arg[len("--config."):])
            i += 1
        elif i + 1 < len(extra):
            overrides.append(f"{arg[len('--config.'):]}={extra[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value")
    return overrides


def _default_workdir(config_spec: str) -> str:
    path, _, arg = config_spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Train a config in a workdir, resuming if it holds checkpoints."""
    from dlfx import config as config_lib, runner

    config = config_lib.load(args.config, _split_overrides(extra))
    workdir = args.workdir or _default_workdir(args.config)
    if not args.workdir:
        print(f"workdir: {workdir}", file=sys.stderr)
    summary = runner.train(config, workdir, force=args.force)
    final = " ".join(f"{k}={v:.4f}" for k, v in summary["eval"].items())
    rate = f", {summary['steps_per_sec']:.1f} steps/s" if summary["steps_per_sec"] else ""
    print(f"{summary['status']}: step {summary['step']}/{summary['total_steps']} in "
          f"{summary['wall_time']:.1f} s{rate} on {summary['devices']} device(s) ({summary['mode']}); "
          f"eval {final or 'not run'}; workdir {workdir}")
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    """Evaluate a run's latest (or given) checkpoint on its test split."""
    from dlfx import runner

    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    result = runner.evaluate_workdir(args.workdir, args.step)
    print(json.dumps(result))
    return 0


def cmd_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    """Print the parameter table of a run, checkpoint or weights file."""
    from dlfx import inspection

    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    print(inspection.format_table(inspection.read_shapes(args.path)))
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the `dlfx` command."""
    parser = argparse.ArgumentParser(prog="dlfx", description="dlfx: JAX research experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a config (resumes a workdir with checkpoints)",
                           epilog="Any --config.KEY=VALUE overrides that key of the config.")
    train.add_argument("--config", required=True, help="config file, optionally with an argument: configs/x.py:arg")
    train.add_argument("--workdir", help="run folder (default: a new folder under runs/)")
    train.add_argument("--force", action="store_true", help="run even if the workdir holds a different config")
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("eval", help="evaluate a run's checkpoint")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid)")
    evaluate.set_defaults(func=cmd_eval)
    inspect = sub.add_parser("inspect", help="parameter table of a run, checkpoint, .safetensors or .npz")
    inspect.add_argument("path")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dlfx` console script; user errors print one line and return 2."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    args, extra = make_parser().parse_known_args(argv)
    try:
        return args.func(args, extra)
    except DlfxError as e:
        print(f"dlfx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlfx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
