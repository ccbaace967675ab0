"""Dataset preparation throughput on this machine: files/s of the `audio_folder` build in-process and on Beam.

    python benchmarks/prepare.py [--clips 160] [--workers 1,2] [--repeats 3]

A folder of `--clips` 10 s stereo 44.1 kHz FLAC files (the embedded synthetic music, made here) is prepared at
24 kHz with `python -m musiclm_jax.prepare`'s function, each time into a fresh data directory: in this process
(the baseline: decoding on tfds_builders' threads), then on Apache Beam's DirectRunner with each `--workers`
count (multi_processing: one Python process per worker). Each figure is the median over `--repeats` of files
divided by the whole preparation's wall time, Beam's start-up (its worker processes import TensorFlow) included;
the start-up is also measured alone, as the preparation of a one-clip folder, and taken out of a second figure
(what a cluster's long build approaches). Prints one JSON line last, with each figure's ratio to the in-process
one of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import common
from musiclm_jax import prepare
from musiclm_jax.data.dataset_config import raw_audio_task_name

RATE = 24000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=160)
    parser.add_argument("--workers", default="1,2", help="comma-separated Beam worker counts")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="prepare_bench_")
    folder = os.path.join(work, "clips")
    common.write_flac_folder(folder, args.clips)
    one_clip = os.path.join(work, "one_clip")
    common.write_flac_folder(one_clip, 1)
    name, one_clip_name = raw_audio_task_name(RATE, folder), raw_audio_task_name(RATE, one_clip)
    runs = {"in_process": None}
    runs.update({f"beam_{w}_workers": f"direct_num_workers={w},direct_running_mode=multi_processing"
                 for w in (int(w) for w in args.workers.split(","))})
    results = {"clips": args.clips, "clip_seconds": 10.0, "rate": RATE}
    build = 0
    for label, options in runs.items():
        seconds, startups = [], []
        for _ in range(args.repeats):
            build += 1
            startups.append(prepare.prepare(one_clip_name, os.path.join(work, f"tfds_{build}"), options)["seconds"])
            build += 1
            summary = prepare.prepare(name, os.path.join(work, f"tfds_{build}"), options)
            assert not summary["reused"] and summary["splits"] and summary["files"] == args.clips, summary
            seconds.append(summary["seconds"])
            print(f"{label}: {summary['files_per_second']:.1f} files/s ({summary['seconds']:.1f} s; one clip "
                  f"{startups[-1]:.1f} s)", flush=True)
        whole, startup = statistics.median(seconds), statistics.median(startups)
        results[f"{label}_files_per_s"] = round(args.clips / whole, 2)
        results[f"{label}_startup_s"] = round(startup, 2)
        results[f"{label}_files_per_s_after_startup"] = round((args.clips - 1) / max(whole - startup, 1e-9), 2)
    for label in runs:
        if label != "in_process":
            for figure in ("files_per_s", "files_per_s_after_startup"):
                results[f"{label}_{figure}_ratio_to_in_process"] = round(
                    results[f"{label}_{figure}"] / results[f"in_process_{figure}"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
