"""`python -m musiclm_jax.tokenize`: the token cache of a dataset, from the frozen tokenizers.

    python -m musiclm_jax.tokenize --gin_file=gin/tokenize/tiny.gin --gin.CODEC_CHECKPOINT="'/ckpt/codec'" \
        --gin.SEMANTIC_CHECKPOINT="'/ckpt/semantic_tokenizer'" --gin.OUTPUT_DIR="'/data/tokens'" \
        [--gin.AUDIO_DIR="'/data/clips'" | --gin.MUSICCAPS_DIR="'/data/musiccaps'"]

Reads every clip of the raw-audio task at the codec's rate (the embedded synthetic music unless AUDIO_DIR or
MUSICCAPS_DIR is set), cuts it into chunks of `chunk_seconds` (a shorter clip is zero-padded to one chunk; a clip
shorter than `min_clip_seconds` is skipped and counted; the tail after the last whole chunk is dropped and its
seconds counted), runs each tokenizer on batches of chunks laid out over all of this process's devices, and writes
the token cache described in musiclm_jax.data.token_cache. Tokenizers: the codec (all levels), the semantic
tokenizer, MuLan's conditioning RVQ (of each chunk's clip embedding) and the melody tokens (quantized chroma,
musiclm_jax.generation.melody, at `melody_rate` Hz), each optional but the codec.

Work is divided into shards of `clips_per_shard` clips; process p of P does the shards whose index is p mod P. A
shard is written to a temporary file and renamed, then marked done by its .json, so a restarted job skips the
finished shards and redoes at most the ones in flight. Process 0 prepares the source first (the others wait) and
writes the manifest; at the end it waits for every shard and records the totals (examples, skip counts by reason,
MuLan codes that were near ties, and the dataset builder's bad-input report). A near tie (margin below
MULAN_NEAR_TIE) is a code that float rounding under another device layout may resolve the other way; each
shard's .json lists their positions [example, frame, level].
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np

from musiclm_jax import distributed
from musiclm_jax.data import audio_io, token_cache
from musiclm_jax.data.dataset_config import RawAudioSource


@dataclasses.dataclass
class TokenSource:
    """A frozen tokenizer as the job sees it: audio [batch, samples] at sample_rate -> [batch, frames, levels]."""

    name: str
    sample_rate: int
    frame_rate: float
    levels: int
    codebook_size: int
    checkpoint: str
    tokenize: Callable[[jax.Array], np.ndarray]
    # Sources whose codes come with margins (tokenize returns (tokens, margins), both [batch, frames, levels]):
    # a code whose margin is below this is a near tie, counted in the shard's summary with its position.
    near_tie_margin: Optional[float] = None

    def spec(self, frames: int) -> dict:
        return {"sample_rate": self.sample_rate, "frame_rate": self.frame_rate, "levels": self.levels,
                "codebook_size": self.codebook_size, "frames": frames,
                "checkpoint": os.path.abspath(self.checkpoint) if self.checkpoint else None}


def codec_source(checkpoint: str) -> TokenSource:
    """All RVQ levels of the codec run directory `checkpoint`."""
    from musiclm_jax.codec.inference import Codec
    return codec_token_source(Codec.from_checkpoint(checkpoint), checkpoint)


def codec_token_source(codec, checkpoint: str = "") -> TokenSource:
    """All RVQ levels of a loaded codec.Codec (`checkpoint`: where it came from, for the manifest)."""
    return TokenSource("codec", codec.sample_rate, codec.frame_rate, codec.num_quantizers, codec.codebook_size,
                       checkpoint, lambda audio: np.asarray(codec.encode(audio)))


def semantic_source(checkpoint: str) -> TokenSource:
    """The semantic tokenizer directory `checkpoint` (written by `python -m musiclm_jax.fit_semantic`)."""
    from musiclm_jax.semantic.inference import SemanticTokenizer
    return semantic_token_source(SemanticTokenizer.load(checkpoint), checkpoint)


def semantic_token_source(tokenizer, checkpoint: str = "") -> TokenSource:
    """A loaded semantic.SemanticTokenizer's tokens."""
    return TokenSource("semantic", tokenizer.sample_rate, tokenizer.frame_rate, 1, tokenizer.num_tokens, checkpoint,
                       lambda audio: np.asarray(tokenizer.tokenize(audio))[..., None])


