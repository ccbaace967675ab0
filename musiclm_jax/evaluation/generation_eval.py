"""Generation evaluation: text -> music on held-out captions, scored against their reference clips.

    python -m musiclm_jax.eval --gin_file=gin/eval/generation.gin --gin.MULAN_CHECKPOINT="'/ckpt/mulan'" ... \
        [--gin.EVAL_DATA="'musiccaps:/data/musiccaps'"] [--gin.TOKEN_DIR="'/data/tokens'"] [--gin.OUTPUT_DIR=...]

`evaluate_generation` generates audio for every caption of the eval set (in batches of `batch_size`, batch b with
seed `seed + b`; the last batch is padded with repeated captions so every batch has one compiled shape), writes
the clips as 16-bit wavs and computes every metric on the audio read back from those files, so the numbers can be
recomputed from the output directory. Output (in OUTPUT_DIR, next to eval.evaluate's metrics.json):

    generated/<index>_<caption>.wav    every generated clip, at the codec's rate
    reference/<index>_<caption>.wav    the reference clips of the samples shown in the report
    *.png                              their log-mel spectrograms
    samples.jsonl                      one line per caption: caption, reference id, wav, the MuLan cosine of
                                       caption and audio, the classifier's top labels for both clips
    report.html                        settings, the metrics table and the first `report_samples` samples

Eval sets (`eval_data`): None or 'synthetic' (the embedded synthetic music's test split, the clips the codec and
MuLan evaluations use), 'audio_folder:DIR' (the `split` clips of an audio folder; captions required) or
'musiccaps:DIR' (DIR/musiccaps-public.csv and the clips {ytid}.<ext> in DIR; `is_audioset_eval` rows are the
`test` split). Reference clips are read at the codec's rate, cut to `duration_s` and zero-padded to it; bad files
are counted (`num_skipped`) and skipped.

Metrics (names carry the embedding model / classifier so values of different ones are not compared by mistake):

- `fad_<embedding>`: Fréchet Audio Distance (generation_metrics.frechet_audio_distance, squared embedding units)
  between clip embeddings of the reference and the generated clips. The embedding model is pluggable: anything
  with `embed(audio [B, samples], sample_rate) -> [B, D]` (`AudioEmbedder`), or a name (`EMBEDDING_MODELS`):
  'mulan' (a MuLan run directory's audio tower; default: the generating MuLan), 'clap' (a converted CLAP run
  directory, `python -m musiclm_jax.convert clap`; it is a MuLan run directory, so the same code), 'features'
  (a w2v-BERT or converted HuBERT/MERT run directory: layer `embedding_layer` averaged over time), 'vggish' (a
  converted VGGish run directory, `python -m musiclm_jax.convert vggish`: the field's FAD_VGG). An embedder may
  also return frame embeddings [B, frames, D]: every frame is then one sample of the set, which is how the
  field's FAD pools VGGish (one 128-d embedding per whole 0.96 s of each clip, last layer without ReLU, no PCA,
  as `frechet-audio-distance`'s defaults and fadtk's 'vggish'; audio resampled to 16 kHz).
- `kld_<classifier>`: mean KL(p_ref || p_gen) in nats between the class posteriors of each reference clip and the
  clip generated from its caption (generation_metrics.kld_from_audio). The classifier is pluggable: any
  `generation_metrics.Classifier` (`classifier(audio, sample_rate) -> probs [B, C]`), or a name (`CLASSIFIERS`):
  'mulan_zero_shot' (`MuLanZeroShotClassifier`), which needs no trained classifier and works offline: softmax
  over the cosines between the clip's MuLan audio embedding and the text embeddings of `class_labels`
  (default `DEFAULT_LABELS`: genres, instruments, moods, tempi), divided by `classifier_temperature`. The paper
  used an AudioSet (LEAF) classifier, which this project does not ship; plug one in through the interface.
- `kl_passt` (only with `passt_checkpoint`, a PaSST converted by `python -m musiclm_jax.convert passt`;
  otherwise listed in `skipped_metrics`): audiocraft's PaSST KL, the KL figure MusicGen and audiocraft report
  (audiocraft/metrics/kld.py, `PasstKLDivergenceMetric`): both clips resampled to 32 kHz, cut into consecutive
  10 s segments (the last one shorter, unpadded; segments of at most 0.15 s dropped), each segment's softmax over
  PaSST's 527 AudioSet logits a row, and `generation_metrics.audiocraft_kl` (KL(reference || generated + 1e-6),
  summed over classes, averaged over all segment pairs). A 10 s clip is one row.
- `mulan_cycle_consistency`: mean cosine between each caption's MuLan text embedding and the MuLan audio
  embedding of the clip generated from it (generation_metrics.mulan_cycle_consistency); `mcc_mulan_checkpoint`
  scores with another MuLan than the generating one (the generating one also conditions, so it is biased).
- `clap_score` (only with `clap_checkpoint`, a CLAP converted by `python -m musiclm_jax.convert clap`; otherwise
  listed in `skipped_metrics`): the same cosine with CLAP's text and audio towers, as audiocraft's
  `TextConsistencyMetric` (audiocraft/metrics/clap_consistency.py) computes the CLAP score MusicGen reports: each
  generated clip resampled to the CLAP's rate (48 kHz for LAION-CLAP) and downmixed, its unit-norm audio
  embedding against its caption's unit-norm text embedding, the cosines averaged over all clips. Clips shorter
  than CLAP's 10 s window are repeat-padded as LAION-CLAP and transformers' ClapFeatureExtractor do; longer ones
  are the normalised mean of 1 s-stride windows (mulan.MuLan.embed_audio), where LAION-CLAP's non-fused model
  embeds one random 10 s crop, so only clips of at most 10 s (MusicCaps') score exactly as audiocraft's.
- `memorization_*` (only with `token_dir`, a token cache of the training data written by musiclm_jax.tokenize;
  otherwise listed in `skipped_metrics` with the reason): the MusicLM paper's study of the semantic stage. For up
  to `memorization_examples` chunks of the cache's `memorization_split`, the stage is given the chunk's MuLan
  tokens (its training conditioning; the caption's text tokens if the cache has none), no melody, and the first
  `prompt_seconds` of its semantic tokens, and samples the next `continuation_seconds` (one window, with the
  generation's guidance scale and the semantic temperature unless `memorization_temperature` is set; example i
  draws from fold_in(key(seed), i)). Reported: `memorization_exact_match_fraction`,
  `memorization_approximate_match_fraction` (normalised Hamming distance <= `approximate_threshold`),
  `memorization_mean_token_agreement`, `memorization_chance_agreement` (1 / semantic vocabulary) and
  `memorization_num_examples` (generation_metrics.memorization).

Also `num_examples`, `num_skipped`, `duration_s`. The codec and MuLan evaluations run from the same entry point
with gin/eval/codec.gin and gin/eval/mulan.gin.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from musiclm_jax import report as report_lib
from musiclm_jax.data import audio_io, captioned_audio, synthetic_music, token_cache
from musiclm_jax.data.bad_input import BadInputReport
from musiclm_jax.evaluation import generation_metrics

SYNTHETIC_TEST_SEED = 2  # the test split of the synthetic_music raw-audio tasks (tasks/audio.py)
SYNTHETIC_TEST_CLIPS = 1000
EVAL_DATA_KINDS = ("synthetic", "audio_folder", "musiccaps")
MUSICCAPS_CSV = "musiccaps-public.csv"

# Label texts of the zero-shot classifier: broad music tags (genre, instrument, mood, tempo), one short phrase each.
DEFAULT_LABELS = (
    "rock music", "pop music", "jazz", "classical music", "electronic dance music", "hip hop", "blues",
    "country music", "folk music", "reggae", "metal", "ambient music", "funk", "latin music", "orchestral music",
    "piano", "acoustic guitar", "electric guitar", "drums", "bass", "violin", "strings", "flute", "brass",
    "synthesizer", "organ", "singing voice", "choir", "happy music", "sad music", "calm music",
    "energetic music", "slow tempo", "fast tempo")


# ----------------------------------------------------------------------------------------------------------------
# Eval data
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalExample:
    """A held-out caption and its reference clip (mono float32 at the requested rate)."""

    id: str
    caption: str
    audio: np.ndarray


def parse_eval_data(eval_data: Optional[str]) -> tuple[str, Optional[str]]:
    """(kind, directory) of an EVAL_DATA setting; raises naming it if it is malformed or its files are missing."""
    if eval_data is None or eval_data == "synthetic":
        return "synthetic", None
    kind, _, path = str(eval_data).partition(":")
    if kind not in EVAL_DATA_KINDS[1:] or not path:
        raise ValueError(f"EVAL_DATA={eval_data!r} is not None, 'synthetic', 'audio_folder:DIR' or 'musiccaps:DIR'")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"EVAL_DATA={eval_data!r}: {path!r} is not a directory")
    if kind == "musiccaps" and not os.path.isfile(os.path.join(path, MUSICCAPS_CSV)):
        raise FileNotFoundError(f"EVAL_DATA={eval_data!r}: {os.path.join(path, MUSICCAPS_CSV)!r} does not exist")
    return kind, path


def eval_examples(eval_data: Optional[str], sample_rate: int, seconds: float, max_examples: int,
                  split: str = "test", report: Optional[BadInputReport] = None) -> list[EvalExample]:
    """Up to max_examples captioned clips of `split` of the eval set (see the module docstring), each cut to
    `seconds` at `sample_rate` and zero-padded to it. Bad files are counted in `report` and skipped."""
    kind, path = parse_eval_data(eval_data)
    report = report or BadInputReport("skip", f"generation eval {eval_data or 'synthetic'}")
    length = int(round(seconds * sample_rate))

    def fit(audio):
        return np.pad(audio[:length], (0, max(0, length - len(audio)))).astype(np.float32)
    examples = []
    if kind == "synthetic":
        if split != "test":
            raise ValueError(f"the synthetic evaluation clips are the test split; got split={split!r}")
        for i in range(min(max_examples, SYNTHETIC_TEST_CLIPS)):
            clip = synthetic_music.generate_clip(i, seed=SYNTHETIC_TEST_SEED, seconds=seconds, sample_rate=sample_rate)
            examples.append(EvalExample(clip["id"], clip["caption"], fit(clip["audio"])))
        return examples
    checks = captioned_audio.AudioChecks(sample_rate, require_captions=True, max_seconds=seconds)
    if kind == "audio_folder":
        records = captioned_audio.read_audio_folder(path, checks, report)
    else:
        records = captioned_audio.read_musiccaps(os.path.join(path, MUSICCAPS_CSV), path, checks, report)
    for record in records:
        if record.split != split or len(examples) >= max_examples:
            continue
        audio = captioned_audio.decode_record(record, checks, report)
        if audio is not None:
            examples.append(EvalExample(record.id, record.caption, fit(audio)))
    if len(examples) < 2:
        raise ValueError(f"EVAL_DATA={eval_data!r} has {len(examples)} usable captioned clips in split {split!r}; "
                         f"the generation evaluation needs at least 2 (skipped: {report.summary()['skipped']})")
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Embedding models (FAD) and classifiers (KLD)
# ----------------------------------------------------------------------------------------------------------------

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
        from musiclm_jax import semantic
        model, params = semantic.load_feature_model(checkpoint)
        self.extractor = semantic.FeatureExtractor(model, params, model.num_layers if layer is None else int(layer))
        self.name = name

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        return self.extractor(audio_io.resample(audio, sample_rate, self.extractor.sample_rate)).mean(axis=1)


class VGGishFrameEmbedder:
    """FAD_VGG's embeddings: the frames of a converted VGGish run directory (vggish_model.VGGishEmbedder), one
    128-d row per whole 0.96 s of each clip, without the PCA postprocessor: [B, frames, 128]."""

    def __init__(self, checkpoint: str, name: str = "vggish"):
        from musiclm_jax.vggish_model import VGGishEmbedder
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


class _MuLans:
    """MuLans by checkpoint (None: the generating one), each loaded once."""

    def __init__(self, default):
        self.default, self.loaded = default, {}

    def get(self, checkpoint: Optional[str]):
        if checkpoint is None:
            return self.default
        if checkpoint not in self.loaded:
            from musiclm_jax.mulan import MuLan
            self.loaded[checkpoint] = MuLan.from_checkpoint(checkpoint)
        return self.loaded[checkpoint]


def _check_embedding_model(embedding_model, checkpoint: Optional[str]) -> None:
    if not isinstance(embedding_model, str):
        if not isinstance(embedding_model, AudioEmbedder):
            raise TypeError(f"embedding_model {embedding_model!r} has no embed(audio, sample_rate) method")
        return
    if embedding_model not in EMBEDDING_MODELS:
        raise ValueError(f"unknown embedding_model {embedding_model!r}; use one of {list(EMBEDDING_MODELS)} or an "
                         f"object with embed(audio [B, samples], sample_rate) -> [B, D]")
    if embedding_model in ("clap", "features", "vggish") and not checkpoint:
        raise ValueError(f"embedding_model {embedding_model!r} needs embedding_checkpoint (a run directory)")


def _check_classifier(classifier) -> None:
    if not isinstance(classifier, str):
        if not callable(classifier):
            raise TypeError(f"classifier {classifier!r} is not callable as classifier(audio, sample_rate)")
        return
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; use one of {list(CLASSIFIERS)} or a callable "
                         f"classifier(audio [B, samples], sample_rate) -> probs [B, C]")


def make_embedder(embedding_model: Union[str, AudioEmbedder], checkpoint: Optional[str] = None,
                  layer: Optional[int] = None, mulans: Optional[_MuLans] = None) -> AudioEmbedder:
    """The AudioEmbedder of a name in EMBEDDING_MODELS (with its run directory; 'mulan' defaults to the
    generating MuLan in `mulans`), or `embedding_model` itself if it already is one."""
    _check_embedding_model(embedding_model, checkpoint)
    if not isinstance(embedding_model, str):
        return embedding_model
    if embedding_model == "features":
        return FeatureModelEmbedder(checkpoint, layer)
    if embedding_model == "vggish":
        return VGGishFrameEmbedder(checkpoint)
    mulans = mulans or _MuLans(None)
    mulan = mulans.get(checkpoint)
    if mulan is None:
        raise ValueError(f"embedding_model {embedding_model!r} needs embedding_checkpoint (no default MuLan here)")
    return MuLanEmbedder(mulan, name=embedding_model)


def make_classifier(classifier: Union[str, Callable], checkpoint: Optional[str] = None,
                    labels: Sequence[str] = DEFAULT_LABELS, temperature: float = 0.1,
                    mulans: Optional[_MuLans] = None):
    """The Classifier of a name in CLASSIFIERS ('mulan_zero_shot': the MuLan of `checkpoint`, default the
    generating one in `mulans`), or `classifier` itself if it already is one."""
    _check_classifier(classifier)
    if not isinstance(classifier, str):
        return classifier
    mulan = (mulans or _MuLans(None)).get(checkpoint)
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


def _probs(classifier, audio: np.ndarray, sample_rate: int, batch_size: int) -> np.ndarray:
    probs = np.concatenate([np.asarray(classifier(audio[i:i + batch_size], sample_rate), np.float64)
                            for i in range(0, len(audio), batch_size)])
    if probs.ndim != 2 or probs.shape[0] != len(audio):
        raise ValueError(f"the classifier returned shape {probs.shape} for {len(audio)} clips; expected "
                         f"[{len(audio)}, C]")
    return probs


def passt_kl(classifier, reference: np.ndarray, generated: np.ndarray, sample_rate: int, batch_size: int) -> float:
    """audiocraft's PaSST KL (module docstring) of paired clips reference and generated [N, samples] at
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


