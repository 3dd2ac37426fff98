"""Research UX: plots, the runs table, sweeps, interpretability and `dlfx.load_run`."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlfx
from dlfx import cli, config as config_lib, interpret, plot, runner, runs, sweep
from dlfx.models import GPT, ViT

TINY = ["model.features=(8, 16)", "model.hidden_dim=32", "data.batch_size=64", "train.epochs=0", "train.steps=30",
        "train.checkpoint_every=30", "train.log_every=5", "train.eval_every=15", "optimizer.warmup_steps=5"]


def _png_ok(path, min_width=200, min_height=150):
    """The PNG exists, has a sensible size and is not one flat colour."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_height and image.shape[1] >= min_width, image.shape
    assert float(np.std(image[..., :3])) > 0.01  # not blank


@pytest.fixture(scope="module")
def trained(repo_root, tmp_path_factory):
    """Two finished digits-CNN runs: the default config (fully trained, 660 steps) and a tiny one."""
    root = tmp_path_factory.mktemp("runs")
    spec = os.path.join(repo_root, "configs/digits_cnn.py")
    dirs = [str(root / "lr0.003"), str(root / "lr0.01")]
    runner.train(config_lib.load(spec, ["train.checkpoint_every=330"]), dirs[0])
    runner.train(config_lib.load(spec, TINY + ["optimizer.learning_rate=0.01"]), dirs[1])
    return str(root), dirs


def test_runner_writes_curves_and_confusion(trained):
    _, (workdir, _) = trained
    _png_ok(os.path.join(workdir, "plots", "curves.png"))
    _png_ok(os.path.join(workdir, "plots", "confusion.png"), 150, 150)
    assert json.load(open(os.path.join(workdir, "status.json")))["status"] == "finished"


def test_plot_command_compares_runs(trained, tmp_path, capsys):
    _, dirs = trained
    out = str(tmp_path / "two.png")
    assert cli.main(["plot", *dirs, "-o", out, "--metrics", "loss,accuracy,learning_rate", "--smooth", "0.6",
                     "--log-y"]) == 0
    _png_ok(out, 600, 200)
    assert cli.main(["plot", dirs[0], "--metrics", "nope"]) == 2
    assert "metric(s) nope not logged" in capsys.readouterr().err


