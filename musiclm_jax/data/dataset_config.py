"""What a training or evaluation input is made of (plain dataclass: no TensorFlow import)."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional


def raw_audio_task_name(sample_rate: int, audio_dir: Optional[str] = None) -> str:
    """The raw-audio task for a rate: the embedded synthetic music, or the audio files of `audio_dir`.

    Such tasks are registered on first use (tasks/audio.py), so a gin file can name a user's folder:
    `MIXTURE_OR_TASK_NAME = @dataset_config.raw_audio_task_name()` with `raw_audio_task_name.audio_dir =
    %AUDIO_DIR`.
    """
    if audio_dir:
        return f"audio_folder_{int(sample_rate)}hz:{audio_dir}"
    return f"synthetic_music_{int(sample_rate)}hz"


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
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str
    batch_size: int
    shuffle: bool = True
    seed: Optional[int] = 0
    num_epochs: Optional[int] = None
    module: Optional[str] = "musiclm_jax.tasks"
