"""MuLan's contrastive training on the common trainer (the t5x model interface).

Batches (data.feature_converters.AudioTextFeatureConverter): {'audio': float32 [batch, segment_samples] at
sample_rate, 'text_tokens': int32 [batch, text_length] (0 = padding)}.

Loss: symmetric InfoNCE. With audio embeddings a_i and text embeddings t_j (unit norm) of the whole global batch
and s = min(exp(logit_scale), max_logit_scale) (CLIP's clamp at 100):

    logits_ij = s * <t_i, a_j>,   loss = (CE(logits, diag) + CE(logits^T, diag)) / 2

Every example's negatives are the other B - 1 examples of the *global* batch: the step is jitted on the global
(sharded) arrays, so XLA gathers the embeddings across the data axes and the loss and gradients are the same on
one device or a mesh (tested on a (2, 4) mesh).
"""
from __future__ import annotations

import os

from typing import Optional

import jax
import jax.numpy as jnp

from musiclm_jax.models import BaseModel, cross_entropy
from musiclm_jax.networks.mulan import MuLan, MuLanConfig
from musiclm_jax.partitioning import constrain

EMBEDDINGS = ("activation_batch", "activation_embed")


def contrastive_loss(audio: jax.Array, text: jax.Array, logit_scale: jax.Array, max_logit_scale: float = 100.0):
    """(loss, metrics) of unit-norm audio and text embeddings [batch, d] (see the module docstring)."""
    scale = jnp.minimum(jnp.exp(logit_scale), max_logit_scale)
    logits = scale * jnp.einsum("id,jd->ij", text, audio, precision=jax.lax.Precision.HIGHEST)
    labels = jnp.arange(logits.shape[0])
    text_to_audio, _ = cross_entropy(logits, labels)
    audio_to_text, _ = cross_entropy(logits.T, labels)
    loss = 0.5 * (jnp.mean(text_to_audio) + jnp.mean(audio_to_text))
    metrics = {"loss": loss, "text_to_audio_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
               "audio_to_text_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
               "temperature": 1.0 / scale, "positive_similarity": jnp.mean(jnp.diagonal(logits)) / scale,
               "loss_weight": jnp.float32(logits.shape[0])}
    return loss, metrics


