"""Generation: the three stages sampled window by window and chained into text -> music.

  pipeline.py        MusicLM: generate, continuation, story, melody, rerank
  stage_sampling.py  Stage: one stage's model and parameters, sample_window
  params.py          GenerationParams, GenerationResult, PromptError
  decoding.py        jitted incremental sampling with a KV cache
  token_layout.py    how several token vocabularies share one embedding table
  melody.py          melody tokens (quantized chroma)

The public names are importable from here (MusicLM, GenerationParams, GenerationResult); they are loaded on first use, so
importing one module of the folder does not import the others.
"""
from musiclm_jax.lazy_exports import lazy_getattr

_EXPORTS = {'MusicLM': 'pipeline', 'GenerationParams': 'params', 'GenerationResult': 'params'}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
