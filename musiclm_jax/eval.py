"""Evaluation: metrics of a run directory (gin), and the embeddings of one audio file (the `embed` subcommand).

Metrics: `python -m musiclm_jax.eval --gin_file=gin/eval/codec.gin --gin.CHECKPOINT_DIR="'DIR'"
[--gin.AUDIO_DIR="'/clips'"] [--gin.OUTPUT_DIR="'/out'"]`.

An eval gin file binds `evaluate.evaluator` to a function of the run directory that returns {metric: number}
(e.g. evaluation.codec_eval.evaluate_codec) and `evaluate.name`. The metrics are printed as one JSON line and
written to OUTPUT_DIR/metrics.json (default CHECKPOINT_DIR/eval/<name>/metrics.json). An evaluator with an
`output_dir` parameter also gets that directory, for files beside metrics.json (the generation evaluation's
audio and report). Eval gin files: gin/eval/codec.gin, gin/eval/semantic.gin, gin/eval/mulan.gin,
gin/eval/generation.gin.

Embeddings of the metric models (imported run directories: `python -m musiclm_jax.convert vggish|passt|clap`):

    python -m musiclm_jax.eval embed --model vggish|passt|clap --checkpoint DIR --input a.wav --output e.npy
        [--postprocess]   # vggish only

The file is decoded with `data.audio_io.load_audio` (mixed down to mono and resampled with soxr straight to the
model's rate: 16 kHz VGGish, 32 kHz PaSST, the checkpoint's rate for CLAP, 48 kHz released), and the float32
array saved to --output is
  vggish  [examples, 128]: `VGGishEmbedder.embed`, one row per whole 0.96 s (FAD's embedding, no PCA; with
          --postprocess the AudioSet PCA + 8-bit quantization, which needs a checkpoint converted with --pca);
  passt   [segments, 527]: `PaSSTClassifier.segment_probabilities`, softmax probabilities of each consecutive
          10 s segment as audiocraft's KL cuts them (one row for a clip of at most 10 s; segments of at most
          0.15 s are dropped, so a clip that short gives [0, 527]);
  clap    [dim]: `MuLan.embed_audio` of a converted CLAP (or any MuLan run directory), unit norm (a clip longer
          than the model's 10 s window gets the mean of its 1 s-hop windows, re-normalised: MuLan's rule).
One line is printed: the model, the shape and the output path. A missing input or checkpoint, an undecodable or
too-short clip, or a checkpoint of another model kind exits with a message naming the file or directory.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from musiclm_jax import gin_utils

EMBED_MODELS = ("vggish", "passt", "clap")


def evaluate(*, evaluator: Callable[[str], Mapping[str, float]], checkpoint_dir: str, name: str,
             output_dir: Optional[str] = None) -> dict:
    """Runs evaluator(checkpoint_dir) (with output_dir=... if it takes one); writes and returns
    {'name', 'checkpoint_dir', metrics...}."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"CHECKPOINT_DIR {checkpoint_dir!r} is not a directory")
    output_dir = output_dir or os.path.join(checkpoint_dir, "eval", name)
    extra = {"output_dir": output_dir} if "output_dir" in inspect.signature(evaluator).parameters else {}
    metrics = dict(evaluator(checkpoint_dir, **extra))
    result = {"name": name, "checkpoint_dir": checkpoint_dir, **metrics}
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(json.dumps(result, sort_keys=True))
        print(f"eval: wrote {os.path.join(output_dir, 'metrics.json')}", file=sys.stderr)
    return result


