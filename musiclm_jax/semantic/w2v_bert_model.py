"""w2v-BERT pre-training as a BaseModel: span masking, contrastive + diversity loss, masked prediction (MLM).

Batches: {'audio': [batch, samples] float32 at 16 kHz} (the raw-audio tasks). Per example:
  * span masking: every frame starts a masked span of `mask_span` frames with probability `mask_prob`
    (spans may overlap; away from the edges a frame is masked with probability 1 - (1 - p)^span, 0.49 at the
    defaults 0.065 and 10);
  * contrastive loss (wav2vec 2.0, the contrastive module's task): at each masked frame, the cosine similarity /
    `contrastive_temperature` of its context vector with its own quantized target against `num_negatives`
    targets of other masked frames of the same example (drawn uniformly, never itself); cross-entropy, averaged
    over masked frames. Unlike wav2vec 2.0, a negative with the target's code is kept: ignoring it would make a
    collapsed codebook (every frame one code) a zero-loss solution;
  * diversity loss: (V - perplexity) / V of the masked frames' average soft code assignment (see
    networks/w2v_bert.py), weight `diversity_weight`;
  * MLM loss: cross-entropy of the MLM module's predictions of the quantizer ids at masked frames, weight
    `mlm_weight`.
  * pitch target (optional, MERT's CQT reconstruction in a semitone form; on when the network has pitch_bins):
    the log energy of each semitone, MIDI `pitch_lowest_midi` upwards, of each frame's long-window STFT
    (pitch_target below), standardized over the notes of the frame (so it describes which notes sound, not
    how loud); the network's pitch head regresses it with a mean squared error over every frame, weight
    `pitch_weight`. Self-supervised targets of speech models (quantized short-window features) need not keep
    pitch; this one asks the features to keep it.
loss = contrastive + diversity_weight * diversity + mlm_weight * mlm (+ pitch_weight * pitch). The quantizer's
codebook is state (the 'quantizer' collection), updated by EMA in training.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from musiclm_jax import spectral
from musiclm_jax.models import AudioFeatureModel, cross_entropy
from musiclm_jax.networks.w2v_bert import W2VBert, W2VBertConfig
from musiclm_jax.networks.quantizers import STATE


def span_mask(rng: jax.Array, batch: int, frames: int, mask_prob: float, mask_span: int) -> jax.Array:
    """[batch, frames] bool: frames covered by spans of `mask_span` frames starting where Bernoulli(mask_prob)."""
    starts = jax.random.bernoulli(rng, mask_prob, (batch, frames))
    covered = jnp.zeros((batch, frames), bool)
    for offset in range(mask_span):
        covered = covered | jnp.pad(starts, ((0, 0), (offset, 0)))[:, :frames]
    return covered


def sample_negatives(rng: jax.Array, mask: jax.Array, num_negatives: int) -> jax.Array:
    """Indices [batch, frames, num_negatives] of other masked frames of the same example, uniformly drawn.

    For frame t the draw is uniform over the masked frames except t; with fewer than two masked frames the
    index is t itself (callers ignore negatives equal to the target).
    """
    batch, frames = mask.shape
    order = jnp.argsort(~mask, axis=1, stable=True)  # masked frames first, in time order
    count = jnp.sum(mask, axis=1)  # [b]
    rank = jnp.cumsum(mask, axis=1) - 1  # rank of a masked frame among the masked ones
    draws = jax.random.randint(rng, (batch, frames, num_negatives), 0, jnp.maximum(count - 1, 1)[:, None, None])
    draws = jnp.where(draws >= rank[..., None], draws + 1, draws)  # skip the frame itself
    draws = jnp.minimum(draws, jnp.maximum(count - 1, 0)[:, None, None])
    index = jnp.take_along_axis(order, draws.reshape(batch, -1), axis=1).reshape(batch, frames, num_negatives)
    return jnp.where((count >= 2)[:, None, None], index, jnp.arange(frames)[None, :, None])


def contrastive_loss(context: jax.Array, targets: jax.Array, mask: jax.Array, negatives: jax.Array,
                     temperature: float) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy) over masked frames. context, targets [b, t, c]; mask [b, t]; negatives [b, t, K]."""
    def normalize(x):
        return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)

    c, q = normalize(context), normalize(targets)
    negative_vectors = jax.vmap(lambda qb, idx: qb[idx])(q, negatives)  # [b, t, K, c]
    candidates = jnp.concatenate([q[:, :, None], negative_vectors], axis=2)  # [b, t, 1 + K, c]
    logits = jnp.einsum("btc,btkc->btk", c, candidates) / temperature
    nll = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
    weight = mask.astype(jnp.float32)
    denominator = jnp.maximum(jnp.sum(weight), 1.0)
    accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == 0) * weight) / denominator
    return jnp.sum(nll * weight) / denominator, accuracy


