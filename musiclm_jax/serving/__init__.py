"""Serving: generation from an export bundle, and the model side of the HTTP server.

  bundle.py          load(bundle_dir) -> ServingModel (no gin, no checkpoints, no Flax models)
  generator.py       Generator: the loaded model behind admission control (musiclm_jax.serve)
  requests.py        what a request is and what its response body is

The public names are importable from here (load, ServingModel); they are loaded on first use, so
importing one module of the folder does not import the others.
"""
from musiclm_jax.lazy_exports import lazy_getattr

_EXPORTS = {'load': 'bundle', 'ServingModel': 'bundle'}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
