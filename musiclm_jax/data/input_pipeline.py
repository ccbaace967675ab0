"""A seqio task as a deterministic, checkpointable stream of this process's batches (data side: TensorFlow).

Each process reads a disjoint shard (seqio.ShardInfo(process_index, process_count)) and yields batches of
global_batch / process_count examples as numpy arrays. The tf.data iterator's position is saved with each
checkpoint (tf.train.Checkpoint of the iterator), so a resumed run continues with exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import gc
import importlib
import os
from typing import Iterator

import jax
import numpy as np
import seqio
import tensorflow as tf

from musiclm_jax.data import feature_converters
from musiclm_jax.data.dataset_config import DatasetConfig

# The input pipeline runs on the host CPU; keep TensorFlow off any accelerator.
tf.config.set_visible_devices([], "GPU")


def get_task_or_mixture(cfg: DatasetConfig):
    """The seqio task or mixture of cfg, after importing cfg.module (whose `get_or_register`, if it has one,
    may register tasks named on the fly, such as a user's audio folder)."""
    module = importlib.import_module(cfg.module) if cfg.module else None
    try:
        if module is not None and hasattr(module, "get_or_register"):
            return module.get_or_register(cfg.mixture_or_task_name)
        return seqio.get_mixture_or_task(cfg.mixture_or_task_name)
    except ValueError as e:
        raise ValueError(f"DatasetConfig.mixture_or_task_name={cfg.mixture_or_task_name!r} is not a registered "
                         f"seqio task or mixture (module {cfg.module!r}): {e}") from None


class SeqioInputPipeline:
    """Iterates over {feature: np.ndarray [local_batch, length]} batches of a seqio task.

    Args:
      cfg: the dataset (its batch_size is global).
      feature_converter_name: the model's feature converter ('prefix_lm'); feature_converter_kwargs: its arguments.
      process_index, process_count: default to this JAX process.
    """

    def __init__(self, cfg: DatasetConfig, feature_converter_name: str, *, process_index: int | None = None,
                 process_count: int | None = None, feature_converter_kwargs: dict | None = None):
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if cfg.batch_size % process_count:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {process_count} processes")
        self.cfg = cfg
        self.process_index = process_index
        self.local_batch_size = cfg.batch_size // process_count
        task = get_task_or_mixture(cfg)
        self.vocab_sizes = {name: f.vocabulary.vocab_size for name, f in task.output_features.items()}
        ds = seqio.get_dataset(
            task, task_feature_lengths=dict(cfg.task_feature_lengths),
            feature_converter=feature_converters.get(feature_converter_name, **(feature_converter_kwargs or {})),
            dataset_split=cfg.split,
            shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
            shard_info=seqio.ShardInfo(index=process_index, num_shards=process_count), seed=cfg.seed,
            verbose=False)
        ds = ds.batch(self.local_batch_size, drop_remainder=True).prefetch(2)
        options = tf.data.Options()
        options.deterministic = True
        # Sources that call numpy (audio decoding, synthetic music) are pure functions of their inputs, so the
        # iterator position can be checkpointed without their (non-existent) state.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        self._dataset = ds.with_options(options)
        self._iterator = iter(self._dataset)

    def check_vocab_size(self, model_vocab_size: int | None) -> None:
        """Raises if the task's token ids do not fit the model's vocabulary (None: nothing to check)."""
        if model_vocab_size is None:
            return
        for name, size in self.vocab_sizes.items():
            if size != model_vocab_size:
                raise ValueError(
                    f"task {self.cfg.mixture_or_task_name!r} feature {name!r} has vocabulary size {size} but the "
                    f"model's token layout has {model_vocab_size} ids: the model and task configs disagree")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in next(self._iterator).items()}

    def close(self) -> None:
        """Stops the background input threads. Pipelines whose sources call Python (audio decoding, synthetic
        music) must be closed before the interpreter exits, or their threads can deadlock its shutdown."""
        self._iterator = None
        self._dataset = None
        gc.collect()

    def __enter__(self) -> "SeqioInputPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Starts again from the first batch (used by evaluation)."""
        self._iterator = iter(self._dataset)

    def _prefix(self, directory: str) -> str:
        return os.path.join(directory, f"process_{self.process_index}")

    def save_state(self, directory: str) -> None:
        """Writes this process's iterator position under `directory`."""
        tf.io.gfile.makedirs(directory)
        tf.train.Checkpoint(iterator=self._iterator).write(self._prefix(directory))

    def restore_state(self, directory: str) -> None:
        """Moves the iterator to the position saved under `directory`."""
        prefix = self._prefix(directory)
        if not tf.io.gfile.exists(prefix + ".index"):
            raise FileNotFoundError(f"no input position for process {self.process_index} at {prefix}")
        tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
