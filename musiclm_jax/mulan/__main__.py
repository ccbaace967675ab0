"""`python -m musiclm_jax.mulan`: a file's or a caption's MuLan embedding or tokens (musiclm_jax.mulan.inference),
and the caption vocabulary's training step (musiclm_jax.mulan.text_vocab).

    python -m musiclm_jax.mulan embed-audio --checkpoint DIR --input a.wav --output e.npy
    python -m musiclm_jax.mulan embed-text --checkpoint DIR --text "..." [--text "..."] --output e.npy
    python -m musiclm_jax.mulan tokens --checkpoint DIR (--input a.wav | --text "...") --output t.npy
    python -m musiclm_jax.mulan train-vocab --output DIR/text_vocab/spm.model [--audio_dir D] [--vocab_size N]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from musiclm_jax.mulan.inference import MuLan


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.mulan", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("embed-audio", "embed-text", "tokens"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--output", required=True)
        if name != "embed-text":
            p.add_argument("--input", help="audio file")
        if name != "embed-audio":
            p.add_argument("--text", action="append", help="a caption (repeatable)")
    vocab = sub.add_parser("train-vocab", help="train the caption SentencePiece model")
    vocab.add_argument("--output", required=True)
    vocab.add_argument("--audio_dir", default=None)
    vocab.add_argument("--musiccaps_dir", default=None)
    vocab.add_argument("--vocab_size", type=int, default=8000)
    vocab.add_argument("--max_captions", type=int, default=None)
    args = parser.parse_args(argv)

    if args.command == "train-vocab":
        from musiclm_jax.mulan import text_vocab
        from musiclm_jax.data.dataset_config import raw_audio_task_name
        task = raw_audio_task_name(16000, args.audio_dir, args.musiccaps_dir)
        text_vocab.train_vocab_from_task(args.output, task, args.vocab_size, args.max_captions)
        return
    mulan = MuLan.from_checkpoint(args.checkpoint)
    if args.command == "tokens" and bool(args.input) == bool(args.text):
        parser.error("tokens: give --input (audio) or --text, not both")
    if args.command in ("embed-audio", "tokens") and args.input:
        from musiclm_jax.data import audio_io
        audio = audio_io.load_audio(args.input, mulan.sample_rate)
        result = mulan.embed_audio(audio) if args.command == "embed-audio" else mulan.tokens_from_audio(audio)[0]
        what = f"{args.input} ({len(audio) / mulan.sample_rate:.2f} s)"
    else:
        if not args.text:
            parser.error(f"{args.command}: give --text")
        result = mulan.embed_text(args.text) if args.command == "embed-text" else mulan.tokens_from_text(args.text)
        what = f"{len(args.text)} caption(s)"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    np.save(args.output, result)
    print(f"mulan {args.command}: {what} -> {args.output} {result.shape}", file=sys.stderr)


if __name__ == "__main__":
    main()
