"""Where the runner's host time goes: one `dlfx.runner.train` run of a benchmark model under cProfile.

    python -m benchmarks.runner_profile --model gpt [--steps 2000] [--set train.steps_per_call=4] [--top 30]

Prints the run's steady-state steps/s (between its first and last log point), then the functions with the most
time of their own: on an accelerator a loop that keeps up with the device spends it waiting
(`block_until_ready`, `try_to_block`), and one that does not shows what holds it. Checkpoints are saved only at
the end unless `--set` asks otherwise.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile

from benchmarks.run import MODELS
from dlfx import config as config_lib, runner


def main(argv: list[str] | None = None) -> int:
    """Profile one run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt", help=f"of {','.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    spec, overrides, _ = MODELS[args.model]
    config = config_lib.load(spec, list(overrides) + ["train.epochs=0", f"train.steps={args.steps}",
                                                      "train.eval_every=0", "train.checkpoint_every=0"] + args.set)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as workdir:
        profiler.enable()
        summary = runner.train(config, workdir=workdir)
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"{args.model}: steady {(summary.get('steps_per_sec') or float('nan')):.1f} steps/s, steps per call "
          f"{summary.get('steps_per_call', '?')}")
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
