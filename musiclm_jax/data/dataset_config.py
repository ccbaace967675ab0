"""What a training or evaluation input is made of (plain dataclass: no TensorFlow import)."""
from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import Any, Mapping, Optional


RAW_AUDIO_KINDS = ("synthetic_music", "audio_folder", "musiccaps")
# The options a folder or MusicCaps source takes, with their types (captioned_audio.AudioChecks and HeldOutCarve;
# clips_dir, MusicCaps only: where its clips are).
RAW_AUDIO_OPTIONS = {"bad_input": str, "require_captions": lambda v: str(v).lower() in ("1", "true", "yes"),
                     "min_sample_rate": int, "silence_dbfs": float, "min_seconds": float, "max_seconds": float,
                     "validation_fraction": float, "test_fraction": float}
_RAW_AUDIO_NAME = re.compile(r"^(synthetic_music|audio_folder|musiccaps)_(\d+)hz(?::(.+))?$")


@dataclasses.dataclass(frozen=True)
class RawAudioSource:
    """Where raw audio comes from, as typed values: the seqio task (tasks/audio.py) is named from these.

    Attributes:
      kind: 'synthetic_music' (the embedded procedural music), 'audio_folder' or 'musiccaps'.
      sample_rate: Hz the clips are decoded and resampled to; None until a job binds its model's rate
        (`at_rate`: the tokenization job takes the codec's).
      path: the folder (audio_folder) or the MusicCaps directory (musiccaps); None for the synthetic music.
      options: the source's settings, {name: typed value} of RAW_AUDIO_OPTIONS (and clips_dir for MusicCaps).
    """

    kind: str
    sample_rate: Optional[int] = None
    path: Optional[str] = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in RAW_AUDIO_KINDS:
            raise ValueError(f"raw-audio source kind {self.kind!r}: expected one of {RAW_AUDIO_KINDS}")
        if self.sample_rate is not None and (int(self.sample_rate) != self.sample_rate or self.sample_rate <= 0):
            raise ValueError(f"raw-audio source sample_rate {self.sample_rate!r}: expected a positive integer (Hz)")
        if (self.kind == "synthetic_music") == bool(self.path):
            raise ValueError(f"raw-audio source {self.kind}: " + ("takes no path" if self.path else
                             f"needs a source directory ({self.kind}_<rate>hz:<DIR>)"))
        if self.kind == "synthetic_music" and self.options:
            raise ValueError(f"raw-audio source synthetic_music takes no options (given {sorted(self.options)})")
        for key in self.options:
            if key not in RAW_AUDIO_OPTIONS and not (self.kind == "musiccaps" and key == "clips_dir"):
                raise ValueError(f"raw-audio source {self.kind}: unknown option {key!r}; known: "
                                 f"{sorted(RAW_AUDIO_OPTIONS)}" + (" and clips_dir" if self.kind == "musiccaps" else ""))

    def at_rate(self, sample_rate: int) -> "RawAudioSource":
        """This source at `sample_rate` Hz; an error if it already names another rate."""
        if self.sample_rate is not None and int(self.sample_rate) != int(sample_rate):
            raise ValueError(f"{self.task_name!r} is at {self.sample_rate} Hz, not {int(sample_rate)} Hz")
        return dataclasses.replace(self, sample_rate=int(sample_rate))

    @property
    def task_name(self) -> str:
        """The seqio task's name: synthetic_music_<rate>hz, audio_folder_<rate>hz:<DIR>[?options] or
        musiccaps_<rate>hz:<DIR>[?options]."""
        if self.sample_rate is None:
            raise ValueError(f"the {self.kind} source has no sample rate yet (RawAudioSource.at_rate)")
        name = f"{self.kind}_{int(self.sample_rate)}hz"
        if self.path:
            name += f":{self.path}"
        if self.options:
            name += "?" + "&".join(f"{k}={_option_text(v)}" for k, v in self.options.items())
        return name

    @classmethod
    def from_task_name(cls, name: str) -> "RawAudioSource":
        """The source a raw-audio task name names (the one parser of such names); an error naming the name."""
        match = _RAW_AUDIO_NAME.match(name)
        if not match:
            raise ValueError(f"{name!r} is not a raw-audio task name (synthetic_music_<rate>hz, "
                             f"audio_folder_<rate>hz:<DIR> or musiccaps_<rate>hz:<DIR>)")
        kind, rate, rest = match.group(1), int(match.group(2)), match.group(3)
        options = {}
        if rest and "?" in rest:
            rest, query = rest.split("?", 1)
            for key, value in urllib.parse.parse_qsl(query, strict_parsing=True):
                options[key] = RAW_AUDIO_OPTIONS.get(key, str)(value)
        try:
            return cls(kind, rate, rest, options)
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None


def _option_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def raw_audio_source(sample_rate: Optional[int] = None, audio_dir: Optional[str] = None,
                     musiccaps_dir: Optional[str] = None, bad_input: str = "skip", require_captions: bool = False,
                     validation_fraction: Optional[float] = None, test_fraction: Optional[float] = None
                     ) -> RawAudioSource:
    """The raw-audio source of a job: the embedded synthetic music, the `audio_folder` dataset of `audio_dir`, or
    the `musiccaps` dataset of `musiccaps_dir` (see tasks/audio.py), at `sample_rate` Hz (None: the job binds its
    model's rate, as the tokenization job binds the codec's).

    bad_input ('skip' or 'error') and require_captions set how the folder's bad inputs are handled;
    validation_fraction and test_fraction, the held-out carve of a source without such rows (None:
    captioned_audio.HeldOutCarve's defaults).
    """
    if audio_dir and musiccaps_dir:
        raise ValueError(f"set AUDIO_DIR ({audio_dir!r}) or MUSICCAPS_DIR ({musiccaps_dir!r}), not both")
    if bad_input not in ("skip", "error"):
        raise ValueError(f"raw_audio_source.bad_input={bad_input!r}: must be 'skip' or 'error'")
    options = {}
    if bad_input != "skip":
        options["bad_input"] = bad_input
    if require_captions:
        options["require_captions"] = True
    for key, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if value is not None:
            options[key] = float(value)
    if audio_dir:
        return RawAudioSource("audio_folder", sample_rate, audio_dir, options)
    if musiccaps_dir:
        return RawAudioSource("musiccaps", sample_rate, musiccaps_dir, options)
    return RawAudioSource("synthetic_music", sample_rate)  # rendered clean: the folder options do not apply


def raw_audio_task_name(sample_rate: int, audio_dir: Optional[str] = None, musiccaps_dir: Optional[str] = None,
                        bad_input: str = "skip", require_captions: bool = False,
                        validation_fraction: Optional[float] = None, test_fraction: Optional[float] = None) -> str:
    """The seqio task name of `raw_audio_source(...)` at `sample_rate` Hz, for training jobs whose input is a task
    name: `MIXTURE_OR_TASK_NAME = @dataset_config.raw_audio_task_name()` with `raw_audio_task_name.sample_rate =
    %SAMPLE_RATE` (the model's) and `raw_audio_task_name.audio_dir = %AUDIO_DIR`. Such tasks are registered on
    first use, so a gin file can name a user's folder."""
    return raw_audio_source(int(sample_rate), audio_dir, musiccaps_dir, bad_input, require_captions,
                            validation_fraction, test_fraction).task_name


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
