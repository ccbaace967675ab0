"""Reading torch state dicts into this project's parameter trees: the pieces every importer shares.

Importers run where the `convert` extra (torch, transformers) is installed; this module itself imports neither.
"""
from __future__ import annotations

import numpy as np


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor (any device, any float dtype) -> float32 numpy array."""
    return tensor.detach().cpu().numpy().astype(np.float32)


def layer_norm_params(sd: dict, prefix: str) -> dict:
    """torch LayerNorm `prefix` -> {'scale', 'bias'} (layers.layer_norm's parameters)."""
    return {"scale": to_numpy(sd[f"{prefix}.weight"]), "bias": to_numpy(sd[f"{prefix}.bias"])}


def linear_params(sd: dict, prefix: str, in_shape: tuple = (), out_shape: tuple = (), bias: bool = True) -> dict:
    """torch Linear `prefix` (weight [out, in]) -> layers.Dense params: kernel [in, out] reshaped to in_shape +
    out_shape (for [heads, head_dim] torch's output index is head * head_dim + d), bias [out] reshaped to
    out_shape (left out with bias=False)."""
    kernel = to_numpy(sd[f"{prefix}.weight"]).T
    in_shape, out_shape = in_shape or kernel.shape[:1], out_shape or kernel.shape[1:]
    params = {"kernel": kernel.reshape(in_shape + out_shape)}
    if bias:
        params["bias"] = to_numpy(sd[f"{prefix}.bias"]).reshape(out_shape)
    return params
