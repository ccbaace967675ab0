"""Weights held in a narrower precision for decoding: bfloat16, or int8 weight-only with a float32 scale.

At batch 1 a decoding step reads every weight once and does little else, so its time is the weight bytes over the
memory bandwidth (`benchmarks/lm_sample.py` prints that bound). Holding the matrices in 2 or 1 bytes instead of 4
raises the bound 2x or 4x. `for_decoding(params, precision)` converts a stage's parameters once, at load time:

* 'float32': unchanged.
* 'bfloat16': every dense kernel and embedding table ([leaf named 'kernel' or 'embedding', at least 2-D) is
  stored in bfloat16. A matmul then takes bfloat16 operands and accumulates in float32 (`matmul`), the way
  TPUs and GPUs run bf16 inference; norms, attention softmax, position biases and the sampling distribution stay
  float32 (they are computed from float32 activations by the modules as before).
* 'int8': the same matrices as int8 values with one float32 scale per slice along the first axis
  (max |w| / 127 over axis 0, symmetric, round to nearest), `Int8Weight`. A matmul dequantizes to bfloat16
  operands (values * scale) and accumulates in float32. Embedding rows are looked up in int8 and scaled in
  float32.

Where the int8 dequantization runs (fused into the matmul that reads the weight, or hoisted out of the decoding
loop) is XLA's choice per backend. On this project's 2-core CPU the narrow options decode at about float32's
speed (`benchmarks/lm_sample.py`): the float32 step already runs below the bandwidth bound for other reasons.
The layers accept all three forms (`layers.DenseGeneral`, `layers.Embed`); training never produces them.

`for_decoding(params, precision, matvec='kernel')` also wraps each of those weights in a `KernelWeight`: a product
with at most `kernels.matvec.MAX_ROWS` rows of activations (a decoding step) then runs in this project's CPU
matrix-vector kernel (`musiclm_jax.kernels.matvec`), which reads the weight at its own width on every core; larger
products (a prompt's prefill), and any backend but the CPU, take the XLA path above. MATVECS names the choices.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("float32", "bfloat16", "int8")
MATVECS = ("xla", "kernel")  # who runs a decoding step's matrix-vector products
# Parameter names of the matrices that are narrowed: DenseGeneral/Dense kernels and Embed tables.
NARROWED_NAMES = ("kernel", "embedding")


@flax.struct.dataclass
class Int8Weight:
    """A weight as int8 `values` (the weight's shape) and float32 `scale` [1, *shape[1:]]: w ~= values * scale."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """values * scale in `dtype` (the product is formed in float32)."""
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


@flax.struct.dataclass
class KernelWeight:
    """A decoding weight (a float32 or bfloat16 array, or an Int8Weight) whose matrix-vector products run in the CPU
    kernel (`musiclm_jax.kernels.matvec`). `weight` is the wrapped weight, in its original shape; an Int8Weight's
    scale here varies along the last axis only (quantize_int8(per_last_axis=True)), so it is one scale per column
    of every 2-D view and the kernel applies it to the output."""

    weight: Any

    @property
    def shape(self) -> tuple:
        return tuple(self.weight.shape)

    @property
    def ndim(self) -> int:
        return len(self.weight.shape)

    def reshape(self, shape: tuple) -> "KernelWeight":
        """The weight as the 2-D `shape` [rows, columns] (an Int8Weight's scale becomes [1, columns])."""
        inner = self.weight
        if isinstance(inner, Int8Weight):
            values = inner.values.reshape(shape)
            scale = jnp.broadcast_to(inner.scale, inner.values.shape).reshape(values.shape)[:1]
            inner = Int8Weight(values=values, scale=scale)
        else:
            inner = inner.reshape(shape)
        return KernelWeight(weight=inner)


def quantize_int8(weight: np.ndarray, per_last_axis: bool = False) -> Int8Weight:
    """weight [d0, ...] float -> Int8Weight with scale max |w| / 127 over axis 0 (1.0 where a slice is all zero);
    per_last_axis: over every axis but the last instead (scale [1, ..., 1, d_last]), so the scale is one per column
    of any 2-D view [prod(leading axes), rest] of the weight, as the CPU kernel needs."""
    weight = np.asarray(weight, np.float32)
    axes = tuple(range(weight.ndim - 1)) if per_last_axis else (0,)
    scale = np.max(np.abs(weight), axis=axes, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    values = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    if per_last_axis:  # stored as [1, *shape[1:]] like any Int8Weight's scale
        scale = np.broadcast_to(scale, (1,) + weight.shape[1:]).copy()
    return Int8Weight(values=values, scale=scale)


def is_narrow(weight: Any) -> bool:
    """True for an Int8Weight or a bfloat16 array (a weight converted by for_decoding)."""
    if isinstance(weight, KernelWeight):
        weight = weight.weight
    return isinstance(weight, Int8Weight) or jnp.dtype(weight.dtype) == jnp.bfloat16


def as_operand(weight: Any, dtype) -> jax.Array:
    """The weight as a matmul operand: an Int8Weight dequantized to bfloat16, a bfloat16 array as it is, any
    other array cast to `dtype` (the module's compute dtype, as layers always did)."""
    if isinstance(weight, KernelWeight):
        weight = weight.weight
    if isinstance(weight, Int8Weight):
        return weight.dequantize(jnp.bfloat16)
    if jnp.dtype(weight.dtype) == jnp.bfloat16:
        return weight
    return weight.astype(dtype)


def matmul(x: jax.Array, weight: Any, dtype, equation: Optional[str] = None) -> jax.Array:
    """x [m, k] @ weight [k, n] -> [m, n] in `dtype`, or jnp.einsum(equation, x, weight) when an equation is given
    (the tied output projection's '...e,ve->...v'). A narrow weight (bfloat16 or Int8Weight) multiplies a
    bfloat16 copy of x with float32 accumulation; other weights are cast to `dtype` with x, as before."""
    if isinstance(weight, KernelWeight):
        return _kernel_matmul(x, weight, dtype, equation)
    product = jnp.dot if equation is None else functools.partial(jnp.einsum, equation)
    if is_narrow(weight):
        return product(x.astype(jnp.bfloat16), as_operand(weight, dtype),
                       preferred_element_type=jnp.float32).astype(dtype)
    return product(x.astype(dtype), weight.astype(dtype))


# The tied output projection (Embed.attend): x [..., e] against the table [v, e].
TIED_EQUATION = "...e,ve->...v"


def _kernel_matmul(x: jax.Array, weight: KernelWeight, dtype, equation: Optional[str]) -> jax.Array:
    """matmul for a KernelWeight: the CPU kernel when x has at most MAX_ROWS rows, else the XLA path."""
    from musiclm_jax.kernels import matvec
    inner = weight.weight
    rows = int(np.prod(x.shape[:-1]))
    if equation not in (None, TIED_EQUATION):
        raise ValueError(f"KernelWeight: no kernel for the product {equation!r}")
    if rows > matvec.MAX_ROWS:
        return matmul(x, inner, dtype, equation)
    values = inner.values if isinstance(inner, Int8Weight) else inner
    x2 = x.reshape((rows, x.shape[-1])).astype(jnp.float32)
    if equation is None:  # w [k, n], an int8 scale per column n: applied to the output
        def on_cpu(x2):
            y = matvec.matvec(x2, values)
            return y * inner.scale if isinstance(inner, Int8Weight) else y
        out_shape = x.shape[:-1] + (values.shape[1],)
    else:  # table [v, e], an int8 scale per feature e: applied to x
        def on_cpu(x2):
            return matvec.matvec(x2 * inner.scale if isinstance(inner, Int8Weight) else x2, values, transposed=True)
        out_shape = x.shape[:-1] + (values.shape[0],)

    def elsewhere(x2):
        return matmul(x2, inner, jnp.float32, equation)

    y = jax.lax.platform_dependent(x2, cpu=on_cpu, default=elsewhere)
    return y.reshape(out_shape).astype(dtype)


def _narrow(path, leaf, precision: str, matvec: str):
    name = getattr(path[-1], "key", None) if path else None
    if name not in NARROWED_NAMES or np.ndim(leaf) < 2 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        return leaf
    if precision == "bfloat16":
        leaf = jnp.asarray(leaf, jnp.bfloat16)
    elif precision == "int8":
        leaf = quantize_int8(np.asarray(jax.device_get(leaf)), per_last_axis=matvec == "kernel")
    return KernelWeight(weight=leaf) if matvec == "kernel" else leaf


def for_decoding(params: Any, precision: str, matvec: str = "xla") -> Any:
    """params (a stage's parameter tree, plain arrays) with its kernels and embedding tables held in `precision`
    ('float32': returned as they are), and with matvec='kernel' wrapped in KernelWeight (the CPU kernel runs the
    decoding steps' products). Raises ValueError for an unknown precision or matvec."""
    if precision not in PRECISIONS:
        raise ValueError(f"decode weights {precision!r}: expected one of {PRECISIONS}")
    if matvec not in MATVECS:
        raise ValueError(f"decode matvec {matvec!r}: expected one of {MATVECS}")
    if precision == "float32" and matvec == "xla":
        return params
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _narrow(path, leaf, precision, matvec), params)


def weight_bytes(params: Any) -> int:
    """Bytes of every array in params (Int8Weight counts its values and scales)."""
    return int(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape))
                   for leaf in jax.tree_util.tree_leaves(params)))
