"""PaSST import: a torch state dict of hear21passt's PaSST -> networks.passt parameters and config.

Accepted layouts (both name the same tensors):
- the network's own state dict (hear21passt `get_model(...)`, i.e. `get_basic_model(mode="logits").net`, and the
  released `passt-s-f128-p16-s10-ap.476-swa.pt`): `patch_embed.proj.*`, `cls_token`, `blocks.N.*`, `head.1.*`, ...;
- the whole `PasstBasicWrapper`'s (`get_basic_model(mode="logits").state_dict()`): the same names under `net.`, plus
  `device_proxy` (a placeholder parameter) — the `net.` prefix is stripped and `device_proxy` dropped. The front end
  (`mel`) holds no persistent tensors; any `mel.*` key is dropped too.

`head_dist.*` (the distillation head) is read past: the reference's logits use only `head` on the mean of the cls
and distillation tokens. Sizes (embed dim, depth, frequency/time positions, classes) are read from the tensors;
the heads count is not stored and is taken from the caller (12 for every released PaSST-S).

torch -> ours: patch_embed.proj.weight [D, 1, p, p] -> patch_embed.kernel [p, p, 1, D];
freq_new_pos_embed [1, D, F, 1] -> freq_pos_embed [F, D]; time_new_pos_embed [1, D, 1, T] -> time_pos_embed [T, D];
cls_token / dist_token [1, 1, D] -> [D]; new_pos_embed [1, 2, D] -> token_pos_embed [2, D];
blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2} -> block_N.{norm1, qkv, proj, norm2, fc1, fc2};
norm -> norm; head.0 (LayerNorm) -> head_norm; head.1 (Linear) -> head.
"""
from __future__ import annotations

import dataclasses
import math
import re

from musiclm_jax.convert.state_dict import layer_norm_params, linear_params, to_numpy
from musiclm_jax.networks.passt import PaSSTConfig

_TOP = ("cls_token", "dist_token", "new_pos_embed", "freq_new_pos_embed", "time_new_pos_embed",
        "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
        "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias")
_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_IGNORED = ("head_dist.weight", "head_dist.bias")


class PaSSTStateDictError(ValueError):
    """A state dict that is not hear21passt's PaSST (a missing or surplus key, a wrong shape)."""


