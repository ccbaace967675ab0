"""Semantic tokens: a frozen feature model's layer clustered by k-means, and the feature models.

  inference.py       SemanticTokenizer, FeatureExtractor (params only)
  __main__.py        `python -m musiclm_jax.semantic tokenize|embed`
  kmeans.py          mini-batch and Lloyd k-means in JAX (the fit job: musiclm_jax.fit_semantic)
  w2v_bert_model.py  w2v-BERT pre-training on the common trainer
  hubert_model.py    an imported HuBERT / MERT as a frozen feature model

The public names are importable from here (SemanticTokenizer, FeatureExtractor); they are loaded on first use, so
importing one module of the folder does not import the others.
"""
from musiclm_jax.lazy_exports import lazy_getattr

_EXPORTS = {'SemanticTokenizer': 'inference', 'FeatureExtractor': 'inference'}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
