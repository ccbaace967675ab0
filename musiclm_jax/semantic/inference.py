"""Semantic tokens: embeddings of one layer of a frozen feature model, normalised per dimension, clustered by
k-means (MusicLM: w2v-BERT MLM-module layer 7, k = 1024, 25 Hz).

    tokenizer = SemanticTokenizer.load("/path/to/TOKENIZER_DIR")
    tokens = tokenizer.tokenize(audio)              # audio [batch, samples] at tokenizer.sample_rate -> [batch, frames]
    tokens = tokenizer.tokenize(audio, dedupe=True) # AudioLM: consecutive duplicates removed (a list of arrays)

The feature model is any run directory whose model has `embed(params, audio, layer)`, `sample_rate` and
`frame_rate`: a trained w2v-BERT (gin/w2v_bert/*.gin) or an imported HuBERT/MERT (`python -m musiclm_jax.convert
hubert`); which one is a gin setting of the fitting job (gin/semantic/*.gin). `frame_pooling` averages that many
consecutive frames (HuBERT's 50 Hz -> 25 Hz with 2).

The fit is a job of its own (musiclm_jax.fit_semantic):
    python -m musiclm_jax.fit_semantic --gin_file=gin/semantic/kmeans_tiny.gin \
        --gin.FEATURE_CHECKPOINT="'/tmp/w2v_bert_tiny'" --gin.OUTPUT_DIR="'/tmp/semantic_tok'" [--gin.AUDIO_DIR=...]

Command line (semantic/__main__.py): `python -m musiclm_jax.semantic tokenize|embed`.

TOKENIZER_DIR holds tokenizer.json (feature checkpoint, layer, pooling, k), normalisation.npz (mean, std) and
kmeans.npz (the k-means state; written every `save_every` steps, so a restarted fit resumes where it stopped).
"""
from __future__ import annotations

import json
import os
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import spectral

TOKENIZER_FILE = "tokenizer.json"
NORMALIZATION_FILE = "normalization.npz"
KMEANS_FILE = "kmeans.npz"


def load_feature_model(checkpoint: str):
    """(model, params) of a feature-model run directory (w2v-BERT or imported HuBERT/MERT)."""
    from musiclm_jax import checkpoint_loading
    loaded = checkpoint_loading.load_model(checkpoint)
    model = loaded.model
    if not hasattr(model, "embed"):
        raise ValueError(f"{checkpoint} holds a {type(model).__name__}, which has no layer embeddings "
                         f"(expected w2v-BERT or an imported HuBERT/MERT)")
    return model, jax.device_get(loaded.params)


def pool_frames(features: jax.Array, pooling: int) -> jax.Array:
    """Averages groups of `pooling` consecutive frames: [b, t, d] -> [b, ceil(t / pooling), d] (a short last
    group is averaged over the frames it has)."""
    if pooling == 1:
        return features
    b, t, d = features.shape
    pad = -t % pooling
    padded = jnp.pad(features, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, pooling, d)
    counts = jnp.pad(jnp.ones((t,)), (0, pad)).reshape(-1, pooling).sum(axis=1)
    return padded.sum(axis=2) / counts[None, :, None]


