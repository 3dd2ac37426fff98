"""Experiment configs: load `configs/x.py[:arg]`, apply `--config.a.b=v`, validate, persist."""

from __future__ import annotations

import ast
import dataclasses
import contextlib
import difflib
import importlib.util
import inspect
import json
import os
import re
import sys
from typing import Any, Iterable

import ml_collections

from dlfx import preflight
from dlfx.errors import ConfigError, one_line

PARALLEL_MODES = ("auto", "pmap", "shard_map", "fsdp")
DTYPES = ("float32", "bfloat16", "float16")
IMPORTS_FILE = "imports.json"  # in a workdir: folders the run's `package.module:attr` names were imported from
OPTIMIZERS = ("sgd", "adam", "adamw", "lion")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear", "step")
LOSSES = ("softmax_xent",)
NAN_POLICIES = ("error", "skip")
INIT_FORMATS = ("dlfx", "torchvision_resnet", "hf_gpt2", "hf_vit")


def base_config() -> ml_collections.ConfigDict:
    """Every key dlfx knows, with its default; config files start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # drives parameter init, dropout and data order

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # registry name, see dlfx.models; other keys are passed to the model

    c.data = ml_collections.ConfigDict()
    c.data.name = ""  # registry name, see dlfx.data; other keys are passed to the source
    c.data.batch_size = 128  # global batch, split over processes and devices
    c.data.crop_padding = 0  # images: random crop after zero-padding by this many pixels (0: off)
    c.data.random_flip = False  # images: random horizontal flip
    c.data.classes = ()  # classification: keep only these labels, relabelled 0..k-1 (empty: all)
    c.data.train_fraction = 1.0  # classification: stratified fraction of the train split to keep
    c.data.workers = 0  # grain worker processes that read, decode and augment batches (0: the prefetch thread)
    c.data.on_device = "auto"  # auto | on | off: a small in-memory train split lives on the devices (dlfx.data.resident)

    c.task = ml_collections.ConfigDict()  # the objective and eval metrics, see dlfx.tasks
    c.task.name = ""  # classification | lm | regression | 'package.module:attr' ("": lm for text, else classification)

    c.loss = ml_collections.ConfigDict()  # kept for older configs: loss.label_smoothing feeds the task's
    c.loss.name = "softmax_xent"
    c.loss.label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3  # peak learning rate
    c.optimizer.schedule = "cosine"  # constant | cosine | warmup_cosine | linear | step
    c.optimizer.warmup_steps = 0  # linear warmup before any schedule; > 0 for warmup_cosine
    c.optimizer.end_learning_rate = 0.0  # cosine / linear end value
    c.optimizer.boundaries = (0.5, 0.75)  # step schedule: fractions of the run
    c.optimizer.decay_factor = 0.1  # step schedule: multiplier at each boundary
    c.optimizer.weight_decay = 0.0  # decoupled; never applied to biases or norm scales
    c.optimizer.clip_norm = 0.0  # global-norm clipping; 0 turns it off
    c.optimizer.momentum = 0.9  # sgd
    c.optimizer.nesterov = False  # sgd
    c.optimizer.b1 = 0.9  # adam/adamw/lion
    c.optimizer.b2 = 0.999  # adam/adamw; lion usually wants 0.99
    c.optimizer.eps = 1e-8  # adam/adamw
    c.optimizer.grad_accum_steps = 1  # microbatches per update (lax.scan inside the step; memory of one)
    c.optimizer.freeze = ()  # regexes over a/b/c parameter paths that get no updates (e.g. ('conv.*', 'bn.*'))

    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # set steps or epochs (epochs = passes over the train split)
    c.train.epochs = 0
    c.train.eval_every = 0  # 0: evaluate only at the end
    c.train.log_every = 50
    c.train.steps_per_call = 0  # >1: one compiled call runs this many steps (lax.scan); 0: auto (dlfx.feed.can_tune)
    c.train.checkpoint_every = 500  # also saved at the end; 0: only at the end
    c.train.checkpoint_min_interval_s = 0.0  # >0: skip a checkpoint_every save within this many s of the last one
    c.train.keep = 3  # newest checkpoints kept
    c.train.keep_best = ""  # an eval metric (e.g. 'accuracy'): also keep the state of its best eval in checkpoints/best
    c.train.best_mode = "auto"  # keep_best: 'max' | 'min' | 'auto' (known for the built-in tasks' metrics)
    c.train.checkpoint_dir = ""  # "" = workdir/checkpoints; may be gs://bucket/path (Orbax writes there directly)
    c.train.nan_policy = "error"  # non-finite loss/grad: 'error' stops the run, 'skip' drops that update
    c.train.max_skipped = 10  # 'skip': stop after this many non-finite steps in a row

    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "auto"  # auto (one device: plain jit; several: shard_map) | pmap | shard_map | fsdp
    c.parallel.num_devices = 0  # use the first N devices of this host (0: all; one process only)
    c.parallel.data = 1  # fsdp mode: size of the `data` mesh axis (-1: the devices left)
    c.parallel.fsdp = -1  # fsdp mode: size of the `fsdp` mesh axis (-1: the devices left)
    c.parallel.fsdp_rules = ()  # fsdp mode: 'regex=DIM' / 'regex=replicate' per parameter path, first match wins
    c.parallel.fsdp_min_size = 16384  # fsdp mode: parameters with fewer elements stay replicated

    c.precision = ml_collections.ConfigDict()
    c.precision.compute_dtype = "float32"
    c.precision.param_dtype = "float32"

    c.init_from = ml_collections.ConfigDict()  # pretrained parameters for a fresh run (never on resume)
    c.init_from.path = ""  # dlfx workdir/checkpoint, .safetensors/.pt file or Hugging Face folder; "" = off
    c.init_from.format = "dlfx"  # dlfx | torchvision_resnet | hf_gpt2 | hf_vit
    c.init_from.load = ()  # regexes over a/b/c paths to take (empty: all)
    c.init_from.skip = ()  # regexes of parameters kept at their fresh init (e.g. ('head/.*',))
    c.init_from.step = -1  # dlfx format: checkpoint step (-1: newest valid)
    return c


def parse_config_spec(spec: str) -> tuple[str, str | None]:
    """Split `path/to/x.py:arg` into the file path and the optional argument."""
    path, sep, arg = spec.partition(":")
    if sep and not path.endswith(".py"):  # a ':' inside the path itself, not an arg
        return spec, None
    return path, (arg if sep else None)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Run `get_config(arg)` of a config file given as `path.py[:arg]`."""
    path, arg = parse_config_spec(spec)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if not path.endswith(".py"):
        raise ConfigError(f"config file {path} is not a Python file (a config is a .py file defining get_config)")
    name = "dlfx_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        where = f"syntax error at line {e.lineno}" if e.lineno else "not Python source (binary or null bytes?)"
        raise ConfigError(f"config file {path}: {where}: {e.msg}") from None
    except Exception as e:  # the file's own code failed
        raise ConfigError(f"config file {path}: {one_line(e)}") from None
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {path} defines no get_config()")
    takes_arg = bool(inspect.signature(get_config).parameters)
    if arg is not None and not takes_arg:
        raise ConfigError(f"config file {path} takes no argument, got ':{arg}'")
    try:
        config = get_config(arg) if takes_arg else get_config()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config file {path}: get_config({arg!r}) failed: {one_line(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() must return a ConfigDict")
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys of a config as dotted paths."""
    keys = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flat_keys(v, f"{prefix}{k}."))
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _argument_keys(config: ml_collections.ConfigDict) -> list[str]:
    """`model.X` / `data.X` for the arguments of the configured model and data source a config leaves out."""
    from dlfx import data, models

    keys = []
    with contextlib.suppress(Exception):  # an unknown model or source: no suggestions from it
        keys += [f"model.{name}" for name in models.fields(config.model.name)]
    with contextlib.suppress(Exception):
        keys += [f"data.{name}" for name in inspect.signature(data.resolve(config.data.name)).parameters]
    return keys


def _unknown_key(key: str, config: ml_collections.ConfigDict) -> ConfigError:
    leaves = flat_keys(config) + _argument_keys(config)
    candidates = sorted({".".join(k.split(".")[:i + 1]) for k in leaves for i in range(k.count(".") + 1)})
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean config.{close[0]}?" if close else ""
    return ConfigError(f"unknown config key config.{key}{hint}")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def _parse_sequence(text: str, like: tuple | list) -> tuple | list:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if like and not all(isinstance(v, type(like[0])) or
                        (isinstance(like[0], float) and isinstance(v, int)) for v in value):
        raise ValueError(text)
    return type(like)(value)


def parse_value(text: str, current: Any) -> Any:
    """Parse an override string into the type of the value it replaces."""
    if isinstance(current, bool):
        return _parse_bool(text)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        return _parse_sequence(text, current)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ValueError(text)


_NOT_AN_ARGUMENT = object()


def _task_default(config: ml_collections.ConfigDict, name: str) -> Any:
    """Default of task argument `name` of the configured task (for no task name: of classification / lm)."""
    from dlfx import tasks

    task_name = config.task.get("name", "")
    candidates = [tasks.resolve(task_name)] if task_name else [tasks.Classification, tasks.LanguageModel]
    for target in candidates:
        arguments = tasks.arguments(target)
        if name in arguments:
            default = arguments[name]
            return None if default is inspect.Parameter.empty else default
    return _NOT_AN_ARGUMENT


def _constructor_default(config: ml_collections.ConfigDict, parts: list[str]) -> Any:
    """Default of `model.X` / `data.X` / `task.X` when X is an argument of the configured model / data
    source / task."""
    if len(parts) != 2 or parts[0] not in ("model", "data", "task"):
        return _NOT_AN_ARGUMENT
    if parts[0] == "task":
        return _task_default(config, parts[1])
    from dlfx import data, models  # registries; imported here to keep config import light

    section, name = parts
    if section == "model":
        if not (config.model.name in models.REGISTRY or ":" in config.model.name) or \
                name not in models.fields(config.model.name):
            return _NOT_AN_ARGUMENT
        cls = models.resolve(config.model.name)[0]
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        return None if field.default is dataclasses.MISSING else field.default
    if not (config.data.name in data.SOURCES or ":" in config.data.name):
        return _NOT_AN_ARGUMENT
    params = inspect.signature(data.resolve(config.data.name)).parameters
    if name not in params or name in data.PIPELINE_KEYS:
        return _NOT_AN_ARGUMENT
    default = params[name].default
    return None if default is inspect.Parameter.empty else default


MODEL_DTYPE_KEYS = {"dtype": "compute_dtype", "param_dtype": "param_dtype"}  # model fields set from precision.*


def _model_dtype_error(key: str) -> ConfigError:
    return ConfigError(f"config.model.{key} is set by config.precision.{MODEL_DTYPE_KEYS[key]} "
                       f"({', '.join(DTYPES[:2])}); remove config.model.{key}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Apply `a.b.c=value` overrides in place; each value takes the type of the key it replaces."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form config.a.b=value")
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise _unknown_key(key, config)
            node = child
        leaf = parts[-1]
        if parts[0] == "model" and len(parts) == 2 and leaf in MODEL_DTYPE_KEYS:
            raise _model_dtype_error(leaf)
        if leaf not in node:
            default = _constructor_default(config, parts)
            if default is _NOT_AN_ARGUMENT:
                raise _unknown_key(key, config)
            with node.unlocked():  # a model/source argument the config file left at its default
                node[leaf] = default
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config.{key} is a section, set one of its keys "
                              f"({', '.join(sorted(current.keys()))})")
        try:
            value = parse_value(text, current)
        except ValueError:
            expected = type(current).__name__
            if isinstance(current, (tuple, list)) and current:
                expected += f" of {type(current[0]).__name__}"
            raise ConfigError(f"config.{key}: expected {expected}, got {text!r}") from None
        with node.ignore_type():
            node[leaf] = value


def _check_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[str]) -> None:
    section, leaf = key.split(".")
    value = config[section][leaf]
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config.{key}={value!r} is not one of {', '.join(choices)}{hint}")


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _check_types(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    """Every key dlfx defines holds the type of its default (a config file can set anything)."""
    for key in flat_keys(reference):
        section, _, leaf = key.rpartition(".")
        node = config[section] if section else config
        if leaf not in node:
            continue
        default = reference[section][leaf] if section else reference[leaf]
        if not _type_ok(node[leaf], default):
            kind = "a number" if isinstance(default, float) else type(default).__name__
            raise ConfigError(f"config.{key} must be {kind}, got {node[leaf]!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Check that every section is present and every value is usable; raise ConfigError."""
    from dlfx import data, models  # registries; imported here to keep config import light

    reference = base_config()
    for section in reference.keys():
        if section not in config:
            raise ConfigError(f"config.{section} is missing (start config files from dlfx.config.base_config())")
    for key in flat_keys(config):
        if key.split(".")[0] not in reference:
            raise _unknown_key(key, reference)
    for section in ("loss", "optimizer", "train", "parallel", "precision", "init_from"):
        for key in config[section].keys():
            if key not in reference[section]:
                raise _unknown_key(f"{section}.{key}", reference)
    _check_types(config, reference)
    if not config.model.name:
        raise ConfigError(f"config.model.name is not set (one of {', '.join(models.names())})")
    if ":" not in config.model.name:  # 'package.module:Class' is checked when the model is built
        _check_choice(config, "model.name", models.names())
    if not config.data.name:
        raise ConfigError(f"config.data.name is not set (one of {', '.join(data.names())})")
    if ":" not in config.data.name:
        _check_choice(config, "data.name", data.names())
    _check_choice(config, "loss.name", LOSSES)
    task_name = config.task.get("name", "")
    if task_name and ":" not in task_name:
        from dlfx import tasks

        _check_choice(config, "task.name", sorted(tasks.TASKS))
    _check_choice(config, "optimizer.name", OPTIMIZERS)
    _check_choice(config, "optimizer.schedule", SCHEDULES)
    _check_choice(config, "data.on_device", ("auto", "on", "off"))
    _check_choice(config, "parallel.mode", PARALLEL_MODES)
    _check_choice(config, "train.nan_policy", NAN_POLICIES)
    _check_choice(config, "train.best_mode", ("auto", "max", "min"))
    _check_choice(config, "precision.compute_dtype", DTYPES)
    _check_choice(config, "precision.param_dtype", DTYPES)
    for key in ("compute_dtype", "param_dtype"):
        if config.precision[key] == "float16":  # no loss scaling: small gradients flush to zero, large ones overflow
            raise ConfigError(f"config.precision.{key}='float16' is not supported (dlfx has no loss scaling, "
                              f"so float16 gradients underflow); use 'bfloat16'")
    _check_choice(config, "init_from.format", INIT_FORMATS)
    for key in ("optimizer.freeze", "init_from.load", "init_from.skip"):
        section, leaf = key.split(".")
        if not all(isinstance(p, str) for p in config[section][leaf]):
            raise ConfigError(f"config.{key} must be a tuple of regex strings, got {config[section][leaf]!r}")
        for pattern in config[section][leaf]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"config.{key}: {pattern!r} is not a valid regex ({e})") from None
    if not isinstance(config.data.batch_size, int) or config.data.batch_size <= 0:
        raise ConfigError(f"config.data.batch_size must be a positive int, got {config.data.batch_size!r}")
    if (config.train.steps > 0) == (config.train.epochs > 0):
        raise ConfigError("set exactly one of config.train.steps and config.train.epochs to a positive number")
    for key in ("eval_every", "log_every", "checkpoint_every", "keep", "warmup_steps", "max_skipped"):
        section = "optimizer" if key == "warmup_steps" else "train"
        if config[section][key] < 0:
            raise ConfigError(f"config.{section}.{key} must be >= 0, got {config[section][key]}")
    if config.optimizer.grad_accum_steps < 1:
        raise ConfigError(f"config.optimizer.grad_accum_steps must be >= 1, got {config.optimizer.grad_accum_steps}")
    if config.train.steps_per_call < 0:
        raise ConfigError(f"config.train.steps_per_call must be >= 0 (0: auto), got {config.train.steps_per_call}")
    if config.data.workers and config.train.steps_per_call > 1:
        raise ConfigError("config.data.workers > 0 needs config.train.steps_per_call=1 (workers suit decode-bound "
                          "data; several steps per call suit small in-memory data)")
    if config.train.steps_per_call > 1 and config.parallel.mode == "pmap":
        raise ConfigError("config.train.steps_per_call > 1 needs parallel.mode auto, shard_map or fsdp (not pmap)")
    if not isinstance(config.train.checkpoint_min_interval_s, (int, float)) or config.train.checkpoint_min_interval_s < 0:
        raise ConfigError("config.train.checkpoint_min_interval_s must be a number of seconds >= 0, got "
                          f"{config.train.checkpoint_min_interval_s!r}")
    if config.train.keep < 1:
        raise ConfigError(f"config.train.keep must be >= 1, got {config.train.keep}")
    if config.train.log_every < 1:
        raise ConfigError(f"config.train.log_every must be >= 1, got {config.train.log_every}")
    preflight.check(config, flat_keys(config))


def _search_config_folder(spec: str, config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """With a `package.module:attr` name (model, data or task), its module may sit beside the config file:
    that folder joins the end of `sys.path` (installed packages still win)."""
    names = [config.model.get("name", ""), config.data.get("name", ""), config.get("task", {}).get("name", "")]
    names += [o.partition("=")[2] for o in overrides if o.split("=")[0].strip().endswith(".name")]
    if any(":" in str(n) for n in names):
        path = parse_config_spec(spec)[0]  # a linked config: its own folder, then its target's (as Python does)
        for folder in dict.fromkeys(os.path.dirname(p) for p in (os.path.abspath(path), os.path.realpath(path))):
            if folder not in sys.path:
                sys.path.append(folder)


def load(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Load a config file, apply overrides, validate and lock it."""
    config = load_config_file(spec)
    config.lock()
    _search_config_folder(spec, config, overrides)
    apply_overrides(config, overrides)
    for key in MODEL_DTYPE_KEYS:  # set there, it bypassed the precision checks (float16 trained, then failed);
        if key in config.model:  # here, not in validate: a run that recorded one still reads back
            raise _model_dtype_error(key)
    validate(config)
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON-compatible Python (tuples become lists)."""
    return json.loads(config.to_json(sort_keys=True))


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def from_dict(values: dict) -> ml_collections.ConfigDict:
    """Rebuild a locked ConfigDict from `to_dict` output (lists become tuples again)."""
    config = ml_collections.ConfigDict(_tuples(values))
    config.lock()
    return config


def read_workdir_config(workdir: str, import_roots: bool = True) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `workdir/config.json`; `import_roots`: also put the folders its import
    paths came from on `sys.path` (a reader that imports nothing, like `dlfx runs`, passes False)."""
    from dlfx.remote import join, shown
    from dlfx.workdir import read_json

    path = os.path.join(workdir, "config.json")
    if not os.path.lexists(path):
        raise ConfigError(f"no run in {shown(workdir)}: {join(shown(workdir), 'config.json')} does not exist")
    saved = read_json(path)
    if import_roots:
        _add_recorded_import_roots(workdir)
    try:
        config = from_dict(_with_defaults(to_dict(base_config()), saved))
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{join(shown(workdir), 'config.json')} holds no valid config: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"{join(shown(workdir), 'config.json')} holds no valid config: {one_line(e)}") from None
    return config


def _with_defaults(defaults: dict, saved: dict) -> dict:
    """`saved` plus every key dlfx added since it was written, at its default."""
    merged = dict(saved)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(value, merged[key])
    return merged


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _new_key_at_default(change: str, defaults: dict) -> bool:
    """A key added to dlfx after the run was made, holding its default, is not a change of config."""
    key, _, values = change.partition(": ")
    old, _, new = values.partition(" -> ")
    if old != repr("<unset>"):
        return False
    node: Any = defaults
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return repr(node) == new


def check_workdir(config: ml_collections.ConfigDict, workdir: str, force: bool) -> None:
    """Refuse a workdir whose config.json holds a different config, unless forced."""
    from dlfx.remote import shown
    from dlfx.workdir import read_json

    path = os.path.join(workdir, "config.json")
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir} is a file, not a folder")
    if force or not os.path.lexists(path):
        return
    try:
        old = read_json(path)
    except ConfigError as e:
        raise ConfigError(f"{e}; use --force to overwrite it") from None
    changes = config_changes(old, config)
    if changes:
        raise ConfigError(f"workdir {shown(workdir)} holds a run with a different config ({describe_changes(changes)}); "
                          "use --force to run the new config there")


# how a run is logged and saved, not what it trains: a rerun that resumes may change them (with several steps
# per call, log and save points also bound the calls: results then equal to float rounding, as any call split)
CADENCE_KEYS = ("train.log_every", "train.checkpoint_every", "train.checkpoint_min_interval_s", "train.keep")


def config_changes(old: dict, config: ml_collections.ConfigDict) -> list[str]:
    """`key: old -> new` for every key where a saved config (dict) and `config` differ; keys dlfx added
    since `old` was written, at their default, and the `CADENCE_KEYS` are not changes."""
    defaults = to_dict(base_config())
    return [c for c in _diff(old, to_dict(config))
            if not _new_key_at_default(c, defaults) and c.partition(":")[0] not in CADENCE_KEYS
            and not _recorded_model_dtype(c, old)]


def _recorded_model_dtype(change: str, old: dict) -> bool:
    """`model.dtype` / `param_dtype` a run recorded before they came only from `precision.*` (now refused in a
    config), equal to its precision setting: the model computed the same, so not a change of config."""
    key, _, values = change.partition(": ")
    section, _, leaf = key.partition(".")
    if section != "model" or leaf not in MODEL_DTYPE_KEYS or not values.endswith(f" -> {'<unset>'!r}"):
        return False
    recorded, precision = old.get("model", {}).get(leaf), old.get("precision", {}).get(MODEL_DTYPE_KEYS[leaf])
    return isinstance(recorded, str) and recorded == precision


def describe_changes(changes: list[str]) -> str:
    """The first few config changes on one line."""
    return "; ".join(changes[:5]) + (f"; ... {len(changes) - 5} more" if len(changes) > 5 else "")


def write_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Write the resolved config to `workdir/config.json` atomically, and, for `package.module:attr` names,
    the folders their modules were imported from to `workdir/imports.json`."""
    from dlfx import imports
    from dlfx.workdir import write_json

    roots = imports.import_roots(_import_names(config))
    files = [("config.json", to_dict(config))] + ([(IMPORTS_FILE, {"search_dirs": roots})] if roots else [])
    for name, value in files:
        write_json(os.path.join(workdir, name), value)


def _import_names(config: ml_collections.ConfigDict) -> list[str]:
    return [str(config[section].get("name", "")) for section in ("model", "data", "task") if section in config]


def _add_recorded_import_roots(workdir: str) -> None:
    """Put the folders a run's import paths came from (imports.json) at the end of `sys.path`."""
    from dlfx.workdir import read_json

    path = os.path.join(workdir, IMPORTS_FILE)
    if not os.path.lexists(path):
        return
    recorded = read_json(path)
    folders = recorded.get("search_dirs") if isinstance(recorded, dict) else None
    if not (isinstance(folders, list) and all(isinstance(f, str) for f in folders)):
        raise ConfigError(f"{path} must hold {{\"search_dirs\": [folder, ...]}}")
    for folder in reversed(folders):  # first: the run's modules, not same-named ones in the current folder
        if not os.path.isdir(folder):
            raise ConfigError(f"{path} records {folder}, where this run's modules came from, but it does not exist")
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
