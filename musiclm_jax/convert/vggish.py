"""VGGish import: a torch state dict in the layout torchvggish loads (the released `vggish-10086976.pth`) ->
networks.vggish parameters; optionally the PCA postprocessor's parameters (`vggish_pca_params-970ea276.pth`:
pca_eigen_vectors [128, 128], pca_means [128] or [128, 1]).

torch names: features.{0,3,6,8,11,13} are the six 3x3 convolutions (weight [out, in, 3, 3]), embeddings.{0,2,4}
the three dense layers (weight [out, in]); the first dense layer reads the flattened [time, band, channel] map,
which is also this network's flattening order, so no permutation is needed.
"""
from __future__ import annotations

import numpy as np

from musiclm_jax.convert.state_dict import linear_params, to_numpy
from musiclm_jax.networks.vggish import CONV_CHANNELS

TORCH_CONVS = (0, 3, 6, 8, 11, 13)  # indices of the convolutions in torchvggish's `features` Sequential
TORCH_DENSE = {"fc1_1": "embeddings.0", "fc1_2": "embeddings.2", "fc2": "embeddings.4"}


class VGGishStateDictError(ValueError):
    """A state dict that is not torchvggish's VGGish (a missing or surplus key, a wrong shape)."""


def convert_vggish(state_dict: dict) -> dict:
    """torchvggish state dict {name: tensor} -> networks.vggish.VGGish params (float32 numpy)."""
    names = [f"conv{b + 1}_{i + 1}" for b, channels in enumerate(CONV_CHANNELS) for i in range(len(channels))]
    expected = {f"features.{t}.{w}" for t in TORCH_CONVS for w in ("weight", "bias")}
    expected |= {f"{p}.{w}" for p in TORCH_DENSE.values() for w in ("weight", "bias")}
    missing, surplus = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or surplus:
        raise VGGishStateDictError(f"not a torchvggish VGGish state dict: missing {missing}, unexpected {surplus}")
    params = {}
    for name, index in zip(names, TORCH_CONVS):
        weight = to_numpy(state_dict[f"features.{index}.weight"])  # [out, in, kh, kw]
        if weight.shape[2:] != (3, 3):
            raise VGGishStateDictError(f"features.{index}.weight: expected 3x3 kernels, got {weight.shape}")
        params[name] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": to_numpy(state_dict[f"features.{index}.bias"])}
    for name, prefix in TORCH_DENSE.items():
        params[name] = linear_params(state_dict, prefix)
    return params


def convert_vggish_pca(pca_params: dict) -> dict:
    """{'pca_eigen_vectors', 'pca_means'} (torch tensors or numpy) -> {'eigen_vectors' [128, 128], 'means' [128]}."""
    missing = [k for k in ("pca_eigen_vectors", "pca_means") if k not in pca_params]
    if missing:
        raise VGGishStateDictError(f"not VGGish PCA parameters: missing {missing} (keys: {sorted(pca_params)})")

    def array(value):
        return to_numpy(value) if hasattr(value, "detach") else np.asarray(value, np.float32)
    return {"eigen_vectors": array(pca_params["pca_eigen_vectors"]), "means": array(pca_params["pca_means"]).reshape(-1)}
