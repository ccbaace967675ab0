"""Stage tasks over a token cache (musiclm_jax.data.token_cache), registered on first use by name:

  semantic_stage:<TOKEN_DIR>   inputs: MuLan tokens (12)             targets: semantic tokens of a crop
  coarse_stage:<TOKEN_DIR>     inputs: MuLan tokens + semantic crop  targets: codec levels 1..Lc of the crop
  fine_stage:<TOKEN_DIR>       inputs: codec levels 1..Lc of a crop  targets: codec levels Lc+1..Lc+Lf

optionally followed by `?seconds=S&coarse_levels=Lc&fine_levels=Lf&melody=1` (defaults: semantic the whole chunk,
coarse 10 s, fine 3 s, each at most the chunk; Lc = min(4, levels // 2), Lf = the remaining levels; melody 0).
`melody=1` (semantic or coarse stage, a cache with melody tokens): the MuLan tokens are followed by the melody
token of each semantic frame of the crop (musiclm_jax.melody, 13 codes; the cache's tokens, e.g. 5 Hz, repeated to
the semantic rate: 750 for 30 s), in the layout mulan, melody, semantic (, coarse), then, for the coarse stage,
by the semantic crop; the crop then starts on a melody frame. (The coarse stage with melody is MusicGen's route
of conditioning the acoustic-token model on the melody's chroma; MusicLM conditions only the semantic stage.)
One melody token per semantic frame puts the melody of target frame t exactly `target_length` positions before
it, whatever t: the relative position bias can attend to it by distance alone. With one token per 200 ms the
distance varies with t and the model must find the frame's melody by content; measured on a cache whose semantic
tokens encode the melody, 400 steps of the tiny stage follow a given melody on 89% of the frames with aligned
tokens and on 7.5% (chance ~8%) with 5 Hz tokens.

Token layout (exact; global ids of the stage's TokenLayout, see musiclm_jax.token_layout): every (group, level)
has its own id range after PAD = 0, `id = offset(group) + level * codebook_size + code`, and multi-level groups
are flattened frame-major. With the paper's sizes (MuLan 12 x 1024, semantic 1024, codec 12 x 1024, 25 and
50 Hz) and a crop starting at semantic frame s (codec frame 2s):

  semantic  layout mulan(12 x 1024), semantic(1 x 1024)
            inputs  [m_0 + 1, m_1 + 1 + 1024, ..., m_11 + 1 + 11 * 1024]                      (12 tokens)
            targets [S_s + 12289, S_(s+1) + 12289, ...]                                       (25 Hz x seconds)
  coarse    layout mulan(12 x 1024), semantic(1 x 1024), coarse(4 x 1024)
            inputs  MuLan as above, then the semantic crop (12 + 25 x seconds tokens)
            targets [c(2s, 0) + 13313, c(2s, 1) + 13313 + 1024, ..., c(2s, 3) + 13313 + 3072,
                     c(2s + 1, 0) + 13313, ...]                                              (4 x 50 Hz x seconds)
  fine      layout coarse(4 x 1024), fine(8 x 1024)
            inputs  [c(f, 0) + 1, ..., c(f, 3) + 1 + 3072, c(f + 1, 0) + 1, ...]            (4 x 50 Hz x seconds)
            targets [c(f, 4) + 4097, ..., c(f, 11) + 4097 + 7 * 1024, c(f + 1, 4) + 4097, ...] (8 x 50 Hz x seconds)

where m_l is MuLan level l's code, S_t the semantic token of frame t and c(t, l) codec level l at frame t. The
prefix-LM feature converter (data/feature_converters.py) then makes decoder inputs/targets of `inputs + targets`.
Crops start at a seeded random frame within the chunk's real (not padded) audio, aligned across the semantic
and codec rates (the codec rate must be a whole multiple of the semantic rate).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import urllib.parse

import seqio
import tensorflow as tf

from musiclm_jax.data import token_cache
from musiclm_jax.token_layout import TokenLayout

STAGES = ("semantic", "coarse", "fine")
DEFAULT_SECONDS = {"semantic": None, "coarse": 10.0, "fine": 3.0}  # None: the whole chunk
_NAME = re.compile(r"^(semantic|coarse|fine)_stage:([^?]+)(?:\?(.*))?$")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage's view of a token cache: its layout, crop and lengths (all resolved from the manifest)."""

    stage: str
    token_dir: str
    layout: TokenLayout
    seconds: float
    coarse_levels: int
    fine_levels: int
    melody: bool
    input_length: int
    target_length: int

    @property
    def task_feature_lengths(self) -> dict[str, int]:
        return {"inputs": self.input_length, "targets": self.target_length}


def _frames(spec: dict, seconds: float, token_dir: str, what: str) -> int:
    frames = seconds * spec["frame_rate"]
    if abs(frames - round(frames)) > 1e-6:
        raise ValueError(f"{token_dir}: {seconds} s is not a whole number of {what} frames at {spec['frame_rate']} Hz")
    return int(round(frames))


