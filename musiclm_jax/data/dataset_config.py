"""What a training or evaluation input is made of (plain dataclass: no TensorFlow import)."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional


def raw_audio_task_name(sample_rate: int, audio_dir: Optional[str] = None, musiccaps_dir: Optional[str] = None,
                        bad_input: str = "skip", require_captions: bool = False,
                        validation_fraction: Optional[float] = None, test_fraction: Optional[float] = None) -> str:
    """The raw-audio task for a rate: the embedded synthetic music, the `audio_folder` dataset of `audio_dir`,
    or the `musiccaps` dataset of `musiccaps_dir` (see tasks/audio.py).

    Such tasks are registered on first use, so a gin file can name a user's folder:
    `MIXTURE_OR_TASK_NAME = @dataset_config.raw_audio_task_name()` with `raw_audio_task_name.audio_dir =
    %AUDIO_DIR`. bad_input ('skip' or 'error') and require_captions set how the folder's bad inputs are handled;
    validation_fraction and test_fraction, the held-out carve of a source without such rows (None:
    captioned_audio.HeldOutCarve's defaults).
    """
    if audio_dir and musiccaps_dir:
        raise ValueError(f"set AUDIO_DIR ({audio_dir!r}) or MUSICCAPS_DIR ({musiccaps_dir!r}), not both")
    if bad_input not in ("skip", "error"):
        raise ValueError(f"raw_audio_task_name.bad_input={bad_input!r}: must be 'skip' or 'error'")
    options = []
    if bad_input != "skip":
        options.append(f"bad_input={bad_input}")
    if require_captions:
        options.append("require_captions=true")
    for key, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if value is not None:
            options.append(f"{key}={float(value)!r}")
    query = ("?" + "&".join(options)) if options else ""
    if audio_dir:
        return f"audio_folder_{int(sample_rate)}hz:{audio_dir}{query}"
    if musiccaps_dir:
        return f"musiccaps_{int(sample_rate)}hz:{musiccaps_dir}{query}"
    return f"synthetic_music_{int(sample_rate)}hz"


INPUT_SHARDINGS = ("global", "per_process")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """A seqio task or mixture as one input stream.

    Attributes:
      mixture_or_task_name: registered seqio name, e.g. 'synthetic_semantic_tiny'.
      task_feature_lengths: {'inputs': P, 'targets': T} in tokens.
      split: 'train', 'validation', ...
      batch_size: the *global* batch size (all processes together), in examples.
      shuffle: shuffle examples (train) or keep their order (eval).
      seed: input seed; the same seed gives the same batches.
      num_epochs: None repeats forever (training); an int stops after that many passes (evaluation).
      module: Python module imported first, to register the tasks.
      input_sharding: how the processes of a multi-host run split the stream (data.input_pipeline):
        'global' (default): every process reads the one global stream, batches it at the global batch size and
          keeps its own rows [i * local, (i + 1) * local): the batches, the loss curve and the saved input
          position do not depend on the process count, and a checkpoint resumes under another count. Each
          process runs the task's preprocessing for the whole global batch: right for token caches (cheap to
          read); for raw-audio tasks at pod scale that multiplies the decoding work by the process count.
        'per_process': process i reads shard i of the stream (seqio.ShardInfo) and decodes only its examples;
          the batches depend on the process count and an input position restores exactly only under the same
          count (under another, the run starts a new order seeded by the seed and the examples read, and logs it).
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str
    batch_size: int
    shuffle: bool = True
    seed: Optional[int] = 0
    num_epochs: Optional[int] = None
    module: Optional[str] = "musiclm_jax.tasks"
    input_sharding: str = "global"

    def __post_init__(self):
        if self.input_sharding not in INPUT_SHARDINGS:
            raise ValueError(f"DatasetConfig.input_sharding={self.input_sharding!r}: must be one of "
                             f"{INPUT_SHARDINGS}")


def stage_task_name(stage: str, token_dir: Optional[str], seconds: Optional[float] = None,
                    coarse_levels: Optional[int] = None, fine_levels: Optional[int] = None,
                    melody: bool = False) -> str:
    """The stage task over the token cache `token_dir` (tasks/tokenized.py), e.g. 'coarse_stage:/tokens?seconds=10'
    (registered on first use, so gin can name it: `MIXTURE_OR_TASK_NAME = @dataset_config.stage_task_name()`)."""
    if stage not in ("semantic", "coarse", "fine"):
        raise ValueError(f"stage_task_name.stage={stage!r}: must be 'semantic', 'coarse' or 'fine'")
    if not token_dir:
        raise ValueError(f"the {stage} stage reads a token cache: set TOKEN_DIR (python -m musiclm_jax.tokenize)")
    options = [f"{k}={v}" for k, v in (("seconds", seconds), ("coarse_levels", coarse_levels),
                                       ("fine_levels", fine_levels)) if v is not None]
    if melody:
        options.append("melody=1")
    return f"{stage}_stage:{token_dir}" + ("?" + "&".join(options) if options else "")
