"""Offline text tokenization for MuLan's text tower.

The project trains its own SentencePiece vocabulary from the training captions (no download): seqio's id
convention (pad 0, eos 1, unk 2, no bos), so the same file serves `seqio.SentencePieceVocabulary` in the input
pipeline and `TextTokenizer` in Python. A training run keeps the file with its checkpoint, at
MODEL_DIR/text_vocab/spm.model (`ensure_vocabulary` trains it there: the train job calls it through
MuLanModel.prepare_assets before reading any input).
An imported CLAP checkpoint instead carries transformers' RoBERTa tokenizer (tokenizer.json, read with the
`tokenizers` library of the `convert` extra).

    python -m musiclm_jax.mulan train-vocab --output DIR/spm.model [--audio_dir D | --musiccaps_dir D] [--vocab_size N]
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional, Sequence

import numpy as np

VOCAB_DIR = "text_vocab"
SPM_FILE = "spm.model"
HF_TOKENIZER_FILE = "tokenizer.json"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_sentencepiece(captions: Iterable[str], model_path: str, vocab_size: int) -> str:
    """Trains a unigram SentencePiece model on `captions` and writes it to model_path (a .model file).
    `vocab_size` is an upper bound: a small caption set gets fewer pieces."""
    import sentencepiece as spm
    captions = [c.strip() for c in captions if c and c.strip()]
    if not captions:
        raise ValueError(f"no captions to train the text vocabulary {model_path} on")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    prefix = model_path[:-len(".model")] if model_path.endswith(".model") else model_path
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_prefix=prefix + ".tmp",
                                   vocab_size=int(vocab_size), hard_vocab_limit=False, model_type="unigram",
                                   pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, character_coverage=1.0,
                                   num_threads=2, minloglevel=2)
    os.replace(prefix + ".tmp.model", prefix + ".model")
    os.remove(prefix + ".tmp.vocab")
    return prefix + ".model"


def captions_of(task_name: str, split: str = "train", max_captions: int = 100_000) -> list[str]:
    """Captions of a raw-audio task's split (the synthetic music's from its parameters, without rendering)."""
    from musiclm_jax.data import synthetic_music
    from musiclm_jax.data.dataset_config import RawAudioSource
    from musiclm_jax.tasks import audio as audio_tasks
    if RawAudioSource.from_task_name(task_name).kind == "synthetic_music":
        seed = list(audio_tasks.SYNTHETIC_CLIPS).index(split)
        count = min(max_captions, audio_tasks.SYNTHETIC_CLIPS[split])
        return [synthetic_music.clip_caption(i, seed) for i in range(count)]
    builder = audio_tasks.register_raw_audio_task(task_name).source.builder
    import tensorflow_datasets as tfds
    ds = builder.as_dataset(split=split, decoders={"audio": tfds.decode.SkipDecoding()})
    return [ex["caption"].decode() for ex in ds.take(max_captions).as_numpy_iterator() if ex["caption"]]


def vocabulary_path(model_dir: str) -> str:
    """Where a run keeps its caption vocabulary: MODEL_DIR/text_vocab/spm.model."""
    return os.path.join(model_dir, VOCAB_DIR, SPM_FILE)


def ensure_vocabulary(model_dir: str, source_task: str, vocab_size: int = 8000,
                      max_captions: int = 20_000) -> str:
    """MODEL_DIR/text_vocab/spm.model, trained on the captions of `source_task` if it does not exist yet (process
    0 trains it; the others wait). Returns the path."""
    import jax
    path = vocabulary_path(model_dir)
    if os.path.exists(path):
        return path
    if jax.process_index() == 0:
        start = time.time()
        captions = captions_of(source_task, "train", max_captions)
        train_sentencepiece(captions, path, vocab_size)
        print(f"text vocabulary: trained {path} on {len(captions)} captions of {source_task} "
              f"({time.time() - start:.1f} s)", file=sys.stderr)
    else:
        while not os.path.exists(path):
            time.sleep(1.0)
    return path


class TextTokenizer:
    """Captions -> (tokens [batch, length] int32, mask [batch, length] int32), truncated or padded with 0.

    `path`: a SentencePiece .model file, or a directory holding one (text_vocab/spm.model) or an imported
    checkpoint's tokenizer.json (RoBERTa BPE; its own padding id and <s> ... </s> framing)."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            for candidate in (os.path.join(path, SPM_FILE), os.path.join(path, VOCAB_DIR, SPM_FILE),
                              os.path.join(path, HF_TOKENIZER_FILE)):
                if os.path.exists(candidate):
                    path = candidate
                    break
        if path.endswith(".model") and os.path.exists(path):
            import sentencepiece as spm
            self._spm = spm.SentencePieceProcessor(model_file=path)
            self._hf = None
            self.pad_id = PAD_ID
            self.vocab_size = self._spm.get_piece_size()
        elif path.endswith(HF_TOKENIZER_FILE) and os.path.exists(path):
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ImportError(f"{path} is a transformers tokenizer: install the `convert` extra") from None
            self._hf, self._spm = Tokenizer.from_file(path), None
            self.pad_id = self._hf.token_to_id("<pad>") if self._hf.token_to_id("<pad>") is not None else 0
            self.vocab_size = self._hf.get_vocab_size()
        else:
            raise FileNotFoundError(f"{self.path}: no SentencePiece model ({SPM_FILE}) or {HF_TOKENIZER_FILE}")
        self.file = path

    def ids(self, text: str) -> list[int]:
        if self._spm is not None:
            return self._spm.encode(text)
        return self._hf.encode(text).ids

    def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (tokens, mask), each [len(texts), length] int32; longer captions are truncated."""
        tokens = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for row, text in enumerate(texts):
            ids = self.ids(text)[:length]
            tokens[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        return tokens, mask


def train_vocab_from_task(output: str, task: str, vocab_size: int, max_captions: Optional[int]) -> None:
    """Trains the SentencePiece vocabulary `output` (vocab_size pieces) on up to max_captions (default 100,000)
    captions of raw-audio task `task`'s train split (`python -m musiclm_jax.mulan train-vocab`)."""
    captions = captions_of(task, "train", max_captions or 100_000)
    path = train_sentencepiece(captions, output, vocab_size)
    print(f"text vocabulary: {path} from {len(captions)} captions of {task}", file=sys.stderr)
