"""`package.module:attribute` targets for `model.name`, `data.name` and `task.name`."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Iterable, Mapping

from dlfx.errors import ConfigError, one_line


def is_import_path(name: str) -> bool:
    """True for `package.module:attribute` (a built-in name has no colon)."""
    return ":" in name


def load(spec: str, key: str, search_dirs: tuple[str, ...] = ()) -> Any:
    """Import `module:attribute` from `sys.path` plus `search_dirs` (a config file's folder); one ConfigError
    line naming `key` (e.g. `config.model.name`) if the module or attribute is not there."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{key}={spec!r} is not 'package.module:attribute'")
    if "/" in module_name or os.sep in module_name or module_name.endswith(".py"):
        raise ConfigError(f"{key}={spec!r}: give a module name, not a file path (put the file's folder beside the "
                          "config or on PYTHONPATH and write 'module:attribute')")
    for folder in search_dirs:
        if folder and folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name.split(".")[0]:
            raise ConfigError(f"{key}={spec!r}: importing {module_name} failed: {one_line(e)}") from None
        raise ConfigError(f"{key}={spec!r}: no module {module_name!r} on the Python path (dlfx adds the folder "
                          "of the config file it loads; elsewhere put the module's folder on PYTHONPATH)") from None
    except Exception as e:  # the user's module: any error while importing it
        raise ConfigError(f"{key}={spec!r}: importing {module_name} failed: {one_line(e)}") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            found = getattr(module, "__file__", None) or "a namespace package"
            shadowed = [os.path.join(d, module_name.replace(".", os.sep) + ".py") for d in (*search_dirs, *sys.path) if d]
            shadowed = [f for f in shadowed if os.path.isfile(f) and os.path.abspath(f) != os.path.abspath(found)]
            hint = (f"; {shadowed[0]} is shadowed by that module of the same name: rename your file" if shadowed
                    else "")
            raise ConfigError(f"{key}={spec!r}: {module_name} (imported from {found}) has no attribute "
                              f"{attribute!r}{hint}")
        target = getattr(target, part)
    return target


def resolve(name: str, registry: Mapping[str, Any], key: str, kind: str, accept: Callable[[Any], bool],
            search_dirs: tuple[str, ...] = ()) -> Any:
    """A built-in `registry[name]`, or the `package.module:attribute` target `name` names if `accept(target)`;
    one ConfigError line naming `key` and what it takes (`kind`, e.g. 'a flax.linen.Module class') otherwise."""
    if name in registry:
        return registry[name]
    if not is_import_path(name):
        raise ConfigError(f"{key}={name!r} is not one of {', '.join(sorted(registry))} "
                          "(or a 'package.module:attribute' path)")
    target = load(name, key, search_dirs)
    if not accept(target):
        raise ConfigError(f"{key}={name!r} is not {kind} (got {type(target).__name__})")
    return target


def import_roots(names: Iterable[str]) -> list[str]:
    """The `sys.path` folders that the already-imported `package.module:attribute` names came from: what
    `dlfx eval`/`sample`/`load_run` add to find them again from any working directory."""
    roots: list[str] = []
    for name in names:
        module = sys.modules.get(name.partition(":")[0]) if is_import_path(name) else None
        file = getattr(module, "__file__", None)
        if not file:
            continue
        root = os.path.dirname(os.path.abspath(file))
        for _ in range(module.__name__.count(".") + (os.path.basename(file) == "__init__.py")):
            root = os.path.dirname(root)
        if root not in roots:
            roots.append(root)
    return roots