def test_smoothing_is_debiased():
    np.testing.assert_allclose(plot.smooth([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])


def test_runs_table_reads_finished_failed_and_preempted(trained, tmp_path, capsys):
    root, dirs = trained
    table_root = tmp_path / "all"
    shutil.copytree(root, table_root)
    # a preempted run: the status the runner writes on SIGTERM
    preempted = table_root / "preempted"
    shutil.copytree(dirs[0], preempted)
    (preempted / "status.json").write_text(json.dumps({"status": "preempted", "step": 10, "total_steps": 30}))
    # a run that died without a word: status 'running' but no live process holds the lock
    died = table_root / "died"
    shutil.copytree(dirs[0], died)
    (died / "status.json").write_text(json.dumps({"status": "running", "total_steps": 30}))
    (died / ".lock").write_text("somehost 999999")
    rows = {r["name"]: r for r in (runs.summarize(w) for w in runs.find_runs(str(table_root)))}
    assert {n: r["status"] for n, r in rows.items()} == {
        "lr0.003": "finished", "lr0.01": "finished", "preempted": "preempted", "died": "failed"}
    assert rows["lr0.003"]["steps"] == "660/660" and 0.95 < rows["lr0.003"]["final_accuracy"] <= 1
    assert cli.main(["runs", str(table_root), "--sort", "final_accuracy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["name", "model", "data", "steps", "status"] and len(out) == 5
    assert cli.main(["runs", str(table_root), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("name,model,data,steps,status")


def test_failed_run_is_recorded(repo_root, tmp_path):
    workdir = str(tmp_path / "nan")
    config = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"),
                             TINY + ["optimizer.learning_rate=1e30", "optimizer.clip_norm=0.0"])
    with pytest.raises(dlfx.errors.NonFiniteError):
        runner.train(config, workdir)
    row = runs.summarize(workdir)
    assert row["status"] == "failed" and "NonFiniteError" in row["error"]


def test_sweep_resumes_without_redoing_finished_runs(repo_root, tmp_path, capsys):
    root = str(tmp_path / "sweep")
    config = os.path.join(repo_root, "configs/digits_cnn.py")
    grid = ["optimizer.learning_rate=0.003,0.01", "seed=0"]
    overrides = [t for t in TINY if not t.startswith("train.eval_every")] + ["train.steps=10", "train.log_every=5"]
    # "interrupted" sweep: only the first point got done
    first = os.path.join(root, sweep.run_name({"optimizer.learning_rate": "0.003", "seed": "0"}))
    runner.train(config_lib.load(config, overrides + ["optimizer.learning_rate=0.003", "seed=0"]), first)
    before = os.path.getmtime(os.path.join(first, "metrics.jsonl"))
    args = ["sweep", "--config", config, "--workdir-root", root] + [f"--grid={g}" for g in grid]
    assert cli.main(args + [f"--config.{o}" for o in overrides]) == 0
    assert "1 already finished, 1 to run" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(first, "metrics.jsonl")) == before  # not retrained
    rows = {r["name"]: r for r in (runs.summarize(w) for w in runs.find_runs(root))}
    assert set(rows) == {"learning_rate=0.003-seed=0", "learning_rate=0.01-seed=0"}
    assert all(r["status"] == "finished" for r in rows.values())
    _png_ok(os.path.join(root, "sweep_learning_rate.png"))
    assert cli.main(args + [f"--config.{o}" for o in overrides]) == 0  # all done: nothing runs
    assert "2 already finished, 0 to run" in capsys.readouterr().err


def test_sweep_rejects_a_bad_grid_before_running_anything(repo_root, tmp_path, capsys):
    args = ["sweep", "--config", os.path.join(repo_root, "configs/digits_cnn.py"), "--workdir-root",
            str(tmp_path / "s"), "--grid", "optimizer.learning_rat=0.1,0.2"]
    assert cli.main(args) == 2
    assert "optimizer.learning_rat" in capsys.readouterr().err and not os.path.exists(tmp_path / "s")


def test_load_run_gives_a_jitted_predict(trained):
    _, (workdir, _) = trained
    run = dlfx.load_run(workdir)
    assert run.step == 660 and set(run.variables) == {"params", "batch_stats"}
    x, y = run.dataset.test["x"], run.dataset.test["y"]
    accuracy = float(np.mean(np.argmax(run.predict(x), -1) == y))
    assert abs(accuracy - runs.summarize(workdir)["final_accuracy"]) < 1e-6


def test_integrated_gradients_completeness_and_saliency(trained):
    _, (workdir, _) = trained
    run = dlfx.load_run(workdir)
    x = jnp.asarray(run.dataset.test["x"][:32])
    target = jnp.argmax(run.predict(x), -1)
    # the midpoint rule's error on a ReLU network depends on the trained weights (1.1 % at 64 points for one
    # run): 128 points keep a margin; a wrong attribution is off by far more
    attributions, error = interpret.integrated_gradients(run.model, run.variables, x, target, steps=128)
    assert attributions.shape == x.shape
    assert float(jnp.max(error)) < 0.01  # sum of attributions = f(x) - f(0) within 1 %
    grads = interpret.saliency(run.model, run.variables, x, target)
    eps = 1e-3 * jnp.sign(grads)  # a step along the gradient raises the target logit
    f = interpret.logit_fn(run.model, run.variables)
    assert all(f(xi + ei, ti) > f(xi, ti) for xi, ei, ti in zip(x, eps, target))
    smooth = interpret.smoothgrad(run.model, run.variables, x, target, jax.random.PRNGKey(0), num_samples=8)
    assert smooth.shape == x.shape and bool(jnp.all(jnp.isfinite(smooth)))


def test_interpret_command_writes_figure(trained, tmp_path, capsys):
    _, (workdir, _) = trained
    out = str(tmp_path / "sal.png")
    assert cli.main(["interpret", "--workdir", workdir, "--index", "0..7", "--ig-steps", "128", "-o", out]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["indices"] == list(range(8)) and result["ig_completeness_error"] < 0.01
    _png_ok(out, 600, 300)
    assert cli.main(["interpret", "--workdir", workdir, "--index", "0..100000", "-o", out]) == 2


def test_integrated_gradients_on_sequences():
    from dlfx.models import CNN1D

    model = CNN1D(num_classes=3, features=(4, 4))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 40, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    attributions, error = interpret.integrated_gradients(model, variables, x, jnp.zeros(4, jnp.int32), steps=64)
    assert attributions.shape == x.shape and float(jnp.max(error)) < 0.01


def test_attention_maps_and_rollout():
    vit = ViT(num_classes=3, patch_size=2, num_layers=2, num_heads=2, embed_dim=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    variables = vit.init(jax.random.PRNGKey(1), x)
    maps = interpret.attention_maps(vit, variables, x)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    np.testing.assert_allclose(np.asarray(maps[0]).sum(-1), 1.0, rtol=1e-5)
    rollout = interpret.attention_rollout(maps)
    assert rollout.shape == (2, 17, 17)
    np.testing.assert_allclose(np.asarray(rollout).sum(-1), 1.0, rtol=1e-5)
    scanned = vit.clone(scan_layers=True)
    assert len(interpret.attention_maps(scanned, scanned.init(jax.random.PRNGKey(1), x), x)) == 2
    gpt = GPT(vocab_size=11, max_len=8, num_layers=2, num_heads=2, embed_dim=8)
    tokens = jnp.zeros((1, 8), jnp.int32)
    causal = interpret.attention_maps(gpt, gpt.init(jax.random.PRNGKey(0), tokens), tokens)[0]
    assert float(jnp.max(jnp.triu(causal[0, 0], 1))) == 0.0  # no attention to the future


def test_vit_attention_rollout_figure(repo_root, tmp_path):
    workdir = str(tmp_path / "vit")
    runner.train(config_lib.load(os.path.join(repo_root, "configs/digits_vit.py"), [
        "model.num_layers=2", "model.embed_dim=16", "train.epochs=0", "train.steps=5", "optimizer.warmup_steps=1",
        "data.batch_size=64"]), workdir)
    out = str(tmp_path / "rollout.png")
    result = interpret.interpret_workdir(workdir, out, index="0..3", methods=("attention",))
    assert result["layers"] == 2
    _png_ok(out, 200, 200)
