"""What generation needs of each component: four small typed protocols (typing.Protocol, runtime-checkable).

Two families implement them and plug into generation.pipeline.MusicLM alike:
  - the inference classes, loaded from run directories (parameters only): codec.Codec,
    semantic.SemanticTokenizer, mulan.MuLan, generation.stage_sampling.Stage;
  - the served parts a bundle loads (serving.bundle: ServedCodec, ServedSemanticTokenizer, ServedMuLan,
    ServedStage), which run exported functions and import no Flax, gin or orbax.

Units: audio is float32 [batch, samples] at the component's `sample_rate` (Hz); tokens are int32. A protocol
states what MusicLM calls; the classes offer more (Codec.encode's num_quantizers, SemanticTokenizer.tokenize's
dedupe, MuLan.tokens_from_audio).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Codec(Protocol):
    """A neural audio codec with residual VQ codes."""

    sample_rate: int       # Hz of the audio
    hop_length: int        # samples per code frame
    num_quantizers: int    # RVQ levels of a frame
    codebook_size: int     # codes per level
    causal: bool           # True: a prefix of codes decodes to the whole's first samples

    @property
    def frame_rate(self) -> float:
        """Code frames per second (sample_rate / hop_length)."""

    def encode(self, audio) -> np.ndarray:
        """audio [batch, samples] -> codes [batch, ceil(samples / hop_length), num_quantizers] int32."""

    def decode(self, codes) -> np.ndarray:
        """codes [batch, frames, num_quantizers] -> audio [batch, frames * hop_length] float32."""


@runtime_checkable
class SemanticTokenizer(Protocol):
    """Audio -> semantic tokens (a feature model's layer, clustered)."""

    sample_rate: int       # Hz of the audio
    frame_rate: float      # tokens per second

    def tokenize(self, audio) -> np.ndarray:
        """audio [batch, samples] -> tokens [batch, frames] int32 at frame_rate."""


@runtime_checkable
class MuLan(Protocol):
    """A joint music-text embedding and its conditioning tokens."""

    sample_rate: int       # Hz of the audio embed_audio takes

    def embed_audio(self, audio) -> np.ndarray:
        """audio [batch, samples] -> unit-norm clip embeddings [batch, dim]."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """captions -> unit-norm embeddings [len(texts), dim]."""

    def tokens_from_text(self, texts: Sequence[str]) -> np.ndarray:
        """captions -> conditioning tokens [len(texts), levels] int32."""


@runtime_checkable
class Stage(Protocol):
    """One of the three Transformer stages, sampled window by window."""

    name: str              # 'semantic', 'coarse' or 'fine'
    model: object          # its TokenLMModel, or a StageSpec (layout, prefix/target groups and lengths)
    params: object         # the parameters sample() runs with

    def sample(self, prefix: np.ndarray, steps: int, prompt_length: int, keys, params, temperature: float
               ) -> np.ndarray:
        """prefix [batch, P] global token ids (conditioning, then prompt_length known targets) -> [batch, steps]
        sampled global ids; keys: one PRNG key per row; params: a generation.params.GenerationParams."""
