"""A seqio task as a deterministic, checkpointable stream of this process's batches (data side: TensorFlow).

Each process yields batches of global_batch / process_count examples as numpy arrays, disjoint from the other
processes' rows. How the processes split the stream is DatasetConfig.input_sharding:
  'global': every process reads the one global stream, batches it at the global batch size and keeps its rows
    [i * local, (i + 1) * local) of each global batch. Process 0's rows come first, as
    jax.make_array_from_process_local_data places them, so a run on P processes sees exactly the global batches
    of a run on one, and the position is the same in every process: it restores under any process count.
  'per_process': process i reads shard i of the stream (seqio.ShardInfo) and batches it locally; cheaper for
    expensive preprocessing (audio decoding) on many hosts, but the batches depend on the process count.
The tf.data iterator's position is saved with each checkpoint (tf.train.Checkpoint of the iterator, symbolic:
the stages' positions and the shuffle buffer, not the elements in flight), with a small JSON record of the
sharding, so a resumed run continues with exactly the batches the uninterrupted run would have seen, and a
position that cannot be restored is refused with the reason. No stage caches the dataset in memory (seqio's
automatic cache of small datasets and TFDS's autocache are off): a cache would be saved with every position.
"""
from __future__ import annotations

import gc
import importlib
import json
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


def missing_split(cfg: DatasetConfig) -> str | None:
    """None if every task of cfg's task or mixture has cfg.split; else a sentence naming the task that lacks it
    and the splits it has (a folder too small for a held-out carve has only 'train')."""
    task = get_task_or_mixture(cfg)
    for member in (task.tasks if isinstance(task, seqio.Mixture) else [task]):
        if cfg.split not in member.source.splits:
            return (f"{cfg.mixture_or_task_name!r} has no {cfg.split!r} split (splits: "
                    f"{sorted(member.source.splits)})")
    return None


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
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = cfg.batch_size // process_count
        task = get_task_or_mixture(cfg)
        self.vocab_sizes = {name: f.vocabulary.vocab_size for name, f in task.output_features.items()}
        # seqio.get_dataset, but without seqio's in-memory cache of small datasets (under 10,000 examples): the
        # cache is part of the iterator's state, so every saved input position held the whole dataset decoded
        # (42 MB for a 160-clip folder at step 100, against 9.4 MB for the tiny codec itself), and it grew
        # until the first epoch ended.
        lengths = dict(cfg.task_feature_lengths)
        ds = task.get_dataset(lengths, split=cfg.split, shuffle=cfg.shuffle, seed=cfg.seed,
                              shard_info=self._shard_info(), num_epochs=cfg.num_epochs, try_in_mem_cache=False)
        converter = feature_converters.get(feature_converter_name, **(feature_converter_kwargs or {}))
        ds = converter(ds, task_feature_lengths=lengths)
        # 'global': the dataset (and so the saved position, prefetch buffer included) is the same under every
        # process count; __next__ keeps this process's rows.
        self._rows = slice(None)
        if cfg.input_sharding == "global":
            begin = process_index * self.local_batch_size
            self._rows = slice(begin, begin + self.local_batch_size)
            ds = ds.batch(cfg.batch_size, drop_remainder=True).prefetch(2)
        else:
            ds = ds.batch(self.local_batch_size, drop_remainder=True).prefetch(2)
        options = tf.data.Options()
        options.deterministic = True
        # Sources that call numpy (audio decoding, synthetic music) are pure functions of their inputs, so the
        # iterator position can be checkpointed without their (non-existent) state.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        # Symbolic checkpointing: the saved position holds the input positions of the pipeline's stages, not the
        # elements in flight in its parallel maps and prefetch buffers (they are recomputed on restore, which is
        # exact because the pipeline is deterministic). Only the shuffle buffer's elements are saved. 29 MB ->
        # 3.1 MB for the tiny codec on a 160-clip folder (the 64 crops of its shuffle buffer).
        options.experimental_symbolic_checkpoint = True
        # No autotuning: its model thread sleeps in periods that double up to 60 s, and destroying the iterator
        # waits for it, so a SIGTERM'd run spent 20-35 s in close() after its checkpoint was written (up to a
        # minute the longer the run). The AUTOTUNE parallelism of seqio's maps then falls back to a fixed value.
        options.autotune.enabled = False
        self._dataset = ds.with_options(options)
        self._iterator = iter(self._dataset)

    def _shard_info(self) -> seqio.ShardInfo:
        if self.cfg.input_sharding == "global":
            return seqio.ShardInfo(index=0, num_shards=1)
        return seqio.ShardInfo(index=self.process_index, num_shards=self.process_count)

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
        return {k: v.numpy()[self._rows] for k, v in next(self._iterator).items()}

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

    def _prefix(self, directory: str, process_index: int | None = None) -> str:
        index = self.process_index if process_index is None else process_index
        return os.path.join(directory, f"process_{index}")

    def _record(self) -> dict:
        return {"input_sharding": self.cfg.input_sharding, "process_count": self.process_count,
                "batch_size": self.cfg.batch_size, "task": self.cfg.mixture_or_task_name}

    def save_state(self, directory: str) -> None:
        """Writes this process's iterator position under `directory` (process_<i>*, and process_<i>.json: the
        sharding, process count, global batch size and task it belongs to)."""
        tf.io.gfile.makedirs(directory)
        try:
            tf.train.Checkpoint(iterator=self._iterator).write(self._prefix(directory))
        except tf.errors.UnimplementedError as e:
            raise ValueError(f"task {self.cfg.mixture_or_task_name!r}: its input pipeline uses a tf.data "
                             f"transformation whose position cannot be saved symbolically ({e.message}); remove it "
                             f"from the task (an in-memory .cache(), for one), or the run cannot checkpoint") from None
        with tf.io.gfile.GFile(self._prefix(directory) + ".json", "w") as f:
            json.dump(self._record(), f)

    def restore_state(self, directory: str) -> None:
        """Moves the iterator to the position saved under `directory`.

        A 'global' position is the same in every process, so a process without its own file (the run was saved
        by fewer processes) takes process 0's. A 'per_process' position restores only under the same process
        count and sharding; anything else is refused, naming what differs.
        """
        prefix = self._prefix(directory)
        record_path = prefix + ".json"
        if not tf.io.gfile.exists(prefix + ".index") and self.cfg.input_sharding == "global":
            prefix, record_path = self._prefix(directory, 0), self._prefix(directory, 0) + ".json"
        if not tf.io.gfile.exists(prefix + ".index"):
            raise FileNotFoundError(f"no input position for process {self.process_index} at {prefix}")
        if tf.io.gfile.exists(record_path):
            with tf.io.gfile.GFile(record_path) as f:
                saved = json.load(f)
        else:  # written before the record existed: per-process shards
            saved = {"input_sharding": "per_process", "process_count": None}
        mine = self._record()
        problems = [f"{k} {saved[k]!r} (now {mine[k]!r})" for k in ("input_sharding", "batch_size")
                    if k in saved and saved[k] != mine[k]]
        if mine["input_sharding"] == "per_process" and saved.get("process_count") != self.process_count:
            problems.append(f"process_count {saved.get('process_count')} (now {self.process_count}; per-process "
                            f"shards restore only under the same count; input_sharding='global' does not depend "
                            f"on it)")
        if problems:
            raise ValueError(f"the input position in {directory} was saved with " + ", ".join(problems) +
                             ": it cannot be restored into this input pipeline")
        tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