def strip_wrapper(state_dict: dict) -> dict:
    """The network's state dict from either layout: drops `device_proxy` and `mel.*`, strips `net.` when the keys
    carry it (the PasstBasicWrapper layout); a {'model': state_dict} file is unwrapped, and a patch_embed.proj.weight
    of fewer than 4 dimensions (hear21passt's checkpoint_filter_fn: older, linear patchification) becomes
    [D, 1, p, p], as hear21passt does when it loads one."""
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    state_dict = dict(state_dict)
    for key in ("patch_embed.proj.weight", "net.patch_embed.proj.weight"):
        weight = state_dict.get(key)
        if weight is not None and weight.ndim < 4:
            patch = math.isqrt(weight.numel() // weight.shape[0])
            state_dict[key] = weight.reshape(weight.shape[0], -1, patch, patch)
    keys = [k for k in state_dict if k != "device_proxy" and not k.startswith("mel.")]
    if any(k.startswith("net.") for k in keys):
        return {k[len("net."):] if k.startswith("net.") else k: state_dict[k] for k in keys}
    return {k: state_dict[k] for k in keys}


def config_from_state_dict(state_dict: dict, num_heads: int = 12, **overrides) -> PaSSTConfig:
    """The PaSSTConfig whose parameter shapes are those of the state dict (after `strip_wrapper`). Frequency and time
    positions F, T become num_bands and input_frames (= position * stride, stride from `overrides` or 10) unless
    given in `overrides`; the released model gives exactly its sizes (128 bands, 998 frames -> F 12, T 99)."""
    need = ("patch_embed.proj.weight", "freq_new_pos_embed", "time_new_pos_embed", "head.1.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise PaSSTStateDictError(f"not a hear21passt PaSST state dict: missing {missing}")
    embed_dim, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    freq, time = state_dict["freq_new_pos_embed"].shape[2], state_dict["time_new_pos_embed"].shape[3]
    stride = overrides.get("stride", PaSSTConfig.stride)
    sizes = dict(embed_dim=int(embed_dim), depth=depth, num_heads=num_heads, patch_size=int(patch), stride=stride,
                 num_classes=int(state_dict["head.1.weight"].shape[0]))
    if "blocks.0.mlp.fc1.weight" in state_dict:
        sizes["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    default = PaSSTConfig()
    if freq != default.freq_positions or stride != default.stride:
        sizes["num_bands"] = int(freq) * stride
    if time != default.time_positions or stride != default.stride:
        sizes["input_frames"] = int(time) * stride
    sizes.update(overrides)
    config = PaSSTConfig(**sizes)
    if (config.freq_positions, config.time_positions) != (freq, time):
        raise PaSSTStateDictError(f"positional embeddings of {freq} x {time} patches do not fit {config}")
    return config


def convert_passt(state_dict: dict, config: PaSSTConfig) -> dict:
    """hear21passt PaSST state dict {name: tensor} (either layout, see the module doc) -> networks.passt.PaSST
    params (float32 numpy) for `config`. Raises PaSSTStateDictError naming missing and unexpected keys, or the
    first tensor whose shape does not fit `config`."""
    sd = strip_wrapper(state_dict)
    expected = set(_TOP) | {f"blocks.{i}.{m}.{w}" for i in range(config.depth) for m in _BLOCK
                            for w in ("weight", "bias")}
    missing = sorted(expected - set(sd))
    surplus = sorted(set(sd) - expected - set(_IGNORED))
    if missing or surplus:
        raise PaSSTStateDictError(f"not a hear21passt PaSST state dict of depth {config.depth}: missing {missing}, "
                                  f"unexpected {surplus}")
    d, p = config.embed_dim, config.patch_size
    shapes = {"patch_embed.proj.weight": (d, 1, p, p), "freq_new_pos_embed": (1, d, config.freq_positions, 1),
              "time_new_pos_embed": (1, d, 1, config.time_positions), "cls_token": (1, 1, d),
              "dist_token": (1, 1, d), "new_pos_embed": (1, 2, d), "head.1.weight": (config.num_classes, d),
              "blocks.0.attn.qkv.weight": (3 * d, d), "blocks.0.mlp.fc1.weight": (int(d * config.mlp_ratio), d)}
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != shape:
            raise PaSSTStateDictError(f"{name}: expected shape {shape} for {config}, got {tuple(sd[name].shape)}")
    params = {
        "patch_embed": {"kernel": to_numpy(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
                        "bias": to_numpy(sd["patch_embed.proj.bias"])},
        "freq_pos_embed": to_numpy(sd["freq_new_pos_embed"])[0, :, :, 0].T,
        "time_pos_embed": to_numpy(sd["time_new_pos_embed"])[0, :, 0, :].T,
        "cls_token": to_numpy(sd["cls_token"]).reshape(d),
        "dist_token": to_numpy(sd["dist_token"]).reshape(d),
        "token_pos_embed": to_numpy(sd["new_pos_embed"]).reshape(2, d),
        "norm": layer_norm_params(sd, "norm"),
        "head_norm": layer_norm_params(sd, "head.0"),
        "head": linear_params(sd, "head.1"),
    }
    for i in range(config.depth):
        prefix = f"blocks.{i}"
        params[f"block_{i}"] = {
            "norm1": layer_norm_params(sd, f"{prefix}.norm1"), "qkv": linear_params(sd, f"{prefix}.attn.qkv"),
            "proj": linear_params(sd, f"{prefix}.attn.proj"), "norm2": layer_norm_params(sd, f"{prefix}.norm2"),
            "fc1": linear_params(sd, f"{prefix}.mlp.fc1"), "fc2": linear_params(sd, f"{prefix}.mlp.fc2")}
    return params


def gin_bindings(config: PaSSTConfig) -> list[str]:
    """The config.gin bindings that rebuild `config` from gin/eval/passt.gin."""
    return [f"passt.PaSSTConfig.{f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config)]