# A MuLan code whose squared-distance margin over the second-nearest code is below this is a near tie. The
# embeddings have unit norm (squared distances in [0, 4]); float32 rounding moves a distance by ~1e-7 per
# dimension, so a margin of 1e-5 is where another device layout can choose the other code.
MULAN_NEAR_TIE = 1e-5


def mulan_source(checkpoint: str, chunk_seconds: float) -> TokenSource:
    """MuLan's conditioning tokens (its RVQ of the chunk's clip embedding): one frame of `levels` per chunk."""
    from musiclm_jax.mulan.inference import MuLan
    return mulan_token_source(MuLan.from_checkpoint(checkpoint), chunk_seconds, checkpoint)


def mulan_token_source(mulan, chunk_seconds: float, checkpoint: str = "") -> TokenSource:
    """A loaded mulan.MuLan's conditioning tokens (it needs its RVQ), one frame per chunk of chunk_seconds."""
    rvq = mulan.conditioning_rvq()

    def tokenize(audio):
        codes, margins = rvq.quantize_with_margins(mulan.embed_audio(np.asarray(audio)))
        return codes[:, None, :], margins[:, None, :]
    return TokenSource("mulan", mulan.sample_rate, 1.0 / chunk_seconds, rvq.levels, rvq.codebook_size, checkpoint,
                       tokenize, near_tie_margin=MULAN_NEAR_TIE)


def melody_source(sample_rate: int, frame_rate: float) -> TokenSource:
    """Melody tokens (musiclm_jax.generation.melody: the dominant pitch class per frame, or none) at frame_rate Hz, computed
    on the host from the chunk at the codec's rate (no checkpoint)."""
    from musiclm_jax.generation import melody
    return TokenSource("melody", sample_rate, frame_rate, 1, melody.VOCAB_SIZE, "",
                       lambda audio: melody.melody_tokens(np.asarray(audio), sample_rate, frame_rate)[..., None])


class DeviceBatcher:
    """Lays a [batch, samples] numpy batch over this process's devices (batch padded to a multiple of them) ->
    (tokens [batch, frames, levels], near-tie mask of the same shape or None)."""

    def __init__(self):
        devices = np.array(jax.local_devices())
        self.mesh = jax.sharding.Mesh(devices, ("batch",))
        self.sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("batch"))
        self.num_devices = len(devices)

    def __call__(self, source: TokenSource, audio: np.ndarray, audio_rate: int) -> np.ndarray:
        rows = audio.shape[0]
        audio = audio_io.resample(audio, audio_rate, source.sample_rate)
        padded = -rows % self.num_devices
        if padded:
            audio = np.concatenate([audio, np.zeros((padded, audio.shape[1]), audio.dtype)])
        tokens = source.tokenize(jax.device_put(audio, self.sharding))
        near = None
        if source.near_tie_margin is not None:
            tokens, margins = tokens
            near = np.asarray(margins)[:rows] < source.near_tie_margin
        tokens = np.asarray(tokens)[:rows]
        if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= source.codebook_size:
            raise ValueError(f"{source.name} tokens outside [0, {source.codebook_size})")
        return tokens, near


def chunk_clip(audio: np.ndarray, chunk_samples: int,
               min_clip_samples: int) -> tuple[list[tuple[np.ndarray, int]], int]:
    """([(chunk [chunk_samples], real samples)], dropped tail samples) of one clip; [] if it is too short."""
    if len(audio) < min_clip_samples:
        return [], 0
    if len(audio) < chunk_samples:
        return [(np.pad(audio, (0, chunk_samples - len(audio))), len(audio))], 0
    count = len(audio) // chunk_samples
    chunks = [(audio[i * chunk_samples:(i + 1) * chunk_samples], chunk_samples) for i in range(count)]
    return chunks, len(audio) - count * chunk_samples


