"""The MusicLM chain on your own music, step by step: `python -m musiclm_jax.recipe`.

    python -m musiclm_jax.recipe --output_dir OUT (--audio_dir DIR | --musiccaps_dir DIR | --embedded)
        [--size tiny] [--redo STEP]... [--bind STEP:NAME=VALUE]... [--init_from STEP=DIR]...
        [--in_process | --local N [--local_devices K]]
        [--codec_from encodec:DIR] [--semantic_from hubert:DIR | mert:DIR] [--mulan_from clap:DIR]
    python -m musiclm_jax.recipe --output_dir gs://B/OUT --audio_dir gs://B/DIR --size paper --dry-run \
        (--tpu NAME --zone ZONE [--project P] | --local N) [--topology v5e:16x16] [--aot]

`--audio_dir DIR`: a folder of audio files (any format libsndfile/audioread reads, any rate, mono or stereo)
with a `captions.jsonl` (one {"audio_path", "caption"[, "split"]} per line; MuLan needs the captions). Rows
without a `split` are training rows, and validation and test clips are carved from them by a hash of their
path (stable when files are added). Bad files are skipped and counted. `--musiccaps_dir DIR`: MusicCaps'
musiccaps-public.csv and the clips {ytid}.<ext> in DIR. `--embedded`: the embedded procedural music, which is
the demo (`python -m musiclm_jax.demo`, the same orchestration with its own prompts and measures).

Steps (each the project's own command line, its output in OUT/<dir>, its whole log in OUT/logs/<step>.log):

  codec, w2v_bert, semantic_tokens (k-means), mulan, mulan_rvq, tokenize   the tokenizers and the token cache
  semantic_stage, coarse_stage, fine_stage                                  the three stages on the cache
  eval_codec, eval_mulan, eval_generation                                   the held-out measures
  report                                                                    OUT/quality.json

Imported components, the open-weights route (MuLan and w2v-BERT were never released): `--codec_from encodec:DIR`,
`--semantic_from hubert:DIR` or `mert:DIR`, `--mulan_from clap:DIR`, each DIR a transformers checkpoint folder
(config.json + weights; CLAP's with tokenizer.json) or a run directory `python -m musiclm_jax.convert` wrote. The
component's training step becomes its import (`python -m musiclm_jax.convert`, or a copy of the run directory)
into the same OUT/<dir>: `codec` keeps EnCodec's RVQ levels of 6 kbps (8 at 75 Hz for the 24 kHz model);
`hubert` / `mert` replaces `w2v_bert`, and the k-means fit takes the feature model's layer and a pooling to 25 Hz
(gin/semantic/features_hubert.gin: layer 9 of 12, 50 -> 25 Hz; features_mert.gin: 75 -> 25 Hz); `mulan` is CLAP,
whose RVQ `mulan_rvq` fits as for MuLan. The k-means, the RVQ, the token cache and the stages run as usual, and
the stages' token layouts and lengths follow the cache those tokenizers write (data/stages.py): EnCodec's 75 Hz
frames give the coarse stage three codec frames per semantic frame.

A finished step leaves OUT/.done/<step> and is skipped when the recipe runs again; an interrupted training step
resumes from its last checkpoint. `--redo STEP` starts one step over (its output directory removed first).
`--bind STEP:NAME=VALUE` adds `--gin.NAME=VALUE` to a step's command (e.g. `--bind coarse_stage:TRAIN_STEPS=2000`;
for mulan_rvq, whose command takes flags, `--bind mulan_rvq:steps=20` adds `--steps 20`). `--init_from STEP=DIR`
fine-tunes a training step from another run directory, as t5x's initial checkpoint does (`--gin.INIT_CHECKPOINT`:
the parameters are restored by name from DIR's latest checkpoint at any mesh, the names not found are reported in
the step's MODEL_DIR/init_checkpoint.json; the optimizer starts fresh; a resumed step keeps its own checkpoint,
and a finished one is not redone unless named in --redo). `--in_process` runs
the commands' `main` in this Python process instead of a subprocess each (quicker to start; the tests use it).
`--local N` runs each training and data step as N processes with jax.distributed over loopback
(`launch/tpu_run.sh --local N --local_devices K`, K CPU devices each, default 4; the global batch is split over
the N x K devices, the data jobs take their own shards and rows), its logs in OUT/logs/<step>/process-<i>.log
(process 0's echoed); the evaluations run in one process.

Pod plans (`--dry-run`): each step printed as the command that runs it, through `launch/tpu_run.sh` on the TPU
(`--tpu/--zone`, every worker of the `--topology` slice) or as N local processes (`--local N`), after a comment that
names the steps it waits for and the directories of theirs it reads (gs:// paths when OUT is one). `--size paper`
uses the paper's gin files (PAPER) with their own batch sizes, steps and meshes. `--aot` compiles each training
step's train step for `--topology` here (`python -m musiclm_jax.aot`, libtpu) and prints its per-chip memory.
Plans are printed, not run. Every step runs on every process of the launch: the data jobs too (tokenization takes
its own shards, the k-means and RVQ fits their own rows).

quality.json: {"codec": gin/eval/codec.gin's metrics (SI-SNR, mel distance, pitch-class agreement, bitrate),
"mulan": gin/eval/mulan.gin's (text <-> audio retrieval), "generation": gin/eval/generation.gin's (FAD and KL
with the trained MuLan, MuLan cycle consistency) on the data's held-out `test` split, "data": each prepared
dataset's counts (records per split, skipped files by reason, downmixed/resampled/carved notes; prepared in
$MUSICLM_TFDS_DIR, default OUT/data), "timings"}; the
generated clips, reference clips and their report are in OUT/eval/generation (report.html).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence, Union

# A step: (name, argv of `python -m ...`) or (name, a function of the output directory).
Step = tuple[str, Union[list[str], Callable[[str], None]]]

# The tiny sizes, as the demo trains them (CPU minutes).
TINY = {
    "codec": "gin/codec/spectral_tiny.gin",
    "w2v_bert": "gin/w2v_bert/tiny_pitch.gin",
    "semantic_tokens": "gin/semantic/kmeans_tiny.gin",
    "mulan": "gin/mulan/tiny.gin",
    "mulan_rvq": "gin/mulan/rvq_tiny.gin",
    "tokenize": "gin/tokenize/tiny.gin",
    "stages": "gin/stages/{stage}_tiny.gin",
    "coarse_stage": "gin/stages/coarse_melody_tiny.gin",
}
# The paper's sizes (a TPU pod): the same design as the tiny chain (spectral codec, w2v-BERT with the pitch target,
# the melody-conditioned semantic and coarse stages), each gin file's own batch size, steps and mesh.
PAPER = {
    "codec": "gin/codec/spectral_paper.gin",
    "w2v_bert": "gin/w2v_bert/paper_pitch.gin",
    "semantic_tokens": "gin/semantic/kmeans_w2v_bert.gin",
    "mulan": "gin/mulan/paper.gin",
    "mulan_rvq": "gin/mulan/rvq_paper.gin",
    "tokenize": "gin/tokenize/paper.gin",
    "stages": "gin/stages/{stage}_paper.gin",
    "semantic_stage": "gin/stages/semantic_melody_paper.gin",
    "coarse_stage": "gin/stages/coarse_melody_paper.gin",
}
SIZES = {"tiny": TINY, "paper": PAPER}
STAGE_STEPS = {"semantic": 1000, "coarse": 800, "fine": 600}
# What each step reads of the earlier steps' outputs (the pod plan prints it: a step starts when these are done;
# of several names, those the plan has).
STEP_READS = {"semantic_tokens": ("w2v_bert", "hubert", "mert"), "mulan_rvq": ("mulan",),
              "tokenize": ("codec", "semantic_tokens", "mulan_rvq"), "semantic_stage": ("tokenize",),
              "coarse_stage": ("tokenize",), "fine_stage": ("tokenize",), "generate": (
                  "mulan_rvq", "codec", "semantic_stage", "coarse_stage", "fine_stage", "semantic_tokens"),
              "eval_codec": ("codec",), "eval_mulan": ("mulan_rvq",), "eval_generation": (
                  "mulan_rvq", "codec", "semantic_stage", "coarse_stage", "fine_stage", "semantic_tokens"),
              "report": ("eval_codec", "eval_mulan", "eval_generation")}
EVAL_EXAMPLES = 16  # held-out captions generated by eval_generation at tiny size
EVAL_SECONDS = 4.0

# The directory each step writes (relative to the output directory): `--redo STEP` removes it first, so the step
# starts over (a training step would otherwise resume its finished run and change nothing). mulan_rvq writes
# into the MuLan run directory and replaces its own files.
STEP_OUTPUTS = {"codec": "codec", "w2v_bert": "w2v_bert", "hubert": "hubert", "mert": "mert",
                "semantic_tokens": "semantic_tokenizer", "mulan": "mulan",
                "tokenize": "tokens", "semantic_stage": "semantic", "coarse_stage": "coarse", "fine_stage": "fine",
                "generate": "samples", "eval_codec": "eval/codec", "eval_mulan": "eval/mulan",
                "eval_generation": "eval/generation"}


# Imported components (--codec_from, --semantic_from, --mulan_from): the kinds each flag takes.
IMPORT_KINDS = {"codec": ("encodec",), "semantic": ("hubert", "mert"), "mulan": ("clap",)}
# The `python -m musiclm_jax.convert` kind of each (MERT's checkpoints are HubertModel's).
CONVERT_KIND = {"encodec": "encodec", "hubert": "hubert", "mert": "hubert", "clap": "clap"}
# The layer and frame pooling (to 25 Hz) of an imported semantic feature model, for the k-means fit: a gin file
# applied after the size's own k-means file (its clusters, steps and clip length).
SEMANTIC_FEATURES_GIN = {"hubert": "gin/semantic/features_hubert.gin", "mert": "gin/semantic/features_mert.gin"}
# EnCodec's RVQ levels kept by an import (convert encodec --bandwidth): 6 kbps, MusicLM's SoundStream bitrate
# (the 24 kHz model's 8 of 32 levels at 75 Hz).
ENCODEC_BANDWIDTH_KBPS = 6.0


@dataclasses.dataclass(frozen=True)
class Import:
    """An imported component in place of a trained one: `kind` ('encodec', 'hubert', 'mert' or 'clap') and `path`,
    a transformers checkpoint folder (config.json + weights), which the plan's step converts into the component's
    run directory (`python -m musiclm_jax.convert`), or a run directory that convert already wrote (it has a
    config.gin), which the step copies there."""

    kind: str
    path: str

    @property
    def converted(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "config.gin"))

    def step(self, name: str, model_dir: str) -> Step:
        """The plan's step that puts this import's run directory at model_dir."""
        if self.converted:
            return (name, CopyRunDirectory(self.path, model_dir))
        argv = ["musiclm_jax.convert", CONVERT_KIND[self.kind], "--from", self.path, "--to", model_dir]
        if self.kind == "encodec":
            argv += ["--bandwidth", str(ENCODEC_BANDWIDTH_KBPS)]
        return (name, argv)


class CopyRunDirectory:
    """A plan step that copies a converted run directory into the output directory (so that the MuLan RVQ fit,
    which writes beside MuLan's checkpoint, never writes into the user's folder)."""

    def __init__(self, source: str, target: str):
        self.source, self.target = source, target
        self.__name__ = f"copy of {source} to {target}"

    def __call__(self, out: str) -> None:
        del out
        if os.path.exists(self.target):
            shutil.rmtree(self.target)
        shutil.copytree(self.source, self.target)


def parse_imports(codec_from: Optional[str] = None, semantic_from: Optional[str] = None,
                  mulan_from: Optional[str] = None, check_paths: bool = True) -> dict[str, Import]:
    """{'codec' | 'semantic' | 'mulan': Import} of the --*_from flags (KIND:DIR); exits naming the flag if the kind
    is not one it takes or (check_paths) DIR is not a directory."""
    imports = {}
    for role, value in (("codec", codec_from), ("semantic", semantic_from), ("mulan", mulan_from)):
        if value is None:
            continue
        kind, sep, path = value.partition(":")
        kinds = IMPORT_KINDS[role]
        if not sep or kind not in kinds or not path:
            raise SystemExit(f"recipe: --{role}_from {value!r}: expected KIND:DIR with KIND one of {', '.join(kinds)}")
        if check_paths and not os.path.isdir(path):
            raise SystemExit(f"recipe: --{role}_from {value!r}: {path} is not a directory (a transformers checkpoint "
                             f"folder, or a run directory of `python -m musiclm_jax.convert {kinds[0]}`)")
        imports[role] = Import(kind, path if path.startswith("gs://") else os.path.abspath(path))
    return imports


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where the music comes from: kind 'audio_dir' or 'musiccaps' and its directory."""

    kind: str
    path: str

    def check(self) -> None:
        """Errors that name the missing file before any step runs."""
        if not os.path.isdir(self.path):
            raise SystemExit(f"recipe: {self.path} is not a directory")
        need = "captions.jsonl" if self.kind == "audio_dir" else "musiccaps-public.csv"
        if not os.path.isfile(os.path.join(self.path, need)):
            why = ("MuLan learns from captions: one {\"audio_path\": ..., \"caption\": ...} per line"
                   if self.kind == "audio_dir" else "MusicCaps' caption table")
            raise SystemExit(f"recipe: {os.path.join(self.path, need)} is missing ({why})")

    def gin(self) -> list[str]:
        """The data binding of a command: AUDIO_DIR, or MUSICCAPS_DIR (every step reads MusicCaps' splits)."""
        macro = "MUSICCAPS_DIR" if self.kind == "musiccaps" else "AUDIO_DIR"
        return [f"--gin.{macro}='{self.path}'"]

    @property
    def eval_data(self) -> str:
        return f"{'audio_folder' if self.kind == 'audio_dir' else 'musiccaps'}:{self.path}"


