"""TFDS builders for captioned audio (`audio_folder`, `musiccaps`) and the seqio source that reads them.

Each builder decodes its source once, checks every clip (captioned_audio.decode_record: bad inputs are errors or
counted skips, by `AudioChecks.bad_input`), converts it to mono at the config's rate and stores it as 16-bit PCM:

    {'audio': int16 [samples] (tfds.features.Audio at sample_rate), 'caption': str ('' if none),
     'aspects': [str] (MusicCaps' aspect list), 'id': str (the path relative to DIR, or the ytid)}

Splits: those of the records ('train' / 'validation' / 'test'), held-out ones carved from 'train' where the source
has none (captioned_audio.carve_held_out). The bad-input report (skips by reason, notes such as 'downmixed',
'resampled' and 'carved_validation') is kept in the prepared dataset's metadata (`builder.info.metadata`), and
so are the carve's settings and the records per split before decoding ('held_out').

Preparation runs in this process (decoding on a few threads) or, given Beam pipeline options, on Apache Beam
the way TFDS builds its large datasets: the same records, checks, keys and examples, so the prepared splits are
identical, example for example; the decoding is spread over Beam's workers (DirectRunner processes here, Dataflow,
Flink or Spark on a cluster: `--runner=...` in the options, no code change). Under Beam each worker counts its
skips and notes in Beam metrics (namespace BEAM_METRICS_NAMESPACE), which are summed into the same metadata
report once the pipeline has run; a bad input under bad_input='error' fails the pipeline with the file named.

Configs are made on the fly: the config name is `<rate>hz_<fingerprint>`, where the fingerprint covers the
source's paths, file sizes and modification times, the captions file and the checks, so changing the folder or a
setting prepares a new copy. Prepared data goes under `data_root` (default $MUSICLM_TFDS_DIR or
~/tensorflow_datasets/musiclm_jax), one directory per config. In a multi-process run process 0 prepares and the
others wait for it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import sys
import time
from typing import Optional

import numpy as np
import seqio
import tensorflow_datasets as tfds

from musiclm_jax.data import captioned_audio
from musiclm_jax.data.bad_input import BadInputReport
from musiclm_jax.data.captioned_audio import AudioChecks, AudioRecord

VERSION = "1.0.0"
MUSICCAPS_CLIP_SECONDS = 10.0
_DECODE_THREADS = 4
_DECODE_CHUNK = 64
BEAM_METRICS_NAMESPACE = "musiclm_jax.bad_input"


def default_data_root() -> str:
    return os.environ.get("MUSICLM_TFDS_DIR") or os.path.expanduser("~/tensorflow_datasets/musiclm_jax")


@dataclasses.dataclass(eq=False)
class CaptionedAudioConfig(tfds.core.BuilderConfig):
    """A builder config: the source (audio_dir, or csv_path + clips_dir) and the checks."""

    audio_dir: str = ""
    csv_path: str = ""
    clips_dir: str = ""
    checks: Optional[AudioChecks] = None


class _CaptionedAudioBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    expected_seconds: Optional[float] = None

    @property
    def checks(self) -> AudioChecks:
        return self.builder_config.checks

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.name}: mono 16-bit audio at {self.checks.sample_rate} Hz with captions",
            features=tfds.features.FeaturesDict({
                "audio": tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=self.checks.sample_rate),
                "caption": tfds.features.Text(),
                "aspects": tfds.features.Sequence(tfds.features.Text()),
                "id": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _records(self, report: BadInputReport) -> list[AudioRecord]:
        raise NotImplementedError

    def _what(self) -> str:
        raise NotImplementedError

    def _download_and_prepare(self, dl_manager, download_config):
        # Beam options (or a runner) in the download config select the Beam build (see the module docstring).
        self._beam = download_config.beam_options is not None or download_config.beam_runner is not None
        super()._download_and_prepare(dl_manager, download_config)

    def _split_generators(self, dl_manager):
        del dl_manager
        self._report = BadInputReport(self.checks.bad_input, self._what())
        records = self._records(self._report)
        self.info.metadata["held_out"] = {
            "carve": dataclasses.asdict(self.checks.held_out),
            "records": {split: sum(1 for r in records if r.split == split) for split in captioned_audio.SPLITS}}
        self._pending = {split: [r for r in records if r.split == split] for split in captioned_audio.SPLITS}
        self._pending = {split: rs for split, rs in self._pending.items() if rs}
        if not self._pending:
            self._report.print_summary()
            raise ValueError(f"{self._what()}: no usable audio files ({self._report.summary()['skipped']})")
        if getattr(self, "_beam", False):
            return {split: self._beam_examples(split) for split in self._pending}
        return {split: self._generate_examples(split) for split in self._pending}

    def _decode(self, record: AudioRecord):
        return record, captioned_audio.decode_record(record, self.checks, self._report, self.expected_seconds)

    def _generate_examples(self, split: str):
        records = self._pending.pop(split)
        with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
            for start in range(0, len(records), _DECODE_CHUNK):
                for record, audio in pool.map(self._decode, records[start:start + _DECODE_CHUNK]):
                    if audio is not None:
                        yield _keyed_example(record, audio)
        self.info.metadata["bad_input"] = self._report.summary()
        if not self._pending:
            self._report.print_summary()

    def _beam_examples(self, split: str):
        """The Beam transform of `split`: its records, spread over the workers (Reshuffle), decoded and checked
        on them (_decode_on_beam_worker)."""
        beam = tfds.core.lazy_imports.apache_beam
        return (beam.Create(self._pending[split]) | "Spread" >> beam.Reshuffle()
                | "Decode" >> beam.FlatMap(_decode_on_beam_worker, self.checks, self.expected_seconds, self._what()))

    def _process_pipeline_result(self, pipeline_result):
        """After the Beam pipeline: the workers' skip and note counts (and skip messages) join this process's
        report of the listing, as the metadata's 'bad_input'."""
        metrics = pipeline_result.metrics().query(
            tfds.core.lazy_imports.apache_beam.metrics.MetricsFilter().with_namespace(BEAM_METRICS_NAMESPACE))
        workers = BadInputReport(self.checks.bad_input, self._what(), log=None)
        for result in metrics["counters"]:
            kind, name = result.key.metric.name.split(":", 1)
            count = result.committed if result.committed is not None else result.attempted
            (workers.skipped if kind == "skipped" else workers.notes)[name] += int(count)
        for result in metrics.get("string_sets", []):
            messages = result.committed if result.committed is not None else result.attempted
            workers.examples[result.key.metric.name.split(":", 1)[1]] = sorted(messages)
        self._report.merge(workers)
        self.info.metadata["bad_input"] = self._report.summary()
        self._report.print_summary()