def _load_embedder(model: str, checkpoint: str):
    """The loaded embedder of `model` from run directory `checkpoint`; exits naming the directory if it is missing
    or holds another kind of model (the loaders' ValueError names the kind)."""
    if not os.path.isdir(checkpoint):
        raise SystemExit(f"eval embed: --checkpoint {checkpoint!r} is not a directory")
    try:
        if model == "vggish":
            from musiclm_jax.evaluation.vggish_model import VGGishEmbedder
            return VGGishEmbedder.from_checkpoint(checkpoint)
        if model == "passt":
            from musiclm_jax.evaluation.passt_model import PaSSTClassifier
            return PaSSTClassifier.from_checkpoint(checkpoint)
        from musiclm_jax.mulan.inference import MuLan
        return MuLan.from_checkpoint(checkpoint)
    except ValueError as e:  # "DIR holds a VGGishModel, not PaSST"
        raise SystemExit(f"eval embed --model {model}: cannot use checkpoint {checkpoint!r}: {e}") from e


def embed(model: str, checkpoint: str, input_path: str, output_path: str, postprocess: bool = False) -> np.ndarray:
    """Embeds (or, for PaSST, classifies) audio file `input_path` with the `model` ('vggish', 'passt' or 'clap') of
    run directory `checkpoint`, saves the float32 array to `output_path` (.npy) and returns it (see the module
    doc for the shapes)."""
    from musiclm_jax.data import audio_io
    if model not in EMBED_MODELS:
        raise SystemExit(f"eval embed: --model must be one of {', '.join(EMBED_MODELS)}; got {model!r}")
    if postprocess and model != "vggish":
        raise SystemExit(f"eval embed: --postprocess is VGGish's PCA; not for --model {model}")
    if not os.path.isfile(input_path):
        raise SystemExit(f"eval embed: --input {input_path!r} does not exist")
    embedder = _load_embedder(model, checkpoint)
    if postprocess and embedder.pca is None:
        raise SystemExit(f"eval embed --postprocess: checkpoint {checkpoint!r} has no VGGish PCA (vggish_pca.npz; "
                         "convert it with --pca)")
    try:
        audio = audio_io.load_audio(input_path, embedder.sample_rate)
        if model == "vggish":
            result = embedder.embed(audio, embedder.sample_rate, postprocess=postprocess)
        elif model == "passt":
            result = embedder.segment_probabilities(audio, embedder.sample_rate)
        else:
            result = embedder.embed_audio(audio)
    except ValueError as e:  # undecodable file (AudioDecodeError), too short for VGGish
        raise SystemExit(f"eval embed --model {model}: {input_path}: {e}") from e
    result = np.asarray(result, np.float32)
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    np.save(output_path, result)
    print(f"eval embed: {model} {tuple(result.shape)} float32 -> {output_path}")
    return result


def embed_main(argv: Sequence[str]) -> np.ndarray:
    """`embed` subcommand: parses its flags and runs embed()."""
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.eval embed",
                                     description="Embeddings of one audio file with VGGish, PaSST or CLAP.")
    parser.add_argument("--model", required=True, choices=EMBED_MODELS)
    parser.add_argument("--checkpoint", required=True, help="run directory of the imported model")
    parser.add_argument("--input", required=True, help="audio file (wav/flac/ogg; mp3 where a decoder exists)")
    parser.add_argument("--output", required=True, help=".npy file to write (float32)")
    parser.add_argument("--postprocess", action="store_true",
                        help="vggish only: the AudioSet PCA + quantization (needs the converted PCA)")
    args = parser.parse_args(argv)
    return embed(args.model, args.checkpoint, args.input, args.output, args.postprocess)


def main(argv: Optional[Sequence[str]] = None) -> Union[dict, np.ndarray]:
    """Entry point: `embed ...` runs the embed subcommand (returns the array); anything else is parsed as
    --gin_file / --gin.X flags and runs evaluate() (returns its result)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "embed":
        return embed_main(argv[1:])
    import gin
    return gin_utils.run(lambda flags: gin.get_configurable(evaluate)(), argv=argv)


if __name__ == "__main__":
    # Gin files import this module as `musiclm_jax.eval`; run that copy, not this __main__ one.
    from musiclm_jax import eval as _eval_module
    _eval_module.main()
