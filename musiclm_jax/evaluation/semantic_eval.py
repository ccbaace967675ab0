"""Semantic-token evaluation: how much of the melody the semantic tokens carry.

Each held-out clip (the `split` files of an audio folder, or the embedded synthetic music's test clips; see
codec_eval.evaluation_clips) is tokenized by the semantic tokenizer, and its melody tokens (musiclm_jax.generation.melody,
5 Hz) are computed from the same audio. Semantic frame j (at the tokenizer's frame rate) is paired with the melody
frame that contains its start, floor(j * 5 / frame_rate); pairs whose melody frame has no pitch (NO_MELODY) and
frames past the last whole melody frame are left out. Over all pairs of all clips:

  melody_mutual_information_bits   I(semantic token; melody token), the plug-in estimate in bits
  melody_mi_shuffled_bits          the same with each clip's melody tokens taken from another clip (a cyclic
                                   shift of the clips): the estimate's bias floor for these marginals and counts
  melody_held_out_bits             the information that carries over to other clips: the clips are split in two
                                   (even and odd positions); P(melody | semantic token) is counted on one half
                                   (smoothed towards that half's P(melody) with 6 pseudo-counts) and scored on
                                   the other, against that P(melody), in bits per pair, averaged over both ways
                                   (held_out_information_bits). Unlike the plug-in figures it is not raised by
                                   tokens that only tell clips apart (e.g. by timbre): those score 0 or below
  chroma_cqt_mutual_information_bits, chroma_cqt_held_out_bits, chroma_cqt_entropy_bits, num_chroma_pairs
                                   the same against an independent pitch measure: the argmax of librosa's
                                   chroma_cqt on its clear frames (evaluation/pitch_metrics.chroma_cqt_classes),
                                   one frame per semantic frame (hop = samples per semantic frame)
  melody_entropy_bits              H(melody token) over the pitched pairs (the most any token can carry: log2 12 =
                                   3.58 bits for uniform pitch classes)
  semantic_entropy_bits            H(semantic token) over the same pairs
  num_pairs, num_examples, num_skipped

The plug-in estimate is biased upwards by about (|S| - 1)(|M| - 1) / (2 N ln 2) bits for N pairs; compare it with
the shuffled figure, not with 0.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from musiclm_jax.generation import melody
from musiclm_jax.evaluation import pitch_metrics
from musiclm_jax.evaluation.codec_eval import evaluation_batches


def entropy_bits(x: np.ndarray) -> float:
    """Plug-in entropy in bits of the discrete samples x [N]."""
    _, counts = np.unique(np.asarray(x), return_counts=True)
    p = counts / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def mutual_information_bits(x: np.ndarray, y: np.ndarray) -> float:
    """Plug-in estimate of I(X; Y) in bits from paired discrete samples x, y [N]: H(X) + H(Y) - H(X, Y)."""
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"mutual_information_bits needs two non-empty arrays of one length, got {x.shape}, {y.shape}")
    _, joint = np.unique(np.stack([x, y]), axis=1, return_inverse=True)
    return max(0.0, entropy_bits(x) + entropy_bits(y) - entropy_bits(joint.ravel()))


def held_out_information_bits(tokens: list, labels: list, num_labels: int = 12) -> float:
    """Bits per pair about the label that the token gives on clips it was not counted on (see the module
    docstring). tokens, labels: one [pairs] int array per clip, labels in 0..num_labels - 1. Needs 2 clips."""
    if len(tokens) < 2:
        raise ValueError("held_out_information_bits needs at least two clips")
    gain, count = 0.0, 0
    vocab = int(max(t.max(initial=0) for t in tokens)) + 1
    for fold in (0, 1):
        train = [i for i in range(len(tokens)) if i % 2 != fold]
        test = [i for i in range(len(tokens)) if i % 2 == fold]
        tok, lab = np.concatenate([tokens[i] for i in train]), np.concatenate([labels[i] for i in train])
        prior = np.bincount(lab, minlength=num_labels) + 0.5
        prior = prior / prior.sum()
        # Counts smoothed towards the prior (num_labels / 2 pseudo-counts): a token unseen in this half predicts
        # the prior and scores 0.
        table = np.zeros((vocab, num_labels)) + 0.5 * num_labels * prior
        np.add.at(table, (tok, lab), 1.0)
        table /= table.sum(axis=1, keepdims=True)
        tok, lab = np.concatenate([tokens[i] for i in test]), np.concatenate([labels[i] for i in test])
        gain += float(np.sum(np.log2(table[tok, lab]) - np.log2(prior[lab])))
        count += len(lab)
    return gain / max(count, 1)


def paired_frames(semantic: np.ndarray, melody_tokens: np.ndarray, semantic_rate: float,
                  melody_rate: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """(semantic tokens, melody tokens) of the pitched pairs of one clip (see the module docstring):
    semantic [frames], melody_tokens [melody frames] -> two [pairs] int arrays."""
    index = np.floor(np.arange(len(semantic)) * melody_rate / semantic_rate + 1e-9).astype(int)
    inside = index < len(melody_tokens)
    sem, mel = np.asarray(semantic)[inside], np.asarray(melody_tokens)[index[inside]]
    pitched = mel != melody.NO_MELODY
    return sem[pitched], mel[pitched]


def evaluate_semantic(checkpoint_dir: str, audio_dir: Optional[str] = None, split: str = "test",
                      max_examples: int = 64, clip_seconds: float = 4.0, batch_size: int = 8) -> dict:
    """Evaluates the semantic tokenizer of TOKENIZER_DIR `checkpoint_dir` (see the module docstring)."""
    from musiclm_jax.semantic.inference import SemanticTokenizer
    tokenizer = SemanticTokenizer.load(checkpoint_dir)
    rate = tokenizer.sample_rate
    sem_per_clip, mel_per_clip, chroma_pairs, skipped = [], [], [], {}
    hop = rate / tokenizer.frame_rate
    for batch, clips in evaluation_batches(audio_dir, split, rate, clip_seconds, max_examples, int(rate / 5),
                                           batch_size, skipped, "semantic eval"):
        tokens = tokenizer.tokenize(batch)
        for row, audio in enumerate(clips):
            frames = int(np.ceil(len(audio) / rate * tokenizer.frame_rate - 1e-9))
            sem_per_clip.append(tokens[row, :frames])
            mel_per_clip.append(melody.melody_tokens(audio[None], rate)[0])
            classes, clear = pitch_metrics.chroma_cqt_classes(audio, rate, int(round(hop)))
            n = min(frames, len(classes))
            chroma_pairs.append((sem_per_clip[-1][:n][clear[:n]], classes[:n][clear[:n]]))

    def pairs(shift: int):
        sem, mel = zip(*(paired_frames(s, mel_per_clip[(i + shift) % len(mel_per_clip)], tokenizer.frame_rate)
                         for i, s in enumerate(sem_per_clip)))
        return np.concatenate(sem), np.concatenate(mel)

    sem, mel = pairs(0) if sem_per_clip else (np.zeros(0), np.zeros(0))
    if sem.size == 0:
        raise ValueError(f"semantic eval: no pitched frame in {len(sem_per_clip)} clips (skipped: {skipped})")
    shuffled = pairs(1) if len(sem_per_clip) > 1 else (sem, np.zeros_like(mel))
    by_clip = [paired_frames(s, m, tokenizer.frame_rate) for s, m in zip(sem_per_clip, mel_per_clip)]
    chroma_sem, chroma_cls = (np.concatenate(x) for x in zip(*chroma_pairs))
    two = len(sem_per_clip) > 1
    return {
        "melody_held_out_bits": held_out_information_bits(*map(list, zip(*by_clip))) if two else float("nan"),
        "chroma_cqt_mutual_information_bits": mutual_information_bits(chroma_sem, chroma_cls)
        if chroma_sem.size else float("nan"),
        "chroma_cqt_held_out_bits": held_out_information_bits(*map(list, zip(*chroma_pairs)))
        if two and chroma_sem.size else float("nan"),
        "chroma_cqt_entropy_bits": entropy_bits(chroma_cls) if chroma_cls.size else float("nan"),
        "num_chroma_pairs": int(chroma_sem.size),
        "melody_mutual_information_bits": mutual_information_bits(sem, mel),
        "melody_mi_shuffled_bits": mutual_information_bits(*shuffled),
        "melody_entropy_bits": entropy_bits(mel),
        "semantic_entropy_bits": entropy_bits(sem),
        "num_pairs": int(sem.size),
        "num_examples": len(sem_per_clip),
        "num_skipped": int(sum(skipped.values())),
    }
