"""Config files, overrides, validation and the workdir config check."""

import json
import os

import chex
import pytest

from dlfx import config as config_lib
from dlfx.errors import ConfigError


def _write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_misspelt_argument_the_config_leaves_at_its_default_is_suggested(repo_root):
    with pytest.raises(ConfigError, match="config.data.skip_bad_image; did you mean config.data.skip_bad_images"):
        config_lib.load(os.path.join(repo_root, "configs/finetune_resnet_folder.py"), ["data.skip_bad_image=true"])


def test_load_applies_overrides_with_types(repo_root):
    c = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), [
        "optimizer.learning_rate=0.01", "train.epochs=3", "optimizer.nesterov=true",
        "model.features=(8, 16)", "optimizer.name=sgd", "optimizer.weight_decay=1"])
    assert c.optimizer.learning_rate == 0.01 and isinstance(c.optimizer.learning_rate, float)
    assert c.train.epochs == 3 and c.optimizer.nesterov is True
    assert c.model.features == (8, 16) and c.optimizer.name == "sgd"
    assert c.optimizer.weight_decay == 1.0 and isinstance(c.optimizer.weight_decay, float)


def test_config_argument_selects_variant(repo_root):
    mlp = config_lib.load(os.path.join(repo_root, "configs/mnist1d.py") + ":mlp")
    cnn = config_lib.load(os.path.join(repo_root, "configs/mnist1d.py") + ":cnn")
    assert (mlp.model.name, cnn.model.name) == ("mlp", "cnn1d")
    with pytest.raises(ConfigError, match="unknown model 'rnn'"):
        config_lib.load(os.path.join(repo_root, "configs/mnist1d.py") + ":rnn")


def test_unknown_key_names_it_and_suggests(repo_root):
    with pytest.raises(ConfigError, match=r"config.optimizer.lerning_rate; did you mean config.optimizer.learning_rate"):
        config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), ["optimizer.lerning_rate=0.1"])
    with pytest.raises(ConfigError, match="unknown config key config.nothing.here"):
        config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), ["nothing.here=1"])


@pytest.mark.parametrize("override, message", [
    ("optimizer.learning_rate=fast", "config.optimizer.learning_rate: expected float, got 'fast'"),
    ("train.epochs=2.5", "config.train.epochs: expected int"),
    ("optimizer.nesterov=maybe", "config.optimizer.nesterov: expected bool"),
    ("model.features=(8, 'a')", "config.model.features: expected tuple of int"),
    ("optimizer=1", "config.optimizer is a section"),
    ("seed", "not of the form"),
])
def test_wrong_type_is_one_clear_error(repo_root, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), [override])


@pytest.mark.parametrize("override, message", [
    ("optimizer.schedule=cosin", "config.optimizer.schedule='cosin' is not one of .* \\(did you mean 'cosine'\\?\\)"),
    ("model.name=resnet9000", "config.model.name='resnet9000' is not one of"),
    ("data.name=imagenet", "config.data.name='imagenet' is not one of"),
    ("parallel.mode=tpu", "config.parallel.mode='tpu'"),
    ("train.steps_per_call=-1", "config.train.steps_per_call must be >= 0"),
    ("data.batch_size=0", "config.data.batch_size must be a positive int"),
    ("train.steps=10", "set exactly one of config.train.steps and config.train.epochs"),
])
def test_validation_names_the_key(repo_root, override, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), [override])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.py"):
        config_lib.load(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match=r"syntax error at line 2"):
        config_lib.load(_write(tmp_path, "def get_config():\n  return (\n"))
    with pytest.raises(ConfigError, match="defines no get_config"):
        config_lib.load(_write(tmp_path, "x = 1\n"))
    with pytest.raises(ConfigError, match="takes no argument"):
        config_lib.load(_write(tmp_path, "def get_config():\n  return None\n") + ":foo")
    with pytest.raises(ConfigError, match="must return a ConfigDict"):
        config_lib.load(_write(tmp_path, "def get_config():\n  return {}\n"))


def test_config_file_cannot_add_unknown_sections(tmp_path):
    path = _write(tmp_path, "from dlfx.config import base_config\n"
                            "def get_config():\n  c = base_config()\n  c.model.name = 'mlp'\n"
                            "  c.data.name = 'digits'\n  c.train.steps = 5\n  c.trian = 3\n  return c\n")
    with pytest.raises(ConfigError, match="config.trian; did you mean config.train"):
        config_lib.load(path)


