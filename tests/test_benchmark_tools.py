"""benchmarks.step_probe's pure parts: option parsing, the device-time table of a trace, rotating windows."""

import gzip
import json

import jax.numpy as jnp
import pytest

from benchmarks import step_probe


def test_option_parsing_keeps_list_values_and_types_scalars():
    """'name:key=value;key=value': bools and ints typed, commas kept inside a value, a bare key refused."""
    assert step_probe.parse_option("a:xla_x=true;xla_y=3;xla_z=FUSION,WHILE;xla_e=") == (
        "a", {"xla_x": True, "xla_y": 3, "xla_z": "FUSION,WHILE", "xla_e": ""})
    with pytest.raises(SystemExit, match="expected name:key=value"):
        step_probe.parse_option("a:xla_x")


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
