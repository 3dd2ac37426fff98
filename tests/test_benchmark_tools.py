"""benchmarks.step_probe's pure parts: option parsing, the device-time table of a trace, rotating windows."""

import gzip
import json
import os

import chex
import jax.numpy as jnp
import pytest

from benchmarks import step_probe


def test_option_parsing_keeps_list_values_and_types_scalars():
    """'name:key=value;key=value': bools and ints typed, commas kept inside a value, a bare key refused."""
    assert step_probe.parse_option("a:xla_x=true;xla_y=3;xla_z=FUSION,WHILE;xla_e=") == (
        "a", {"xla_x": True, "xla_y": 3, "xla_z": "FUSION,WHILE", "xla_e": ""})
    for bad in ("a:xla_x", "garbage", "a:", ":xla_x=1"):  # a variant without options or name is refused too
        with pytest.raises(ValueError, match="expected name:key=value"):
            step_probe.parse_option(bad)


def test_benchmark_clis_refuse_bad_arguments_in_one_line(capsys):
    """Unknown models, counts below one and bad overrides: a usage error or one line, exit status 2."""
    from benchmarks import run

    for main, argv in ((run.main, ["--models", "mlp,nosuch"]), (step_probe.main, ["--steps-per-call", "0"]),
                       (step_probe.main, ["--model", "nosuch"])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "--models: nosuch not among mlp" in capsys.readouterr().err
    assert run.main(["--models", "mlp", "--set", "train.steps_per_call=-2"]) == 2
    assert capsys.readouterr().err.strip() == ("benchmarks.run: config.train.steps_per_call must be >= 0 (0: auto), "
                                               "got -2")


def _trace(path, processes, events):
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}} for pid, name in processes]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_device_time_table_maps_kernels_to_ops_and_ignores_host_events(tmp_path):
    """Kernels named after their fusion (dots as underscores) get its op name; layers sum; host events never count."""
    names = step_probe._op_names('  %loop_add_fusion.3 = f32[4]{0} fusion(%p), metadata={op_name="jit(f)/h/h_0/add"}\n'
                                 '  %loop_add_fusion.4 = f32[4]{0} fusion(%p), metadata={op_name="jit(f)/h/h_1/add"}\n')
    events = [{"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion_3", "dur": 300,
               "args": {"hlo_op": "command_buffer_1"}},
              {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion_4", "dur": 100, "args": {}},
              {"ph": "X", "pid": 1, "tid": 7, "name": "nvjet_gemm", "dur": 600, "args": {"hlo_op": "command_buffer_1"}},
              {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction", "dur": 99999, "args": {}}]
    _trace(tmp_path / "t.json.gz", [(1, "/device:GPU:0"), (2, "/host:CPU")], events)
    table = step_probe.device_time_table(str(tmp_path / "t.json.gz"), names, 2, 1.0, 10)
    assert "busiest device stream 0.50 ms/step" in table
    assert "| 0.300 | 0.5 | nvjet_gemm | command_buffer_1 |" in table
    assert "| 0.200 | 1 | loop_add_fusion | h/h_*/add |" in table
    _trace(tmp_path / "h.json.gz", [(2, "/host:CPU")], events[-1:])
    assert "no device events" in step_probe.device_time_table(str(tmp_path / "h.json.gz"), names, 2, 1.0, 10)


def test_rotate_times_every_run_each_round_and_keeps_its_state():
    """Each run's state advances through every window; each run gets one window per round."""
    def call(state, batch):
        return state + batch, jnp.zeros(())

    runs = {"a": [call, jnp.zeros(()), [jnp.ones(())]], "b": [call, jnp.zeros(()), [2 * jnp.ones(())]]}
    times = step_probe.rotate(runs, calls=3, windows=4)
    assert [len(t) for t in times.values()] == [4, 4]
    assert float(runs["a"][1]) == 12.0 and float(runs["b"][1]) == 24.0
    assert step_probe.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0


HLO = """HloModule jit_step, is_scheduled=true

%fused_transpose.1 (p0: bf16[4,8]) -> bf16[8,4] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %t = bf16[8,4]{1,0} transpose(%p0), dimensions={1,0}
}

%branch_a.16 (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  ROOT %neg_fusion.18 = f32[16]{0} fusion(%a), kind=kLoop, calls=%fused_negate.18
}

%branch_b.17 (b: f32[16]) -> f32[16] {
  %b = f32[16]{0} parameter(0)
  ROOT %b2 = f32[16]{0} copy(%b)
}

%body.2 (arg: (s32[], f32[16])) -> (s32[], f32[16]) {
  %arg = (s32[], f32[16]{0}) parameter(0)
  %v = f32[16]{0} get-tuple-element(%arg), index=1
  %loop_add_fusion.3 = f32[16]{0} fusion(%v, %v), kind=kLoop, calls=%fused_add.3, metadata={op_name="jit(step)/h/h_1/add"}
  ROOT %out = (s32[], f32[16]{0}) tuple(%v, %loop_add_fusion.3)
}

ENTRY %main.9 (x: bf16[4,8], w: bf16[8,8], c: (s32[], f32[16])) -> (bf16[4,8], f32[16]) {
  %x = bf16[4,8]{1,0} parameter(0)
  %w = bf16[8,8]{1,0} parameter(1)
  %c = (s32[], f32[16]{0}) parameter(2)
  %gemm.4 = bf16[4,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%g, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %attn.5 = (bf16[4,8]{1,0}, u8[0]{0}) custom-call(%gemm.4, %x, %x), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/h/h_0/attn/dot_product_attention"}
  %input_transpose_fusion.6 = bf16[8,4]{1,0} fusion(%gemm.4), kind=kInput, calls=%fused_transpose.1, metadata={op_name="jit(step)/h/h_0/mlp/transpose"}
  %loop_add_fusion.7 = bf16[4,8]{1,0} fusion(%x, %gemm.4), kind=kLoop, calls=%fused_add.7, metadata={op_name="jit(step)/h/h_0/add"}
  %while.8 = (s32[], f32[16]{0}) while(%c), condition=%cond.9, body=%body.2
  %copy.10 = bf16[4,8]{0,1} copy(%x)
  %copy.11 = bf16[4,8]{1,0} copy(%x)
  %conv.12 = (bf16[4,8]{1,0}, u8[1024]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward"
  %ars.13 = bf16[4,8]{1,0} all-reduce-start(%x), replica_groups={}, to_apply=%sum
  %ard.14 = bf16[4,8]{1,0} all-reduce-done(%ars.13)
  %cond.15 = f32[16]{0} conditional(%p, %r, %r), branch_computations={%branch_a.16, %branch_b.17}
  %cublas.19 = (bf16[4,8]{1,0}, s8[4096]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm"
  %bytes.20 = (u8[4,8]{1,0}, u8[64]{0}) fusion(%x), kind=kLoop, calls=%fused_bitcast_convert.20
  %r = f32[16]{0} get-tuple-element(%while.8), index=1
  ROOT %tuple = (bf16[4,8]{1,0}, f32[16]{0}) tuple(%loop_add_fusion.7, %r)
}
"""


def test_gpu_compile_counts_kernels_by_kind_with_their_bytes_and_model_op():
    """The deviceless-compile tool's HLO reading: loop bodies are launched, fused computations are not; bytes
    are each kernel's output plus operands; layers merge in the by-op rows."""
    from benchmarks import gpu_compile

    rows = gpu_compile.kernels(HLO)
    assert sorted(rows) == sorted([
        ("GEMM", "fusion", 64 + 64 + 128),  # no op_name: the opcode; out bf16[4,8] + x + w bf16[8,8]
        ("attention", "h/h_*/attn/dot_product_attention", 64 + 3 * 64),
        ("transposing", "h/h_*/mlp/transpose", 64 + 64),
        ("other memory-bound", "h/h_*/add", 3 * 64),
        ("other memory-bound", "h/h_*/add", 3 * 64),  # the loop body's f32[16] add: 64 bytes out, 2 x 64 in
        ("transposing", "copy", 2 * 64),  # a copy to another layout
        ("other memory-bound", "copy", 2 * 64),  # a copy that keeps the layout
        ("convolution", "custom-call", 64 + 64 + 128),  # its u8 workspace left out
        ("collective", "all-reduce-start", 2 * 64),  # the -done launches nothing
        ("other memory-bound", "fusion", 2 * 64),  # each branch of the conditional
        ("other memory-bound", "copy", 2 * 64),
        ("GEMM", "custom-call", 64 + 64 + 128),  # cuBLAS: its s8 workspace left out
        ("other memory-bound", "fusion", 32 + 64 + 64),  # u8 data out of a fusion is counted, all of it
    ])
    table = gpu_compile.tables(rows, 1e12, top=5)
    assert "| attention | 1 |" in table and "| transposing | 2 |" in table and "| all | 13 |" in table
    assert "| `h/h_*/add` | 2 | 0 |" in table  # 384 bytes: 0 MB


def test_gpu_compile_says_what_it_needs_without_the_cuda_plugin(capsys, monkeypatch):
    """Without JAX's CUDA plugin: one line naming the install, exit status 2."""
    from benchmarks import gpu_compile

    def find_spec(name):  # as without any plugin: the jax_plugins package itself is missing
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

    monkeypatch.setattr(gpu_compile.importlib.util, "find_spec", find_spec)
    assert gpu_compile.main(["--model", "gpt"]) == 2
    assert "jax[cuda13]" in capsys.readouterr().err


@pytest.mark.parametrize("on_device,steps_per_call", [("on", 1), ("on", 3), ("off", 3)])
def test_gpu_compile_gives_the_runner_call_what_the_runner_feed_gives_it(repo_root, on_device, steps_per_call):
    """The deviceless compile's abstract arguments are shaped like the batches the runner's device feed yields
    (row indices and slot where the split lives on the device, stacked batches otherwise) and the call lowers."""
    from benchmarks import gpu_compile
    from dlfx import config as config_lib, data, feed
    from dlfx.experiment import build

    config = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), [
        "model.features=(4, 8)", "model.hidden_dim=16", "data.batch_size=8", "train.epochs=0", "train.steps=60",
        "train.log_every=6", "train.eval_every=0", "train.checkpoint_every=0", "parallel.num_devices=1",
        f"data.on_device={on_device}", f"train.steps_per_call={steps_per_call}"])
    exp = build(config)
    args = gpu_compile.call_arguments(exp, steps_per_call)
    fed = feed.device_prefetcher(exp, exp.train_iterator(), feed.call_sizes(exp, steps_per_call))
    try:
        chex.assert_trees_all_equal_shapes_and_dtypes(args[1], next(fed))
    finally:
        fed.release()
    tables = data.resident.place(exp.dataset.train, exp.mesh) if exp.resident else None
    assert exp.resident == (on_device == "on") and len(args) == (3 if exp.resident else 2)
    if tables is not None:
        chex.assert_trees_all_equal_shapes_and_dtypes(args[2], tables)
    assert "stablehlo" in exp.train_step(steps_per_call, tables).lower(*args).as_text()[:20000]