def stage_spec(stage: str, token_dir: str, seconds: float | None = None, coarse_levels: int | None = None,
               fine_levels: int | None = None, melody: bool | int = False) -> StageSpec:
    """The StageSpec of `stage` over the token cache `token_dir` (see the module docstring for defaults)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: must be one of {STAGES}")
    if melody and stage == "fine":
        raise ValueError("melody=1 is an option of the semantic and coarse stages, not the fine stage")
    manifest = token_cache.read_manifest(token_dir)
    chunk = float(manifest["chunk_seconds"])
    seconds = float(seconds if seconds is not None else (DEFAULT_SECONDS[stage] or chunk))
    seconds = min(seconds, chunk)
    need = f"the {stage} stage"
    codec = token_cache.tokenizer_spec(manifest, "codec", token_dir, need) if stage != "semantic" else None
    levels = codec["levels"] if codec else 0
    coarse_levels = int(coarse_levels if coarse_levels is not None else min(4, levels // 2))
    fine_levels = int(fine_levels if fine_levels is not None else levels - coarse_levels)
    if codec and not (1 <= coarse_levels and coarse_levels + (fine_levels if stage == "fine" else 0) <= levels
                      and (stage != "fine" or fine_levels >= 1)):
        raise ValueError(f"{token_dir}: coarse_levels={coarse_levels}, fine_levels={fine_levels} do not fit the "
                         f"codec's {levels} levels")
    groups = []
    if stage in ("semantic", "coarse"):
        mulan = token_cache.tokenizer_spec(manifest, "mulan", token_dir, need)
        semantic = token_cache.tokenizer_spec(manifest, "semantic", token_dir, need)
        groups.append(("mulan", mulan["levels"] * mulan["frames"], mulan["codebook_size"]))
        input_length = mulan["levels"] * mulan["frames"]
        semantic_frames = _frames(semantic, seconds, token_dir, "semantic")
        if melody:
            tune = token_cache.tokenizer_spec(manifest, "melody", token_dir, f"a melody-conditioned {stage} stage")
            ratio = semantic["frame_rate"] / tune["frame_rate"]
            if abs(ratio - round(ratio)) > 1e-6:
                raise ValueError(f"{token_dir}: the semantic rate {semantic['frame_rate']} Hz is not a whole multiple "
                                 f"of the melody rate {tune['frame_rate']} Hz")
            _frames(tune, seconds, token_dir, "melody")  # the crop is whole melody frames
            groups.append(("melody", 1, tune["codebook_size"]))
            input_length += semantic_frames  # one melody token per semantic frame
        groups.append(("semantic", 1, semantic["codebook_size"]))
        if stage == "semantic":
            target_length = semantic_frames
        else:
            ratio = codec["frame_rate"] / semantic["frame_rate"]
            if abs(ratio - round(ratio)) > 1e-6:
                raise ValueError(f"{token_dir}: the codec rate {codec['frame_rate']} Hz is not a whole multiple of "
                                 f"the semantic rate {semantic['frame_rate']} Hz")
            groups.append(("coarse", coarse_levels, codec["codebook_size"]))
            input_length += semantic_frames
            target_length = semantic_frames * int(round(ratio)) * coarse_levels
    else:
        groups = [("coarse", coarse_levels, codec["codebook_size"]), ("fine", fine_levels, codec["codebook_size"])]
        frames = _frames(codec, seconds, token_dir, "codec")
        input_length, target_length = frames * coarse_levels, frames * fine_levels
    return StageSpec(stage, token_dir, TokenLayout.from_tuples(groups), seconds, coarse_levels, fine_levels,
                     bool(melody), input_length, target_length)


def feature_description(manifest: dict) -> dict:
    """The tf.io parsing spec of a token cache's examples (data/token_cache.py), from its manifest."""
    description = {"id": tf.io.FixedLenFeature([], tf.string), "text": tf.io.FixedLenFeature([], tf.string),
                   "num_samples": tf.io.FixedLenFeature([], tf.int64)}
    for name, spec in manifest["tokenizers"].items():
        description[name] = tf.io.FixedLenFeature([spec["frames"] * spec["levels"]], tf.int64)
    return description


def _level_offsets(layout: TokenLayout, group: str) -> tf.Tensor:
    return tf.constant(layout.level_ranges(group)[:, 0], tf.int32)


