"""A component folder's public names, loaded on first use (PEP 562), so that importing one module of the folder
does not import the others: `from musiclm_jax.codec import Codec` loads codec/inference.py only then."""
from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """The module-level __getattr__ of `package`: name -> getattr(package.<exports[name]>, name)."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    return __getattr__
