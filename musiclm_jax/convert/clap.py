"""CLAP (transformers `ClapModel`) -> the MuLan network: HTSAT audio tower, RoBERTa text tower, both projections.

CLAP (Wu et al. 2023) is a contrastive music/audio-text model like MuLan; importing it gives an open joint
embedding where MuLan's weights are not public. Mapping:

  audio_model (HTSAT)              -> audio_tower      (convert/clap_audio.py)
  text_model (RoBERTa + pooler)    -> text_tower       networks.bert.Bert with 'roberta' positions, the
                                                       checkpoint's pad id, 'first_dense_tanh' pooling
  audio_projection, text_projection -> Projection('mlp'): linear1, ReLU, linear2 (projection_dim wide)
  logit_scale_t                    -> logit_scale

so `MuLanModel.embed_audio` / `embed_text` equal `ClapModel.get_audio_features` / `get_text_features` (unit-norm).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from musiclm_jax.convert.clap_audio import convert_clap_audio
from musiclm_jax.convert.state_dict import layer_norm_params, linear_params, to_numpy
from musiclm_jax.layers import ACTIVATIONS
from musiclm_jax.networks.bert import BertConfig
from musiclm_jax.networks.mulan import MuLanConfig

DEFAULT_TEXT_LENGTH = 77


class UnsupportedClapConfig(ValueError):
    """A ClapConfig setting the MuLan network cannot reproduce."""


def text_config_from_hf(config, max_length: int = DEFAULT_TEXT_LENGTH) -> BertConfig:
    """The BertConfig equivalent to a transformers ClapTextConfig (RoBERTa)."""
    bad = {}
    if config.hidden_act not in ACTIVATIONS:
        bad["hidden_act"] = config.hidden_act
    if getattr(config, "projection_hidden_act", "relu") != "relu":
        bad["projection_hidden_act"] = config.projection_hidden_act
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        bad["position_embedding_type"] = config.position_embedding_type
    if bad:
        raise UnsupportedClapConfig(f"ClapTextConfig settings not supported: {bad} (supported: hidden_act in "
                                    f"{sorted(ACTIVATIONS)}, projection_hidden_act 'relu', absolute positions)")
    max_length = min(int(max_length), config.max_position_embeddings - config.pad_token_id - 1)
    return BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                      num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                      intermediate_size=config.intermediate_size,
                      max_position_embeddings=config.max_position_embeddings,
                      type_vocab_size=config.type_vocab_size, layer_norm_eps=float(config.layer_norm_eps),
                      hidden_act=config.hidden_act, position_style="roberta", padding_idx=int(config.pad_token_id),
                      pooling="first_dense_tanh", max_length=max_length)


def convert_clap_text(text_model, config: BertConfig) -> dict:
    """A transformers ClapTextModel -> params of networks.bert.Bert(config)."""
    sd = dict(text_model.state_dict())
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    params = {
        "word_embeddings": to_numpy(sd["embeddings.word_embeddings.weight"]),
        "position_embeddings": to_numpy(sd["embeddings.position_embeddings.weight"]),
        "token_type_embeddings": to_numpy(sd["embeddings.token_type_embeddings.weight"]),
        "embeddings_norm": layer_norm_params(sd, "embeddings.LayerNorm"),
        "pooler": linear_params(sd, "pooler.dense"),
    }
    for i in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{i}"
        layer = {name: linear_params(sd, f"{prefix}.attention.self.{name}", (hidden,), (heads, head_dim))
                 for name in ("query", "key", "value")}
        layer["attention_out"] = linear_params(sd, f"{prefix}.attention.output.dense", (heads, head_dim), (hidden,))
        layer["attention_norm"] = layer_norm_params(sd, f"{prefix}.attention.output.LayerNorm")
        layer["intermediate"] = linear_params(sd, f"{prefix}.intermediate.dense")
        layer["output"] = linear_params(sd, f"{prefix}.output.dense")
        layer["output_norm"] = layer_norm_params(sd, f"{prefix}.output.LayerNorm")
        params[f"layers_{i}"] = layer
    return params


def _projection(module) -> dict:
    sd = dict(module.state_dict())
    return {"linear1": linear_params(sd, "linear1"), "linear2": linear_params(sd, "linear2")}


def convert_clap(model, text_length: int = DEFAULT_TEXT_LENGTH, **feature_settings) -> tuple[dict, MuLanConfig]:
    """A transformers ClapModel -> (params of networks.mulan.MuLan as plain fp32 numpy arrays, MuLanConfig).

    `feature_settings`: the checkpoint's feature-extractor settings for the HTSAT front end (clap_audio)."""
    audio_params, audio_config = convert_clap_audio(model, **feature_settings)
    text_config = text_config_from_hf(model.config.text_config, text_length)
    projection_dim = int(model.config.projection_dim)
    config = MuLanConfig(audio=audio_config, text=text_config, embed_dim=projection_dim, projection="mlp")
    params = {"audio_tower": audio_params, "text_tower": convert_clap_text(model.text_model, text_config),
              "audio_projection": _projection(model.audio_projection),
              "text_projection": _projection(model.text_projection),
              "logit_scale": np.asarray(to_numpy(model.logit_scale_t), np.float32).reshape(())}
    return params, config


def gin_bindings(config: MuLanConfig, text_length: int) -> list[str]:
    """Bindings of gin/mulan/clap.gin describing a converted model's sizes."""
    lines = [f"htsat.HTSATConfig.{f.name} = {getattr(config.audio, f.name)!r}"
             for f in dataclasses.fields(config.audio)]
    lines += [f"bert.BertConfig.{f.name} = {getattr(config.text, f.name)!r}" for f in dataclasses.fields(config.text)]
    lines += [f"EMBED_DIM = {config.embed_dim}", f"SAMPLE_RATE = {config.audio.sample_rate}",
              f"SEGMENT_SAMPLES = {config.audio.num_samples}",
              f"TEXT_LENGTH = {min(int(text_length), config.text.max_length)}"]
    return lines
