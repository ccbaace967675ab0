"""Gin at the edges: command-line parsing and gin set-up shared by the entry points (train, aot, ...).

Command line (t5x style):
  --gin_file=PATH            a gin file (repeatable); relative paths are looked up in the current directory,
                             then in the installed package (so `gin/codec/tiny.gin` works anywhere)
  --gin.NAME=VALUE           a binding, e.g. --gin.MODEL_DIR="'/tmp/run'" or --gin.train.total_steps=10
  --gin_bindings=BINDING     a binding in gin syntax (repeatable)
  --gin_search_paths=A,B     extra directories to resolve gin files and their includes
Any other flag must be declared by the entry point; unknown flags are errors.

Gin files use dynamic registration (`from __gin__ import dynamic_registration`), so library code carries no
gin decorators; run files bind the entry point's function, e.g. `from musiclm_jax import train as train_lib`
then `train_lib.train.model = %MODEL`. Unknown configurables, unknown parameters and unset required macros are
gin errors.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import gin

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def default_search_paths() -> list[str]:
    """Where gin files are looked up: cwd, the repository (source checkout), the installed package."""
    repo_dir = os.path.dirname(_PACKAGE_DIR)
    paths = [os.getcwd()]
    if os.path.isdir(os.path.join(repo_dir, "gin")):
        paths.append(repo_dir)
    if os.path.isdir(os.path.join(_PACKAGE_DIR, "gin")):
        paths.append(_PACKAGE_DIR)
    return paths


def gin_files_in(root: str) -> list[str]:
    """Every *.gin file under root (sorted)."""
    found = []
    for dirpath, _, names in os.walk(root):
        found.extend(os.path.join(dirpath, n) for n in names if n.endswith(".gin"))
    return sorted(found)


class FlagError(ValueError):
    """A command-line flag the entry point does not know, or a malformed one."""


def parse_flags(argv: Sequence[str], extra_flags: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Parses the entry point's command line.

    Args:
      argv: arguments without the program name.
      extra_flags: {name: default} of the entry point's own flags (e.g. {'topology': None}); a list default
        makes the flag repeatable (each occurrence appends).
    Returns:
      {'gin_files': [...], 'gin_bindings': [...], 'gin_search_paths': [...], <extra flags>}.
    """
    extra = dict(extra_flags or {})
    out: dict[str, Any] = {"gin_files": [], "gin_bindings": [], "gin_search_paths": []}
    out.update(extra)
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise FlagError(f"unexpected argument {arg!r}; flags look like --gin_file=PATH or --gin.NAME=VALUE")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            name, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise FlagError(f"flag {arg!r} has no value")
        if name.startswith("gin."):
            out["gin_bindings"].append(f"{name[4:]} = {value}")
        elif name == "gin_file":
            out["gin_files"].append(value)
        elif name == "gin_bindings":
            out["gin_bindings"].append(value)
        elif name == "gin_search_paths":
            out["gin_search_paths"].extend(p for p in value.split(",") if p)
        elif name in extra and isinstance(extra[name], list):  # a repeatable flag
            out[name] = out[name] + [value]
        elif name in extra:
            out[name] = value
        else:
            known = ["gin_file", "gin.NAME", "gin_bindings", "gin_search_paths"] + sorted(extra)
            raise FlagError(f"unknown flag --{name}; known flags: {', '.join('--' + k for k in known)}")
        i += 1
    return out


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str], search_paths: Sequence[str] = (),
              finalize: bool = True) -> None:
    """Clears gin, then parses the files and bindings (later ones win), resolving paths via the search paths.

    finalize=True also checks that every `%gin.REQUIRED` macro was set; tools that use only part of a run's
    configuration (the AOT compiler needs no MODEL_DIR) pass False and meet unset macros only if they use them.
    """
    gin.clear_config(clear_constants=False)
    for path in list(search_paths) + default_search_paths():
        gin.add_config_file_search_path(path)
    if not gin_files:
        raise FlagError("no --gin_file given (e.g. --gin_file=gin/codec/tiny.gin)")
    for f in gin_files:
        if not os.path.isabs(f) and not any(os.path.exists(os.path.join(p, f))
                                            for p in list(search_paths) + default_search_paths()):
            raise FileNotFoundError(f"gin file {f!r} not found in {list(search_paths) + default_search_paths()}")
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), finalize_config=finalize)