def training_steps(out: str, data_gin: Sequence[str], tokenize_gin: Sequence[str],
                   stage_steps: Optional[dict[str, int]] = STAGE_STEPS, size: str = "tiny",
                   imports: Optional[dict[str, Import]] = None) -> list[Step]:
    """The tokenizers, the token cache and the three stages at `size` ('tiny' or 'paper'). data_gin: the data
    bindings of the codec, w2v-BERT, k-means, MuLan and MuLan RVQ commands; tokenize_gin:
    bindings of the tokenize command (its data and clip counts); stage_steps: TRAIN_STEPS of each stage (None:
    the gin files' own). imports (parse_imports): components converted instead of trained: 'codec' (step codec),
    'semantic' (step hubert or mert in place of w2v_bert; the k-means fit then takes SEMANTIC_FEATURES_GIN's layer
    and pooling), 'mulan' (step mulan; its RVQ is fitted as for a trained MuLan). The stages' layouts follow the
    token cache those tokenizers write (data/stages.py)."""
    gins = SIZES[size]
    imports = imports or {}
    d = {name: os.path.join(out, name) for name in set(STEP_OUTPUTS.values())}

    def stage_gin(stage: str) -> str:
        return gins.get(f"{stage}_stage", gins["stages"].format(stage=stage))

    def steps_of(stage: str) -> list[str]:
        return [f"--gin.TRAIN_STEPS={stage_steps[stage]}"] if stage_steps else []

    def train(gin_file: str, model_dir: str, *bindings: str) -> list[str]:
        return ["musiclm_jax.train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'", *bindings]

    semantic_gins, features = [gins["semantic_tokens"]], d["w2v_bert"]
    if "semantic" in imports:
        kind = imports["semantic"].kind
        semantic_gins.append(SEMANTIC_FEATURES_GIN[kind])
        features = os.path.join(out, STEP_OUTPUTS[kind])
        features_step = imports["semantic"].step(kind, features)
    else:
        features_step = ("w2v_bert", train(gins["w2v_bert"], d["w2v_bert"], *data_gin))
    return [
        imports["codec"].step("codec", d["codec"]) if "codec" in imports else (
            "codec", train(gins["codec"], d["codec"], *data_gin)),
        features_step,
        ("semantic_tokens", ["musiclm_jax.fit_semantic", *[f"--gin_file={g}" for g in semantic_gins],
                             f"--gin.FEATURE_CHECKPOINT='{features}'",
                             f"--gin.OUTPUT_DIR='{d['semantic_tokenizer']}'",
                             *data_gin]),
        imports["mulan"].step("mulan", d["mulan"]) if "mulan" in imports else (
            "mulan", train(gins["mulan"], d["mulan"], *data_gin)),
        ("mulan_rvq", ["musiclm_jax.fit_rvq", f"--gin_file={gins['mulan_rvq']}",
                       f"--gin.MULAN_CHECKPOINT='{d['mulan']}'", *data_gin]),
        ("tokenize", ["musiclm_jax.tokenize", f"--gin_file={gins['tokenize']}", f"--gin.OUTPUT_DIR='{d['tokens']}'",
                      *tokenize_gin, f"--gin.CODEC_CHECKPOINT='{d['codec']}'",
                      f"--gin.SEMANTIC_CHECKPOINT='{d['semantic_tokenizer']}'",
                      f"--gin.MULAN_CHECKPOINT='{d['mulan']}'"]),
        *[(f"{stage}_stage", train(stage_gin(stage), d[stage], f"--gin.TOKEN_DIR='{d['tokens']}'", *steps_of(stage)))
          for stage in ("semantic", "coarse", "fine")],
    ]