def clap_score(clap, captions: Sequence[str], audio: np.ndarray, sample_rate: int, batch_size: int) -> float:
    """audiocraft's CLAP score (module docstring): the mean over clips of the cosine between caption i's text
    embedding and clip i's audio embedding. clap: a mulan.MuLan loaded from a converted CLAP run directory;
    audio [N, samples] at sample_rate Hz, resampled to the CLAP's rate in batches of `batch_size` clips."""
    if len(captions) != len(audio):
        raise ValueError(f"clap_score: {len(captions)} captions for {len(audio)} clips")
    text = np.asarray(clap.embed_text(list(captions)), np.float64)
    embeddings = np.concatenate([
        np.asarray(clap.embed_audio(audio_io.resample(audio[i:i + batch_size], sample_rate, clap.sample_rate)),
                   np.float64) for i in range(0, len(audio), batch_size)])
    return generation_metrics.mulan_cycle_consistency(text, embeddings)


def _name(component) -> str:
    return component if isinstance(component, str) else getattr(component, "name", type(component).__name__)


# ----------------------------------------------------------------------------------------------------------------
# Memorization (semantic stage, token cache)
# ----------------------------------------------------------------------------------------------------------------

def read_training_tokens(token_dir: str, split: str, min_frames: int, max_examples: int,
                         needed_by: str = "the memorization metric") -> dict:
    """{'semantic' [N, F] int, 'mulan' [N, levels] int or None (if the cache has no MuLan tokens), 'text' [N],
    'ids' [N], 'spec' and 'mulan_spec': the manifest entries of the semantic and MuLan tokenizers} of the first
    `max_examples` chunks of `split` whose real (unpadded) audio covers at least `min_frames` semantic frames."""
    manifest = token_cache.read_manifest(token_dir)
    spec = token_cache.tokenizer_spec(manifest, "semantic", token_dir, needed_by)
    has_mulan = "mulan" in manifest.get("tokenizers", {})
    if split not in manifest.get("splits", {}):
        raise ValueError(f"token cache {token_dir} has no split {split!r} (it has {sorted(manifest['splits'])})")
    paths = token_cache.completed_shards(token_dir, split, manifest["splits"][split]["num_shards"])
    if not paths:
        raise ValueError(f"token cache {token_dir} has no finished shards in split {split!r}")
    import tensorflow as tf  # the cache is TFRecord; read only when a TOKEN_DIR is given
    out = {"semantic": [], "mulan": [], "text": [], "ids": []}
    for raw in tf.data.TFRecordDataset(paths).as_numpy_iterator():
        if len(out["ids"]) >= max_examples:
            break
        feature = tf.train.Example.FromString(raw).features.feature
        semantic = np.asarray(feature["semantic"].int64_list.value, np.int64).reshape(spec["frames"], -1)[:, 0]
        real = int(feature["num_samples"].int64_list.value[0]) * spec["frame_rate"] / manifest["sample_rate"]
        if int(real + 1e-6) < min_frames:
            continue
        out["semantic"].append(semantic)
        out["ids"].append(feature["id"].bytes_list.value[0].decode())
        out["text"].append(feature["text"].bytes_list.value[0].decode())
        if has_mulan:
            out["mulan"].append(np.asarray(feature["mulan"].int64_list.value, np.int64))
    if not out["ids"]:
        raise ValueError(f"token cache {token_dir} split {split!r} has no chunk with {min_frames} real semantic "
                         f"frames ({min_frames / spec['frame_rate']:.2f} s)")
    return {"semantic": np.stack(out["semantic"]), "mulan": np.stack(out["mulan"]) if has_mulan else None,
            "text": out["text"], "ids": out["ids"], "spec": spec,
            "mulan_spec": manifest["tokenizers"].get("mulan")}