def bound_arguments(configurable_name: str, names: Sequence[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Values gin would pass to `configurable_name` for `names` (references evaluated), else `defaults`.

    Lets a tool (the AOT compiler) reuse a run's configuration without calling the run itself.
    """
    values = {}
    for name in names:
        try:
            value = gin.query_parameter(f"{configurable_name}.{name}")
        except ValueError:
            if name not in defaults:
                raise ValueError(f"gin binding {configurable_name}.{name} is required but not set") from None
            value = defaults[name]
        # Evaluating a ConfigurableReference or macro is what gin itself does when it calls a configurable.
        values[name] = copy.deepcopy(value)
    return values


@contextlib.contextmanager
def private_config():
    """Runs the block on an empty global gin configuration and gives the caller's back afterwards.

    Gin keeps one global configuration; loading a run's config.gin (checkpoint_loading) or writing a run
    directory must not wipe the configuration of the program that does it (an entry point mid-run, a server, a
    test). Saved and restored: the bindings, the imported modules, the constants, the singletons, the operative
    configuration, the search paths and the lock. Configurables registered in the block stay registered
    (registration is not configuration).
    """
    from gin import config as gin_config  # the state gin.clear_config clears lives in this module
    saved = {
        "bindings": {selector: dict(values) for selector, values in gin_config._CONFIG.items()},
        "imports": set(gin_config._IMPORTS),
        "constants": dict(gin_config._CONSTANTS.items()),
        "singletons": dict(gin_config._SINGLETONS),
        "operative": dict(gin_config._OPERATIVE_CONFIG),
        "search_paths": list(gin_config._LOCATION_PREFIXES),
        "locked": gin_config._CONFIG_IS_LOCKED,
    }
    gin.clear_config(clear_constants=False)
    try:
        yield
    finally:
        gin.clear_config(clear_constants=True)
        gin_config._CONFIG.update(saved["bindings"])
        gin_config._IMPORTS.update(saved["imports"])
        for name, value in saved["constants"].items():
            gin_config._CONSTANTS[name] = value
        gin_config._SINGLETONS.update(saved["singletons"])
        with gin_config._OPERATIVE_CONFIG_LOCK:
            gin_config._OPERATIVE_CONFIG.update(saved["operative"])
        gin_config._LOCATION_PREFIXES[:] = saved["search_paths"]
        gin_config._set_config_is_locked(saved["locked"])


# Functions whose value a saved config.gin records as a literal: see resolved_when_saved.
_RESOLVED_WHEN_SAVED: set = set()


def resolved_when_saved(fn: Callable) -> Callable:
    """Marks `fn` as read from data outside the run (a token cache's manifest: data/stages.py). A macro bound to a
    call of it (`PREFIX_LENGTH = @stages.stage_input_length()`) is saved in config.gin as the value the call
    returned, so a run directory rebuilds its model without that data. Returns fn unchanged."""
    _RESOLVED_WHEN_SAVED.add(fn)
    return fn


def resolve_saved_macros() -> dict[str, Any]:
    """Evaluates every macro of the current configuration bound to a call of a resolved_when_saved function and
    binds the macro to that value; returns {macro: value}."""
    from gin import config as gin_config
    resolved = {}
    for (name, selector), values in list(gin_config._CONFIG.items()):
        value = values.get("value")
        if selector != "gin.macro" or not isinstance(value, gin_config.ConfigurableReference):
            continue
        if value.evaluate and value.configurable.wrapped in _RESOLVED_WHEN_SAVED:
            resolved[name] = copy.deepcopy(value)  # deep-copying a reference calls it, as gin does
    with gin.unlock_config():
        for name, value in resolved.items():
            gin.bind_parameter(f"{name}/gin.macro.value", value)
    return resolved


def save_config(model_dir: str) -> str:
    """Writes the gin config to MODEL_DIR/config.gin (macros read from data resolved to literals:
    resolve_saved_macros) and returns its path."""
    from etils import epath
    resolve_saved_macros()
    path = epath.Path(model_dir) / "config.gin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gin.config_str())
    return str(path)


def run(main: Callable[[dict], Any], extra_flags: Optional[Mapping[str, Any]] = None,
        argv: Optional[Sequence[str]] = None, finalize: bool = True) -> Any:
    """Parses flags and gin, then calls main(flags)."""
    flags = parse_flags(sys.argv[1:] if argv is None else argv, extra_flags)
    # Multi-process start-up (tpu_run.sh sets MUSICLM_* variables) must precede any JAX use, gin parsing
    # included (gin files import modules); after flag parsing so a bad flag fails without waiting for peers.
    from musiclm_jax import distributed
    distributed.maybe_initialize()
    parse_gin(flags["gin_files"], flags["gin_bindings"], flags["gin_search_paths"], finalize=finalize)
    return main(flags)