def checkpoints_gin(out: str) -> list[str]:
    """The bindings of gin/sample/musiclm.gin naming the five run directories and the semantic tokenizer."""
    names = {"MULAN": "mulan", "CODEC": "codec", "SEMANTIC": "semantic", "COARSE": "coarse", "FINE": "fine"}
    return ([f"--gin.{macro}_CHECKPOINT='{os.path.join(out, name)}'" for macro, name in names.items()]
            + [f"--gin.SEMANTIC_TOKENIZER='{os.path.join(out, 'semantic_tokenizer')}'"])


def folder_steps(out: str, source: DataSource, seed: int = 0, size: str = "tiny",
                 imports: Optional[dict[str, Import]] = None) -> list[Step]:
    """The whole recipe on a folder or MusicCaps: training_steps (with `imports` in place of trained components),
    the three evaluations and the report (at tiny size, the generation evaluation makes EVAL_EXAMPLES clips of
    EVAL_SECONDS; at paper size, the gin's)."""
    d = {name: os.path.join(out, sub) for name, sub in STEP_OUTPUTS.items()}
    tiny = size == "tiny"
    plan = training_steps(out, source.gin(), source.gin(), STAGE_STEPS if tiny else None, size, imports)
    generation_size = [f"--gin.MAX_EXAMPLES={EVAL_EXAMPLES}", f"--gin.DURATION_S={EVAL_SECONDS}"] if tiny else []
    plan += [
        ("eval_codec", ["musiclm_jax.eval", "--gin_file=gin/eval/codec.gin",
                        f"--gin.CHECKPOINT_DIR='{d['codec']}'", *source.gin(),
                        f"--gin.OUTPUT_DIR='{d['eval_codec']}'"]),
        ("eval_mulan", ["musiclm_jax.eval", "--gin_file=gin/eval/mulan.gin",
                        f"--gin.CHECKPOINT_DIR='{d['mulan']}'", *source.gin(),
                        f"--gin.OUTPUT_DIR='{d['eval_mulan']}'"]),
        ("eval_generation", ["musiclm_jax.eval", "--gin_file=gin/eval/generation.gin", *checkpoints_gin(out),
                             f"--gin.EVAL_DATA='{source.eval_data}'", *generation_size, f"--gin.SEED={seed}",
                             f"--gin.OUTPUT_DIR='{d['eval_generation']}'"]),
        ("report", write_quality),
    ]
    return plan


