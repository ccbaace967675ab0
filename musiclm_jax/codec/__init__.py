"""The codec: its inference class and command line, its trainable models and losses.

  inference.py       Codec (encode / decode), loaded from a run directory (params only)
  __main__.py        `python -m musiclm_jax.codec encode|decode`
  model.py           CodecModel: the SoundStream GAN on the common trainer
  spectral_model.py  SpectralCodecModel: the spectral codec the demo trains
  losses.py          adversarial, feature-matching and multi-scale mel losses
  quantizers.py      the residual VQ with EMA codebooks (Flax; arithmetic in musiclm_jax.vq)

The public names are importable from here (Codec); they are loaded on first use, so
importing one module of the folder does not import the others.
"""
from musiclm_jax.lazy_exports import lazy_getattr

_EXPORTS = {'Codec': 'inference'}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
