"""What a generation call takes and returns: GenerationParams (the sampling settings of one call, audiocraft's
`set_generation_params`), GenerationResult (the audio, tokens and reranking scores it made) and PromptError (a
continuation prompt that cannot be continued). Plain dataclasses, shared by pipeline.MusicLM, the served bundle
(serving) and the HTTP server."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """duration_s (seconds of audio); temperature per stage (semantic, coarse, fine; paper 1.0 / 0.95 / 0.4);
    top_k, top_p (0 / 1: off); guidance_scale (1: none); seed."""

    duration_s: float = 10.0
    temperature: tuple[float, float, float] = (1.0, 0.95, 0.4)
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0
    seed: int = 0


class PromptError(ValueError):
    """A continuation prompt that cannot be continued (too short, or not shorter than the duration asked)."""


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What one generation call made, returned to the caller (the MusicLM object keeps none of it).

    Attributes:
      audio: [B, samples] float32 at the codec's rate.
      tokens: {'mulan', 'melody' (or None), 'semantic' [B, frames], 'codes' [B, codec frames, levels]} of the
        kept samples.
      params: the generation settings used.
      scores: with reranking, [B, N] MuLan cosines of the N candidates per caption (else None).
      choice: with reranking, [B] the kept candidate (else None).
    """

    audio: np.ndarray
    tokens: dict
    params: GenerationParams
    scores: Optional[np.ndarray] = None
    choice: Optional[np.ndarray] = None