# Steps whose failure does not stop the recipe (a folder too small to hold out enough clips for one of the
# evaluations): the reason is kept in OUT/.done/<step> and in quality.json, and the other steps go on.
EVALUATION_STEPS = ("eval_codec", "eval_mulan", "eval_generation")


def data_root(out: str) -> str:
    """Where the steps prepare the data: $MUSICLM_TFDS_DIR if set, else OUT/data (tfds_builders.default_data_root
    reads the variable; the recipe sets it for its steps)."""
    return os.environ.get("MUSICLM_TFDS_DIR") or os.path.join(out, "data")


def prepared_datasets(root: str) -> dict[str, dict]:
    """{dataset directory relative to root: its metadata} for every prepared audio_folder/musiccaps dataset under
    root: 'bad_input' (skipped files by reason, notes such as downmixed, resampled, carved_validation) and
    'held_out' (the carve settings and the records per split)."""
    found = {}
    for directory, _, files in sorted(os.walk(root)):
        if "metadata.json" in files and "dataset_info.json" in files:
            with open(os.path.join(directory, "metadata.json")) as f:
                found[os.path.relpath(directory, root)] = json.load(f)
    return found


def write_quality(out: str) -> None:
    """OUT/quality.json from the evaluations' metrics.json and the prepared datasets' metadata."""
    quality = {}
    for name in ("codec", "mulan", "generation"):
        path = os.path.join(out, "eval", name, "metrics.json")
        marker = os.path.join(out, ".done", f"eval_{name}")
        if os.path.isfile(path):
            with open(path) as f:
                quality[name] = json.load(f)
            continue
        failed = None
        if os.path.isfile(marker):
            with open(marker) as f:
                failed = json.load(f).get("failed")
        if failed is None:
            raise SystemExit(f"recipe: report: {path} is missing (run the eval_{name} step)")
        quality[name] = {"skipped": failed}
    quality["data"] = prepared_datasets(data_root(out))
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(quality, f, indent=1)


