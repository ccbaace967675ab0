"""w2v-BERT (Chung et al. 2021): a conformer speech/music encoder pre-trained with contrastive + masked prediction.

    audio [batch, samples] at 16 kHz
      -> log-mel (80 bins, 25 ms window, 10 ms hop: 100 Hz), normalised per band    `FeatureEncoder`
      -> two 3x3 stride-2 Conv2D (4x subsampling: 25 Hz) -> linear to d      (features, the quantizer's input)
         [+ a linear map of the frame's note spectrogram, when note_bins > 0]
      -> [span masking: masked frames replaced by a learned vector]
      -> contrastive module: the first `num_contrastive_layers` conformer blocks        (context vectors)
      -> MLM module: the remaining conformer blocks -> logits over the quantizer's codes (MLM predictions)

The quantizer turns the unmasked features into discrete targets: a vector quantizer of `codebook_size` codes
over the (stop-gradient) features whose codebook follows an exponential moving average of the features
assigned to each code, initialised by k-means on the first training batch, with dead codes replaced
(quantizers.ResidualVQ with one level). Its targets are fixed points to predict, not a moving Gumbel sample, so
the tiny model learns from the first steps; the diversity loss (V - perplexity) / V of the batch's average soft
assignment softmax(-|x - c|^2 / diversity_temperature) keeps the features spread over the codes (its gradient
flows into the feature encoder). wav2vec 2.0's Gumbel-softmax quantizer is the alternative this replaces: on
CPU-sized runs its near-uniform code probabilities made the targets noise for hundreds of steps.

Conformer block (Gulati et al. 2020): x + FF/2, x + MHSA (T5 relative position bias, bidirectional), x + Conv
module (pointwise + GLU, depthwise conv, LayerNorm in place of BatchNorm, swish, pointwise), x + FF/2, LayerNorm.
LayerNorm instead of BatchNorm keeps every example independent of the others in its batch (no batch statistics
to synchronise across the data axes, the same output on any mesh).

Frame rate: with `samples` a multiple of 640, frames = samples / 640 (25 Hz at 16 kHz).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax import layers, spectral
from musiclm_jax.networks.quantizers import ResidualVQ, RVQConfig
from musiclm_jax.vq import squared_distances
from musiclm_jax.partitioning import constrain

BLE = ("activation_batch", "activation_length", "activation_embed")
BLHD = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


@dataclasses.dataclass(frozen=True)
class W2VBertConfig:
    """Sizes of w2v-BERT.

    Attributes:
      sample_rate: Hz of the input audio; n_mels, window, hop: the log-mel front end (samples).
      subsampling_channels: channels of the two Conv2D subsampling layers.
      embed_dim, num_heads, head_dim, mlp_dim: conformer sizes; conv_kernel_size: depthwise conv width.
      num_contrastive_layers, num_mlm_layers: conformer blocks of the two modules.
      codebook_size: codes of the target quantizer (its vectors have the features' dimension embed_dim);
      codebook_decay: EMA decay of its statistics; dead_code_threshold: codes whose EMA count falls below it are
      replaced (default 0: off, since a replaced code moves the targets the MLM module is learning);
      diversity_temperature: of the soft assignment (see above).
      contrastive_dim: dimension of the projected context vectors and targets compared by cosine.
      note_bins: 0, or the notes of a second front end (MERT's CQT features in semitone form): the standardized
        log energy of MIDI note_lowest_midi .. note_lowest_midi + note_bins - 1 in a window of `note_window`
        samples centred on each output frame (spectral.note_spectrogram), mapped linearly to d and added to the
        features. The 25 ms mel window cannot resolve semitones below about 700 Hz (its bins are 40 Hz apart at
        16 kHz); a 2048-sample window's are 7.8 Hz apart.
      pitch_bins: 0, or the notes of the pitch head (a linear map of hidden state `pitch_layer`, 0 = the last,
        to `pitch_bins` outputs [b, t, pitch_bins], trained by W2VBertModel's pitch target, as MERT's CQT head).
      dropout_rate: dropout in the conformer blocks; dtype: compute dtype ('float32' or 'bfloat16').
      remat: rematerialise each conformer block in the backward pass.
    """

    sample_rate: int = 16000
    n_mels: int = 80
    window: int = 400
    hop: int = 160
    subsampling_channels: int = 128
    embed_dim: int = 1024
    num_heads: int = 8
    head_dim: int = 128
    mlp_dim: int = 4096
    conv_kernel_size: int = 5
    num_contrastive_layers: int = 12
    num_mlm_layers: int = 12
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    codebook_size: int = 1024
    codebook_decay: float = 0.99
    dead_code_threshold: float = 0.0
    diversity_temperature: float = 1.0
    contrastive_dim: int = 768
    note_bins: int = 0
    note_lowest_midi: int = 36
    note_window: int = 2048
    pitch_bins: int = 0
    pitch_layer: int = 0
    dropout_rate: float = 0.1
    dtype: str = "float32"
    remat: bool = False

    @property
    def num_layers(self) -> int:
        return self.num_contrastive_layers + self.num_mlm_layers

    @property
    def samples_per_frame(self) -> int:
        """Input samples per output frame: hop x 4 (640 at the defaults)."""
        return self.hop * 4

    @property
    def frame_rate(self) -> float:
        """Output frames per second (25 Hz at the defaults)."""
        return self.sample_rate / self.samples_per_frame

    def num_frames(self, samples: int) -> int:
        """Output frames for `samples` input samples: ceil(ceil(samples / hop) / 4) (the front end pads)."""
        frames = -(-samples // self.hop)
        for _ in range(2):  # two stride-2 convolutions with SAME padding
            frames = -(-frames // 2)
        return frames


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(name=name, epsilon=1e-5,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _dense(features, axes, name, dtype, num_contract=1):
    return layers.DenseGeneral(features, axes, num_contract=num_contract, name=name, dtype=dtype)


class FeatureEncoder(nn.Module):
    """audio [batch, samples] -> features [batch, frames, embed_dim] at sample_rate / (4 * hop)."""

    config: W2VBertConfig

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        cfg = self.config
        # Pad so that each hop of input gives one mel frame: left by window - hop, right up to a whole hop.
        samples = audio.shape[-1]
        notes = None
        if cfg.note_bins:
            notes = spectral.note_spectrogram(audio, cfg.sample_rate, cfg.num_frames(samples), cfg.samples_per_frame,
                                              cfg.note_bins, cfg.note_lowest_midi, cfg.note_window)
        right = (-samples) % cfg.hop
        audio = jnp.pad(audio.astype(jnp.float32), ((0, 0), (cfg.window - cfg.hop, right)))
        mel = spectral.log_mel_spectrogram(audio, cfg.sample_rate, cfg.window, cfg.hop, cfg.n_mels)
        # Per-example, per-band mean and variance normalisation over time (the log-mel's large constant offset
        # would otherwise dominate the features and let them collapse to one code).
        mel = (mel - jnp.mean(mel, axis=1, keepdims=True)) * jax.lax.rsqrt(
            jnp.var(mel, axis=1, keepdims=True) + 1e-5)
        x = mel[..., None]  # [b, t, mels, 1]
        for i in range(2):
            x = nn.Conv(cfg.subsampling_channels, (3, 3), strides=(2, 2), padding="SAME", name=f"subsample_{i}",
                        dtype=jnp.dtype(cfg.dtype),
                        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                 ("conv_height", "conv_width", "conv_in", "conv_out")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))(x)
            x = nn.swish(x)
        b, t, f, c = x.shape
        x = _dense((cfg.embed_dim,), ("conv_in", "conv_out", "embed"), "project", jnp.dtype(cfg.dtype),
                   num_contract=2)(x)
        if notes is not None:
            x = x + _dense((cfg.embed_dim,), ("conv_in", "embed"), "note_project", jnp.dtype(cfg.dtype))(
                notes.astype(jnp.dtype(cfg.dtype)))
        x = _layer_norm("norm")(x)
        return constrain(x, BLE)


class ConformerBlock(nn.Module):
    """One conformer block (see the module docstring). x [batch, frames, embed_dim] -> same; bias [1, h, t, t]."""

    config: W2VBertConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        drop = lambda h: nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)  # noqa: E731

        def feed_forward(x, name):
            h = _layer_norm(f"{name}_norm")(x)
            h = nn.swish(_dense((cfg.mlp_dim,), ("embed", "mlp"), f"{name}_wi", dtype)(h))
            h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
            return x + 0.5 * drop(_dense((cfg.embed_dim,), ("mlp", "embed"), f"{name}_wo", dtype)(h))

        x = feed_forward(x, "ff_in")
        # Self-attention with relative position bias.
        h = _layer_norm("attention_norm")(x)
        q, k, v = (constrain(_dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), n, dtype)(h), BLHD)
                   for n in ("query", "key", "value"))
        h = layers.dot_product_attention(q, k, v, bias=bias, mask=None, dtype=dtype)
        h = _dense((cfg.embed_dim,), ("heads", "kv", "embed"), "attention_out", dtype, num_contract=2)(h)
        x = constrain(x + drop(h), BLE)
        # Convolution module.
        h = _layer_norm("conv_norm")(x)
        h = _dense((2 * cfg.embed_dim,), ("embed", "mlp"), "conv_pointwise_in", dtype)(h)
        h = h[..., :cfg.embed_dim] * jax.nn.sigmoid(h[..., cfg.embed_dim:])  # GLU
        kernel = self.param("conv_depthwise", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0 / cfg.conv_kernel_size**0.5), ("conv_width", "embed")),
            (cfg.conv_kernel_size, cfg.embed_dim))
        left = (cfg.conv_kernel_size - 1) // 2
        padded = jnp.pad(h, ((0, 0), (left, cfg.conv_kernel_size - 1 - left), (0, 0)))
        h = sum(padded[:, j:j + h.shape[1]] * kernel[j].astype(dtype) for j in range(cfg.conv_kernel_size))
        h = nn.swish(_layer_norm("conv_depthwise_norm")(h))
        h = _dense((cfg.embed_dim,), ("mlp", "embed"), "conv_pointwise_out", dtype)(h)
        x = constrain(x + drop(h), BLE)
        x = feed_forward(x, "ff_out")
        return constrain(_layer_norm("out_norm")(x), BLE)


class W2VBert(nn.Module):
    """The w2v-BERT network. `__call__` returns a dict (shapes for audio [batch, samples], t = frames):

      features [b, t, d]         front-end output (unmasked)
      hidden_states              tuple of num_layers + 1 arrays [b, t, d]: the encoder input (masked features),
                                 then the output of each conformer block (1..num_contrastive_layers are the
                                 contrastive module, the rest the MLM module)
      context [b, t, contrastive_dim]      projected contrastive-module output
      mlm_logits [b, t, V]       MLM predictions of the quantizer ids
      targets [b, t, contrastive_dim], target_ids [b, t], diversity_loss, perplexity   (the quantizer's)
      pitch [b, t, pitch_bins]   the pitch head's output (only when config.pitch_bins > 0)
    `mask` [b, t] bool: frames replaced by the learned mask vector (None: no masking, e.g. for embeddings).
    `num_layers_to_run` (embedding extraction) stops after that many blocks and returns only the first two keys.
    `update_codebook`: update the quantizer's EMA statistics (training; the 'quantizer' collection mutable and a
    'quantizer' rng given).
    """

    config: W2VBertConfig

    @nn.compact
    def __call__(self, audio: jax.Array, mask: Optional[jax.Array] = None, *, deterministic: bool = True,
                 update_codebook: bool = False, num_layers_to_run: Optional[int] = None) -> dict:
        cfg = self.config
        features = FeatureEncoder(cfg, name="feature_encoder")(audio)
        x = features
        if mask is not None:
            mask_embedding = self.param("mask_embedding", nn.with_logical_partitioning(
                nn.initializers.uniform(1.0), ("embed",)), (cfg.embed_dim,))
            x = jnp.where(mask[..., None], mask_embedding.astype(x.dtype), x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        length = x.shape[1]
        positions = jnp.arange(length, dtype=jnp.int32)
        bias = layers.RelativePositionBias(cfg.num_heads, cfg.relative_num_buckets, cfg.relative_max_distance,
                                           bidirectional=True, name="relpos_bias")(positions, positions)
        block_cls = nn.remat(ConformerBlock) if cfg.remat else ConformerBlock
        hidden = [x]
        run = cfg.num_layers if num_layers_to_run is None else num_layers_to_run
        for i in range(run):
            x = block_cls(cfg, deterministic, name=f"layers_{i}")(x, bias)
            hidden.append(x)
        out = {"features": features, "hidden_states": tuple(hidden)}
        if num_layers_to_run is not None:  # embedding extraction: no heads, no quantizer
            return out
        context = hidden[cfg.num_contrastive_layers]
        out["context"] = _dense((cfg.contrastive_dim,), ("embed", "mlp"), "context_project", jnp.float32)(
            context.astype(jnp.float32))
        out["mlm_logits"] = _dense((cfg.codebook_size,), ("embed", "codebook_codes"), "mlm_logits", jnp.float32)(
            x.astype(jnp.float32))
        if cfg.pitch_bins:
            if not 0 <= cfg.pitch_layer <= cfg.num_layers:
                raise ValueError(f"W2VBertConfig.pitch_layer={cfg.pitch_layer}: expected 0..{cfg.num_layers}")
            source = hidden[cfg.pitch_layer or cfg.num_layers]
            out["pitch"] = _dense((cfg.pitch_bins,), ("embed", "mlp"), "pitch_head", jnp.float32)(
                source.astype(jnp.float32))
        quantizer = ResidualVQ(RVQConfig(num_quantizers=1, codebook_size=cfg.codebook_size, dim=cfg.embed_dim,
                                         decay=cfg.codebook_decay, dead_code_threshold=cfg.dead_code_threshold,
                                         quantizer_dropout=False), name="quantizer")
        flat = features.astype(jnp.float32)
        quantized, ids, _ = quantizer(jax.lax.stop_gradient(flat), train=update_codebook,
                                      rng=self.make_rng("quantizer") if update_codebook else None)
        out["targets"] = _dense((cfg.contrastive_dim,), ("embed", "mlp"), "target_project", jnp.float32)(
            jax.lax.stop_gradient(quantized))
        # Diversity: perplexity of the average soft assignment of the (masked) frames' features to the codes.
        codebook = jax.lax.stop_gradient(quantizer.codebook.value[0])
        distances = squared_distances(flat.reshape(-1, cfg.embed_dim), codebook) / cfg.embed_dim
        probs = jax.nn.softmax(-distances / cfg.diversity_temperature, axis=-1)
        w = (jnp.ones(features.shape[:2]) if mask is None else mask).reshape(-1).astype(jnp.float32)
        average = jnp.sum(probs * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
        perplexity = jnp.exp(-jnp.sum(average * jnp.log(average + 1e-7)))
        out.update(target_ids=ids[..., 0], diversity_loss=(cfg.codebook_size - perplexity) / cfg.codebook_size,
                   perplexity=perplexity)
        return out