@pytest.mark.parametrize("key,setting", [("dtype", "compute_dtype"), ("param_dtype", "param_dtype")])
def test_model_dtypes_come_only_from_the_precision_section(tmp_path, key, setting):
    # set on the model, float16 got past the precision check, trained, and failed at the eval
    path = _write(tmp_path, "import jax.numpy as jnp\nfrom dlfx.config import base_config\n"
                            "def get_config():\n  c = base_config()\n  c.model.name = 'mlp'\n"
                            f"  c.data.name = 'digits'\n  c.model.{key} = jnp.float16\n  return c\n")
    with pytest.raises(ConfigError, match=rf"config.model.{key} is set by config.precision.{setting} "):
        config_lib.load(path)
    with pytest.raises(ConfigError, match=rf"config.model.{key} is set by config.precision.{setting} "):
        config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "char_gpt.py"),
                        [f"model.{key}=float16"])  # a model field the override would otherwise have added
    # a run an older dlfx trained with one recorded still reads back (eval, resume, sample)
    old = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "char_gpt.py"))
    with old.unlocked():
        old.model[key] = "bfloat16"
    os.makedirs(tmp_path / "old_run")
    config_lib.write_workdir(old, str(tmp_path / "old_run"))
    assert config_lib.read_workdir_config(str(tmp_path / "old_run")).model[key] == "bfloat16"
    # ... and resumes under the same command where it matched its precision setting (it computed the same)
    new = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "char_gpt.py"))
    saved = config_lib.to_dict(old)
    assert config_lib.config_changes(saved, new) == [f"model.{key}: 'bfloat16' -> '<unset>'"]
    saved["model"][key] = saved["precision"][setting]
    assert config_lib.config_changes(saved, new) == []


def test_json_roundtrip_and_workdir_check(repo_root, tmp_path):
    c = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"))
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    config_lib.write_workdir(c, workdir)
    again = config_lib.read_workdir_config(workdir)
    assert config_lib.to_dict(again) == config_lib.to_dict(c)
    assert again.model.features == (32, 64)  # tuples survive the JSON trip
    config_lib.check_workdir(c, workdir, force=False)  # same config: accepted
    changed = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), ["optimizer.learning_rate=0.5"])
    with pytest.raises(ConfigError, match=r"different config \(optimizer.learning_rate: 0.003 -> 0.5\).*--force"):
        config_lib.check_workdir(changed, workdir, force=False)
    config_lib.check_workdir(changed, workdir, force=True)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optimizer"]["learning_rate"] == 0.003


def test_base_config_keys_are_stable():
    keys = config_lib.flat_keys(config_lib.base_config())
    for key in ("seed", "model.name", "data.batch_size", "optimizer.clip_norm", "train.keep", "parallel.mode", "precision.compute_dtype"):
        assert key in keys
    chex.assert_equal(len(keys), len(set(keys)))


def test_model_and_data_arguments_left_at_default_can_be_overridden(repo_root):
    c = config_lib.load(os.path.join(repo_root, "configs/mnist1d.py") + ":mlp",
                        ["model.dropout_rate=0.3", "data.seed=7", "model.hidden_dims=(64, 64)"])
    assert c.model.dropout_rate == 0.3 and isinstance(c.model.dropout_rate, float)
    assert c.data.seed == 7 and c.model.hidden_dims == (64, 64)
    with pytest.raises(ConfigError, match="config.model.dropout_rate: expected float"):
        config_lib.load(os.path.join(repo_root, "configs/mnist1d.py") + ":mlp", ["model.dropout_rate=lots"])
    with pytest.raises(ConfigError, match="unknown config key config.model.kernel_size"):
        config_lib.load(os.path.join(repo_root, "configs/mnist1d.py") + ":mlp", ["model.kernel_size=3"])


def test_keys_added_to_dlfx_later_do_not_count_as_a_change(repo_root, tmp_path):
    c = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"))
    values = config_lib.to_dict(c)
    del values["train"]["nan_policy"]  # a run made before this key existed
    (tmp_path / "config.json").write_text(json.dumps(values))
    config_lib.check_workdir(c, str(tmp_path), force=False)
    changed = config_lib.load(os.path.join(repo_root, "configs/digits_cnn.py"), ["train.nan_policy=skip"])
    with pytest.raises(ConfigError, match="train.nan_policy: '<unset>' -> 'skip'"):
        config_lib.check_workdir(changed, str(tmp_path), force=False)