class MuLanModel(BaseModel):
    """MuLan (Huang et al. 2022) as a trainable model.

    Args:
      network: MuLanConfig (towers, embed_dim, projection).
      segment_samples: audio samples per training example at network.audio.sample_rate (paper: 10 s).
      text_length: caption tokens per example.
      vocabulary_dir: where the captions' SentencePiece model lives (the run's MODEL_DIR: text_vocab/spm.model);
        trained from `vocabulary_source_task`'s train captions when the input pipeline is first built.
      max_logit_scale: clamp of exp(logit_scale).
      short_clip_padding: how a clip shorter than one window is brought to segment_samples for a clip embedding
        (mulan.MuLan.embed_audio): 'pad' appends zeros (this project's MuLan); 'repeatpad' first repeats the clip
        as many whole times as fit, then appends zeros (CLAP's convention: transformers' ClapFeatureExtractor
        padding='repeatpad', the one an imported CLAP is scored with).
    """

    feature_converter_name = "audio_text"
    SHORT_CLIP_PADDINGS = ("pad", "repeatpad")

    def __init__(self, network: MuLanConfig, segment_samples: int, text_length: int,
                 vocabulary_dir: Optional[str] = None, vocabulary_source_task: Optional[str] = None,
                 max_logit_scale: float = 100.0, short_clip_padding: str = "pad"):
        if short_clip_padding not in self.SHORT_CLIP_PADDINGS:
            raise ValueError(f"MuLanModel.short_clip_padding={short_clip_padding!r}: expected one of "
                             f"{self.SHORT_CLIP_PADDINGS}")
        self.short_clip_padding = short_clip_padding
        self.network = network
        self.module = MuLan(network)
        self.segment_samples = int(segment_samples)
        self.text_length = int(text_length)
        self.vocabulary_dir, self.vocabulary_source_task = vocabulary_dir, vocabulary_source_task
        self.max_logit_scale = float(max_logit_scale)
        if self.text_length > network.text.max_length:
            raise ValueError(f"text_length={self.text_length} exceeds the text tower's max_length="
                             f"{network.text.max_length}")

    @property
    def sample_rate(self) -> int:
        return self.network.audio.sample_rate

    def _vocabulary_settings(self) -> None:
        if not self.vocabulary_dir or not self.vocabulary_source_task:
            raise ValueError("MuLanModel needs vocabulary_dir and vocabulary_source_task to read captions")

    def prepare_assets(self) -> None:
        """Trains the caption vocabulary into vocabulary_dir/text_vocab/spm.model from vocabulary_source_task's
        training captions, unless it exists (text_vocab.ensure_vocabulary; process 0 trains, the others wait)."""
        from musiclm_jax.mulan import text_vocab
        self._vocabulary_settings()
        text_vocab.ensure_vocabulary(self.vocabulary_dir, self.vocabulary_source_task, self.network.text.vocab_size)

    @property
    def feature_converter_kwargs(self) -> dict:
        """{'vocabulary_path': the caption vocabulary}, which must exist (prepare_assets makes it). Raises
        FileNotFoundError naming the path, or ValueError if it has more pieces than the text tower embeds."""
        from musiclm_jax.mulan import text_vocab
        self._vocabulary_settings()
        path = text_vocab.vocabulary_path(self.vocabulary_dir)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"MuLan's caption vocabulary {path} does not exist: the train job makes it (model.prepare_assets), "
                f"or `python -m musiclm_jax.mulan train-vocab --output {path}`")
        size = text_vocab.TextTokenizer(path).vocab_size
        if size > self.network.text.vocab_size:
            raise ValueError(f"{path} has {size} pieces but the text tower's vocab_size is "
                             f"{self.network.text.vocab_size}")
        return {"vocabulary_path": path}

    def input_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"audio": (batch_size, self.segment_samples), "text_tokens": (batch_size, self.text_length)}

    def input_dtypes(self):
        return {"audio": jnp.float32, "text_tokens": jnp.int32}

    def get_initial_variables(self, rng, input_shapes):
        batch = input_shapes["audio"][0]
        features = jax.eval_shape(self.network.audio.features,
                                  jax.ShapeDtypeStruct((batch, self.segment_samples), jnp.float32))
        tokens = jnp.zeros(input_shapes["text_tokens"], jnp.int32)
        return self.module.init({"params": rng}, jnp.zeros(features.shape, features.dtype), tokens, tokens)

    def embed_audio(self, params, audio: jax.Array) -> jax.Array:
        """audio [batch, samples] at sample_rate -> unit-norm embeddings [batch, embed_dim]."""
        features = self.network.audio.features(audio)
        return self.module.apply({"params": params}, features, method=MuLan.embed_audio)

    def embed_text(self, params, tokens: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """tokens [batch, length] (mask: 1 = real token; default tokens != 0) -> unit-norm [batch, embed_dim]."""
        mask = (tokens != 0) if mask is None else mask
        return self.module.apply({"params": params}, tokens, mask.astype(jnp.int32), method=MuLan.embed_text)

    def _embeddings(self, params, batch):
        tokens = batch["text_tokens"]
        features = self.network.audio.features(batch["audio"])
        audio, text, logit_scale = self.module.apply({"params": params}, features, tokens,
                                                     (tokens != 0).astype(jnp.int32))
        return constrain(audio, EMBEDDINGS), constrain(text, EMBEDDINGS), logit_scale

    def loss_fn(self, params, batch, dropout_rng, flax_mutables=None):
        del dropout_rng, flax_mutables  # the towers have no dropout or state
        audio, text, logit_scale = self._embeddings(params, batch)
        return contrastive_loss(audio, text, logit_scale, self.max_logit_scale)

    def predict_batch_with_aux(self, params, batch, rng=None, **kwargs):
        """Audio embeddings [batch, embed_dim]; aux: text embeddings and the [batch, batch] text-audio cosines."""
        audio, text, _ = self._embeddings(params, batch)
        return audio, {"text_embeddings": text, "similarity": text @ audio.T}

    def score_batch(self, params, batch):
        """[batch] cosine similarity of each example's caption and audio."""
        audio, text, _ = self._embeddings(params, batch)
        return jnp.sum(audio * text, axis=-1)