def apply_bindings(plan: list[Step], binds: Sequence[str]) -> list[Step]:
    """--bind STEP:NAME=VALUE: `--gin.NAME=VALUE` on the step's command (every command step is gin-configured)."""
    plan = [(name, list(argv) if isinstance(argv, list) else argv) for name, argv in plan]
    steps = dict(plan)
    for bind in binds:
        step, sep, binding = bind.partition(":")
        if not sep or "=" not in binding:
            raise SystemExit(f"recipe: --bind {bind!r}: expected STEP:NAME=VALUE")
        if step not in steps or not isinstance(steps[step], list):
            raise SystemExit(f"recipe: --bind {bind!r}: no command step {step!r} "
                             f"(steps: {', '.join(n for n, a in plan if isinstance(a, list))})")
        if steps[step][0] == "musiclm_jax.convert":
            raise SystemExit(f"recipe: --bind {bind!r}: step {step!r} imports a checkpoint (python -m "
                             f"musiclm_jax.convert), which takes no gin bindings")
        steps[step].append(f"--gin.{binding}")
    return plan


def init_from_bindings(plan: Sequence[Step], init_from: Sequence[str]) -> list[str]:
    """--init_from STEP=DIR -> the --bind STEP:INIT_CHECKPOINT='DIR' of a training step (`musiclm_jax.train`);
    exits naming the argument if STEP is not one or DIR is not a directory."""
    trains = training_step_names(plan)
    binds = []
    for item in init_from:
        step, sep, directory = item.partition("=")
        if not sep or not directory:
            raise SystemExit(f"recipe: --init_from {item!r}: expected STEP=DIR")
        if step not in trains:
            raise SystemExit(f"recipe: --init_from {item!r}: {step!r} is not a training step (training steps: "
                             f"{', '.join(trains)})")
        remote = directory.startswith("gs://")
        if not remote and not os.path.isdir(directory):
            raise SystemExit(f"recipe: --init_from {item!r}: {directory!r} is not a run directory")
        binds.append(f"{step}:INIT_CHECKPOINT={directory if remote else os.path.abspath(directory)!r}")
    return binds


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that steer a plan's steps, the recipe's and the demo's alike: --redo, --bind, --init_from,
    --in_process."""
    parser.add_argument("--redo", action="append", default=[],
                        help="start this step over even if done, its output directory removed first (repeatable)")
    parser.add_argument("--bind", action="append", default=[], help="STEP:NAME=VALUE, a gin binding of one step")
    parser.add_argument("--init_from", action="append", default=[],
                        help="STEP=DIR: fine-tune training step STEP from run directory DIR (INIT_CHECKPOINT)")
    parser.add_argument("--in_process", action="store_true", help="run the steps in this process")
    parser.add_argument("--local", type=int, help="run (or with --dry-run print) the training and data steps as N "
                                                  "local processes (launch/tpu_run.sh --local N)")
    parser.add_argument("--local_devices", type=int, help="with --local: CPU devices per process (default 4)")


def local_launch(args: argparse.Namespace, prefix: str = "recipe") -> Optional["Launch"]:
    """The Launch of add_step_arguments' --local/--local_devices (None without --local); bad values are errors."""
    if args.local_devices is not None and not args.local:
        raise SystemExit(f"{prefix}: --local_devices goes with --local N")
    if args.local is None:
        return None
    if args.local < 1 or (args.local_devices is not None and args.local_devices < 1):
        raise SystemExit(f"{prefix}: --local {args.local} --local_devices {args.local_devices}: need positive numbers")
    if args.in_process:
        raise SystemExit(f"{prefix}: --in_process and --local exclude each other")
    return Launch(local=args.local, local_devices=args.local_devices)


def bind_plan(plan: list[Step], args: argparse.Namespace) -> list[Step]:
    """The plan with add_step_arguments' --bind and --init_from applied."""
    return apply_bindings(plan, args.bind + init_from_bindings(plan, args.init_from))