def semantic_continuations(musiclm, mulan_tokens: np.ndarray, prompts: np.ndarray, steps: int,
                           temperature: Optional[float] = None, seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """The semantic stage's continuations [N, steps] (local token ids) of prompts [N, P] (local ids) under MuLan
    conditioning tokens [N, levels], in one window (P + steps <= the stage's window), without melody (PAD).
    Example i draws from fold_in(key(seed), i); batches are padded to `batch_size` rows (one compiled shape).
    temperature: default the generation's semantic temperature."""
    import jax
    stage = musiclm.stages["semantic"]
    model = stage.model
    prompts, mulan_tokens = np.asarray(prompts), np.asarray(mulan_tokens)
    n, p = prompts.shape
    if p + steps > model.target_length:
        raise ValueError(f"memorization prompt ({p}) + continuation ({steps}) frames exceed the semantic stage's "
                         f"window of {model.target_length} frames")
    temperature = musiclm.params.temperature[0] if temperature is None else float(temperature)
    base = jax.random.key(seed)
    out = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        parts = [model.layout.to_global(mulan_tokens[rows], "mulan")]
        if musiclm.melody_length:
            parts.append(np.zeros((batch_size, musiclm.melody_length), np.int32))  # PAD: no melody
        parts.append(model.layout.to_global(prompts[rows], "semantic"))
        prefix = np.concatenate(parts, axis=1).astype(np.int32)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(start, start + batch_size))
        new = stage.sample(prefix, steps, p, keys, musiclm.params, temperature)
        out.append(model.layout.to_local(new, "semantic")[:min(n, start + batch_size) - start])
    return np.concatenate(out).astype(np.int64)