def _keyed_example(record: AudioRecord, audio: np.ndarray):
    """(key, example) of a decoded record: mono float32 [samples] stored as 16-bit PCM."""
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    return record.id, {"audio": pcm, "caption": record.caption, "aspects": list(record.aspects), "id": record.id}


def _decode_on_beam_worker(record: AudioRecord, checks: AudioChecks, expected_seconds: Optional[float], what: str):
    """A Beam worker's step: yields the (key, example) of `record`, or nothing if it is bad input, counting the
    skip (or note) in Beam metrics: counters 'skipped:<reason>' and 'notes:<kind>', and the skip's message in the
    string set 'examples:<reason>'. Under bad_input='error' the BadInputError (naming the file) fails the run."""
    beam = tfds.core.lazy_imports.apache_beam
    report = BadInputReport(checks.bad_input, what)
    audio = captioned_audio.decode_record(record, checks, report, expected_seconds)
    for reason, count in report.skipped.items():
        beam.metrics.Metrics.counter(BEAM_METRICS_NAMESPACE, f"skipped:{reason}").inc(count)
    for kind, count in report.notes.items():
        beam.metrics.Metrics.counter(BEAM_METRICS_NAMESPACE, f"notes:{kind}").inc(count)
    for reason, messages in report.examples.items():
        for message in messages:
            beam.metrics.Metrics.string_set(BEAM_METRICS_NAMESPACE, f"examples:{reason}").add(message)
    if audio is not None:
        yield _keyed_example(record, audio)


class AudioFolder(_CaptionedAudioBuilder):
    """A folder of audio files with an optional captions.jsonl (see captioned_audio)."""

    def _what(self) -> str:
        return f"audio_folder {self.builder_config.audio_dir}"

    def _records(self, report):
        return captioned_audio.read_audio_folder(self.builder_config.audio_dir, self.checks, report)


class MusicCaps(_CaptionedAudioBuilder):
    """MusicCaps: musiccaps-public.csv and a folder of clips {ytid}.<ext> cut to [start_s, end_s]."""

    expected_seconds = MUSICCAPS_CLIP_SECONDS

    def _what(self) -> str:
        return f"musiccaps {self.builder_config.csv_path}"

    def _records(self, report):
        cfg = self.builder_config
        return captioned_audio.read_musiccaps(cfg.csv_path, cfg.clips_dir, self.checks, report)


