"""MuLan: joint music-text embeddings, their conditioning tokens and the caption vocabulary.

  inference.py       MuLan, ConditioningRVQ (params only)
  __main__.py        `python -m musiclm_jax.mulan embed-audio|embed-text|tokens|train-vocab`
  model.py           MuLanModel: contrastive training on the common trainer
  text_vocab.py      the caption SentencePiece vocabulary (trained by an explicit step)

The public names are importable from here (MuLan, ConditioningRVQ); they are loaded on first use, so
importing one module of the folder does not import the others.
"""
from musiclm_jax.lazy_exports import lazy_getattr

_EXPORTS = {'MuLan': 'inference', 'ConditioningRVQ': 'inference'}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
