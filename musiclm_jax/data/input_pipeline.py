"""A seqio task as a deterministic, checkpointable stream of this process's batches (data side: TensorFlow).

Each process yields batches of global_batch / process_count examples as numpy arrays, disjoint from the other
processes' rows. How the processes split the stream is DatasetConfig.input_sharding:
  'global': every process reads the one global stream, batches it at the global batch size and keeps its rows
    [i * local, (i + 1) * local) of each global batch. Process 0's rows come first, as
    jax.make_array_from_process_local_data places them, so a run on P processes sees exactly the global batches
    of a run on one, and the position is the same in every process: it restores under any process count.
  'per_process': process i reads shard i of the stream (seqio.ShardInfo) and batches it locally; cheaper for
    expensive preprocessing (audio decoding) on many hosts, but the batches depend on the process count.

The stream is the task's (its source, with the source's files shuffled per epoch, then its preprocessors, repeated)
shuffled in blocks instead of through a shuffle buffer (block_shuffle): consecutive blocks of the task's
shuffle_buffer_size examples, each permuted by a stateless draw from (seed, block index). A shuffle buffer's
examples are part of the stream's position, and so of every saved input position (3.1 MB for the tiny codec's 64
one-second crops, 73 MB before symbolic checkpointing; a pod's buffers of 30 s clips would be gigabytes); a block's
permutation is recomputed from its index. The position saved with each checkpoint is tf.data's symbolic checkpoint
of the iterator (the readers' file offsets, counters and seeds, a few kilobytes: no examples), with a JSON record
of the sharding and of the examples consumed, so a resumed run continues with exactly the batches the
uninterrupted run would have seen, under any process count with 'global'. A 'per_process' position saved under
another process count cannot map onto this one's shards: the run then starts a new order, seeded by the input seed
and the examples already consumed, and says so (restore_state). No stage caches the dataset in memory (seqio's
automatic cache of small datasets and TFDS's autocache are off): a cache would be saved with every position.
"""
from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
from typing import Iterator, Optional

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


def block_shuffle(ds: tf.data.Dataset, block: int, seed: int) -> tf.data.Dataset:
    """`ds` shuffled within consecutive blocks of `block` examples: block b (0, 1, ... over the whole stream, so each
    epoch's blocks draw new permutations) is permuted by tf.random.stateless_uniform keyed by (seed, b). Unlike
    ds.shuffle, its position holds no examples: the block in progress is recomputed on restore."""
    if block < 1:
        raise ValueError(f"block_shuffle: block {block} must be >= 1")

    def permute(index, examples):
        size = tf.shape(tf.nest.flatten(examples)[0])[0]
        keys = tf.random.stateless_uniform([size], seed=tf.stack([tf.constant(seed, tf.int64), index]))
        order = tf.argsort(keys)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), examples)

    fixed = all(spec.shape.is_fully_defined() for spec in tf.nest.flatten(ds.element_spec))
    blocks = ds.batch(block) if fixed else ds.ragged_batch(block)  # dense when it can: ragged costs copies
    return blocks.enumerate().map(permute).unbatch()