def _fingerprint(*items) -> str:
    """A hash of `items` plus, for each existing directory or file among them, its files' sizes and mtimes."""
    h = hashlib.sha1()
    for item in items:
        h.update(repr(item).encode())
        if isinstance(item, str) and os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    stat = os.stat(os.path.join(root, name))
                    h.update(f"{os.path.relpath(os.path.join(root, name), item)}:{stat.st_size}:"
                             f"{stat.st_mtime_ns}".encode())
        elif isinstance(item, str) and os.path.isfile(item):
            with open(item, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def beam_options_from_flags(flags: Optional[str]):
    """Beam PipelineOptions from TFDS's comma-separated form ("direct_num_workers=2,direct_running_mode=
    multi_processing"; None or '': None, the in-process build). Needs the `beam` extra."""
    if not flags:
        return None
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ImportError("Beam pipeline options were given but apache_beam is not installed: run "
                          "`bash launch/setup_env.sh beam` (the `beam` extra)") from None
    options = PipelineOptions(flags=[f"--{option.strip()}" for option in flags.split(",") if option.strip()])
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))
    if unknown:  # Beam would only log and drop them
        raise ValueError(f"Beam pipeline options {flags!r}: unknown option(s) {unknown}")
    return options


def _prepare(cls, config: CaptionedAudioConfig, root: str, timeout_s: float = 24 * 3600, beam_options=None):
    import jax  # only for the process index: process 0 prepares, the others wait for it
    builder = cls(config=config, data_dir=root)
    info = os.path.join(builder.data_dir, "dataset_info.json")
    if jax.process_count() > 1 and jax.process_index() != 0:
        start = time.time()
        while not os.path.exists(info):
            if time.time() - start > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f} s for process 0 to prepare {builder.data_dir}")
            time.sleep(2.0)
        return cls(config=config, data_dir=root)
    if not os.path.exists(info):
        print(f"tfds: preparing {builder.name}/{builder.builder_config.name} in {builder.data_dir}", file=sys.stderr)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS, beam_options=beam_options))
    return builder


def audio_folder_builder(audio_dir: str, checks: AudioChecks, data_root: Optional[str] = None,
                         beam_options=None) -> AudioFolder:
    """The prepared `audio_folder` dataset of `audio_dir` (prepared now if it is not yet, on Beam if
    `beam_options`, a PipelineOptions, is given)."""
    audio_dir = os.path.abspath(audio_dir)
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"AUDIO_DIR {audio_dir!r} is not a directory")
    name = f"{checks.sample_rate}hz_{_fingerprint('audio_folder', audio_dir, checks)}"
    config = CaptionedAudioConfig(name=name, audio_dir=audio_dir, checks=checks)
    root = os.path.join(data_root or default_data_root(), f"audio_folder_{name}")
    return _prepare(AudioFolder, config, root, beam_options=beam_options)


def musiccaps_builder(csv_path: str, clips_dir: str, checks: AudioChecks, data_root: Optional[str] = None,
                      beam_options=None) -> MusicCaps:
    """The prepared `musiccaps` dataset of `csv_path` and `clips_dir` (prepared now if it is not yet, on Beam if
    `beam_options` is given)."""
    csv_path, clips_dir = os.path.abspath(csv_path), os.path.abspath(clips_dir)
    name = f"{checks.sample_rate}hz_{_fingerprint('musiccaps', csv_path, clips_dir, checks)}"
    config = CaptionedAudioConfig(name=name, csv_path=csv_path, clips_dir=clips_dir, checks=checks)
    root = os.path.join(data_root or default_data_root(), f"musiccaps_{name}")
    return _prepare(MusicCaps, config, root, beam_options=beam_options)


class PreparedTfdsSource(seqio.DataSource):
    """A seqio source over a prepared TFDS builder. Process i of n reads its own contiguous 1/n of each split
    (tfds.even_splits: only those records are read), so the processes' examples are disjoint."""

    def __init__(self, builder: tfds.core.DatasetBuilder):
        self.builder = builder
        splits = {name: info.num_examples for name, info in builder.info.splits.items()}
        super().__init__(splits=list(splits), num_input_examples=splits)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str):
        return [split]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                    num_epochs: Optional[int] = 1):
        del sequence_length, use_cached
        if split not in self.splits:
            raise ValueError(f"{self.builder.data_dir} has no split {split!r}; splits: {list(self.splits)}")
        tfds_split = split
        if shard_info is not None and shard_info.num_shards > 1:
            if self.num_input_examples(split) < shard_info.num_shards:
                raise ValueError(f"split {split!r} of {self.builder.data_dir} has {self.num_input_examples(split)} "
                                 f"examples, fewer than the {shard_info.num_shards} processes reading it")
            tfds_split = tfds.even_splits(split, shard_info.num_shards)[shard_info.index]
        # No autocache: a small split cached in memory would be saved with every input position.
        read_config = tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True, try_autocache=False)
        ds = self.builder.as_dataset(split=tfds_split, shuffle_files=shuffle, read_config=read_config)
        return ds.repeat(num_epochs) if num_epochs != 1 else ds
