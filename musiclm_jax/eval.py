"""Evaluation: `python -m musiclm_jax.eval --gin_file=gin/eval/codec.gin --gin.CHECKPOINT_DIR="'DIR'"
[--gin.AUDIO_DIR="'/clips'"] [--gin.OUTPUT_DIR="'/out'"]`.

An eval gin file binds `evaluate.evaluator` to a function of the run directory that returns {metric: number}
(e.g. evaluation.codec_eval.evaluate_codec) and `evaluate.name`. The metrics are printed as one JSON line and
written to OUTPUT_DIR/metrics.json (default CHECKPOINT_DIR/eval/<name>/metrics.json). An evaluator with an
`output_dir` parameter also gets that directory, for files beside metrics.json (the generation evaluation's
audio and report). Eval gin files: gin/eval/codec.gin, gin/eval/semantic.gin, gin/eval/mulan.gin,
gin/eval/generation.gin.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

import jax

from musiclm_jax import gin_utils


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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point: parses --gin_file / --gin.X flags and runs evaluate()."""
    import gin
    return gin_utils.run(lambda flags: gin.get_configurable(evaluate)(), argv=argv)


if __name__ == "__main__":
    # Gin files import this module as `musiclm_jax.eval`; run that copy, not this __main__ one.
    from musiclm_jax import eval as _eval_module
    _eval_module.main()