def memorization_from_cache(musiclm, token_dir: str, prompt_seconds: float = 10.0,
                            continuation_seconds: float = 5.0, max_examples: int = 256, split: str = "train",
                            temperature: Optional[float] = None, approximate_threshold: float = 0.1,
                            seed: int = 0, batch_size: int = 16) -> dict:
    """The memorization metrics (module docstring) of musiclm's semantic stage on the token cache `token_dir`."""
    rate = musiclm.semantic_rate
    prompt, steps = int(round(prompt_seconds * rate)), int(round(continuation_seconds * rate))
    if prompt < 0 or steps < 1:
        raise ValueError(f"memorization needs prompt_seconds >= 0 and continuation_seconds >= {1 / rate} s; got "
                         f"{prompt_seconds} and {continuation_seconds}")
    window = musiclm.stages["semantic"].model.target_length
    if prompt + steps > window:
        raise ValueError(f"memorization prompt ({prompt}) + continuation ({steps}) frames exceed the semantic stage's "
                         f"window of {window} frames")
    data = read_training_tokens(token_dir, split, prompt + steps, max_examples)
    layout = musiclm.stages["semantic"].model.layout
    spec = data["spec"]
    vocab = layout.group("semantic").codebook_size
    if spec["codebook_size"] != vocab or abs(spec["frame_rate"] - rate) > 1e-6:
        raise ValueError(f"token cache {token_dir} has semantic tokens of {spec['codebook_size']} codes at "
                         f"{spec['frame_rate']} Hz; the semantic stage uses {vocab} codes at {rate} Hz")
    if data["mulan"] is not None:
        mulan_tokens = data["mulan"]
        group = layout.group("mulan")
        if mulan_tokens.shape[1] != group.levels or data["mulan_spec"]["codebook_size"] != group.codebook_size:
            raise ValueError(f"token cache {token_dir} has MuLan tokens of {mulan_tokens.shape[1]} x "
                             f"{data['mulan_spec']['codebook_size']}; the semantic stage uses {group.levels} x "
                             f"{group.codebook_size}")
    else:
        if not all(data["text"]):
            raise ValueError(f"token cache {token_dir} has neither MuLan tokens nor captions for every chunk, so "
                             f"the semantic stage has no conditioning for memorization")
        mulan_tokens = musiclm.mulan.tokens_from_text(data["text"])
    semantic = data["semantic"]
    generated = semantic_continuations(musiclm, mulan_tokens, semantic[:, :prompt], steps, temperature, seed,
                                       batch_size)
    result = generation_metrics.memorization(semantic[:, prompt:prompt + steps], generated, approximate_threshold)
    metrics = {f"memorization_{k}": v for k, v in result.items()}
    metrics.update(memorization_chance_agreement=1.0 / vocab, memorization_num_examples=len(semantic),
                   memorization_prompt_seconds=prompt / rate, memorization_continuation_seconds=steps / rate)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Generation, outputs and the report
