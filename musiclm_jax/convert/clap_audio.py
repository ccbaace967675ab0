"""CLAP's audio tower (transformers `ClapAudioModel`, e.g. `ClapModel.audio_model`) -> networks.htsat.HTSAT.

`config_from_hf(audio_config)` maps a ClapAudioConfig onto networks.htsat.HTSATConfig and refuses, naming them,
the settings this network does not reproduce (fused checkpoints, unflattened or multi-channel patch embeddings).
`convert_clap_audio(model)` maps the weights; the input batch norm (`bn0`, over the mel bins) is folded into a
per-bin scale and shift from its running statistics. Only the encoder is imported: the projection to CLAP's joint
embedding space lives in `ClapModel.audio_projection`, outside the audio model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import partitioning
from musiclm_jax.convert.state_dict import layer_norm_params, linear_params, to_numpy
from musiclm_jax.layers import ACTIVATIONS
from musiclm_jax.networks.htsat import HTSAT, HTSATConfig


class UnsupportedClapAudioConfig(ValueError):
    """A ClapAudioConfig setting this network cannot reproduce."""


def config_from_hf(config, **feature_settings) -> HTSATConfig:
    """The HTSATConfig equivalent to a transformers ClapAudioConfig.

    Args:
      config: the transformers ClapAudioConfig (`ClapConfig.audio_config`).
      **feature_settings: HTSATConfig feature-extraction fields (sample_rate, fft_window_size, hop_length,
        max_length_s, frequency_min, frequency_max; from the checkpoint's ClapFeatureExtractor) and dtype; the
        defaults are CLAP's (48 kHz, 1024, 480, 10 s, 50 Hz, 14 kHz).
    Raises:
      UnsupportedClapAudioConfig naming every unsupported setting.
    """
    checks = {  # name: (value, the value we support)
        "enable_fusion": (bool(config.enable_fusion), False),
        "flatten_patch_embeds": (bool(getattr(config, "flatten_patch_embeds", True)), True),
        "patch_embed_input_channels": (int(getattr(config, "patch_embed_input_channels", 1)), 1),
    }
    bad = {k: v for k, (v, want) in checks.items() if v != want}
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACTIVATIONS:
        bad["hidden_act"] = config.hidden_act
    if not isinstance(config.spec_size, int):
        bad["spec_size"] = config.spec_size
    if bad:
        reason = " (fused CLAP checkpoints are not supported)" if "enable_fusion" in bad else ""
        raise UnsupportedClapAudioConfig(
            f"ClapAudioConfig settings not supported: {bad}{reason} (supported: enable_fusion=False, "
            f"flatten_patch_embeds=True, patch_embed_input_channels=1, an int spec_size, activations "
            f"{sorted(ACTIVATIONS)})")
    return HTSATConfig(
        window_size=int(config.window_size), num_mel_bins=int(config.num_mel_bins), spec_size=int(config.spec_size),
        hidden_act=config.hidden_act, patch_size=config.patch_size, patch_stride=config.patch_stride,
        depths=tuple(config.depths), num_attention_heads=tuple(config.num_attention_heads), enable_fusion=False,
        patch_embeds_hidden_size=int(config.patch_embeds_hidden_size),
        enable_patch_layer_norm=bool(config.enable_patch_layer_norm), qkv_bias=bool(config.qkv_bias),
        mlp_ratio=float(config.mlp_ratio), layer_norm_eps=float(config.layer_norm_eps), **feature_settings)


def _shapes(tree) -> dict:
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def convert_clap_audio(hf_model, **feature_settings) -> tuple[dict, HTSATConfig]:
    """A transformers ClapAudioModel (or a ClapModel / ClapAudioModelWithProjection, whose `audio_model` is
    taken) -> (params of networks.htsat.HTSAT, plain fp32 numpy arrays; HTSATConfig).

    `feature_settings` go to config_from_hf. Raises UnsupportedClapAudioConfig for unsupported settings and
    ValueError if the converted tree does not have the shapes HTSAT(config).init creates.
    """
    model = getattr(hf_model, "audio_model", hf_model)
    config = config_from_hf(model.config, **feature_settings)
    sd = dict(model.state_dict())
    encoder = "audio_encoder"

    batch_norm = model.audio_encoder.batch_norm
    mean, var = to_numpy(batch_norm.running_mean).astype(np.float64), to_numpy(batch_norm.running_var).astype(np.float64)
    weight = to_numpy(batch_norm.weight).astype(np.float64) if batch_norm.affine else np.ones_like(mean)
    bias = to_numpy(batch_norm.bias).astype(np.float64) if batch_norm.affine else np.zeros_like(mean)
    scale = weight / np.sqrt(var + batch_norm.eps)
    params = {
        "bn0_scale": scale.astype(np.float32),
        "bn0_bias": (bias - mean * scale).astype(np.float32),
        "patch_embed_kernel": to_numpy(sd[f"{encoder}.patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
        "patch_embed_bias": to_numpy(sd[f"{encoder}.patch_embed.proj.bias"]),
        "final_norm": layer_norm_params(sd, f"{encoder}.norm"),
    }
    if config.enable_patch_layer_norm:
        params["patch_norm"] = layer_norm_params(sd, f"{encoder}.patch_embed.norm")
    for i, (depth, heads) in enumerate(zip(config.depths, config.num_attention_heads)):
        dim = config.stage_dims[i]
        head_dim = dim // heads
        for j in range(depth):
            prefix = f"{encoder}.layers.{i}.blocks.{j}"
            attention = {name: linear_params(sd, f"{prefix}.attention.self.{name}", (dim,), (heads, head_dim),
                                       bias=config.qkv_bias) for name in ("query", "key", "value")}
            attention["relative_position_bias"] = to_numpy(sd[f"{prefix}.attention.self.relative_position_bias_table"])
            attention["attention_out"] = linear_params(sd, f"{prefix}.attention.output.dense", (heads, head_dim), (dim,))
            params[f"stage_{i}_layer_{j}"] = {
                "layernorm_before": layer_norm_params(sd, f"{prefix}.layernorm_before"),
                "attention": attention,
                "layernorm_after": layer_norm_params(sd, f"{prefix}.layernorm_after"),
                "intermediate": linear_params(sd, f"{prefix}.intermediate.dense"),
                "output": linear_params(sd, f"{prefix}.output.dense"),
            }
        if i < len(config.depths) - 1:
            prefix = f"{encoder}.layers.{i}.downsample"
            params[f"stage_{i}_merge"] = {"norm": layer_norm_params(sd, f"{prefix}.norm"),
                                          "reduction": linear_params(sd, f"{prefix}.reduction", bias=False)}

    features = jax.ShapeDtypeStruct((1, config.spec_width, config.num_mel_bins), jnp.float32)
    abstract = jax.eval_shape(lambda x: HTSAT(config).init(jax.random.key(0), x), features)
    expected = _shapes(partitioning.unbox(abstract)["params"])
    got = _shapes(params)
    if expected != got:
        flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0])
        flat_got = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))[0])
        diffs = [f"{jax.tree_util.keystr(k)}: converted {flat_got.get(k)}, HTSAT {flat_expected.get(k)}"
                 for k in sorted(set(flat_expected) | set(flat_got), key=jax.tree_util.keystr)
                 if flat_expected.get(k) != flat_got.get(k)]
        raise ValueError("converted CLAP audio params do not match HTSAT's: " + "; ".join(diffs[:20]))
    return params, config
