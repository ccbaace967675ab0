"""Prepares the TFDS dataset of an audio folder or of MusicCaps ahead of training: in this process, or on Apache Beam.

    python -m musiclm_jax.prepare --audio_dir DIR [--sample_rates 24000,16000]
    python -m musiclm_jax.prepare --musiccaps_dir DIR \\
        --beam_pipeline_options "direct_num_workers=2,direct_running_mode=multi_processing"

Training prepares a folder on first use, in its process 0 (tasks/audio.py). A large folder is better prepared
first, on Beam: `--beam_pipeline_options` takes TFDS's comma-separated form (`tfds build --beam_pipeline_options`);
DirectRunner processes here, or `runner=DataflowRunner,project=...,region=...,temp_location=gs://...` (also Flink,
Spark) with `--data_dir gs://...` on a cluster, with no code change. Each rate prepares exactly the dataset that
the raw-audio task of the same source and settings reads (dataset_config.raw_audio_task_name), so the training
run that follows finds it prepared and reuses it; a Beam build and an in-process build of the same folder hold the
same examples in the same order (tests/test_prepare.py). Needs the `beam` extra for Beam
(`bash launch/setup_env.sh beam`).

Prints, per rate, a JSON line: the prepared directory, examples per split, the bad-input report (skips by reason,
notes) and the files listed per second of preparation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from musiclm_jax.data import tfds_builders
from musiclm_jax.data.dataset_config import raw_audio_task_name
from musiclm_jax.tasks import audio as audio_tasks

DEFAULT_SAMPLE_RATES = "24000,16000"  # the codec's rate; w2v-BERT's and MuLan's


def prepare(name: str, data_dir: Optional[str] = None, beam_pipeline_options: Optional[str] = None) -> dict:
    """Prepares raw-audio task `name`'s dataset (reused if already prepared) and returns its summary: {'task',
    'data_dir', 'reused' (prepared before this call), 'splits': {split: examples}, 'bad_input': {'skipped',
    'notes'}, 'held_out', 'files' (examples plus skipped inputs, caption rows included), 'seconds',
    'files_per_second'}."""
    beam_options = tfds_builders.beam_options_from_flags(beam_pipeline_options)
    began, start = time.time(), time.perf_counter()
    builder = audio_tasks.prepared_builder(name, data_dir, beam_options=beam_options)
    seconds = time.perf_counter() - start
    reused = os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json")) < began
    report = dict(builder.info.metadata.get("bad_input", {}))
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    files = sum(splits.values()) + sum(report.get("skipped", {}).values())
    return {"task": name, "data_dir": builder.data_dir, "reused": reused, "splits": splits,
            "bad_input": {"skipped": report.get("skipped", {}), "notes": report.get("notes", {})},
            "held_out": builder.info.metadata.get("held_out", {}), "files": files, "seconds": round(seconds, 2),
            "files_per_second": round(files / max(seconds, 1e-9), 2)}


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio_dir", help="a folder of audio files, with an optional captions.jsonl")
    source.add_argument("--musiccaps_dir", help="musiccaps-public.csv and the clips {ytid}.<ext>")
    parser.add_argument("--sample_rates", default=DEFAULT_SAMPLE_RATES,
                        help=f"comma-separated rates in Hz to prepare (default {DEFAULT_SAMPLE_RATES})")
    parser.add_argument("--bad_input", choices=("skip", "error"), default="skip")
    parser.add_argument("--require_captions", action="store_true")
    parser.add_argument("--validation_fraction", type=float, help="held-out carve where the source has no "
                        "validation rows (default: captioned_audio.HeldOutCarve's)")
    parser.add_argument("--test_fraction", type=float)
    parser.add_argument("--data_dir", help="where prepared datasets go (default $MUSICLM_TFDS_DIR or "
                        "~/tensorflow_datasets/musiclm_jax); training must read the same (MUSICLM_TFDS_DIR)")
    parser.add_argument("--beam_pipeline_options", help="prepare on Apache Beam with these options, "
                        "comma-separated, e.g. direct_num_workers=2,direct_running_mode=multi_processing")
    args = parser.parse_args(argv)
    try:
        rates = [int(rate) for rate in args.sample_rates.split(",") if rate.strip()]
    except ValueError:
        parser.error(f"--sample_rates {args.sample_rates!r}: comma-separated integers (Hz)")
    if not rates:
        parser.error("--sample_rates names no rate")
    source_dir = args.audio_dir or args.musiccaps_dir
    if not os.path.isdir(source_dir):
        parser.error(f"{'--audio_dir' if args.audio_dir else '--musiccaps_dir'} {source_dir!r} is not a directory")
    summaries = []
    for rate in rates:
        name = raw_audio_task_name(rate, audio_dir=args.audio_dir, musiccaps_dir=args.musiccaps_dir,
                                   bad_input=args.bad_input, require_captions=args.require_captions,
                                   validation_fraction=args.validation_fraction, test_fraction=args.test_fraction)
        summary = prepare(name, args.data_dir, args.beam_pipeline_options)
        print(json.dumps(summary), flush=True)
        summaries.append(summary)
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