# ----------------------------------------------------------------------------------------------------------------

def generate_all(musiclm, captions: Sequence[str], batch_size: int, seed: int, log=sys.stderr) -> np.ndarray:
    """[N, duration samples] for the captions, batch b generated with seed + b (the last batch padded)."""
    out = []
    start_time, previous_seed = time.time(), musiclm.params.seed
    for b, start in enumerate(range(0, len(captions), batch_size)):
        batch = list(captions[start:start + batch_size])
        real = len(batch)
        batch += [batch[-1]] * (batch_size - real)
        musiclm.set_generation_params(seed=seed + b)
        out.append(np.asarray(musiclm.generate(batch))[:real])
        if log is not None:
            print(f"generation eval: {start + real}/{len(captions)} captions generated "
                  f"({time.time() - start_time:.1f} s)", file=log)
    musiclm.set_generation_params(seed=previous_seed)
    return np.concatenate(out)


# Published figures on MusicCaps, shown beside ours in the report of a MusicCaps evaluation: (our metric, system,
# value as published, source). Only the FAD_VGG, PaSST KL and CLAP rows are computed the same way as ours;
# MusicLM's KLD used a LEAF AudioSet classifier and its MCC Google's MuLan.
PUBLISHED_MUSICCAPS = (
    ("fad_vggish", "MusicLM", "4.0", "arXiv 2301.11325, Table 1 (FAD_VGG)"),
    ("fad_vggish", "MusicGen (300M-3.3B)", "3.1-3.8", "arXiv 2306.05284, Table 1 (FAD_vgg)"),
    ("fad_vggish", "audiocraft's released MusicGen checkpoints", "4.88 / 5.14 / 5.48",
     "audiocraft MusicGen model card"),
    ("kl_passt", "MusicLM", "1.01", "arXiv 2301.11325, Table 1 (KLD, LEAF classifier: not PaSST)"),
    ("kl_passt", "MusicGen (300M-3.3B)", "1.22-1.28", "arXiv 2306.05284, Table 1 (KL, PaSST)"),
    ("kl_passt", "audiocraft's released MusicGen checkpoints", "1.42 / 1.38 / 1.37", "audiocraft MusicGen model card"),
    ("clap_score", "MusicGen (300M-3.3B)", "0.31-0.32", "arXiv 2306.05284, Table 1 (CLAP score)"),
    ("clap_score", "audiocraft's released MusicGen checkpoints", "0.27-0.28", "audiocraft MusicGen model card"),
    ("mulan_cycle_consistency", "MusicLM", "0.51", "arXiv 2301.11325, Table 1 (MCC, Google's MuLan: not ours)"),
)


