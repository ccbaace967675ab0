"""What a training or evaluation input is made of (plain dataclass: no TensorFlow import)."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional


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
