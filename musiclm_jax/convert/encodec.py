"""EnCodec (transformers `EncodecModel`) -> this project's SoundStream generator.

`configs_from_hf(config)` maps an EncodecConfig onto SEANetConfig + RVQConfig; `convert_encodec(model)` maps the
weights: weight-normalised convolutions keep their (g, v) parametrisation, LSTM biases are summed (b_ih + b_hh),
codebooks become the quantizer state (codebook, cluster_size, embed_sum, initialized).
Features EnCodec has and this codec does not (input normalisation, chunked 48 kHz models, time-group norm,
stereo) are refused with an error naming the setting.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from musiclm_jax.convert.state_dict import to_numpy
from musiclm_jax.networks.seanet import SEANetConfig
from musiclm_jax.networks.quantizers import STATE, RVQConfig


class UnsupportedEncodecConfig(ValueError):
    """An EncodecConfig setting this codec cannot reproduce."""


def configs_from_hf(config) -> tuple[SEANetConfig, RVQConfig, int]:
    """(SEANetConfig, RVQConfig, sample_rate) equivalent to a transformers EncodecConfig."""
    checks = {
        "audio_channels": (config.audio_channels, 1),
        "normalize": (config.normalize, False),
        "chunk_length_s": (config.chunk_length_s, None),
        "norm_type": (config.norm_type, "weight_norm"),
        "trim_right_ratio": (config.trim_right_ratio, 1.0),
    }
    bad = {k: v for k, (v, want) in checks.items() if v != want}
    if bad:
        raise UnsupportedEncodecConfig(f"EncodecConfig settings not supported: {bad} (expected "
                                       f"{ {k: checks[k][1] for k in bad} })")
    if config.num_lstm_layers < 1:
        raise UnsupportedEncodecConfig("EncodecConfig.num_lstm_layers must be >= 1")
    seanet = SEANetConfig(
        channels=config.num_filters, dimension=config.hidden_size, strides=tuple(reversed(config.upsampling_ratios)),
        residual_dilations=tuple(config.dilation_growth_rate**j for j in range(config.num_residual_layers)),
        residual_kernel_size=config.residual_kernel_size, compress=config.compress, kernel_size=config.kernel_size,
        last_kernel_size=config.last_kernel_size, lstm_layers=config.num_lstm_layers,
        causal=config.use_causal_conv, pad_mode="reflect" if config.pad_mode == "reflect" else "constant",
        weight_norm=True, conv_shortcut=config.use_conv_shortcut)
    rvq = RVQConfig(num_quantizers=config.num_quantizers, codebook_size=config.codebook_size,
                    dim=config.codebook_dim)
    return seanet, rvq, config.sampling_rate


def _conv(sd: dict, prefix: str) -> dict:
    """Weight-normalised torch Conv1d -> Conv1D params (kernel [k, in, out])."""
    g = sd[f"{prefix}.conv.parametrizations.weight.original0"]
    v = sd[f"{prefix}.conv.parametrizations.weight.original1"]
    return {"kernel_v": to_numpy(v).transpose(2, 1, 0), "kernel_g": to_numpy(g).reshape(-1),
            "bias": to_numpy(sd[f"{prefix}.conv.bias"])}


def _conv_transpose(sd: dict, prefix: str) -> dict:
    """Weight-normalised torch ConvTranspose1d (weight [in, out, k]) -> ConvTranspose1D params."""
    g = sd[f"{prefix}.conv.parametrizations.weight.original0"]
    v = sd[f"{prefix}.conv.parametrizations.weight.original1"]
    return {"kernel_v": to_numpy(v).transpose(2, 0, 1), "kernel_g": to_numpy(g).reshape(-1),
            "bias": to_numpy(sd[f"{prefix}.conv.bias"])}


def _lstm(sd: dict, prefix: str, layers: int) -> dict:
    out = {}
    for layer in range(layers):
        out[f"layer_{layer}_kernel_ih"] = to_numpy(sd[f"{prefix}.lstm.weight_ih_l{layer}"]).T
        out[f"layer_{layer}_kernel_hh"] = to_numpy(sd[f"{prefix}.lstm.weight_hh_l{layer}"]).T
        out[f"layer_{layer}_bias"] = (to_numpy(sd[f"{prefix}.lstm.bias_ih_l{layer}"])
                                      + to_numpy(sd[f"{prefix}.lstm.bias_hh_l{layer}"]))
    return {"lstm": out}


def _residual(sd: dict, prefix: str, shortcut: bool) -> dict:
    unit = {"conv1": _conv(sd, f"{prefix}.block.1"), "conv2": _conv(sd, f"{prefix}.block.3")}
    if shortcut:
        unit["shortcut"] = _conv(sd, f"{prefix}.shortcut")
    return unit


def convert_encodec(model) -> tuple[dict, dict, SEANetConfig, RVQConfig, int]:
    """A transformers EncodecModel -> (generator params, quantizer state, SEANetConfig, RVQConfig, sample_rate).

    The generator params are the 'params' of networks.soundstream.SoundStream; the state is its 'quantizer'
    collection.
    """
    seanet, rvq, sample_rate = configs_from_hf(model.config)
    sd = dict(model.state_dict())
    n_res = len(seanet.residual_dilations)

    encoder, index = {"conv_in": _conv(sd, "encoder.layers.0")}, 0
    for i in range(len(seanet.strides)):
        for j in range(n_res):
            index += 1
            encoder[f"block_{i}_res_{j}"] = _residual(sd, f"encoder.layers.{index}", seanet.conv_shortcut)
        index += 2  # ELU, then the strided convolution
        encoder[f"block_{i}_down"] = _conv(sd, f"encoder.layers.{index}")
    index += 1
    encoder["lstm"] = _lstm(sd, f"encoder.layers.{index}", seanet.lstm_layers)
    index += 2  # ELU, then the last convolution
    encoder["conv_out"] = _conv(sd, f"encoder.layers.{index}")

    decoder = {"conv_in": _conv(sd, "decoder.layers.0"), "lstm": _lstm(sd, "decoder.layers.1", seanet.lstm_layers)}
    index = 1
    for i in range(len(seanet.strides)):
        index += 2  # ELU, then the transposed convolution
        decoder[f"block_{i}_up"] = _conv_transpose(sd, f"decoder.layers.{index}")
        for j in range(n_res):
            index += 1
            decoder[f"block_{i}_res_{j}"] = _residual(sd, f"decoder.layers.{index}", seanet.conv_shortcut)
    index += 2
    decoder["conv_out"] = _conv(sd, f"decoder.layers.{index}")

    levels = range(rvq.num_quantizers)
    state = {
        "codebook": np.stack([to_numpy(sd[f"quantizer.layers.{l}.codebook.embed"]) for l in levels]),
        "cluster_size": np.stack([to_numpy(sd[f"quantizer.layers.{l}.codebook.cluster_size"]) for l in levels]),
        "embed_sum": np.stack([to_numpy(sd[f"quantizer.layers.{l}.codebook.embed_avg"]) for l in levels]),
        "initialized": np.ones((rvq.num_quantizers,), np.float32),
    }
    params = {"encoder": encoder, "decoder": decoder}
    # Collection 'quantizer' -> module 'quantizer' (SoundStream.quantizer) -> the statistics.
    return params, {STATE: {"quantizer": state}}, seanet, rvq, sample_rate


def keep_levels(state: dict, rvq: RVQConfig, levels: int) -> tuple[dict, RVQConfig]:
    """The quantizer state and RVQConfig of convert_encodec with only the first `levels` RVQ levels (a residual
    quantizer's first levels code the same as the whole one's: EnCodec at a lower bandwidth)."""
    if not 1 <= levels <= rvq.num_quantizers:
        raise ValueError(f"keep_levels: {levels} levels of {rvq.num_quantizers}")
    kept = {name: value[:levels] for name, value in state[STATE]["quantizer"].items()}
    return {STATE: {"quantizer": kept}}, dataclasses.replace(rvq, num_quantizers=levels)


def num_quantizers_for_bandwidth(bandwidth_kbps: float, codebook_size: int, frame_rate: float) -> int:
    """EnCodec's rule: floor(bandwidth / (log2(codebook_size) * frame_rate)), at least 1."""
    return int(max(1, np.floor(bandwidth_kbps * 1000 / (np.log2(codebook_size) * frame_rate))))

