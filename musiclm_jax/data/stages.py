"""What a stage sees of a token cache: its token layout, crop and sequence lengths, from the cache's manifest.

A stage task is named `<semantic|coarse|fine>_stage:<TOKEN_DIR>[?seconds=S&coarse_levels=Lc&fine_levels=Lf&melody=1]`
(tasks/tokenized.py registers it; its docstring gives the layouts). Everything a stage's model must agree with
(groups, levels, codebook sizes, prefix and target lengths) follows from the manifest.json that
`python -m musiclm_jax.tokenize` writes, or that `python -m musiclm_jax.aot --job=token_manifest` plans from the
tokenizers' gin files without data. The model gin files read them through the gin-callables `stage_groups`,
`stage_input_length` and `stage_target_length`, so no size is typed twice:

    STAGE_GROUPS = @stages.stage_groups()            # (('mulan', 12, 1024), ('semantic', 1, 1024))
    PREFIX_LENGTH = @stages.stage_input_length()     # 12
    TARGET_LENGTH = @stages.stage_target_length()    # 750 (30 s at 25 Hz)
    stages.stage_groups.task_name = %MIXTURE_OR_TASK_NAME   (and the same for the other two)

A run saves its config.gin with these three resolved to literals (gin_utils.save_config), so loading a trained
stage for inference never reads the token cache. No TensorFlow here: the manifest is JSON.
"""
from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse

from musiclm_jax import gin_utils
from musiclm_jax.data import token_cache
from musiclm_jax.generation.token_layout import TokenLayout

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
    """The StageSpec of a stage task name (see parse_stage_task_name)."""
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
                         f"({want} from its manifest.json): bind the model's layout to the cache "
                         f"(token_layout.TokenLayout.from_tuples.groups = %STAGE_GROUPS, as gin/models/*_tiny.gin "
                         f"do) or tokenize with matching tokenizers")


@gin_utils.resolved_when_saved
def stage_groups(task_name: str) -> tuple[tuple[str, int, int], ...]:
    """((group, levels, codebook size), ...) of stage task `task_name`, from its cache's manifest: the value of
    token_layout.TokenLayout.from_tuples.groups for the stage's model."""
    return tuple((g.name, g.levels, g.codebook_size) for g in stage_spec_from_name(task_name).layout.groups)


@gin_utils.resolved_when_saved
def stage_input_length(task_name: str) -> int:
    """The stage's prefix (inputs) length in tokens, from its cache's manifest."""
    return stage_spec_from_name(task_name).input_length


@gin_utils.resolved_when_saved
def stage_target_length(task_name: str) -> int:
    """The stage's target length in tokens, from its cache's manifest."""
    return stage_spec_from_name(task_name).target_length