def _tokenize_shard(sources: list[TokenSource], batcher: DeviceBatcher, clips, sample_rate: int,
                    chunk_samples: int, min_clip_samples: int, batch_size: int, frames: dict[str, int],
                    path: str) -> dict:
    import tensorflow as tf
    counts = {"clips": 0, "examples": 0, "skipped": {}, "dropped_tail_seconds": 0.0, "near_ties": {}}
    pending: list[tuple[str, str, np.ndarray, int]] = []
    tmp = path + ".tfrecord.tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        def flush():
            audio = np.stack([chunk for _, _, chunk, _ in pending]).astype(np.float32)
            results = {s.name: batcher(s, audio, sample_rate) for s in sources}
            tokens = {name: t for name, (t, _) in results.items()}
            for name, (_, near) in results.items():
                if near is not None:  # [example in this shard, frame, level] of each near tie
                    ties = counts["near_ties"].setdefault(name, [])
                    ties += [[counts["examples"] + int(r), int(f), int(l)] for r, f, l in np.argwhere(near)]
            for row, (clip_id, text, _, real) in enumerate(pending):
                per_source = {}
                for s in sources:
                    t = tokens[s.name][row]
                    if t.shape != (frames[s.name], s.levels):
                        raise ValueError(f"{s.name} gave tokens of shape {t.shape} for a chunk; expected "
                                         f"{(frames[s.name], s.levels)}")
                    per_source[s.name] = t
                writer.write(token_cache.encode_example(clip_id, text, real, per_source))
            counts["examples"] += len(pending)
            pending.clear()

        for clip in clips:
            counts["clips"] += 1
            chunks, tail = chunk_clip(clip["audio"], chunk_samples, min_clip_samples)
            if not chunks:
                counts["skipped"]["too_short"] = counts["skipped"].get("too_short", 0) + 1
                print(f"tokenize: skipping {clip['id']}: {len(clip['audio']) / sample_rate:.2f} s is shorter than "
                      f"min_clip_seconds [too_short]", file=sys.stderr)
                continue
            counts["dropped_tail_seconds"] += tail / sample_rate
            for index, (chunk, real) in enumerate(chunks):
                pending.append((f"{clip['id']}#{index}", clip["text"], chunk, real))
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    os.replace(tmp, path + ".tfrecord")
    return counts


def _probe_frames(sources: list[TokenSource], batcher: DeviceBatcher, chunk_samples: int, sample_rate: int):
    """Frames per chunk of each source (from one silent chunk, so the manifest states exact shapes)."""
    silent = np.zeros((1, chunk_samples), np.float32)
    return {s.name: int(batcher(s, silent, sample_rate)[0].shape[1]) for s in sources}