def _make_preprocessor(spec: StageSpec, manifest: dict):
    tokenizers, chunk_rate = manifest["tokenizers"], float(manifest["sample_rate"])
    layout = spec.layout

    def crop_start(seed, num_samples, frame_rate, window, total, align=1):
        """A random first frame (a multiple of `align`) such that the window lies in the real audio (or starts at
        0 if it cannot)."""
        real = tf.cast(tf.math.ceil(tf.cast(num_samples, tf.float64) / chunk_rate * frame_rate), tf.int32)
        last = tf.maximum(0, tf.minimum(real, total) - window) // align
        return tf.random.stateless_uniform([], seed, 0, last + 1, tf.int32) * align

    def codec_window(ex, first, frames, lo, hi, group):
        codec = tokenizers["codec"]
        codes = tf.reshape(tf.cast(ex["codec"], tf.int32), [codec["frames"], codec["levels"]])
        window = codes[first:first + frames, lo:hi]
        return tf.reshape(window + _level_offsets(layout, group)[None, :], [-1])

    @seqio.map_over_dataset(num_seeds=1)
    def to_stage(ex, seed):
        if spec.stage in ("semantic", "coarse"):
            mulan = tf.cast(ex["mulan"], tf.int32) + _level_offsets(layout, "mulan")
            semantic = tokenizers["semantic"]
            frames = int(round(spec.seconds * semantic["frame_rate"]))
            per_melody = int(round(semantic["frame_rate"] / tokenizers["melody"]["frame_rate"])) if spec.melody else 1
            first = crop_start(seed, ex["num_samples"], semantic["frame_rate"], frames, semantic["frames"], per_melody)
            sem = tf.cast(ex["semantic"][first:first + frames], tf.int32) + layout.offset("semantic")
            inputs = mulan
            if spec.melody:
                tune = tf.cast(ex["melody"][first // per_melody:(first + frames) // per_melody], tf.int32)
                tune = tf.repeat(tune, per_melody)  # each semantic frame's melody token
                inputs = tf.concat([mulan, tune + layout.offset("melody")], 0)
            if spec.stage == "semantic":
                return {"inputs": inputs, "targets": sem, "id": ex["id"], "text": ex["text"]}
            ratio = int(round(tokenizers["codec"]["frame_rate"] / semantic["frame_rate"]))
            targets = codec_window(ex, first * ratio, frames * ratio, 0, spec.coarse_levels, "coarse")
            return {"inputs": tf.concat([inputs, sem], 0), "targets": targets, "id": ex["id"], "text": ex["text"]}
        codec = tokenizers["codec"]
        frames = int(round(spec.seconds * codec["frame_rate"]))
        first = crop_start(seed, ex["num_samples"], codec["frame_rate"], frames, codec["frames"])
        lc, lf = spec.coarse_levels, spec.fine_levels
        return {"inputs": codec_window(ex, first, frames, 0, lc, "coarse"),
                "targets": codec_window(ex, first, frames, lc, lc + lf, "fine"), "id": ex["id"], "text": ex["text"]}
    return to_stage


def parse_stage_task_name(name: str) -> tuple[str, str, dict]:
    """(stage, token_dir, options) of a stage task name."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a stage task name (<semantic|coarse|fine>_stage:<TOKEN_DIR>[?options])")
    options = {}
    for key, value in urllib.parse.parse_qsl(match.group(3) or "", strict_parsing=bool(match.group(3))):
        if key not in ("seconds", "coarse_levels", "fine_levels", "melody"):
            raise ValueError(f"{name!r}: unknown option {key!r}; known: seconds, coarse_levels, fine_levels, melody")
        options[key] = float(value) if key == "seconds" else int(value)
    return match.group(1), os.path.abspath(match.group(2)), options


def stage_spec_from_name(name: str) -> StageSpec:
    stage, token_dir, options = parse_stage_task_name(name)
    return stage_spec(stage, token_dir, **options)


def check_layout(name: str, layout: TokenLayout) -> None:
    """Raises if `name` is a stage task whose token cache gives another layout than the model's `layout` (the
    model's gin file and the tokenizers that made the cache disagree on groups, levels or codebook sizes)."""
    if not _NAME.match(name):
        return
    spec = stage_spec_from_name(name)
    if tuple(spec.layout.groups) != tuple(layout.groups):
        want = tuple((g.name, g.levels, g.codebook_size) for g in spec.layout.groups)
        have = tuple((g.name, g.levels, g.codebook_size) for g in layout.groups)
        raise ValueError(f"the model's token layout {have} does not match the token cache {spec.token_dir} "
                         f"({want} from its manifest.json): set token_layout.TokenLayout.from_tuples.groups = "
                         f"{want} in the model's gin file, or tokenize with matching tokenizers")


def register_stage_task(name: str) -> seqio.Task:
    """Registers (once) and returns the stage task `name`, over the finished shards of its token cache."""
    spec = stage_spec_from_name(name)
    manifest = token_cache.read_manifest(spec.token_dir)
    registered = f"{spec.stage}_stage_{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    if registered in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(registered)  # the cache may have grown since
    files = {}
    for split, info in manifest["splits"].items():
        done = token_cache.completed_shards(spec.token_dir, split, info["num_shards"])
        if done:
            files[split] = done
    if not files:
        raise ValueError(f"token cache {spec.token_dir} has no finished shards")
    vocab = seqio.PassThroughVocabulary(size=spec.layout.vocab_size, eos_id=None)
    counts = {split: manifest["splits"][split].get("num_examples") for split in files}
    source = seqio.TFExampleDataSource(files, feature_description(manifest),
                                       num_input_examples=counts if all(counts.values()) else None)
    return seqio.TaskRegistry.add(
        registered, source=source,
        preprocessors=[seqio.CacheDatasetPlaceholder(), _make_preprocessor(spec, manifest)],
        output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=256)


