"""`python -m musiclm_jax.semantic`: a file's semantic tokens or layer features (musiclm_jax.semantic.inference).

    python -m musiclm_jax.semantic tokenize --checkpoint TOKENIZER_DIR --input a.wav --output tokens.npy [--dedupe]
    python -m musiclm_jax.semantic embed --checkpoint FEATURE_MODEL_DIR --layer L --input a.wav --output emb.npy
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from musiclm_jax.semantic.inference import FeatureExtractor, SemanticTokenizer, load_feature_model


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.semantic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenize", help="audio file -> tokens.npy [frames] int32")
    tok.add_argument("--checkpoint", required=True, help="TOKENIZER_DIR written by `fit`")
    tok.add_argument("--dedupe", action="store_true", help="remove consecutive duplicate tokens")
    emb = sub.add_parser("embed", help="audio file -> emb.npy [frames, dim] (raw layer features)")
    emb.add_argument("--checkpoint", required=True, help="feature model run directory (w2v-BERT, HuBERT, MERT)")
    emb.add_argument("--layer", type=int, required=True)
    for p in (tok, emb):
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    from musiclm_jax.data import audio_io
    if args.command == "tokenize":
        tokenizer = SemanticTokenizer.load(args.checkpoint)
        sample_rate = tokenizer.sample_rate
        audio = audio_io.load_audio(args.input, sample_rate)
        result = tokenizer.tokenize(audio, dedupe=args.dedupe).astype(np.int32)
    else:
        model, params = load_feature_model(args.checkpoint)
        extractor = FeatureExtractor(model, params, args.layer)
        sample_rate = extractor.sample_rate
        audio = audio_io.load_audio(args.input, sample_rate)
        result = extractor(audio[None])[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    np.save(args.output, result)
    print(f"semantic {args.command}: {args.input} ({len(audio) / sample_rate:.2f} s) -> {args.output} "
          f"{result.shape}", file=sys.stderr)


if __name__ == "__main__":
    main()
