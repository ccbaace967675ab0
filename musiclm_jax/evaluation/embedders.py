"""The generation evaluation's embedding models (FAD) and classifiers (KLD), and the PaSST KL and CLAP score.

An embedding model is anything with `embed(audio [B, samples], sample_rate Hz) -> [B, D]` clip embeddings or
[B, frames, D] frame embeddings (`AudioEmbedder`), or a name in EMBEDDING_MODELS: 'mulan' and 'clap' (a MuLan or
converted CLAP run directory's audio tower), 'features' (a w2v-BERT or converted HuBERT/MERT run directory's
layer averaged over time), 'vggish' (a converted VGGish: FAD_VGG's frames). A classifier is any callable
`classifier(audio, sample_rate) -> probs [B, C]`, or 'mulan_zero_shot' (`MuLanZeroShotClassifier`). What each
metric computes, and the reference implementation it follows, is in generation_eval's docstring.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from musiclm_jax.data import audio_io
from musiclm_jax.evaluation import generation_metrics

# Label texts of the zero-shot classifier: broad music tags (genre, instrument, mood, tempo), one short phrase each.
DEFAULT_LABELS = (
    "rock music", "pop music", "jazz", "classical music", "electronic dance music", "hip hop", "blues",
    "country music", "folk music", "reggae", "metal", "ambient music", "funk", "latin music", "orchestral music",
    "piano", "acoustic guitar", "electric guitar", "drums", "bass", "violin", "strings", "flute", "brass",
    "synthesizer", "organ", "singing voice", "choir", "happy music", "sad music", "calm music",
    "energetic music", "slow tempo", "fast tempo")



@runtime_checkable
class AudioEmbedder(Protocol):
    """An audio embedding model for FAD: `embed(audio [B, samples] float, sample_rate Hz) -> [B, D]`."""

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        ...


class MuLanEmbedder:
    """Clip embeddings of a MuLan (or converted CLAP) audio tower: unit-norm [B, embed_dim] (MuLan.embed_audio)."""

    def __init__(self, mulan, name: str = "mulan"):
        self.mulan, self.name = mulan, name

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        return self.mulan.embed_audio(audio_io.resample(audio, sample_rate, self.mulan.sample_rate))


class FeatureModelEmbedder:
    """Layer `layer` (default: the last) of a w2v-BERT or converted HuBERT/MERT run directory, averaged over time."""

    def __init__(self, checkpoint: str, layer: Optional[int] = None, name: str = "features"):
        from musiclm_jax.semantic import inference as semantic
        model, params = semantic.load_feature_model(checkpoint)
        self.extractor = semantic.FeatureExtractor(model, params, model.num_layers if layer is None else int(layer))
        self.name = name

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        return self.extractor(audio_io.resample(audio, sample_rate, self.extractor.sample_rate)).mean(axis=1)


class VGGishFrameEmbedder:
    """FAD_VGG's embeddings: the frames of a converted VGGish run directory (vggish_model.VGGishEmbedder), one
    128-d row per whole 0.96 s of each clip, without the PCA postprocessor: [B, frames, 128]."""

    def __init__(self, checkpoint: str, name: str = "vggish"):
        from musiclm_jax.evaluation.vggish_model import VGGishEmbedder
        self.embedder, self.name = VGGishEmbedder.from_checkpoint(checkpoint), name

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        return self.embedder.embed_batch(audio, sample_rate)  # the batch over the mesh's devices


class MuLanZeroShotClassifier:
    """Zero-shot audio classifier from a MuLan (or CLAP): probs [B, C] = softmax over the C labels of
    cos(audio embedding, label text embedding) / temperature. A `generation_metrics.Classifier`."""

    def __init__(self, mulan, labels: Sequence[str] = DEFAULT_LABELS, temperature: float = 0.1,
                 name: str = "mulan_zero_shot"):
        if isinstance(labels, str) or len(labels) < 2:
            raise ValueError(f"the zero-shot classifier needs a list of at least 2 label texts, got {labels!r}")
        if not temperature > 0:
            raise ValueError(f"classifier temperature must be positive, got {temperature}")
        self.mulan, self.labels, self.temperature, self.name = mulan, tuple(labels), float(temperature), name
        self._label_embeddings = None

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        if self._label_embeddings is None:
            self._label_embeddings = np.asarray(self.mulan.embed_text(list(self.labels)), np.float64)
        embeddings = np.asarray(self.mulan.embed_audio(audio_io.resample(audio, sample_rate, self.mulan.sample_rate)),
                                np.float64)
        logits = embeddings @ self._label_embeddings.T / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)


EMBEDDING_MODELS = ("mulan", "clap", "features", "vggish")
CLASSIFIERS = ("mulan_zero_shot",)


class MuLanCache:
    """MuLans by checkpoint (None: the generating one, `default`), each loaded once."""

    def __init__(self, default):
        self.default, self.loaded = default, {}

    def get(self, checkpoint: Optional[str]):
        if checkpoint is None:
            return self.default
        if checkpoint not in self.loaded:
            from musiclm_jax.mulan.inference import MuLan
            self.loaded[checkpoint] = MuLan.from_checkpoint(checkpoint)
        return self.loaded[checkpoint]


def check_embedding_model(embedding_model, checkpoint: Optional[str]) -> None:
    """Raises naming the setting unless `embedding_model` is a name in EMBEDDING_MODELS (with the checkpoint
    it needs) or an AudioEmbedder."""
    if not isinstance(embedding_model, str):
        if not isinstance(embedding_model, AudioEmbedder):
            raise TypeError(f"embedding_model {embedding_model!r} has no embed(audio, sample_rate) method")
        return
    if embedding_model not in EMBEDDING_MODELS:
        raise ValueError(f"unknown embedding_model {embedding_model!r}; use one of {list(EMBEDDING_MODELS)} or an "
                         f"object with embed(audio [B, samples], sample_rate) -> [B, D]")
    if embedding_model in ("clap", "features", "vggish") and not checkpoint:
        raise ValueError(f"embedding_model {embedding_model!r} needs embedding_checkpoint (a run directory)")


def check_classifier(classifier) -> None:
    """Raises naming the setting unless `classifier` is a name in CLASSIFIERS or a callable."""
    if not isinstance(classifier, str):
        if not callable(classifier):
            raise TypeError(f"classifier {classifier!r} is not callable as classifier(audio, sample_rate)")
        return
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; use one of {list(CLASSIFIERS)} or a callable "
                         f"classifier(audio [B, samples], sample_rate) -> probs [B, C]")


def make_embedder(embedding_model: Union[str, AudioEmbedder], checkpoint: Optional[str] = None,
                  layer: Optional[int] = None, mulans: Optional[MuLanCache] = None) -> AudioEmbedder:
    """The AudioEmbedder of a name in EMBEDDING_MODELS (with its run directory; 'mulan' defaults to the
    generating MuLan in `mulans`), or `embedding_model` itself if it already is one."""
    check_embedding_model(embedding_model, checkpoint)
    if not isinstance(embedding_model, str):
        return embedding_model
    if embedding_model == "features":
        return FeatureModelEmbedder(checkpoint, layer)
    if embedding_model == "vggish":
        return VGGishFrameEmbedder(checkpoint)
    mulans = mulans or MuLanCache(None)
    mulan = mulans.get(checkpoint)
    if mulan is None:
        raise ValueError(f"embedding_model {embedding_model!r} needs embedding_checkpoint (no default MuLan here)")
    return MuLanEmbedder(mulan, name=embedding_model)


def make_classifier(classifier: Union[str, Callable], checkpoint: Optional[str] = None,
                    labels: Sequence[str] = DEFAULT_LABELS, temperature: float = 0.1,
                    mulans: Optional[MuLanCache] = None):
    """The Classifier of a name in CLASSIFIERS ('mulan_zero_shot': the MuLan of `checkpoint`, default the
    generating one in `mulans`), or `classifier` itself if it already is one."""
    check_classifier(classifier)
    if not isinstance(classifier, str):
        return classifier
    mulan = (mulans or MuLanCache(None)).get(checkpoint)
    if mulan is None:
        raise ValueError(f"classifier {classifier!r} needs classifier_checkpoint (no default MuLan here)")
    return MuLanZeroShotClassifier(mulan, labels, temperature)


def embed_clips(embedder: AudioEmbedder, audio: np.ndarray, sample_rate: int, batch_size: int) -> np.ndarray:
    """Float64 embeddings of audio [N, samples], `batch_size` clips per embed() call: [N, D] from a clip
    embedder, [N * frames, D] from a frame embedder ([B, frames, D] per call: each frame is one sample)."""
    parts = [np.asarray(embedder.embed(audio[i:i + batch_size], sample_rate), np.float64)
             for i in range(0, len(audio), batch_size)]
    embeddings = np.concatenate(parts)
    if embeddings.ndim not in (2, 3) or embeddings.shape[0] != len(audio):
        raise ValueError(f"the embedding model returned shape {embeddings.shape} for {len(audio)} clips; expected "
                         f"[{len(audio)}, D] or [{len(audio)}, frames, D]")
    return embeddings.reshape(-1, embeddings.shape[-1])


def class_probabilities(classifier, audio: np.ndarray, sample_rate: int, batch_size: int) -> np.ndarray:
    """Float64 class posteriors [N, C] of audio [N, samples] at sample_rate Hz, `batch_size` clips per call."""
    probs = np.concatenate([np.asarray(classifier(audio[i:i + batch_size], sample_rate), np.float64)
                            for i in range(0, len(audio), batch_size)])
    if probs.ndim != 2 or probs.shape[0] != len(audio):
        raise ValueError(f"the classifier returned shape {probs.shape} for {len(audio)} clips; expected "
                         f"[{len(audio)}, C]")
    return probs


def passt_kl(classifier, reference: np.ndarray, generated: np.ndarray, sample_rate: int, batch_size: int) -> float:
    """audiocraft's PaSST KL (generation_eval's docstring) of paired clips reference and generated [N, samples] at
    sample_rate Hz: `generation_metrics.audiocraft_kl` of their segment rows (a passt_model.PaSSTClassifier's
    `segment_rows`, `batch_size` clips per forward pass), in nats."""
    if reference.shape != generated.shape:
        raise ValueError(f"kl_passt pairs clips of equal length: reference {reference.shape}, generated "
                         f"{generated.shape}")
    rows = [classifier.segment_rows(clips, sample_rate, batch_size) for clips in (reference, generated)]
    if not len(rows[0]):
        raise ValueError(f"kl_passt: clips of {reference.shape[1]} samples at {sample_rate} Hz have no segment "
                         f"longer than 0.15 s")
    return generation_metrics.audiocraft_kl(*rows)


def caption_and_clip_embeddings(model, captions: Sequence[str], audio: np.ndarray, sample_rate: int,
                                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(text [N, D], audio [N, D]): float64 unit-norm embeddings of caption i and of clip i (audio [N, samples] at
    sample_rate Hz, resampled to the model's rate, `batch_size` clips per call) by a mulan.MuLan or a converted
    CLAP: what the MuLan cycle consistency and the CLAP score compare."""
    if len(captions) != len(audio):
        raise ValueError(f"{len(captions)} captions for {len(audio)} clips")
    text = np.asarray(model.embed_text(list(captions)), np.float64)
    return text, embed_clips(MuLanEmbedder(model), audio, sample_rate, batch_size)


def clap_score(clap, captions: Sequence[str], audio: np.ndarray, sample_rate: int, batch_size: int) -> float:
    """audiocraft's CLAP score (generation_eval's docstring): the mean over clips of the cosine between caption i's text
    embedding and clip i's audio embedding (caption_and_clip_embeddings). clap: a mulan.MuLan loaded from a
    converted CLAP run directory; audio [N, samples] at sample_rate Hz."""
    return generation_metrics.mulan_cycle_consistency(
        *caption_and_clip_embeddings(clap, captions, audio, sample_rate, batch_size))


def component_name(component) -> str:
    """The name a metric carries for an embedding model or classifier (a name string, or its `name`)."""
    return component if isinstance(component, str) else getattr(component, "name", type(component).__name__)

