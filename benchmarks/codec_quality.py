"""Quality of trained codecs: pitch keeping (two measures), mel distance, SI-SNR, bitrate, codebook perplexity,
and the signal-level sanity checks (pure tones, silence, DC offset).

    python benchmarks/codec_quality.py --checkpoint DIR [--checkpoint BASELINE_DIR] [--audio_dir DIR]
        [--max_examples 16] [--clip_seconds 4]

Each checkpoint is a codec run directory (e.g. the demo's DIR/codec). Clips: the embedded synthetic music's test
clips, or the `test` split of --audio_dir (your recordings). Per codec it prints the figures of
`codec_eval.evaluate_codec` and `codec_eval.codec_sanity`; with two checkpoints, the first is compared with the
second (the baseline) as differences and ratios, measured in the same run on the same clips. The last line is one
JSON object with everything.
"""
from __future__ import annotations

import argparse
import json

from musiclm_jax.evaluation import codec_eval


def measure(checkpoint: str, audio_dir, max_examples: int, clip_seconds: float) -> dict:
    return codec_eval.evaluate_codec(checkpoint, audio_dir=audio_dir, max_examples=max_examples,
                                     clip_seconds=clip_seconds)  # with codec_sanity's tones and silence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="codec run directory; a second one is the baseline")
    parser.add_argument("--audio_dir", default=None)
    parser.add_argument("--max_examples", type=int, default=16)
    parser.add_argument("--clip_seconds", type=float, default=4.0)
    args = parser.parse_args()
    if len(args.checkpoint) > 2:
        parser.error("at most two checkpoints: the codec and its baseline")
    results = {}
    for path in args.checkpoint:
        m = measure(path, args.audio_dir, args.max_examples, args.clip_seconds)
        results[path] = m
        s = m["sanity"]
        print(f"{path}: pitch-class agreement {m['pitch_class_agreement']:.1%} (melody tokens, "
              f"{m['pitched_frames']} frames), {m['chroma_cqt_agreement']:.1%} (librosa chroma_cqt, "
              f"{m['chroma_cqt_frames']} frames); mel distance {m['mel_distance']:.4f}; SI-SNR {m['si_snr_db']:.2f} dB; "
              f"{m['bitrate_kbps']:.2f} kbps; codebook perplexity {m['codebook_perplexity']}")
        print(f"  tones {s['tones_hz']} Hz -> error in cents {s['cents']}; silence {s['silence_dbfs']:.1f} dBFS; "
              f"largest DC offset {s['dc_offset']:.2e}")
    if len(args.checkpoint) == 2:
        new, base = (results[p] for p in args.checkpoint)
        comparison = {k: {"new": new[k], "baseline": base[k], "difference": new[k] - base[k]}
                      for k in ("pitch_class_agreement", "chroma_cqt_agreement", "mel_distance", "si_snr_db")}
        comparison["mel_distance"]["ratio"] = new["mel_distance"] / base["mel_distance"]
        results["comparison"] = comparison
        print("against the baseline: " + "; ".join(f"{k} {v['new']:.4g} vs {v['baseline']:.4g}"
                                                  for k, v in comparison.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