def pitch_target(audio: jax.Array, sample_rate: int, frames: int, samples_per_frame: int, bins: int,
                 lowest_midi: int = 36, n_fft: int = 2048) -> jax.Array:
    """The pitch target (see the module docstring): audio [b, samples] -> [b, frames, bins] float32, the
    standardized log energy of the notes MIDI lowest_midi .. lowest_midi + bins - 1 of frame t's window of n_fft
    samples centred on t * samples_per_frame + samples_per_frame / 2 (`spectral.note_spectrogram`)."""
    return spectral.note_spectrogram(audio, sample_rate, frames, samples_per_frame, bins, lowest_midi, n_fft)


class W2VBertModel(AudioFeatureModel):
    """w2v-BERT training (see the module docstring) and embedding extraction for the semantic tokenizer.

    Args:
      network: W2VBertConfig; segment_samples: samples per training example (16 kHz).
      mask_prob, mask_span: span masking; num_negatives, contrastive_temperature: the contrastive task;
      diversity_weight, mlm_weight: loss weights; pitch_weight: of the pitch target (used when
      network.pitch_bins > 0); pitch_lowest_midi: its lowest note.
    """

    def __init__(self, network: W2VBertConfig, segment_samples: int, mask_prob: float = 0.065, mask_span: int = 10,
                 num_negatives: int = 100, contrastive_temperature: float = 0.1, diversity_weight: float = 0.1,
                 mlm_weight: float = 1.0, pitch_weight: float = 1.0, pitch_lowest_midi: int = 36):
        self.network = network
        self.module = W2VBert(network)
        self.segment_samples = int(segment_samples)
        self.mask_prob, self.mask_span = float(mask_prob), int(mask_span)
        self.num_negatives = int(num_negatives)
        self.contrastive_temperature = float(contrastive_temperature)
        self.diversity_weight, self.mlm_weight = float(diversity_weight), float(mlm_weight)
        self.pitch_weight, self.pitch_lowest_midi = float(pitch_weight), int(pitch_lowest_midi)

    @property
    def num_layers(self) -> int:
        return self.network.num_layers

    def get_initial_variables(self, rng, input_shapes):
        batch = input_shapes["audio"][0]
        audio = jnp.zeros((batch, min(input_shapes["audio"][1], 16 * self.network.samples_per_frame)), jnp.float32)
        frames = self.network.num_frames(audio.shape[1])
        return self.module.init({"params": rng}, audio, jnp.zeros((batch, frames), bool))

    def _losses(self, params, flax_mutables, audio, rng: Optional[jax.Array]):
        batch = audio.shape[0]
        frames = self.network.num_frames(audio.shape[1])
        train = rng is not None
        rng = jax.random.key(0) if rng is None else rng  # evaluation: a fixed mask
        mask_rng, negative_rng, dropout_rng, quantizer_rng = jax.random.split(rng, 4)
        mask = span_mask(mask_rng, batch, frames, self.mask_prob, self.mask_span)
        variables = {"params": params, STATE: flax_mutables[STATE]}
        rngs = {"dropout": dropout_rng, "quantizer": quantizer_rng}
        if train:
            out, updated = self.module.apply(variables, audio, mask, deterministic=False, update_codebook=True,
                                             rngs=rngs, mutable=[STATE])
        else:
            out, updated = self.module.apply(variables, audio, mask, rngs=rngs), {STATE: flax_mutables[STATE]}
        negatives = sample_negatives(negative_rng, mask, self.num_negatives)
        contrastive, contrastive_accuracy = contrastive_loss(out["context"], out["targets"], mask, negatives,
                                                             self.contrastive_temperature)
        weight = mask.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weight), 1.0)
        nll, _ = cross_entropy(out["mlm_logits"], out["target_ids"])  # [b, t]
        mlm = jnp.sum(nll * weight) / count
        mlm_accuracy = jnp.sum((jnp.argmax(out["mlm_logits"], axis=-1) == out["target_ids"]) * weight) / count
        used = jnp.sum(jnp.any(jax.nn.one_hot(out["target_ids"], self.network.codebook_size, dtype=bool),
                               axis=(0, 1)))
        loss = contrastive + self.diversity_weight * out["diversity_loss"] + self.mlm_weight * mlm
        extra = {}
        if self.network.pitch_bins:
            target = pitch_target(audio, self.network.sample_rate, frames, self.network.samples_per_frame,
                                  self.network.pitch_bins, self.pitch_lowest_midi)
            pitch = jnp.mean(jnp.square(out["pitch"] - target))
            loss = loss + self.pitch_weight * pitch
            extra["pitch_loss"] = pitch
        metrics = {**extra,"loss": loss, "contrastive_loss": contrastive, "contrastive_accuracy": contrastive_accuracy,
                   "diversity_loss": out["diversity_loss"], "codebook_perplexity": out["perplexity"],
                   "codes_used": used.astype(jnp.float32), "mlm_loss": mlm, "mlm_accuracy": mlm_accuracy,
                   "mask_fraction": jnp.mean(weight), "loss_weight": jnp.float32(batch)}
        return loss, metrics, updated

    def train_loss_fn(self, params, flax_mutables, batch, dropout_rng):
        loss, metrics, updated = self._losses(params, flax_mutables, batch["audio"], dropout_rng)
        return loss, (metrics, dict(flax_mutables, **updated))

    def loss_fn(self, params, batch, dropout_rng, flax_mutables=None):
        if flax_mutables is None:
            raise ValueError("w2v-BERT's loss needs its quantizer state (flax_mutables)")
        loss, metrics, _ = self._losses(params, flax_mutables, batch["audio"], dropout_rng)
        return loss, metrics

    def embed(self, params, audio: jax.Array, layer: int) -> jax.Array:
        """Hidden state `layer` (0 = the encoder input, L = after conformer block L; MusicLM uses MLM-module
        layer 7, i.e. num_contrastive_layers + 7) of audio [batch, samples] at 16 kHz -> [batch, frames, d]."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer={layer}: w2v-BERT has layers 0..{self.num_layers}")
        out = self.module.apply({"params": params}, audio, None, num_layers_to_run=layer)
        return out["hidden_states"][layer]

    def predict_batch_with_aux(self, params, batch, rng=None, *, flax_mutables=None, **kwargs):
        """Quantizer ids [batch, frames] of the unmasked audio (the pre-training targets); aux: MLM logits."""
        out = self.module.apply({"params": params, STATE: flax_mutables[STATE]}, batch["audio"], None)
        return out["target_ids"], {"mlm_logits": out["mlm_logits"]}

    def score_batch(self, params, batch, flax_mutables=None):
        """[batch] mean log-probability the MLM module gives the quantizer ids of unmasked audio."""
        out = self.module.apply({"params": params, STATE: flax_mutables[STATE]}, batch["audio"], None)
        nll, _ = cross_entropy(out["mlm_logits"], out["target_ids"])
        return -jnp.mean(nll, axis=1)
