#!/usr/bin/env bash
# The accelerator measurements of issue 15 as one prepared session (numbers go to benchmarks/RESULTS.md).
#
#   bash benchmarks/gpu_session.sh prepare      # here, with the package index: cp312 wheels into .gpu_wheels/
#   bash benchmarks/gpu_session.sh run [OUT]    # on the GPU machine (no package index; carry .gpu_wheels):
#                                               # gpt124m, the PyTorch peer, the step probe (XLA options, profile)
#   bash benchmarks/gpu_session.sh small [OUT]  # a second call: small models, char-GPT's steps per call
#
# The GPU image has jax with its CUDA plugin, flax, optax, chex, torch and Python 3.12, but lacks grain,
# array-record, portpicker, ml-collections, mnist1d and tensorboardX, and its orbax-checkpoint is older than the
# pin: `run` installs the wheels into a scratch folder and runs dlfx from PYTHONPATH. Each measurement has its
# own time limit, so each part fits one call of a few minutes and a failed measurement does not stop the others.
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
  run|small)
    out="${2:-${OUT:-gpu_out}}"
    mkdir -p "$out"
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    { nvidia-smi --query-gpu=name,memory.total --format=csv || true
      python3 -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'orbax', o.__version__)" || echo "device: exit $?" >> "$out/failed.txt"; } > "$out/device.txt" 2>&1
    measure() {  # name, seconds, command...
      local name=$1 limit=$2
      shift 2
      timeout "$limit" "$@" > "$out/$name.txt" 2>&1 || echo "$name: exit $?" >> "$out/failed.txt"
    }
    if [ "$1" = small ]; then
      # small models: runner / bare (steps per call auto), saves at most every 5 s
      measure small 150 python3 -m benchmarks.run --models mlp,cnn,gpt --steps 20 --repeats 3 --runner-steps 300 \
        --runner-repeats 1 --set train.checkpoint_min_interval_s=5
      # char-GPT's runner ran at 0.59 of its bare step (H200, 4 steps a call): is its own call (rows gathered on
      # the device) slower per step than the bare step, scanned or not, and does a CUDA graph over the loop help?
      # ... and where the runner's own loop spends its host time on that model
      measure runner_profile 90 python3 -m benchmarks.runner_profile --model gpt --steps 3000 --top 30
      graph=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
      for k in 1 25; do  # 25: what auto picks for char-GPT's ~2.6 ms one-step runner calls since it aims at 50 ms
        measure "gpt_calls_$k" 60 python3 -m benchmarks.step_probe --model gpt --steps 100 --steps-per-call $k \
          --windows 5 --option "loop_in_graph:xla_gpu_enable_command_buffer=$graph"
      done
      # char-GPT (float32, batch 32): sliced position rows left 75 transposing kernels in a deviceless compile,
      # dlfx's gathered rows 12
      measure gpt_posgrad 90 python3 -m experiments.gpu_position_grad --model gpt --variants broadcast,add \
        --steps 50 --windows 5
      # dlfx's XLA attention kernel against JAX's on a GPU (float32 char-GPT; CPU: 1.09-1.15x)
      measure attention_kernels 90 python3 -m benchmarks.attention_kernels --steps 20 --windows 5
    else
      # GPT-2-small shape: dlfx bare/runner/baseline with MFU, then the PyTorch peer (bf16 autocast, SDPA,
      # fused AdamW, torch.compile) on the same card
      measure gpt124m 170 python3 -m benchmarks.run --models gpt124m --steps 10 --repeats 3 --runner-steps 200 \
        --runner-repeats 1 --peak-tflops 989
      measure torch_peer 130 python3 -m benchmarks.torch_peer --models gpt124m --device cuda --compile --steps 10 \
        --repeats 3 --runner-steps 200
      # the two GPU changes a deviceless compile checked (no transposing fusions; 4.8 GB less through the memory-
      # bound kernels), timed against each other: the plain position add, both changes, the GELU's left out
      measure posgrad 120 python3 -m experiments.gpu_position_grad --variants broadcast,add,add+plain_gelu --steps 10 \
        --windows 5
      # the gpt124m step's kernel profile, and the XLA option that came closest last time (H200: 1.007)
      measure probe 120 python3 -m benchmarks.step_probe --model gpt124m --steps 10 --windows 5 \
        --option cudnn_gemm_fusion:xla_gpu_cudnn_gemm_fusion_level=2 --profile "$site/probe" --top 45
      cp "$site"/probe/trace.json.gz "$site"/probe/step_hlo.txt.gz "$out"/ 2>/dev/null || true
    fi
    grep -h "^|" "$out"/*.txt || true
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh prepare | run [OUT] | small [OUT]" >&2
    exit 2
    ;;
esac
