"""HuBERT / MERT (transformers `HubertModel`, MERT's remote-code `MERTModel`) -> networks.hubert.Hubert.

`config_from_hf(config)` maps a HubertConfig (or a MERTConfig, which extends it) onto networks.hubert.HubertConfig
and refuses, naming them, the settings this network does not reproduce (batch-norm positional convolution,
attention adapters, MERT's CQT features and DeepNorm residual scaling). MERT's `attention_relax` is accepted: it
subtracts the row maximum from the attention logits before the softmax, which leaves the softmax unchanged.
`convert_hubert(model)` maps the weights; the positional convolution keeps torch's (g, v) weight-norm
parametrisation. SpecAugment's mask embedding (training only) is not imported.
"""
from __future__ import annotations


from musiclm_jax.convert.state_dict import layer_norm_params, linear_params, to_numpy
from musiclm_jax.layers import ACTIVATIONS
from musiclm_jax.networks.hubert import HubertConfig


class UnsupportedHubertConfig(ValueError):
    """A HubertConfig (or MERTConfig) setting this network cannot reproduce."""


def config_from_hf(config, sample_rate: int | None = None) -> HubertConfig:
    """The HubertConfig of networks.hubert equivalent to a transformers HubertConfig (or MERTConfig).

    Args:
      config: the transformers config.
      sample_rate: Hz of the model's input (the feature extractor's `sampling_rate`); default: the config's
        `sample_rate` if it has one (MERT's), else 16000.
    Raises:
      UnsupportedHubertConfig naming every unsupported setting.
    """
    checks = {  # name: (value, the value we support)
        "conv_pos_batch_norm": (getattr(config, "conv_pos_batch_norm", False), False),
        "adapter_attn_dim": (getattr(config, "adapter_attn_dim", None), None),
        "feature_extractor_cqt": (getattr(config, "feature_extractor_cqt", False), False),
        "deepnorm": (getattr(config, "deepnorm", False), False),
    }
    bad = {k: v for k, (v, want) in checks.items() if v != want}
    for name in ("hidden_act", "feat_extract_activation"):
        if getattr(config, name) not in ACTIVATIONS:
            bad[name] = getattr(config, name)
    if config.feat_extract_norm not in ("group", "layer"):
        bad["feat_extract_norm"] = config.feat_extract_norm
    if bad:
        raise UnsupportedHubertConfig(
            f"HubertConfig settings not supported: {bad} (supported: conv_pos_batch_norm=False, "
            f"adapter_attn_dim=None, feature_extractor_cqt=False, deepnorm=False, feat_extract_norm 'group' or "
            f"'layer', activations {sorted(ACTIVATIONS)})")
    if sample_rate is None:
        sample_rate = getattr(config, "sample_rate", None) or 16000
    return HubertConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        conv_dim=tuple(config.conv_dim), conv_kernel=tuple(config.conv_kernel), conv_stride=tuple(config.conv_stride),
        conv_bias=bool(config.conv_bias), feat_extract_norm=config.feat_extract_norm,
        feat_extract_activation=config.feat_extract_activation,
        num_conv_pos_embeddings=config.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=config.num_conv_pos_embedding_groups,
        do_stable_layer_norm=bool(config.do_stable_layer_norm), layer_norm_eps=float(config.layer_norm_eps),
        feat_proj_layer_norm=bool(getattr(config, "feat_proj_layer_norm", True)), hidden_act=config.hidden_act,
        sample_rate=int(sample_rate))


def _pos_conv(sd: dict, prefix: str) -> dict:
    if f"{prefix}.parametrizations.weight.original0" in sd:  # torch.nn.utils.parametrizations.weight_norm
        g, v = sd[f"{prefix}.parametrizations.weight.original0"], sd[f"{prefix}.parametrizations.weight.original1"]
    else:  # the older torch.nn.utils.weight_norm
        g, v = sd[f"{prefix}.weight_g"], sd[f"{prefix}.weight_v"]
    return {"kernel_v": to_numpy(v).transpose(2, 1, 0), "kernel_g": to_numpy(g).reshape(-1), "bias": to_numpy(sd[f"{prefix}.bias"])}


def convert_hubert(model, sample_rate: int | None = None) -> tuple[dict, HubertConfig]:
    """A transformers HubertModel (or MERTModel) -> (params of networks.hubert.Hubert, HubertConfig)."""
    config = config_from_hf(model.config, sample_rate)
    sd = dict(model.state_dict())
    if any(k.startswith("hubert.") for k in sd):  # a task head model (HubertForCTC, ...): its encoder
        sd = {k[len("hubert."):]: v for k, v in sd.items() if k.startswith("hubert.")}
    heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size

    extractor = {}
    for i in range(len(config.conv_dim)):
        prefix = f"feature_extractor.conv_layers.{i}"
        conv = {"kernel": to_numpy(sd[f"{prefix}.conv.weight"]).transpose(2, 1, 0)}
        if config.conv_bias:
            conv["bias"] = to_numpy(sd[f"{prefix}.conv.bias"])
        extractor[f"conv_{i}"] = conv
        if config.feat_extract_norm == "layer" or i == 0:
            extractor[f"norm_{i}"] = layer_norm_params(sd, f"{prefix}.layer_norm")
    params = {
        "feature_extractor": extractor,
        "feature_projection": linear_params(sd, "feature_projection.projection"),
        "pos_conv": _pos_conv(sd, "encoder.pos_conv_embed.conv"),
        "encoder_norm": layer_norm_params(sd, "encoder.layer_norm"),
    }
    if config.feat_proj_layer_norm:
        params["feature_projection_norm"] = layer_norm_params(sd, "feature_projection.layer_norm")
    for layer in range(config.num_hidden_layers):
        prefix = f"encoder.layers.{layer}"
        params[f"layers_{layer}"] = {
            "query": linear_params(sd, f"{prefix}.attention.q_proj", (hidden,), (heads, head_dim)),
            "key": linear_params(sd, f"{prefix}.attention.k_proj", (hidden,), (heads, head_dim)),
            "value": linear_params(sd, f"{prefix}.attention.v_proj", (hidden,), (heads, head_dim)),
            "attention_out": linear_params(sd, f"{prefix}.attention.out_proj", (heads, head_dim), (hidden,)),
            "layer_norm": layer_norm_params(sd, f"{prefix}.layer_norm"),
            "intermediate": linear_params(sd, f"{prefix}.feed_forward.intermediate_dense"),
            "output": linear_params(sd, f"{prefix}.feed_forward.output_dense"),
            "final_layer_norm": layer_norm_params(sd, f"{prefix}.final_layer_norm"),
        }
    return params, config
