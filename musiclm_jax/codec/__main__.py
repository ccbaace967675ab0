"""`python -m musiclm_jax.codec`: a file through the codec (musiclm_jax.codec.inference.Codec).

    python -m musiclm_jax.codec encode --checkpoint DIR --input a.wav --output codes.npy [--num_quantizers N |
        --bandwidth KBPS]
    python -m musiclm_jax.codec decode --checkpoint DIR --input codes.npy --output b.wav [--num_samples N]

DIR is a codec run directory. The input audio is mixed to mono and resampled to the codec's rate; codes.npy holds
int32 [frames, n_q].
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from musiclm_jax.codec.inference import Codec


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.codec", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="audio file -> codes.npy [frames, n_q]")
    dec = sub.add_parser("decode", help="codes.npy -> audio file")
    for p in (enc, dec):
        p.add_argument("--checkpoint", required=True, help="codec MODEL_DIR")
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
    dec.add_argument("--num_samples", type=int, default=None,
                     help="trim the decoded audio to this many samples (the encoded file's length)")
    levels = enc.add_mutually_exclusive_group()
    levels.add_argument("--num_quantizers", type=int, default=None, help="levels to keep (default all)")
    levels.add_argument("--bandwidth", type=float, default=None, help="kbit/s; picks the number of levels")
    args = parser.parse_args(argv)

    from musiclm_jax.data import audio_io
    codec = Codec.from_checkpoint(args.checkpoint)
    if args.command == "encode":
        audio = audio_io.load_audio(args.input, codec.sample_rate)
        n = args.num_quantizers
        if args.bandwidth is not None:
            n = codec.num_quantizers_for_bandwidth(args.bandwidth)
        codes = codec.encode(audio, n)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        np.save(args.output, codes.astype(np.int32))
        print(f"codec: {args.input} ({len(audio)} samples, {len(audio) / codec.sample_rate:.2f} s) -> "
              f"{args.output} {codes.shape} ({codec.bitrate_kbps(codes.shape[-1]):.2f} kbps); decode with "
              f"--num_samples {len(audio)} to trim back", file=sys.stderr)
    else:
        codes = np.load(args.input)
        if codes.ndim != 2:
            raise ValueError(f"{args.input}: expected codes [frames, n_q], got shape {codes.shape}")
        audio = codec.decode(codes)
        if args.num_samples is not None:
            if not 0 < args.num_samples <= len(audio):
                raise ValueError(f"--num_samples={args.num_samples}: the codes decode to {len(audio)} samples")
            audio = audio[:args.num_samples]
        audio_io.save_audio(args.output, audio, codec.sample_rate)
        print(f"codec: {args.input} {codes.shape} -> {args.output} ({len(audio) / codec.sample_rate:.2f} s)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
