"""PaSST as a frozen AudioSet classifier: the BaseModel wrapper of networks.passt, and the classifier KL uses.

Imported weights (`python -m musiclm_jax.convert passt --from PASST.pt --to MODEL_DIR`) are run directories of
this model (gin/eval/passt.gin); `PaSSTClassifier.from_checkpoint(MODEL_DIR)` loads the parameters only and
classifies audio at any sample rate:

    classifier = PaSSTClassifier.from_checkpoint("/ckpt/passt")
    logits = classifier.logits(audio, sample_rate)          # audio [samples] -> [527] float32
    probs = classifier.probabilities(audio, sample_rate)    # softmax over the 527 classes, as audiocraft's KL
    probs = classifier(batch_audio, sample_rate)            # [batch, samples] -> [batch, 527]: a
                                                            # generation_metrics.Classifier

Probabilities: audiocraft's `PasstKLDivergenceMetric` takes `torch.softmax(logits, dim=-1)` of PaSST's logits
(audiocraft/metrics/kld.py:195), not the sigmoid PaSST was trained with (AudioSet is multi-label); so do we.

Long clips: audiocraft (kld.py:172-185, `_process_audio`) resamples to 32 kHz, splits the clip into consecutive
10 s segments (`torch.split`, the last one shorter, not padded), drops segments of at most 0.15 s (4800 samples),
and scores every kept segment as its own row: each segment of a generated clip is paired with the same segment of
its reference clip in the KL (kld.py:209-218). `audiocraft_segments` cuts a clip that way and
`segment_rows` (`segment_probabilities` for one clip) gives those rows. The batched `__call__` returns one row per clip, as the Classifier
protocol asks: for clips of at most 10 s it equals audiocraft's row; a longer clip's row is the mean of its
segments' probabilities (audiocraft would instead count each segment as a separate pair).

Training is not supported: PaSST is only imported. The parameters carry no logical axis names (replicated; 86M).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.models import RawAudioModel
from musiclm_jax.networks.passt import PaSST, PaSSTConfig, log_mel

_NO_TRAINING = "PaSST is imported as a frozen AudioSet classifier; training it is not supported"
SEGMENT_SECONDS = 10.0  # audiocraft's max_duration for the 10 s PaSST (kld.py: `max_duration = 10`)
MIN_SEGMENT_SECONDS = 0.15  # audiocraft keeps segments strictly longer than this (kld.py: `min_duration = 0.15`)


class PaSSTModel(RawAudioModel):
    """Batches: {'audio': [batch, segment_samples] float32 at network.sample_rate}.

    Args:
      network: PaSSTConfig; segment_samples: samples per example of a batch (input_shapes), at most
        network.max_samples (default: 10 s).
    """

    def __init__(self, network: PaSSTConfig = PaSSTConfig(), segment_samples: int = 320000):
        self.network = network
        self.module = PaSST(network)
        self.segment_samples = int(segment_samples)
        if not network.min_samples <= self.segment_samples <= network.max_samples:
            raise ValueError(f"segment_samples={segment_samples} is outside the {network.min_samples} to "
                             f"{network.max_samples} samples PaSST takes")

    @property
    def sample_rate(self) -> int:
        return self.network.sample_rate

    def get_initial_variables(self, rng, input_shapes):
        mel = jnp.zeros((1, self.network.num_bands, self.network.num_frames(self.segment_samples)), jnp.float32)
        return self.module.init({"params": rng}, mel)

    def logits(self, params, audio: jax.Array) -> jax.Array:
        """audio [batch, samples] at sample_rate (min_samples to max_samples) -> logits [batch, num_classes]."""
        return self.module.apply({"params": params}, log_mel(audio, self.network))

    def predict_batch_with_aux(self, params, batch, rng=None, *, flax_mutables=None, **decoder_params):
        """Softmax probabilities [batch, num_classes] of batch['audio'] (audiocraft's KL convention); aux:
        {'logits': [batch, num_classes]}."""
        logits = self.logits(params, batch["audio"])
        return jax.nn.softmax(logits, axis=-1), {"logits": logits}

    def score_batch(self, params, batch, flax_mutables=None):
        raise NotImplementedError("PaSST has no likelihood to score: it is a classifier (use logits)")

    def loss_fn(self, params, batch, dropout_rng: Optional[jax.Array], flax_mutables=None):
        raise NotImplementedError(_NO_TRAINING)


def audiocraft_segments(audio: np.ndarray, sample_rate: int = 32000, segment_seconds: float = SEGMENT_SECONDS,
                        min_seconds: float = MIN_SEGMENT_SECONDS) -> list[np.ndarray]:
    """audio [samples] at sample_rate -> the segments audiocraft's PasstKLDivergenceMetric scores: consecutive
    pieces of int(segment_seconds * sample_rate) samples (the last may be shorter; nothing is padded), keeping only
    those longer than int(min_seconds * sample_rate) samples. May be empty (a clip of at most 0.15 s)."""
    audio = np.asarray(audio)
    size, minimum = int(segment_seconds * sample_rate), int(min_seconds * sample_rate)
    pieces = [audio[..., i:i + size] for i in range(0, audio.shape[-1], size)]
    return [p for p in pieces if p.shape[-1] > minimum]


class PaSSTClassifier:
    """A loaded PaSST: AudioSet logits and softmax probabilities of clips at any rate (resampled to 32 kHz with
    audio_io.resample, soxr; audiocraft resamples with julius, so other rates differ slightly from it)."""

    def __init__(self, model: PaSSTModel, params, partitioner=None):
        from musiclm_jax import partitioning
        self.partitioner = partitioner or partitioning.Partitioner(partitioning.create_mesh())
        self.model = model
        self.params = jax.device_put(params, self.partitioner.replicated())
        self._logits = jax.jit(model.logits)  # one compilation per clip length and padded batch

    @classmethod
    def from_checkpoint(cls, model_dir: str) -> "PaSSTClassifier":
        from musiclm_jax import checkpoint_loading
        loaded = checkpoint_loading.load_model(model_dir)
        if not isinstance(loaded.model, PaSSTModel):
            raise ValueError(f"{model_dir} holds a {type(loaded.model).__name__}, not PaSST")
        return cls(loaded.model, jax.device_get(loaded.params))

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def config(self) -> PaSSTConfig:
        return self.model.network

    def _at_rate(self, audio, sample_rate: int, ndim: int) -> np.ndarray:
        from musiclm_jax.data import audio_io
        audio = np.asarray(audio, np.float32)
        if audio.ndim != ndim:
            layout = "[samples]" if ndim == 1 else "[batch, samples]"
            raise ValueError(f"expected audio {layout}; got shape {audio.shape}")
        return audio_io.resample(audio, sample_rate, self.sample_rate) if sample_rate != self.sample_rate else audio

    def _check_length(self, samples: int) -> None:
        c = self.config
        if not c.min_samples <= samples <= c.max_samples:
            raise ValueError(f"PaSST takes clips of {c.min_samples} to {c.max_samples} samples at {c.sample_rate} Hz "
                             f"(~{c.min_samples / c.sample_rate:.2f} to {c.max_samples / c.sample_rate:.2f} s); got "
                             f"{samples}: cut longer clips with audiocraft_segments")

    def batch_logits(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """audio [batch, samples] at sample_rate, at most ~10 s at 32 kHz -> logits [batch, 527] float32. The batch
        is padded to a multiple of the mesh's data-parallel size and laid over the devices (the parameters are
        replicated), so evaluation batches run on every device."""
        audio = self._at_rate(audio, sample_rate, 2)
        self._check_length(audio.shape[1])
        rows, n = self.partitioner.pad_and_shard(audio)  # the batch over all devices' data axes
        return np.asarray(self._logits(self.params, rows))[:n]

    def logits(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """audio [samples] at sample_rate, at most ~10 s at 32 kHz (min 4801 samples there) -> logits [527]."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"PaSSTClassifier.logits takes one mono clip [samples]; got shape {audio.shape}")
        return self.batch_logits(audio[None], sample_rate)[0]

    def probabilities(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """audio [samples] at sample_rate (at most ~10 s) -> softmax over the 527 logits [527] float32 (the
        distribution audiocraft's PaSST KL compares; not the per-class sigmoid)."""
        return np.asarray(jax.nn.softmax(self.logits(audio, sample_rate)))

    def segment_rows(self, audio: np.ndarray, sample_rate: int, batch_size: Optional[int] = None) -> np.ndarray:
        """audiocraft's KL rows of equal-length clips: audio [N, samples] at sample_rate -> [S * N, 527] softmax
        probabilities, row s * N + i for segment s of clip i (`audiocraft_segments`, cut after resampling to
        32 kHz, as audiocraft does); `batch_size` clips per forward pass (None: all N). [0, 527] when no segment
        is longer than 0.15 s."""
        audio = self._at_rate(audio, sample_rate, 2)
        step = batch_size or len(audio)
        rows = [jax.nn.softmax(self.batch_logits(segment[i:i + step], self.sample_rate), axis=-1)
                for segment in audiocraft_segments(audio, self.sample_rate) for i in range(0, len(segment), step)]
        return np.concatenate(rows) if rows else np.zeros((0, self.config.num_classes), np.float32)

    def segment_probabilities(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """audio [samples] of any length at sample_rate -> [segments, 527]: `segment_rows` of the one clip."""
        return self.segment_rows(self._at_rate(audio, sample_rate, 1)[None], self.sample_rate)

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """audio [batch, samples] at sample_rate -> softmax probabilities [batch, 527] (a
        generation_metrics.Classifier). Clips of at most 10 s (at 32 kHz) are classified whole, in one batch;
        longer ones get the mean of their audiocraft segments' probabilities (see the module doc)."""
        audio = self._at_rate(audio, sample_rate, 2)
        if audio.shape[1] <= int(SEGMENT_SECONDS * self.sample_rate):
            return np.asarray(jax.nn.softmax(self.batch_logits(audio, self.sample_rate), axis=-1))
        segments = audiocraft_segments(audio, self.sample_rate)  # each [batch, length]: all clips cut alike
        probs = [jax.nn.softmax(self.batch_logits(s, self.sample_rate), axis=-1) for s in segments]
        return np.asarray(jnp.mean(jnp.stack(probs), axis=0))