def run_step(name: str, argv: Sequence[str], index: int, total: int, log_path: str, prefix: str = "recipe",
             in_process: bool = False, launch: Optional[Launch] = None) -> None:
    """Runs `python -m argv...` from the repository root, echoing its output (and saving it to log_path); with
    in_process, calls the module's main(argv[1:]) here (its output goes to the console only); with a local
    `launch`, runs it as launch.local processes through launch/tpu_run.sh, their logs in log_path's directory
    <step>/process-<i>.log (process 0's echoed as it grows)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if launch is not None and launch.local:
        _run_local_step(name, argv, index, total, log_path, prefix, launch, root)
        return
    cmd = [sys.executable, "-u", "-m", *argv]
    print(f"{prefix}: [{index}/{total}] {name}: python {' '.join(cmd[2:])}", flush=True)
    if in_process:
        import gin
        gin.clear_config()
        module = importlib.import_module(argv[0])
        if not hasattr(module, "main"):  # a package run as `python -m` (musiclm_jax.convert): its __main__
            module = importlib.import_module(argv[0] + ".__main__")
        with open(log_path, "w") as log:
            log.write(f"(run in process: python -m {' '.join(argv)})\n")
        try:
            module.main(list(argv[1:]))
        except SystemExit as e:
            if e.code not in (None, 0):
                raise SystemExit(f"{prefix}: step {name} failed: {e.code}") from e
        finally:
            gin.clear_config()
        return
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=root, env=_step_env(), stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            if _worth_showing(line):
                print(f"  [{name}] {line.rstrip()}", flush=True)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"{prefix}: step {name} failed (exit {code}); its whole output is in {log_path}")


def _run_local_step(name: str, argv: Sequence[str], index: int, total: int, log_path: str, prefix: str,
                    launch: Launch, root: str) -> None:
    """run_step through `launch/tpu_run.sh --local N`: process 0's log echoed while the processes run, the
    launcher's own output saved to log_path."""
    process_logs = os.path.splitext(log_path)[0]
    shutil.rmtree(process_logs, ignore_errors=True)  # a rerun's logs replace the last ones
    cmd = launch.command(name, argv, log_dir=process_logs, python=sys.executable)
    print(f"{prefix}: [{index}/{total}] {name}: {shlex.join(cmd)}", flush=True)
    env = _step_env()
    for variable in ("MUSICLM_COORDINATOR", "MUSICLM_NUM_PROCESSES", "MUSICLM_PROCESS_ID", "MUSICLM_DISTRIBUTED"):
        env.pop(variable, None)  # the launcher sets its own
    first = os.path.join(process_logs, "process-0.log")
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=root, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT) as proc:
        shown = 0
        while True:
            finished = proc.poll() is not None
            if os.path.isfile(first):
                with open(first, "rb") as f:
                    f.seek(shown)
                    data = f.read()
                complete = data if finished else data[:data.rfind(b"\n") + 1]  # whole lines until the end
                shown += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    if _worth_showing(line):
                        print(f"  [{name} 0/{launch.local}] {line.rstrip()}", flush=True)
            if finished:
                break
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"{prefix}: step {name} failed on {launch.local} local processes (exit {proc.returncode}); "
                         f"their logs: {process_logs}/process-*.log, the launcher's: {log_path}")


def _step_env() -> dict[str, str]:
    """The environment of a step's processes: this one's, unbuffered, TensorFlow's C++ logging at warnings."""
    return dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))


def _worth_showing(line: str) -> bool:
    """Drops TensorFlow/absl start-up noise from the echoed output (it stays in the step's log file)."""
    noise = ("cuda", "cuInit", "oneDNN", "TF-TRT", "absl::InitializeLog", "computation placer", "AVX",
             "rebuild TensorFlow", "uncached FunctionDataset", "Unable to register", "E0000", "I0000", "W0000",
             "TPU", "InitGoogle", "Source Location Trace", "learning/", ".cc:", "libtpu")
    return bool(line.strip()) and not any(n in line for n in noise)


def _last_error(log_path: str) -> str:
    """The last '...Error: ...' line of a step's log (why it stopped), or ''."""
    if not os.path.isfile(log_path):
        return ""
    with open(log_path, errors="replace") as f:
        errors = [line.strip() for line in f if "Error: " in line and "E0000" not in line]
    return errors[-1] if errors else ""