def task_stream(task: seqio.Task, lengths: dict, split: str, shuffle: bool, seed: int,
                shard_info: Optional[seqio.ShardInfo], num_epochs: Optional[int]) -> tf.data.Dataset:
    """seqio.Task.get_dataset without its closing shuffle buffer (the caller shuffles in blocks) and without caches:
    the source (files shuffled per epoch when `shuffle`), sharded as seqio shards it, the pre-cache preprocessors,
    `num_epochs` repeats (None: forever), the post-cache preprocessors (new random crops every epoch), seqio's
    feature checks and trimming to `lengths`."""
    source = task.source
    if split not in source.splits:
        raise ValueError(f"task {task.name!r} has no split {split!r}; splits: {list(source.splits)}")
    if shard_info is None or shard_info.num_shards == 1 or source.supports_arbitrary_sharding or \
            len(source.list_shards(split=split)) >= shard_info.num_shards:
        ds = source.get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    else:
        ds = source.get_dataset(split=split, shuffle=shuffle, seed=seed).shard(shard_info.num_shards,
                                                                              shard_info.index)
    ds = task.preprocess_precache(ds, seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = task.preprocess_postcache(ds, sequence_length=lengths, seed=seed)
    ds = task._validate_preprocessing(ds)  # pylint: disable=protected-access  (seqio's own checks, as get_dataset)
    return task._trim_output_features(ds, sequence_length=lengths)  # pylint: disable=protected-access


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
        self._task = task
        self._feature_converter = feature_converters.get(feature_converter_name, **(feature_converter_kwargs or {}))
        self._batches = 0  # global batches read since the start of the stream
        self._seed = cfg.seed
        self._build()

    def _build(self) -> None:
        """(Re)builds the dataset and its iterator from self._seed."""
        cfg, task = self.cfg, self._task
        lengths = dict(cfg.task_feature_lengths)
        members = task.tasks if isinstance(task, seqio.Mixture) else [task]
        streams = [task_stream(member, lengths, cfg.split, cfg.shuffle, self._seed, self._shard_info(),
                               cfg.num_epochs) for member in members]
        if isinstance(task, seqio.Mixture):
            ds = tf.data.Dataset.sample_from_datasets(streams, weights=[task.get_rate(m) for m in members],
                                                      seed=self._seed, stop_on_empty_dataset=False)
        else:
            ds = streams[0]
        if cfg.shuffle:
            block = max(m.shuffle_buffer_size or 1 for m in members)
            ds = block_shuffle(ds, block, 0 if self._seed is None else self._seed)
        ds = self._feature_converter(ds, task_feature_lengths=lengths)
        # 'global': the dataset (and so the saved position, prefetch buffer included) is the same under every
        # process count; __next__ keeps this process's rows.
        self._rows = slice(None)
        if cfg.input_sharding == "global":
            begin = self.process_index * self.local_batch_size
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
        # elements in flight in its parallel maps, prefetch buffers and the block in progress (they are
        # recomputed on restore, which is exact because the pipeline is deterministic).
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
        batch = {k: v.numpy()[self._rows] for k, v in next(self._iterator).items()}
        self._batches += 1
        return batch

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
        self._batches = 0

    def _prefix(self, directory: str, process_index: int | None = None) -> str:
        index = self.process_index if process_index is None else process_index
        return os.path.join(directory, f"process_{index}")

    def _record(self) -> dict:
        """What a saved position belongs to, and where it is: 'examples' read by all processes together."""
        examples = self._batches * self.cfg.batch_size  # every process's rows of a batch together
        return {"input_sharding": self.cfg.input_sharding, "process_count": self.process_count,
                "batch_size": self.cfg.batch_size, "task": self.cfg.mixture_or_task_name, "seed": self._seed,
                "examples": examples}

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
        by fewer processes) takes process 0's. A 'per_process' position saved under another process count, or one
        this pipeline cannot read (saved by an earlier version of it), is not restored: the stream starts a new
        order, seeded by the input seed and the examples already consumed (so it does not repeat the saved run's
        order from its start), and a warning says so. A different sharding or global batch size is refused,
        naming what differs.
        """
        prefix = self._prefix(directory)
        if not tf.io.gfile.exists(prefix + ".index") and tf.io.gfile.exists(self._prefix(directory, 0) + ".json"):
            prefix = self._prefix(directory, 0)  # saved by fewer processes: process 0's record (global: position)
        record_path = prefix + ".json"
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
        if problems:
            raise ValueError(f"the input position in {directory} was saved with " + ", ".join(problems) +
                             ": it cannot be restored into this input pipeline")
        examples = int(saved.get("examples", 0))
        if mine["input_sharding"] == "per_process" and saved.get("process_count") != self.process_count:
            self._start_new_order(directory, examples, f"it was saved by {saved.get('process_count')} processes "
                                  f"with input_sharding='per_process', whose shards do not map onto this run's "
                                  f"{self.process_count}")
            return
        if prefix != self._prefix(directory) and mine["input_sharding"] != "global":
            raise FileNotFoundError(f"no input position for process {self.process_index} in {directory} (saved by "
                                    f"{saved.get('process_count')} processes, as this run)")
        if int(saved.get("seed", self._seed)) != self._seed:  # the saved run had itself started a new order
            self._seed = int(saved["seed"])
            self._build()
        try:
            tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            self._start_new_order(directory, examples, f"this input pipeline cannot read it ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); it was saved by another version of it")
            return
        self._batches = examples // self.cfg.batch_size

    def _start_new_order(self, directory: str, examples: int, why: str) -> None:
        """The documented fallback of restore_state: a new order seeded by (input seed, examples consumed)."""
        self._seed = int(np.random.SeedSequence([self.cfg.seed or 0, examples]).generate_state(1)[0] & 0x7FFFFFFF)
        message = (f"input position in {directory} not restored: {why}. Process {self.process_index} starts a new "
                   f"order of {self.cfg.mixture_or_task_name!r} with seed {self._seed} (from seed {self.cfg.seed} "
                   f"and the {examples} examples already read); examples of the interrupted epoch may be seen "
                   f"again. input_sharding='global' restores exactly under any process count.")
        logging.warning(message)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
        self._build()
        self._batches = examples // self.cfg.batch_size  # the count goes on