def tokenize_dataset(output_dir: str, source: Union[RawAudioSource, str], codec_checkpoint: str,
                     semantic_checkpoint: Optional[str] = None, mulan_checkpoint: Optional[str] = None,
                     splits: Sequence[str] = ("train", "validation", "test"), chunk_seconds: float = 30.0,
                     min_clip_seconds: float = 1.0, clips_per_shard: int = 256, batch_size: int = 8,
                     max_clips: Optional[dict] = None, melody_rate: Optional[float] = None) -> dict:
    """Writes the token cache of `source` to output_dir and returns its manifest. `source` is a
    dataset_config.RawAudioSource (gin: `@dataset_config.raw_audio_source()`), read at the codec's sample rate
    (one that names another rate is an error), or a raw-audio task name at the codec's rate. See the module docstring. The semantic tokenizer and MuLan (with its fitted RVQ) are
    optional: the fine stage needs only the codec. Splits the source does not have (a folder too small for a
    held-out carve) are left out, with a message. `max_clips` {split: n} caps a split (the synthetic music has
    100,000 train clips). `melody_rate` (Hz, e.g. 5.0) adds the melody tokens that melody-conditioned semantic
    stages read."""
    from musiclm_jax.tasks import audio as audio_tasks

    sources = [codec_source(codec_checkpoint)]
    if semantic_checkpoint:
        sources.append(semantic_source(semantic_checkpoint))
    if mulan_checkpoint:
        sources.append(mulan_source(mulan_checkpoint, chunk_seconds))
    sample_rate = sources[0].sample_rate
    if melody_rate:
        sources.append(melody_source(sample_rate, float(melody_rate)))
    if isinstance(source, str):
        source = RawAudioSource.from_task_name(source)
    try:
        source_task = source.at_rate(sample_rate).task_name
    except ValueError as e:
        raise ValueError(f"tokenize_dataset.source: {e}, the codec's rate ({codec_checkpoint})") from None
    chunk_samples = int(round(chunk_seconds * sample_rate))
    batcher = DeviceBatcher()
    frames = _probe_frames(sources, batcher, chunk_samples, sample_rate)
    max_clips = dict(max_clips or {})
    split_plan = {}
    # Process 0 prepares the source (an audio folder's TFDS build) while the others wait, so that no two
    # processes write the same prepared dataset.
    if jax.process_index() == 0:
        available = audio_tasks.register_raw_audio_task(source_task).source.splits
    distributed.barrier("tokenize: source prepared")
    if jax.process_index() != 0:
        available = audio_tasks.register_raw_audio_task(source_task).source.splits
    for split in [s for s in splits if s not in available]:
        print(f"tokenize: {source_task!r} has no {split!r} split (splits: {sorted(available)}); it is left out of "
              f"the token cache", file=sys.stderr)
    splits = [s for s in splits if s in available]
    for split in splits:
        n = audio_tasks.num_clips(source_task, split)
        n = min(n, int(max_clips[split])) if split in max_clips else n
        split_plan[split] = {"num_clips": n, "num_shards": max(1, math.ceil(n / clips_per_shard))}
    manifest = {"source": source_task, "sample_rate": sample_rate, "chunk_seconds": chunk_seconds,
                "min_clip_seconds": min_clip_seconds, "clips_per_shard": clips_per_shard,
                "tokenizers": {s.name: s.spec(frames[s.name]) for s in sources}, "splits": split_plan}
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, token_cache.MANIFEST)
    if os.path.exists(path):
        previous = _settings(token_cache.read_manifest(output_dir))
        for key, value in _settings(json.loads(json.dumps(manifest))).items():
            if previous.get(key) != value:
                raise ValueError(f"{output_dir} holds a token cache made with other settings ({key}: "
                                 f"{previous.get(key)} != {value}); use another OUTPUT_DIR or delete it")
    elif jax.process_index() == 0:
        token_cache.write_manifest(output_dir, dict(manifest, complete=False))

    work = [(split, i) for split in splits for i in range(split_plan[split]["num_shards"])]
    mine = [w for k, w in enumerate(work) if k % jax.process_count() == jax.process_index()]
    start, done_now = time.time(), 0
    for position, (split, index) in enumerate(mine):
        plan = split_plan[split]
        base = os.path.join(output_dir, token_cache.shard_name(split, index, plan["num_shards"]))
        if os.path.exists(base + ".json") and os.path.exists(base + ".tfrecord"):
            print(f"tokenize: {split} shard {index + 1}/{plan['num_shards']} already done, skipping", file=sys.stderr)
            continue
        os.makedirs(os.path.dirname(base), exist_ok=True)
        first, last = index * clips_per_shard, min(plan["num_clips"], (index + 1) * clips_per_shard)
        shard_start = time.time()
        clips = audio_tasks.clip_range(source_task, split, first, last, synthetic_seconds=chunk_seconds)
        counts = _tokenize_shard(sources, batcher, clips, sample_rate, chunk_samples,
                                 int(round(min_clip_seconds * sample_rate)), batch_size, frames, base)
        counts["seconds"] = time.time() - shard_start
        with open(base + ".json.tmp", "w") as f:
            json.dump(counts, f)
        os.replace(base + ".json.tmp", base + ".json")
        done_now += 1
        rate = done_now / (time.time() - start)
        remaining = (len(mine) - position - 1) / rate if rate > 0 else float("nan")
        print(f"tokenize: {split} shard {index + 1}/{plan['num_shards']}: {counts['examples']} chunks from "
              f"{counts['clips']} clips, skipped {counts['skipped'] or 0}, {counts['seconds']:.1f} s "
              f"[{position + 1}/{len(mine)} of this process's shards, ~{remaining:.0f} s left]", file=sys.stderr)
    if jax.process_index() == 0:
        manifest = _finalize(output_dir, manifest, work)
    return manifest


