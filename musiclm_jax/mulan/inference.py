"""MuLan as the stages use it: joint music-text embeddings and their conditioning tokens.

    mulan = MuLan.from_checkpoint("/ckpt/mulan")             # a MuLan run directory (or a converted CLAP one)
    e = mulan.embed_audio(audio)         # audio [batch, samples] at mulan.sample_rate -> [batch, 128], unit norm
    e = mulan.embed_text(["calm piano"])  # -> [batch, 128], unit norm
    tokens = mulan.tokens_from_audio(audio)    # -> [batch, 12] int32 in [0, 1024) (training conditioning)
    tokens = mulan.tokens_from_text(texts)     # -> [batch, 12]                   (inference conditioning)

Clip embeddings: audio longer than the model's window (`window_samples`, 10 s in the paper) is cut into windows
at `stride_seconds` (1 s) with a last window ending at the clip's end, their embeddings are averaged and the mean
is re-normalised (the paper's recipe; an imported CLAP is treated the same way, where transformers'
ClapFeatureExtractor with truncation='rand_trunc' would embed one random window). Shorter audio becomes one window
as the model's `short_clip_padding` says: zeros appended ('pad', this project's MuLan), or the clip repeated as many
whole times as fit and then zeros ('repeatpad', CLAP's convention, set by gin/mulan/clap.gin), `pad_to_window`.

Conditioning tokens: a residual VQ of `levels` x `codebook_size` (paper 12 x 1024) fitted on audio embeddings of
training clips (level l: k-means of the residuals left by levels < l), saved as CHECKPOINT/mulan_rvq.npz by the
fit job (musiclm_jax.fit_rvq): `python -m musiclm_jax.fit_rvq --gin_file=gin/mulan/rvq_tiny.gin
--gin.MULAN_CHECKPOINT=...`.

Command line (mulan/__main__.py): `python -m musiclm_jax.mulan embed-audio|embed-text|tokens|train-vocab`.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.vq import rvq_decode, rvq_encode, rvq_encode_with_margins

RVQ_FILE = "mulan_rvq.npz"


def pad_to_window(audio: np.ndarray, window: int, mode: str = "pad") -> np.ndarray:
    """audio [batch, samples] with samples <= window -> [batch, window]: 'pad' appends zeros; 'repeatpad' tiles
    each clip floor(window / samples) times, then appends zeros (transformers' ClapFeatureExtractor)."""
    samples = audio.shape[1]
    if samples > window or samples == 0:
        raise ValueError(f"pad_to_window: {samples} samples for a window of {window}")
    if mode == "repeatpad":
        audio = np.tile(audio, (1, window // samples))
    elif mode != "pad":
        raise ValueError(f"pad_to_window: mode {mode!r}, expected 'pad' or 'repeatpad'")
    return np.pad(audio, ((0, 0), (0, window - audio.shape[1])))


def window_starts(num_samples: int, window: int, stride: int) -> list[int]:
    """Start samples of the windows that cover a clip: every `stride`, plus one ending at the clip's end."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, stride))
    if starts[-1] != num_samples - window:
        starts.append(num_samples - window)
    return starts


def embed_in_batches(windows: np.ndarray, batch_size: int, embed_batch) -> np.ndarray:
    """windows [n, window] -> [n, dim] through embed_batch([batch_size, window]) -> [batch_size, dim], the last
    batch padded with zeros (one compiled shape)."""
    out = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), np.float32)])
        out.append(np.asarray(embed_batch(padded))[:len(chunk)])
    return np.concatenate(out)


def embed_clips(audio, window: int, stride: int, short_clip_padding: str, embed_windows) -> np.ndarray:
    """Clip embeddings: audio [batch, samples] (or [samples]) -> [batch, dim] (or [dim]), unit norm: the mean of
    the embeddings of the windows that cover each clip (every `stride` samples; a clip shorter than one window
    padded to it), embedded by embed_windows([n, window]) -> [n, dim]. MuLan.embed_audio, and the served audio
    tower (musiclm_jax.serving)."""
    audio = np.asarray(audio, np.float32)
    squeeze = audio.ndim == 1
    audio = audio[None] if squeeze else audio
    if audio.shape[1] < window:
        audio = pad_to_window(audio, window, short_clip_padding)
    starts = window_starts(audio.shape[1], window, stride)
    windows = np.stack([clip[s:s + window] for clip in audio for s in starts])
    embeddings = embed_windows(windows).reshape(audio.shape[0], len(starts), -1).mean(axis=1)
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    return embeddings[0] if squeeze else embeddings


def shard_bounds(total: int, num_shards: int) -> np.ndarray:
    """Row boundaries [num_shards + 1] of `total` rows cut into contiguous shards of near-equal size."""
    return np.asarray([s * total // num_shards for s in range(num_shards + 1)])


def process_shards(num_shards: int) -> range:
    """This process's shards: process p of P holds shards [p S / P, (p + 1) S / P)."""
    processes, index = jax.process_count(), jax.process_index()
    return range(index * num_shards // processes, (index + 1) * num_shards // processes)


def process_rows(total: int, num_shards: int) -> tuple[int, int]:
    """(first row, row count) of this process's shards (process_shards) of `total` rows."""
    bounds, shards = shard_bounds(total, num_shards), process_shards(num_shards)
    return int(bounds[shards.start]), int(bounds[shards.stop] - bounds[shards.start])


# The hop of the windows a clip embedding averages (MuLan's default).
STRIDE_SECONDS = 1.0


class ConditioningRVQ:
    """MuLan's conditioning quantizer: a residual VQ of embeddings with fixed codebooks [levels, codebook_size,
    dim], fitted by k-means level by level (fit) and applied with vq.rvq_encode."""

    def __init__(self, codebooks: np.ndarray):
        self.codebooks = np.asarray(codebooks, np.float32)
        self._quantize = jax.jit(partial(rvq_encode, codebooks=jnp.asarray(self.codebooks)))
        self._quantize_with_margins = jax.jit(partial(rvq_encode_with_margins,
                                                      codebooks=jnp.asarray(self.codebooks)))

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    def quantize(self, embeddings) -> np.ndarray:
        """[batch, dim] -> codes [batch, levels] int32."""
        return np.asarray(self._quantize(jnp.asarray(embeddings, jnp.float32)))

    def quantize_with_margins(self, embeddings) -> tuple[np.ndarray, np.ndarray]:
        """[batch, dim] -> (codes [batch, levels] int32, margins [batch, levels] float32: per level, the squared
        distance of the second-nearest code minus the nearest's; vq.rvq_encode_with_margins)."""
        codes, margins = self._quantize_with_margins(jnp.asarray(embeddings, jnp.float32))
        return np.asarray(codes), np.asarray(margins)

    def reconstruct(self, codes) -> np.ndarray:
        """codes [batch, n <= levels] -> the sum of their code vectors [batch, dim]."""
        return np.asarray(rvq_decode(jnp.asarray(codes), self.codebooks))

    @classmethod
    def fit(cls, embeddings: np.ndarray, levels: int, codebook_size: int, steps: int = 50, batch_size: int = 4096,
            seed: int = 0, num_shards: int = 8) -> "ConditioningRVQ":
        """Fits each level by mini-batch k-means (kmeans.MiniBatchKMeans, on all devices of all processes) on
        the residuals of the previous levels.

        The N training embeddings, in their global order, form `num_shards` contiguous shards (shard s: rows
        shard_bounds(N, num_shards)[s:s + 2]); each k-means batch takes about batch_size / num_shards rows of
        every shard, drawn with replacement by a generator fixed by (seed, level, step, shard). With several
        processes, process p holds shards [p S / P, (p + 1) S / P) and passes exactly their rows as
        `embeddings` (`process_rows`); the batches, and so the centres, are the one-process fit's up to float
        summation order. The residuals are updated by each process for its own rows.

        Args:
          embeddings: this process's rows [n, dim] (all N with one process); levels, codebook_size: the RVQ.
          steps: k-means steps per level; batch_size: rows per step (at least codebook_size, at most N, rounded
            up so the shards draw equally and the devices divide it); seed; num_shards: divisible by the
            process count.
        Raises:
          ValueError if N < codebook_size or N < num_shards, or the process count does not divide num_shards.
        """
        from musiclm_jax import distributed
        from musiclm_jax.kmeans import MiniBatchKMeans, assign
        residual = np.asarray(embeddings, np.float32)
        processes, index = jax.process_count(), jax.process_index()
        if num_shards % processes:
            raise ValueError(f"ConditioningRVQ.fit: num_shards={num_shards} must divide evenly over the "
                             f"{processes} processes (fit_rvq rounds num_shards up)")
        total = int(distributed.sum_over_processes(np.asarray([residual.shape[0]], np.float64))[0])
        if total < max(codebook_size, num_shards):
            raise ValueError(f"fitting a {codebook_size}-code RVQ on {num_shards} shards needs >= "
                             f"{max(codebook_size, num_shards)} embeddings, got {total}")
        first, count = process_rows(total, num_shards)
        if residual.shape[0] != count:
            raise ValueError(f"ConditioningRVQ.fit: process {index} passed {residual.shape[0]} rows; its shards "
                             f"hold rows {first}..{first + count} of {total} (process_rows)")
        bounds = shard_bounds(total, num_shards)
        local_shards = process_shards(num_shards)
        nearest = jax.jit(assign)
        codebooks = []
        for level in range(levels):
            kmeans = MiniBatchKMeans(codebook_size, residual.shape[1], seed=seed + level)
            devices = kmeans.partitioner.data_parallel_size
            per_shard = -(-max(codebook_size, min(batch_size, total)) // num_shards)
            while (per_shard * num_shards) % devices:
                per_shard += 1
            for step in range(steps):
                batch = [residual[bounds[s] - first + np.random.RandomState([seed, level, step, s]).randint(
                    0, bounds[s + 1] - bounds[s], per_shard)] for s in local_shards]
                kmeans.step(np.concatenate(batch))
            centroids = kmeans.centroids
            residual = residual - centroids[np.asarray(nearest(centroids, residual)[0])]
            codebooks.append(centroids)
        return cls(np.stack(codebooks))

    def save(self, path: str) -> None:
        np.savez(path, codebooks=self.codebooks)

    @classmethod
    def load(cls, path: str) -> "ConditioningRVQ":
        with np.load(path) as f:
            return cls(f["codebooks"])


class MuLan:
    """A trained (or imported) MuLan with its text tokenizer and, once fitted, its conditioning RVQ.

    Args:
      model: mulan_model.MuLanModel; params: its parameters; tokenizer: text_vocab.TextTokenizer.
      rvq: the conditioning quantizer (None until `python -m musiclm_jax.fit_rvq` has run).
      stride_seconds: the hop of the clip-embedding windows.
    """

    def __init__(self, model, params, tokenizer, rvq: Optional[ConditioningRVQ] = None,
                 stride_seconds: float = STRIDE_SECONDS,
                 batch_size: int = 8):
        self.model, self.params, self.tokenizer, self.rvq = model, params, tokenizer, rvq
        self.stride = int(round(stride_seconds * model.sample_rate))
        self.batch_size = int(batch_size)
        self._embed_audio = jax.jit(model.embed_audio)
        self._embed_text = jax.jit(model.embed_text)

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def window_samples(self) -> int:
        return self.model.segment_samples

    @property
    def embed_dim(self) -> int:
        return self.model.network.embed_dim

    def _windows(self, windows: np.ndarray) -> np.ndarray:
        """[n, window] -> [n, dim], in fixed-size batches (one compiled shape)."""
        return embed_in_batches(windows, self.batch_size, lambda x: self._embed_audio(self.params, jnp.asarray(x)))

    def embed_audio(self, audio) -> np.ndarray:
        """audio [batch, samples] (or [samples]) at sample_rate -> clip embeddings [batch, dim] (or [dim])."""
        return embed_clips(audio, self.window_samples, self.stride, self.model.short_clip_padding, self._windows)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """captions -> [len(texts), dim] unit-norm embeddings."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of captions")
        if self.tokenizer is None:
            raise ValueError("this MuLan checkpoint has no text tokenizer (text_vocab/spm.model or tokenizer.json)")
        tokens, mask = self.tokenizer.encode(list(texts), self.model.text_length)
        return np.asarray(self._embed_text(self.params, jnp.asarray(tokens), jnp.asarray(mask)))

    def similarity(self, texts: Sequence[str], audio) -> np.ndarray:
        """[len(texts), batch] cosines between each caption and each clip."""
        return self.embed_text(texts) @ self.embed_audio(audio).T

    def conditioning_rvq(self) -> ConditioningRVQ:
        """The conditioning RVQ (fitted by `python -m musiclm_jax.fit_rvq`); ValueError naming the fix if there is
        none."""
        if self.rvq is None:
            raise ValueError(f"this MuLan has no conditioning RVQ ({RVQ_FILE}); fit one with `python -m "
                             f"musiclm_jax.fit_rvq --gin_file=gin/mulan/rvq_tiny.gin --gin.MULAN_CHECKPOINT=DIR`")
        return self.rvq

    def tokens_from_audio(self, audio) -> np.ndarray:
        """audio [batch, samples] at sample_rate -> conditioning tokens [batch, levels] int32."""
        rvq = self.conditioning_rvq()
        return rvq.quantize(np.atleast_2d(self.embed_audio(audio)))

    def tokens_from_text(self, texts: Sequence[str]) -> np.ndarray:
        """captions -> conditioning tokens [len(texts), levels] int32."""
        return self.conditioning_rvq().quantize(self.embed_text(texts))

    @classmethod
    def from_checkpoint(cls, model_dir: str, step: Optional[int] = None) -> "MuLan":
        """The MuLan of a training (or converted) MODEL_DIR, its text tokenizer and RVQ (if fitted)."""
        from musiclm_jax import checkpoint_loading
        from musiclm_jax.mulan import model as mulan_model
        from musiclm_jax.mulan import text_vocab
        loaded = checkpoint_loading.load_model(model_dir, step)
        model = loaded.model
        if not isinstance(model, mulan_model.MuLanModel):
            raise ValueError(f"{model_dir} holds a {type(model).__name__}, not MuLan")
        try:
            tokenizer = text_vocab.TextTokenizer(model_dir)
        except FileNotFoundError:
            tokenizer = None  # embed_text will say so
        rvq_path = os.path.join(model_dir, RVQ_FILE)
        rvq = ConditioningRVQ.load(rvq_path) if os.path.exists(rvq_path) else None
        return cls(model, jax.device_get(loaded.params), tokenizer, rvq)
