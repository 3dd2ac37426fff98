#!/usr/bin/env bash
# The accelerator measurements of issue 15 as one prepared session (numbers go to benchmarks/RESULTS.md).
#
#   bash benchmarks/gpu_session.sh prepare      # here, with the package index: cp312 wheels into .gpu_wheels/
#   bash benchmarks/gpu_session.sh run [OUT]    # on the GPU machine (no package index; carry .gpu_wheels)
#   bash benchmarks/gpu_session.sh flags [OUT]  # a second call if time is left: the gpt124m step under XLA flags
#
# The GPU image has jax with its CUDA plugin, flax, optax, chex, torch and Python 3.12, but lacks grain,
# array-record, portpicker, ml-collections, mnist1d and tensorboardX, and its orbax-checkpoint is older than the
# pin: `run` installs the wheels into a scratch folder and runs dlfx from PYTHONPATH. Each measurement has its
# own time limit, so the whole run fits one ~9 minute call and a failed one does not stop the others.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels

case "${1:-}" in
  prepare)
    mkdir -p "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" \
      grain array-record portpicker ml-collections mnist1d tensorboardX "orbax-checkpoint>=0.12.8"
    ls "$WHEELS"
    ;;
  run|flags)
    out="${2:-${OUT:-gpu_out}}"
    mkdir -p "$out"
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    { nvidia-smi --query-gpu=name,memory.total --format=csv || true
      python3 -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'orbax', o.__version__)"; } > "$out/device.txt" 2>&1
    measure() {  # name, seconds, command...
      local name=$1 limit=$2
      shift 2
      timeout "$limit" "$@" > "$out/$name.txt" 2>&1 || echo "$name: exit $?" >> "$out/failed.txt"
    }
    if [ "$1" = flags ]; then  # each XLA flag set against the default, on the same warm card
      for flags in "" --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true \
          --xla_gpu_enable_command_buffer=; do
        name="flags_$(echo "${flags:-default}" | tr -c 'a-z0-9_\n' '_')"
        XLA_FLAGS="$flags" measure "$name" 130 python3 -m benchmarks.run --models gpt124m --steps 10 --repeats 3 \
          --runner-steps 20 --runner-repeats 1 --peak-tflops 989
      done
      grep -h "^| gpt124m" "$out"/flags_*.txt /dev/null || true
      exit 0
    fi
    # GPT-2-small shape: dlfx bare/runner/baseline with MFU, then the PyTorch peer (bf16 autocast, SDPA,
    # fused AdamW, torch.compile) on the same card
    measure gpt124m 200 python3 -m benchmarks.run --models gpt124m --steps 10 --repeats 3 --runner-steps 200 \
      --runner-repeats 1 --peak-tflops 989
    measure torch_peer 150 python3 -m benchmarks.torch_peer --models gpt124m --device cuda --compile --steps 10 \
      --repeats 3 --runner-steps 200
    # small models: runner / bare, saves at most every 5 s (the CNN's saves every 200 steps held it at 0.50)
    measure small 120 python3 -m benchmarks.run --models mlp,cnn,gpt --steps 20 --repeats 3 --runner-steps 300 \
      --runner-repeats 1 --set train.checkpoint_min_interval_s=5
    # the same with steps per call chosen from the measured step time
    measure small_auto 90 python3 -m benchmarks.run --models cnn,gpt --steps 20 --repeats 3 --runner-steps 300 \
      --runner-repeats 1 --set train.checkpoint_min_interval_s=5 --set train.steps_per_call=0
    grep -h "^|" "$out"/*.txt || true
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh prepare | run [OUT] | flags [OUT]" >&2
    exit 2
    ;;
esac