def _settings(manifest: dict) -> dict:
    """The parts of a manifest that a restarted job must agree with (not the totals)."""
    view = {k: manifest.get(k) for k in ("source", "sample_rate", "chunk_seconds", "min_clip_seconds",
                                         "clips_per_shard", "tokenizers")}
    view["splits"] = {s: {k: v[k] for k in ("num_clips", "num_shards")} for s, v in manifest["splits"].items()}
    return view


def _finalize(output_dir: str, manifest: dict, work, timeout_s: float = 24 * 3600) -> dict:
    """Waits for every shard's marker, then writes the totals into the manifest (complete: true)."""
    from musiclm_jax.tasks import audio as audio_tasks
    deadline = time.time() + timeout_s
    totals = {split: {"num_examples": 0, "num_clips_read": 0, "skipped": {}, "dropped_tail_seconds": 0.0,
                      "near_tie_codes": {}} for split in manifest["splits"]}
    for split, index in work:
        marker = os.path.join(output_dir, token_cache.shard_name(split, index, manifest["splits"][split]["num_shards"]))
        while not os.path.exists(marker + ".json"):
            if time.time() > deadline:
                raise TimeoutError(f"tokenize: waited {timeout_s:.0f} s for {marker}.json")
            time.sleep(2.0)
        with open(marker + ".json") as f:
            counts = json.load(f)
        t = totals[split]
        t["num_examples"] += counts["examples"]
        t["num_clips_read"] += counts["clips"]
        t["dropped_tail_seconds"] += counts["dropped_tail_seconds"]
        for reason, n in counts["skipped"].items():
            t["skipped"][reason] = t["skipped"].get(reason, 0) + n
        for name, ties in counts.get("near_ties", {}).items():
            t["near_tie_codes"][name] = t["near_tie_codes"].get(name, 0) + len(ties)
    for split, t in totals.items():
        manifest["splits"][split].update(t)
    source = audio_tasks.register_raw_audio_task(manifest["source"]).source
    builder = getattr(source, "builder", None)
    if builder is not None and "bad_input" in builder.info.metadata:
        manifest["source_bad_input"] = builder.info.metadata["bad_input"]
    manifest["complete"] = True
    token_cache.write_manifest(output_dir, manifest)
    skipped = {s: t["skipped"] for s, t in totals.items() if t["skipped"]}
    ties = {s: t["near_tie_codes"] for s, t in totals.items() if t["near_tie_codes"]}
    print(f"tokenize: done: {output_dir}: " + ", ".join(f"{s} {t['num_examples']} chunks" for s, t in totals.items())
          + f"; skipped {skipped or 'none'}; near-tie codes {ties or 'none'}", file=sys.stderr)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    import gin

    from musiclm_jax import gin_utils
    gin_utils.run(lambda flags: gin.get_configurable(tokenize_dataset)(), argv=argv)


if __name__ == "__main__":
    from musiclm_jax import tokenize as _tokenize_module  # gin binds musiclm_jax.tokenize, not __main__
    _tokenize_module.main()