def run_plan(plan: Sequence[Step], out: str, redo: Sequence[str] = (), prefix: str = "recipe",
             in_process: bool = False, launch: Optional[Launch] = None) -> dict[str, float]:
    """Runs the steps not yet done (OUT/.done/<step>) in order; `redo` steps start over. Returns the seconds of
    each step run now and the total. Prints an overall progress line after each step. With a local `launch`
    (--local N), the training and data steps run as N processes; the evaluations and generation in one."""
    names = [name for name, _ in plan]
    unknown = set(redo) - set(names)
    if unknown:
        raise SystemExit(f"{prefix}: --redo {sorted(unknown)}: no such step (steps: {', '.join(names)})")
    done_dir, log_dir = os.path.join(out, ".done"), os.path.join(out, "logs")
    os.makedirs(done_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    start, timings = time.time(), {}
    for index, (name, action) in enumerate(plan, 1):
        marker = os.path.join(done_dir, name)
        if os.path.exists(marker) and name not in redo:
            print(f"{prefix}: [{index}/{len(plan)}] {name}: done earlier, skipped ({marker})", flush=True)
            continue
        step_start = time.time()
        output = os.path.join(out, STEP_OUTPUTS[name]) if name in STEP_OUTPUTS else None
        if os.path.exists(marker):  # a step run again is not done until it finishes
            os.remove(marker)
        if name in redo and output and os.path.exists(output):
            shutil.rmtree(output)
            print(f"{prefix}: --redo {name}: removed {output}, starting it over", flush=True)
        record = {}
        try:
            if callable(action):
                action(out)
            else:
                single = name in EVALUATION_STEPS or name == "generate"
                run_step(name, action, index, len(plan), os.path.join(log_dir, name + ".log"), prefix, in_process,
                         None if single else launch)
        except (SystemExit, ValueError) as e:
            if name not in EVALUATION_STEPS:
                raise
            record["failed"] = _last_error(os.path.join(log_dir, name + ".log")) or str(e)
            print(f"{prefix}: [{index}/{len(plan)}] {name} could not run, the recipe goes on without it: "
                  f"{record['failed']}", flush=True)
        timings[name] = round(time.time() - step_start, 1)
        with open(marker, "w") as f:
            f.write(json.dumps({"seconds": timings[name], **record}))
        done = sum(os.path.exists(os.path.join(done_dir, n)) for n in names)
        print(f"{prefix}: [{index}/{len(plan)}] {name}: {timings[name]:.0f} s (total {time.time() - start:.0f} s; "
              f"{done} of {len(plan)} steps done)", flush=True)
    timings["total"] = round(time.time() - start, 1)
    return timings


def slice_workers(topology: str) -> tuple[int, int]:
    """(chips, TPU VM workers) of a slice such as 'v5e:16x16' or 'v4:2x2x2': hosts hold 4 chips each, and a v5e or
    v6e slice of at most 8 chips is one host (v5litepod-8)."""
    kind, sep, shape = topology.partition(":")
    try:
        dims = [int(x) for x in shape.split("x")] if sep else []
    except ValueError:
        dims = []
    if not kind or not dims or min(dims) < 1:
        raise SystemExit(f"recipe: --topology {topology!r}: expected KIND:AxB[xC], e.g. v5e:16x16 or v4:2x2x2")
    chips = math.prod(dims)
    return chips, 1 if kind in ("v5e", "v6e") and chips <= 8 else max(1, chips // 4)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a plan's commands run on a pod or as local processes: launch/tpu_run.sh with --tpu/--zone (and
    --project), or with --local N."""

    tpu: Optional[str] = None
    zone: Optional[str] = None
    project: Optional[str] = None
    local: Optional[int] = None
    local_devices: Optional[int] = None

    def command(self, name: str, argv: Sequence[str], log_dir: Optional[str] = None,
                python: str = "python") -> list[str]:
        """The shell command of step `name`, whose python command is `python -m argv...`, each worker's (or local
        process's) log in log_dir (default logs/recipe/<name>)."""
        if self.local:
            where = ["--local", str(self.local)]
            if self.local_devices:
                where += ["--local_devices", str(self.local_devices)]
        else:
            where = ["--tpu", self.tpu, "--zone", self.zone] + (["--project", self.project] if self.project else [])
        return ["bash", "launch/tpu_run.sh", *where, "--log_dir", log_dir or f"logs/recipe/{name}", "--", python,
                "-m", *argv]


def training_step_names(plan: Sequence[Step]) -> list[str]:
    """The plan's steps that are `python -m musiclm_jax.train` runs."""
    return [n for n, argv in plan if isinstance(argv, list) and argv and argv[0] == "musiclm_jax.train"]


def aot_report(plan: Sequence[Step], step: str, topology: str, size: str = "tiny") -> dict:
    """`python -m musiclm_jax.aot` of training step `step` (its gin files and bindings) for `topology`: the train
    step compiled for the slice here, with its per-chip memory (aot.py; needs libtpu, the `tpu` extra). A stage
    reads its layout and lengths from the token cache, which the plan has not written yet: its TOKEN_DIR is
    replaced by the planned cache of the `size` tokenizers (aot.planned_token_dir)."""
    import gin

    from musiclm_jax import aot
    argv = [a if not a.startswith("--gin.TOKEN_DIR=") else f"--gin.TOKEN_DIR='{aot.planned_token_dir(size)}'"
            for a in dict(plan)[step]]
    gin.clear_config()
    try:
        return aot.main(list(argv[1:]) + [f"--topology={topology}"])
    finally:
        gin.clear_config()


def print_plan(plan: Sequence[Step], out: str, size: str, launch: Optional[Launch], topology: Optional[str],
               file=None, aot_topology: Optional[str] = None) -> None:
    """--dry-run: each step as the command that would run it (shell-quoted, through launch/tpu_run.sh with a
    `launch`), after a comment naming the steps it waits for and the outputs of theirs it reads."""
    file = file or sys.stdout
    where = "this machine"
    if launch and launch.local:
        where = f"{launch.local} local processes (launch/tpu_run.sh --local)"
    elif launch:
        chips, workers = slice_workers(topology)
        where = f"TPU {launch.tpu} in {launch.zone}, topology {topology}: {chips} chips, {workers} workers"
    print(f"recipe: plan at {size} size on {where}; outputs under {out}", file=file)
    trains = training_step_names(plan)
    names = {name for name, _ in plan}
    for index, (name, action) in enumerate(plan, 1):
        reads = tuple(r for r in STEP_READS.get(name, ()) if r in names)
        inputs = [os.path.join(out, STEP_OUTPUTS.get(r, "mulan")) for r in reads]
        after = f" after {', '.join(reads)} (reads {', '.join(dict.fromkeys(inputs))})" if reads else ""
        print(f"# [{index}/{len(plan)}] {name}{after}", file=file)
        if callable(action):
            print(f"#   here, once the others are done: {action.__name__}({out!r})", file=file)
            continue
        command = launch.command(name, action) if launch else ["python", "-m", *action]
        print(shlex.join(command), file=file)
        if aot_topology and name in trains:
            r = aot_report(plan, name, aot_topology, size)
            print(f"#   AOT on {aot_topology}: {'fits' if r['fits'] else 'DOES NOT FIT'}, "
                  f"{r['per_chip_bytes'] / 2**30:.2f} GiB per chip of {r['hbm_bytes_per_chip'] / 2**30:.0f} "
                  f"(mesh {r['mesh']}, batch {r['batch_size']}, {r['params']:,} parameters, compiled in "
                  f"{r['compile_seconds']:.0f} s)", file=file, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio_dir", help="a folder of audio files with captions.jsonl")
    source.add_argument("--musiccaps_dir", help="musiccaps-public.csv and the clips {ytid}.<ext>")
    source.add_argument("--embedded", action="store_true", help="the embedded procedural music (the demo)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print each step's command (with --tpu or --local: its launch/tpu_run.sh command) and "
                             "the steps it waits for; run nothing")
    parser.add_argument("--tpu", help="with --dry-run: the TPU VM (pod) the steps run on")
    parser.add_argument("--zone", help="the TPU's zone")
    parser.add_argument("--project", help="the TPU's gcloud project (default: gcloud's)")
    parser.add_argument("--topology", default="v5e:16x16", help="the TPU slice, e.g. v5e:16x16 (chips, workers)")
    parser.add_argument("--aot", action="store_true",
                        help="with --dry-run: compile each training step for --topology here (python -m "
                             "musiclm_jax.aot; libtpu) and print its per-chip memory")
    parser.add_argument("--codec_from", metavar="encodec:DIR",
                        help="import EnCodec (a transformers checkpoint folder, or a converted run directory) as the "
                             f"codec instead of training one; its RVQ levels of {ENCODEC_BANDWIDTH_KBPS:g} kbps")
    parser.add_argument("--semantic_from", metavar="hubert:DIR|mert:DIR",
                        help="import HuBERT or MERT as the semantic tokenizer's feature model instead of training "
                             "w2v-BERT (the k-means fit still runs)")
    parser.add_argument("--mulan_from", metavar="clap:DIR",
                        help="import CLAP as the joint embedding instead of training MuLan (its RVQ is still fitted)")
    add_step_arguments(parser)
    args = parser.parse_args(argv)
    remote = args.output_dir.startswith("gs://")
    out = args.output_dir.rstrip("/") if remote else os.path.abspath(args.output_dir)
    if args.tpu and not args.zone:
        raise SystemExit("recipe: --tpu needs --zone")
    if args.tpu and args.local:
        raise SystemExit("recipe: --tpu and --local exclude each other")
    if (args.tpu or args.size == "paper" or remote) and not args.dry_run:
        raise SystemExit("recipe: pod plans (--size paper, --tpu, a gs:// output) are printed with --dry-run, not "
                         "run from here: launch the printed commands step by step (each waits for the outputs its "
                         "comment names)")
    launch = local_launch(args) if not args.dry_run else None
    if args.embedded and args.dry_run:
        raise SystemExit("recipe: --dry-run takes --audio_dir or --musiccaps_dir")
    imports = parse_imports(args.codec_from, args.semantic_from, args.mulan_from, check_paths=not args.dry_run)
    if imports and args.embedded:
        raise SystemExit("recipe: --codec_from, --semantic_from and --mulan_from go with --audio_dir or "
                         "--musiccaps_dir (the demo trains its own components)")
    if imports and args.aot:
        raise SystemExit("recipe: --aot compiles the stages at the sizes of the recipe's own tokenizers "
                         "(aot.TOKENIZERS_GIN); with imported components their layouts follow the imports' token "
                         "cache: tokenize first, then `python -m musiclm_jax.aot --gin.TOKEN_DIR=...` each stage")
    if args.embedded:
        from musiclm_jax import demo
        forwarded = ["--output_dir", out, "--seed", str(args.seed)] + [f"--redo={r}" for r in args.redo]
        forwarded += [f"--bind={b}" for b in args.bind] + [f"--init_from={i}" for i in args.init_from]
        if launch:
            forwarded += [f"--local={launch.local}"] + (
                [f"--local_devices={launch.local_devices}"] if launch.local_devices else [])
        return demo.main(forwarded + (["--in_process"] if args.in_process else []))
    path = args.audio_dir or args.musiccaps_dir
    path = path.rstrip("/") if path.startswith("gs://") else os.path.abspath(path)
    source = DataSource("audio_dir" if args.audio_dir else "musiccaps", path)
    if not path.startswith("gs://"):
        source.check()
    plan = bind_plan(folder_steps(out, source, args.seed, args.size, imports), args)
    if args.dry_run:
        launch = (Launch(args.tpu, args.zone, args.project, args.local, args.local_devices)
                  if args.tpu or args.local else None)
        print_plan(plan, out, args.size, launch, args.topology, aot_topology=args.topology if args.aot else None)
        return {"plan": plan}
    # The steps' prepared data, read back by the report; set for this run only, so that a later run in the same
    # process (recipe.main called twice, as the tests do) does not read this one's data.
    previous_root = os.environ.get("MUSICLM_TFDS_DIR")
    os.environ["MUSICLM_TFDS_DIR"] = data_root(out)
    try:
        timings = run_plan(plan, out, args.redo, in_process=args.in_process, launch=launch)
    finally:
        if previous_root is None:
            del os.environ["MUSICLM_TFDS_DIR"]
        else:
            os.environ["MUSICLM_TFDS_DIR"] = previous_root
    with open(os.path.join(out, "quality.json")) as f:
        quality = json.load(f)
    quality["timings"] = timings
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(quality, f, indent=1)
    for name in ("codec", "mulan", "generation"):
        figures = ", ".join(f"{k} {v:.4g}" for k, v in quality[name].items() if isinstance(v, (int, float)))
        print(f"recipe: {name} on the held-out clips: {figures}")
    for name, metadata in quality["data"].items():
        skipped = metadata.get("bad_input", {})
        print(f"recipe: data {name}: records per split {metadata.get('held_out', {}).get('records')}, "
              f"skipped {skipped.get('skipped')}, notes {skipped.get('notes')}")
    print(f"recipe: quality {os.path.join(out, 'quality.json')}, report "
          f"{os.path.join(out, 'eval', 'generation', 'report.html')}")
    print(f"recipe: finished in {timings['total'] / 60:.1f} min")
    return {"timings": timings, "quality": quality}


if __name__ == "__main__":
    main()