def dedupe_consecutive(tokens: np.ndarray) -> np.ndarray:
    """[frames] -> tokens with runs of equal consecutive tokens collapsed to one (AudioLM)."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return tokens
    keep = np.concatenate([[True], tokens[1:] != tokens[:-1]])
    return tokens[keep]


class FeatureExtractor:
    """Layer `layer` of a feature model, pooled: audio [batch, samples] -> float32 [batch, frames, dim] (jitted).

    With pitch_classes=True, 12 more dimensions follow the layer's: the frame's pitch-class profile
    (spectral.pitch_class_profile, a 128 ms window centred on the frame), so dim = layer dim + 12.
    """

    def __init__(self, model, params, layer: int, frame_pooling: int = 1, pitch_classes: bool = False):
        if not 0 <= layer <= model.num_layers:
            raise ValueError(f"layer={layer}: {type(model).__name__} has layers 0..{model.num_layers}")
        self.model, self.params, self.layer, self.frame_pooling = model, params, int(layer), int(frame_pooling)
        self.pitch_classes = bool(pitch_classes)
        samples_per_frame = self.sample_rate / self.frame_rate
        if self.pitch_classes and abs(samples_per_frame - round(samples_per_frame)) > 1e-6:
            raise ValueError(f"pitch_classes: {self.sample_rate} Hz / {self.frame_rate} frames/s is not a whole "
                             f"number of samples per frame")

        def embed(p, audio):
            features = pool_frames(model.embed(p, audio, layer).astype(jnp.float32), self.frame_pooling)
            if not self.pitch_classes:
                return features
            profile = spectral.pitch_class_profile(audio, self.sample_rate, features.shape[1],
                                                   int(round(samples_per_frame)))
            return jnp.concatenate([features, profile], axis=-1)

        self.embed_fn = embed  # (params, audio [batch, samples]) -> [batch, frames, dim], pure (tokenize_forward)
        self._embed = jax.jit(embed)

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.model.frame_rate / self.frame_pooling

    def __call__(self, audio) -> np.ndarray:
        """A jax.Array input keeps its sharding (a batch laid out over several devices runs on all of them)."""
        audio = audio.astype(jnp.float32) if isinstance(audio, jax.Array) else jnp.asarray(audio, jnp.float32)
        return np.asarray(self._embed(self.params, audio))


class SemanticTokenizer:
    """Normalised layer features -> nearest k-means centre. See the module docstring."""

    def __init__(self, features: FeatureExtractor, mean: np.ndarray, std: np.ndarray, centroids: np.ndarray,
                 pitch_class_share: float = 0.0):
        self.features = features
        self.pitch_class_share = float(pitch_class_share)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.centroids = np.asarray(centroids, np.float32)
        self._assign = jax.jit(partial(nearest_centroids, centroids=jnp.asarray(self.centroids)))

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    @property
    def frame_rate(self) -> float:
        """Tokens per second (25 Hz for w2v-BERT, or HuBERT with frame_pooling 2)."""
        return self.features.frame_rate

    @property
    def num_tokens(self) -> int:
        return self.centroids.shape[0]

    def token_pitch_classes(self) -> Optional[np.ndarray]:
        """[num_tokens] int: the pitch class (0 = C .. 11 = B) each token's centre stands for (the largest of its
        12 pitch-class dimensions), or None for a tokenizer fitted without pitch classes."""
        if not self.pitch_class_share:
            return None
        centres = self.centroids * self.std + self.mean  # the per-dimension normalisation is undone, argmax kept
        return np.argmax(centres[:, -12:], axis=1)

    def tokenize(self, audio, dedupe: bool = False):
        """audio [batch, samples] (or [samples]) -> tokens [batch, frames] int32; dedupe=True returns a list of
        [tokens_i] arrays with consecutive duplicates removed (or one array for 1-D input)."""
        audio = audio if isinstance(audio, jax.Array) else np.asarray(audio, np.float32)
        squeeze = audio.ndim == 1
        audio = audio[None] if squeeze else audio
        normalized = (self.features(audio) - self.mean) / self.std
        tokens = np.asarray(self._assign(jnp.asarray(normalized)))
        if dedupe:
            tokens = [dedupe_consecutive(t) for t in tokens]
        return tokens[0] if squeeze else tokens

    def save(self, directory: str, feature_checkpoint: str) -> None:
        os.makedirs(directory, exist_ok=True)
        np.savez(os.path.join(directory, NORMALIZATION_FILE), mean=self.mean, std=self.std)
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump({"feature_checkpoint": os.path.abspath(feature_checkpoint), "layer": self.features.layer,
                       "frame_pooling": self.features.frame_pooling, "num_clusters": self.num_tokens,
                       "pitch_class_share": self.pitch_class_share}, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "SemanticTokenizer":
        """The tokenizer of a TOKENIZER_DIR written by the fit job."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path) or not os.path.exists(os.path.join(directory, KMEANS_FILE)):
            raise FileNotFoundError(f"{directory} is not a semantic tokenizer directory (no {TOKENIZER_FILE} or "
                                    f"{KMEANS_FILE}; write one with `python -m musiclm_jax.fit_semantic`)")
        with open(path) as f:
            spec = json.load(f)
        model, params = load_feature_model(spec["feature_checkpoint"])
        share = float(spec.get("pitch_class_share", 0.0))
        features = FeatureExtractor(model, params, spec["layer"], spec["frame_pooling"], pitch_classes=share > 0)
        with np.load(os.path.join(directory, NORMALIZATION_FILE)) as norm, \
                np.load(os.path.join(directory, KMEANS_FILE)) as km:
            if not bool(km["initialized"]):
                raise ValueError(f"{directory}: the k-means fit has not run a step yet")
            return cls(features, norm["mean"], norm["std"], km["centroids"], share)


def nearest_centroids(points, centroids):
    """points [b, t, d] -> ids [b, t] int32 of the nearest centroid [k, d]."""
    from musiclm_jax.kmeans import assign
    ids, _ = assign(centroids, points.reshape(-1, points.shape[-1]))
    return ids.reshape(points.shape[:2]).astype(jnp.int32)
