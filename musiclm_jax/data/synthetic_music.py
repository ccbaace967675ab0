"""Procedural music with captions: the embedded default dataset of the tiny configs (pure numpy).

`generate_clip` draws a clip's parameters, renders the clip and captions it from the same parameters, so each
caption word names something audible; `clip_caption` gives the caption alone and `split_of` the clip's split
(8 / 1 / 1 of every 10 indices for train / validation / test).

Clips are a pure function of (index, seed, seconds, sample_rate): `generate_clip` seeds PCG64 generators from
(seed, index). Once the caches are warm a 10 s clip at 24 kHz renders in ~15 ms on one CPU core (the first clip
of a process, filling the caches, in ~70 ms).

Parameters and captions: music_params.py; composition: music_score.py; sound: music_synthesis.py.
"""
from __future__ import annotations

import numpy as np

from musiclm_jax.data.music_params import aspects, caption, sample_params
from musiclm_jax.data.music_synthesis import render

SPLIT_FRACTIONS = (("train", 8), ("validation", 1), ("test", 1))  # tenths of every block of 10 indices


def generate_clip(index: int, seed: int = 0, seconds: float = 10.0, sample_rate: int = 24000) -> dict:
    """Clip `index` of the stream `seed`: {'audio': float32 [round(seconds * sample_rate)] (peak <= 1),
    'caption': str, 'aspects': list[str], 'params': MusicParams, 'id': 'synthetic-{seed}-{index}'}.

    A pure function of its arguments: parameters and rendering draw from PCG64 generators seeded with
    (seed, index), separately, so the parameters of a clip do not depend on seconds or sample_rate."""
    params = sample_params(np.random.default_rng([seed, index, 0]))
    audio = render(params, seconds, sample_rate, np.random.default_rng([seed, index, 1]))
    return {"audio": audio, "caption": caption(params), "aspects": aspects(params), "params": params,
            "id": f"synthetic-{seed}-{index}"}


def clip_caption(index: int, seed: int = 0) -> str:
    """The caption of generate_clip(index, seed) without rendering the audio (same parameters)."""
    return caption(sample_params(np.random.default_rng([seed, index, 0])))


def split_of(index: int, seed: int = 0) -> str:
    """'train', 'validation' or 'test' for clip `index` of stream `seed`: exactly 8 / 1 / 1 of every block of
    10 consecutive indices, assigned by a permutation seeded with (seed, block)."""
    block, position = divmod(int(index), 10)
    slot = int(np.random.default_rng([seed, block, 7]).permutation(10)[position])
    for name, tenths in SPLIT_FRACTIONS:
        if slot < tenths:
            return name
        slot -= tenths
    raise AssertionError("unreachable")
