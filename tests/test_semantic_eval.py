"""Semantic evaluation's measures: plug-in entropy and mutual information, and the pairing of semantic frames with
5 Hz melody frames. (The evaluation through `python -m musiclm_jax.eval` is in test_semantic.py.)"""
import numpy as np
import pytest

from musiclm_jax.generation import melody
from musiclm_jax.evaluation.semantic_eval import (entropy_bits, held_out_information_bits, mutual_information_bits,
                                                  paired_frames)


def test_entropy_and_mutual_information_by_hand():
    assert entropy_bits(np.array([0, 1, 2, 3] * 5)) == pytest.approx(2.0)
    assert entropy_bits(np.array([7, 7, 7])) == 0.0
    x = np.array([0, 0, 1, 1, 2, 2, 3, 3] * 10)
    assert mutual_information_bits(x, x) == pytest.approx(2.0)
    assert mutual_information_bits(x, x // 2) == pytest.approx(1.0)  # y a function of x: I = H(y)
    assert mutual_information_bits(x, np.zeros_like(x)) == 0.0
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, 4, 200_000), rng.randint(0, 4, 200_000)
    assert mutual_information_bits(a, b) < 1e-3  # independent: only the small plug-in bias
    # A token that names the pitch class in 3 of 4 frames: I = H(M) - H(M|S) by hand.
    m = rng.randint(0, 12, 120_000)
    s = np.where(rng.rand(m.size) < 0.75, m, rng.randint(0, 12, m.size))
    p_same = 0.75 + 0.25 / 12
    h_given = -(p_same * np.log2(p_same) + 11 * (0.25 / 12) * np.log2(0.25 / 12))
    assert mutual_information_bits(s, m) == pytest.approx(np.log2(12) - h_given, abs=0.01)
    with pytest.raises(ValueError, match="non-empty arrays of one length"):
        mutual_information_bits(np.zeros(3), np.zeros(4))


def test_semantic_frames_pair_with_the_melody_frame_that_contains_them():
    semantic = np.arange(12)  # 25 Hz: frames 0-4 in melody frame 0, 5-9 in 1, 10-11 in 2 (past the last whole one)
    tokens = np.array([3, melody.NO_MELODY])
    sem, mel = paired_frames(semantic, tokens, semantic_rate=25.0)
    np.testing.assert_array_equal(sem, [0, 1, 2, 3, 4])  # melody frame 1 has no pitch; frames 10-11 have none
    np.testing.assert_array_equal(mel, [3] * 5)


def test_held_out_information_counts_only_what_carries_over_to_other_clips():
    rng = np.random.RandomState(0)
    labels = [rng.randint(0, 12, 400) for _ in range(8)]
    # A token that is the label: P(m | s) = (n_s + 6 P(m)) / (n_s + 6) on the other half, P(m) near 1/12.
    bits = held_out_information_bits(labels, labels)
    per_token = 4 * 400 / 12  # pairs per token in one half
    expected = np.log2((per_token + 0.5) / (per_token + 6) * 12)
    assert bits == pytest.approx(expected, abs=0.02)
    # Tokens that only tell clips apart carry nothing to the other half: a token unseen there scores 0 ...
    clip_ids = [np.full(400, i) for i in range(8)]
    skewed = [rng.choice([i % 12, (i + 5) % 12], 400) for i in range(8)]  # each clip its own two pitch classes
    assert held_out_information_bits(clip_ids, skewed) == pytest.approx(0.0, abs=1e-12)
    # ... and one shared by clips of different melodies scores below 0, although its plug-in MI is large.
    pairs_of_clips = [np.full(400, i // 2) for i in range(8)]
    assert mutual_information_bits(np.concatenate(pairs_of_clips), np.concatenate(skewed)) > 1.0
    assert held_out_information_bits(pairs_of_clips, skewed) < -1.0
    # A token right 3 times in 4: close to the plug-in value, less the smoothing.
    noisy = [np.where(rng.rand(400) < 0.75, m, rng.randint(0, 12, 400)) for m in labels]
    plug_in = mutual_information_bits(np.concatenate(noisy), np.concatenate(labels))
    assert plug_in - 0.1 < held_out_information_bits(noisy, labels) <= plug_in
    with pytest.raises(ValueError, match="at least two clips"):
        held_out_information_bits(labels[:1], labels[:1])