def _published_table(metrics: dict) -> str:
    """The report's comparison: each PUBLISHED_MUSICCAPS row beside our value of the same metric ('-' if not
    computed)."""
    rows = []
    for metric, system, value, source in PUBLISHED_MUSICCAPS:
        ours = metrics.get(metric)
        shown = f"{ours:.4g}" if isinstance(ours, float) else "-"
        rows.append(f"<tr><td>{html.escape(metric)}</td><td>{shown}</td><td>{html.escape(system)}</td>"
                    f"<td>{html.escape(value)}</td><td>{html.escape(source)}</td></tr>")
    return ("<h2>Published figures on MusicCaps</h2><table>\n<tr><th>metric</th><th>ours</th><th>system</th>"
            "<th>published</th><th>source</th></tr>\n" + "\n".join(rows) + "\n</table>")


def _metric_row(name: str, value: Any) -> str:
    shown = f"{value:.6g}" if isinstance(value, float) else html.escape(str(value))
    return f"<tr><td>{html.escape(name)}</td><td>{shown}</td></tr>"


def write_report(output_dir: str, metrics: dict, settings: dict, samples: Sequence[dict],
                 title: str = "musiclm_jax generation evaluation", published: bool = False) -> str:
    """Writes output_dir/report.html: the settings, the metrics table (with published=True, the published
    MusicCaps figures beside ours) and the samples that have `spectrogram` entries (their generated and reference
    players); file names are relative to output_dir. Returns its path."""
    metric_rows = "\n".join(_metric_row(k, v) for k, v in sorted(metrics.items()) if k != "skipped_metrics")
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>"
                      for k, v in metrics.get("skipped_metrics", {}).items())
    setting_rows = "\n".join(_metric_row(k, v) for k, v in settings.items())
    sections = []
    for s in samples:
        if "spectrogram" not in s:
            continue
        labels = ""
        if s.get("generated_top_labels"):
            labels = (f"<p>classifier, generated: {html.escape(', '.join(s['generated_top_labels']))}; reference: "
                      f"{html.escape(', '.join(s['reference_top_labels']))}</p>")
        sections.append(f"""<section>
<h3>{html.escape(s['caption'])}</h3>
<p>reference {html.escape(s['reference_id'])}; MuLan caption-audio cosine {s['mulan_cosine']:.3f}</p>{labels}
<p>generated</p><img src="{html.escape(s['spectrogram'])}" alt="spectrogram of the generated clip">
<audio controls src="{html.escape(s['wav'])}"></audio>
<p>reference</p><img src="{html.escape(s['reference_spectrogram'])}" alt="spectrogram of the reference clip">
<audio controls src="{html.escape(s['reference_wav'])}"></audio>
</section>""")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}} img{{display:block;max-width:100%}}
td{{padding:0 1em 0 0}}</style>
</head><body><h1>{html.escape(title)}</h1>
<h2>Settings</h2><table>
{setting_rows}
</table>
<h2>Metrics</h2><table>
{metric_rows}
</table>
{f'<p>Skipped:</p><ul>{skipped}</ul>' if skipped else ''}
{_published_table(metrics) if published else ''}
<h2>Samples ({len(sections)} of {len(samples)})</h2>
{chr(10).join(sections)}
</body></html>
"""
    path = os.path.join(output_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def _top_labels(probs: np.ndarray, labels: Optional[Sequence[str]], k: int = 3) -> list[str]:
    order = np.argsort(-probs)[:k]
    return [labels[i] if labels is not None else str(i) for i in order]


# ----------------------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------------------

def evaluate_generation(checkpoint_dir: str, output_dir: str, *, musiclm, eval_data: Optional[str] = None,
                        split: str = "test", max_examples: int = 1000, batch_size: int = 16,
                        duration_s: Optional[float] = None, seed: int = 0,
                        embedding_model: Union[str, AudioEmbedder] = "mulan",
                        embedding_checkpoint: Optional[str] = None, embedding_layer: Optional[int] = None,
                        classifier: Union[str, Callable] = "mulan_zero_shot",
                        classifier_checkpoint: Optional[str] = None, class_labels: Sequence[str] = DEFAULT_LABELS,
                        classifier_temperature: float = 0.1, mcc_mulan_checkpoint: Optional[str] = None,
                        clap_checkpoint: Optional[str] = None, passt_checkpoint: Optional[str] = None,
                        token_dir: Optional[str] = None, memorization_examples: int = 256,
                        memorization_split: str = "train", prompt_seconds: float = 10.0,
                        continuation_seconds: float = 5.0, memorization_temperature: Optional[float] = None,
                        approximate_threshold: float = 0.1, report_samples: int = 8) -> dict:
    """Generates audio for the eval set's captions and returns the metrics of the module docstring; writes the
    clips, samples.jsonl and report.html to `output_dir`.

    Args:
      checkpoint_dir: the run directory eval.evaluate records (gin/eval/generation.gin passes the semantic
        stage's); the models are `musiclm`'s.
      musiclm: a pipeline.MusicLM with its generation settings, or a function that loads one (called after the
        settings and the eval data have been checked, so a bad setting fails before any model loads).
      duration_s: seconds per clip (None: musiclm's setting); references are cut or padded to it.
      seed: batch b of captions is generated with seed + b.
      embedding_model, embedding_checkpoint, embedding_layer: FAD's embedding model (module docstring).
      classifier, classifier_checkpoint, class_labels, classifier_temperature: KLD's classifier.
      mcc_mulan_checkpoint: the MuLan of the cycle consistency (None: the generating one).
      clap_checkpoint: a converted CLAP run directory for `clap_score` (None: skipped).
      passt_checkpoint: a converted PaSST run directory for `kl_passt` (None: skipped).
      token_dir, memorization_*, prompt_seconds, continuation_seconds, approximate_threshold: memorization.
      report_samples: how many samples the report shows with players and spectrograms.
    """
    del checkpoint_dir  # recorded by eval.evaluate
    _check_embedding_model(embedding_model, embedding_checkpoint)
    _check_classifier(classifier)
    parse_eval_data(eval_data)
    if token_dir is not None:
        token_cache.read_manifest(token_dir)
    if max_examples < 2 or batch_size < 1:
        raise ValueError(f"max_examples ({max_examples}) must be >= 2 and batch_size ({batch_size}) >= 1")
    if not hasattr(musiclm, "generate"):
        musiclm = musiclm()
    if duration_s is not None:
        musiclm.set_generation_params(duration_s=float(duration_s))
    duration_s = musiclm.params.duration_s
    rate = musiclm.sample_rate
    report = BadInputReport("skip", f"generation eval {eval_data or 'synthetic'}")
    examples = eval_examples(eval_data, rate, duration_s, max_examples, split, report)
    captions = [e.caption for e in examples]
    reference = np.stack([e.audio for e in examples])
    print(f"generation eval: {len(examples)} captions of {eval_data or 'synthetic'} split {split!r}, "
          f"{duration_s} s each", file=sys.stderr)

    # Generate, write, and read back: the metrics are those of the files.
    os.makedirs(output_dir, exist_ok=True)
    generated_audio = generate_all(musiclm, captions, batch_size, seed, log=musiclm.log)
    samples = []
    for i, (example, clip) in enumerate(zip(examples, generated_audio)):
        name = f"{i:04d}_{report_lib.slug(example.caption)}"
        wav = os.path.join("generated", name + ".wav")
        audio_io.save_audio(os.path.join(output_dir, wav), clip, rate)
        samples.append({"caption": example.caption, "reference_id": example.id, "wav": wav})
    generated = np.stack([audio_io.load_audio(os.path.join(output_dir, s["wav"]), rate) for s in samples])

    mulans = _MuLans(musiclm.mulan)
    metrics: dict = {"num_examples": len(examples), "num_skipped": report.num_skipped, "duration_s": duration_s}
    embedder = make_embedder(embedding_model, embedding_checkpoint, embedding_layer, mulans)
    metrics[f"fad_{_name(embedder)}"] = generation_metrics.frechet_audio_distance(
        embed_clips(embedder, reference, rate, batch_size), embed_clips(embedder, generated, rate, batch_size))
    clf = make_classifier(classifier, classifier_checkpoint, class_labels, classifier_temperature, mulans)
    ref_probs, gen_probs = _probs(clf, reference, rate, batch_size), _probs(clf, generated, rate, batch_size)
    metrics[f"kld_{_name(clf)}"] = generation_metrics.kl_divergence(ref_probs, gen_probs)
    mcc_mulan = mulans.get(mcc_mulan_checkpoint)
    text = mcc_mulan.embed_text(captions)
    audio_embeddings = np.concatenate([
        mcc_mulan.embed_audio(audio_io.resample(generated[i:i + batch_size], rate, mcc_mulan.sample_rate))
        for i in range(0, len(generated), batch_size)])
    metrics["mulan_cycle_consistency"] = generation_metrics.mulan_cycle_consistency(text, audio_embeddings)
    cosines = np.sum(text * audio_embeddings, axis=1)
    skipped = {}
    if passt_checkpoint is None:
        skipped["kl_passt"] = "no PASST_CHECKPOINT given (a PaSST converted by python -m musiclm_jax.convert passt)"
    else:
        from musiclm_jax.passt_model import PaSSTClassifier
        metrics["kl_passt"] = passt_kl(PaSSTClassifier.from_checkpoint(passt_checkpoint), reference, generated,
                                       rate, batch_size)
    if clap_checkpoint is None:
        skipped["clap_score"] = "no CLAP_CHECKPOINT given (a CLAP converted by python -m musiclm_jax.convert clap)"
    else:
        metrics["clap_score"] = clap_score(mulans.get(clap_checkpoint), captions, generated, rate, batch_size)
    if token_dir is None:
        skipped["memorization"] = "no TOKEN_DIR given (set --gin.TOKEN_DIR to the token cache of the training data)"
    if skipped:
        metrics["skipped_metrics"] = skipped
    if token_dir is not None:
        metrics.update(memorization_from_cache(musiclm, token_dir, prompt_seconds, continuation_seconds,
                                               memorization_examples, memorization_split, memorization_temperature,
                                               approximate_threshold, seed, batch_size))

    # Per-sample details, the report's files and the report.
    labels = getattr(clf, "labels", None)
    for i, s in enumerate(samples):
        s.update(mulan_cosine=float(cosines[i]), generated_top_labels=_top_labels(gen_probs[i], labels),
                 reference_top_labels=_top_labels(ref_probs[i], labels))
        if i < report_samples:
            s["spectrogram"] = os.path.splitext(s["wav"])[0] + ".png"
            report_lib.spectrogram_png(generated[i], rate, os.path.join(output_dir, s["spectrogram"]))
            s["reference_wav"] = os.path.join("reference", os.path.basename(s["wav"]))
            audio_io.save_audio(os.path.join(output_dir, s["reference_wav"]), reference[i], rate)
            s["reference_spectrogram"] = os.path.splitext(s["reference_wav"])[0] + ".png"
            report_lib.spectrogram_png(reference[i], rate, os.path.join(output_dir, s["reference_spectrogram"]))
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    p = musiclm.params
    settings = {"eval_data": eval_data or "synthetic", "split": split, "num_examples": len(examples),
                "duration_s": duration_s, "seed": seed, "batch_size": batch_size, "temperature": p.temperature,
                "top_k": p.top_k, "top_p": p.top_p, "guidance_scale": p.guidance_scale,
                "embedding_model": _name(embedder), "embedding_checkpoint": embedding_checkpoint or "generating MuLan",
                "classifier": _name(clf), "class_labels": ", ".join(labels) if labels else "-",
                "classifier_temperature": classifier_temperature,
                "mcc_mulan_checkpoint": mcc_mulan_checkpoint or "generating MuLan",
                "clap_checkpoint": clap_checkpoint or "-", "passt_checkpoint": passt_checkpoint or "-",
                "token_dir": token_dir or "-"}
    write_report(output_dir, metrics, settings, samples, published=parse_eval_data(eval_data)[0] == "musiccaps")
    print(f"generation eval: wrote {len(samples)} clips, samples.jsonl and report.html to {output_dir}",
          file=sys.stderr)
    return metrics
