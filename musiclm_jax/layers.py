"""Building blocks shared by the networks: dense (with and without bias), embedding, RMS and layer norms, the
imported models' activations, position encodings, attention, and the encoder block of the imported encoders
(BERT, HuBERT/MERT, the ViT audio tower).

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and every large
activation is constrained with logical names through `partitioning.constrain`, which refuses unknown names.
Parameters are stored in `param_dtype` (fp32 by default) and cast to the compute `dtype` (e.g. bf16) on use;
norms, softmax and logits are computed in fp32.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import weight_precision
from musiclm_jax.partitioning import constrain


DType = Any


def fan_in_normal(fan_in: int, scale: float = 1.0):
    """Normal initializer with stddev scale / sqrt(fan_in)."""
    return nn.initializers.normal(stddev=scale / math.sqrt(fan_in))


class DenseGeneral(nn.Module):
    """A bias-free dense layer contracting the trailing `num_contract` axes of x into `features`.

    The kernel has shape x.shape[-num_contract:] + features and logical names `kernel_axes`. The product is
    computed as one 2-D matmul on contiguous reshapes of x and the kernel (XLA's CPU backend runs 2-D matmuls
    far faster than multi-dimensional dot_generals; on TPU the reshapes are free, and the sharded dimension of
    a merged group must be its leading one, which holds for every layout used here: (heads, kv), (batch, length)).
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    num_contract: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        in_shape = tuple(x.shape[x.ndim - self.num_contract:])
        shape = in_shape + features
        if len(self.kernel_axes) != len(shape):
            raise ValueError(f"{self.name}: kernel_axes {tuple(self.kernel_axes)} do not match kernel shape {shape}")
        fan_in = int(np.prod(in_shape))
        kernel = self.param("kernel", nn.with_logical_partitioning(fan_in_normal(fan_in, self.init_scale),
                                                                   tuple(self.kernel_axes)),
                            shape, self.param_dtype)
        batch_shape = x.shape[:x.ndim - self.num_contract]
        if isinstance(kernel, weight_precision.Int8Weight):  # decoding weights (weight_precision.for_decoding)
            kernel = kernel.dequantize(jnp.bfloat16)  # (a KernelWeight reshapes its int8 values and scale itself)
        y = weight_precision.matmul(x.reshape((-1, fan_in)), kernel.reshape((fan_in, -1)), self.dtype)
        return y.reshape(batch_shape + features)


class Dense(DenseGeneral):
    """DenseGeneral plus a bias (torch nn.Linear): params 'kernel' and 'bias' with logical `bias_axes`."""

    bias_axes: Sequence[str] = ()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.bias_axes)),
                          tuple(self.features), self.param_dtype)
        return y + bias.astype(self.dtype)


def layer_norm(name: str, epsilon: float) -> nn.LayerNorm:
    """torch nn.LayerNorm as imported models need it: fp32, exact variance, 'scale' and 'bias' on logical 'norm'."""
    return nn.LayerNorm(name=name, epsilon=epsilon, dtype=jnp.float32, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


# The activations of imported (transformers) models, by their config names.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU()
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class Embed(nn.Module):
    """Token embedding table [vocab, embed] with logical names ('vocab', 'embed')."""

    num_embeddings: int
    features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [...] int32 -> embeddings [..., features] in `dtype`."""
        table = self.embedding
        if isinstance(table, weight_precision.KernelWeight):  # the kernel runs products; a lookup reads the table
            table = table.weight
        if isinstance(table, weight_precision.Int8Weight):  # int8 rows scaled per feature
            return (jnp.take(table.values, tokens, axis=0).astype(jnp.float32) * table.scale[0]).astype(self.dtype)
        return jnp.take(table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (tied output projection): x [..., features] -> [..., vocab]."""
        return weight_precision.matmul(x, self.embedding, self.dtype, weight_precision.TIED_EQUATION)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (T5): computed in fp32, scale with logical name ('norm',)."""

    epsilon: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


# ------------------------------------------------------------------------------------------------ convolutions


def pad_time(x: jax.Array, left: int, right: int, mode: str = "constant") -> jax.Array:
    """Pads x [batch, time, channels] along time. mode 'reflect' (as torch: edge not repeated) or 'constant'.

    Reflect padding of a signal shorter than the padding first appends zeros (EnCodec's rule), so any length works.
    """
    if left == 0 and right == 0:
        return x
    if mode == "constant":
        return jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    if mode != "reflect":
        raise ValueError(f"pad mode {mode!r}: expected 'reflect' or 'constant'")
    length = x.shape[1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    padded = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
    return padded[:, :padded.shape[1] - extra]


def conv_padding(length: int, kernel_size: int, stride: int, dilation: int, causal: bool) -> tuple[int, int]:
    """(left, right) padding of a 1-D convolution so that it produces ceil(length / stride) frames.

    As EnCodec/SEANet: the total padding is effective_kernel - stride, all on the left if causal (no output
    depends on a later input), split with the extra sample on the left otherwise; extra right padding
    completes the last frame. Integer arithmetic only, so `length` may be a symbolic dimension (jax.export).
    """
    effective = (kernel_size - 1) * dilation + 1
    total = effective - stride
    frames = -((effective - total - length) // stride)  # ceil((length - effective + total) / stride)
    extra = frames * stride + effective - total - length
    if causal:
        return total, extra
    right = total // 2
    return total - right, right + extra


def grouped_conv1d(x: jax.Array, kernel: jax.Array, stride: int, dilation: int, groups: int) -> jax.Array:
    """VALID grouped 1-D convolution as batched matmuls.

    x [batch, time, in], kernel [width, in / groups, out] -> [batch, frames, out]; equal to
    lax.conv_general_dilated(..., feature_group_count=groups), which XLA's CPU backend runs 3-100x slower for
    the wide grouped kernels of the MelGAN discriminator. Undilated: polyphase form, the input cut into
    stride-long phases and the kernel into ceil(width / stride) blocks, one group-batched matmul per block.
    Dilated: the windows gathered once (im2col), one matmul.
    """
    width, in_per_group, out = kernel.shape
    batch, time, channels = x.shape
    frames = (time - (width - 1) * dilation - 1) // stride + 1
    out_per_group = out // groups
    if dilation == 1:
        blocks = -(-width // stride)
        need = (frames - 1 + blocks) * stride
        phases = jnp.pad(x, ((0, 0), (0, max(0, need - time)), (0, 0)))[:, :need]
        phases = phases.reshape(batch, need // stride, stride, groups, in_per_group)
        phases = jnp.transpose(phases, (3, 0, 1, 2, 4)).reshape(groups, batch, need // stride, stride * in_per_group)
        blocks_w = jnp.pad(kernel, ((0, blocks * stride - width), (0, 0), (0, 0)))
        blocks_w = blocks_w.reshape(blocks, stride, in_per_group, groups, out_per_group)
        blocks_w = jnp.transpose(blocks_w, (0, 3, 1, 2, 4)).reshape(blocks, groups, stride * in_per_group,
                                                                      out_per_group)
        y = sum(jnp.einsum("gbtc,gco->gbto", phases[:, :, m:m + frames], blocks_w[m]) for m in range(blocks))
        return jnp.transpose(y, (1, 2, 0, 3)).reshape(batch, frames, out)
    span = (frames - 1) * stride + 1
    windows = jnp.stack([x[:, j * dilation:j * dilation + span:stride] for j in range(width)], axis=2)
    windows = windows.reshape(batch, frames, width, groups, in_per_group)
    y = jnp.einsum("btkgc,kcgo->btgo", windows, kernel.reshape(width, in_per_group, groups, out_per_group))
    return y.reshape(batch, frames, out)


def conv_kernel(module: nn.Module, shape: Sequence[int], names: Sequence[str], weight_norm: bool, gain_axis: int,
                param_dtype: DType = jnp.float32, init=None) -> jax.Array:
    """A convolution kernel of `shape` created on `module` (call from its compact __call__).

    Plain: the param 'kernel'. Weight-normalised (torch's weight_norm): params 'kernel_v' of `shape` and 'kernel_g'
    [shape[gain_axis]] (logical name names[gain_axis]), kernel = g * v / ||v|| with the norm over every axis but
    gain_axis; g starts at ||v||. Default init: fan-in truncated normal over all axes but the last.
    """
    if init is None:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
    if not weight_norm:
        return module.param("kernel", nn.with_logical_partitioning(init, tuple(names)), tuple(shape), param_dtype)
    norm_axes = tuple(a for a in range(len(shape)) if a != gain_axis)

    def norm(v):
        return jnp.sqrt(jnp.sum(jnp.square(v), axis=norm_axes, keepdims=True))

    v = module.param("kernel_v", nn.with_logical_partitioning(init, tuple(names)), tuple(shape), param_dtype)
    g = module.param("kernel_g", nn.with_logical_partitioning(
        lambda key, s, d: norm(v).reshape(s).astype(d), (names[gain_axis],)), (shape[gain_axis],), param_dtype)
    return v * (g.reshape(norm(v).shape) / norm(v))


class Conv1D(nn.Module):
    """1-D convolution over x [batch, time, channels] with SEANet padding and optional weight normalisation.

    Attributes:
      features, kernel_size, stride, dilation, groups: as usual.
      causal: pad only on the left (output t never depends on input > t).
      pad_mode: 'reflect' or 'constant'.
      weight_norm: kernel = g * v / ||v|| with the norm over (width, in) per output channel (params 'kernel_v',
        'kernel_g'), as torch.nn.utils.weight_norm; else a plain 'kernel'.
      padding: 'seanet' (conv_padding above) or 'valid'.
    Kernel logical names ('conv_width', 'conv_in', 'conv_out'), shape [kernel_size, in/groups, features].
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    causal: bool = True
    pad_mode: str = "constant"
    weight_norm: bool = False
    use_bias: bool = True
    padding: str = "seanet"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels do not split into {self.groups} groups")
        shape = (self.kernel_size, in_features // self.groups, self.features)
        kernel = conv_kernel(self, shape, ("conv_width", "conv_in", "conv_out"), self.weight_norm, gain_axis=2,
                             param_dtype=self.param_dtype)
        if self.padding == "seanet":
            left, right = conv_padding(x.shape[1], self.kernel_size, self.stride, self.dilation, self.causal)
            x = pad_time(x, left, right, self.pad_mode)
        elif self.padding != "valid":
            raise ValueError(f"{self.name}: padding={self.padding!r}: expected 'seanet' or 'valid'")
        if self.groups > 1:
            y = grouped_conv1d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.dilation,
                               self.groups)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride,), padding="VALID",
                rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def transposed_conv1d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Transposed 1-D convolution (torch ConvTranspose1d, no padding) as one matmul plus overlap-add.

    x [batch, time, in], kernel [width, in, out] -> [batch, (time - 1) * stride + width, out]. Input frame t adds
    x[t] @ kernel[j] at output t * stride + j; with the kernel cut into ceil(width / stride) blocks of `stride`
    taps this is a matmul and a few shifted sums. (XLA's CPU backend runs the equivalent input-dilated
    convolution 10-60x slower.)
    """
    width, channels, out = kernel.shape
    batch, time, _ = x.shape
    blocks = -(-width // stride)
    padded = jnp.pad(kernel, ((0, blocks * stride - width), (0, 0), (0, 0)))
    weights = jnp.transpose(padded.reshape(blocks, stride, channels, out), (2, 0, 1, 3)).reshape(channels, -1)
    proj = (x.reshape(batch * time, channels) @ weights).reshape(batch, time, blocks, stride, out)
    y = jnp.zeros((batch, time + blocks - 1, stride, out), proj.dtype)
    for m in range(blocks):
        y = y.at[:, m:m + time].add(proj[:, :, m])
    return y.reshape(batch, (time + blocks - 1) * stride, out)[:, :(time - 1) * stride + width]


class ConvTranspose1D(nn.Module):
    """Transposed 1-D convolution over x [batch, time, channels] (torch ConvTranspose1d semantics), then trimmed
    as SEANet: the kernel_size - stride extra samples are cut on the right if causal, else split.

    Output length: time * stride. Kernel [kernel_size, in, features], logical names as Conv1D; `weight_norm`
    normalises over (width, out) per input channel, as torch's weight_norm on ConvTranspose1d.
    """

    features: int
    kernel_size: int
    stride: int = 1
    causal: bool = True
    weight_norm: bool = False
    use_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, x.shape[-1], self.features)
        # torch's ConvTranspose1d weight is [in, out, width] and weight_norm's dim=0 keeps one gain per input channel.
        kernel = conv_kernel(self, shape, ("conv_width", "conv_in", "conv_out"), self.weight_norm, gain_axis=1,
                             param_dtype=self.param_dtype)
        k = self.kernel_size
        y = transposed_conv1d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        total = k - self.stride
        right = total if self.causal else total // 2
        return y[:, total - right:y.shape[1] - right]


class LSTM(nn.Module):
    """A stack of LSTM layers over x [batch, time, features] (torch.nn.LSTM semantics: gates i, f, g, o;
    one bias per layer holding torch's b_ih + b_hh), returning the last layer's outputs [batch, time, hidden].

    Params per layer 'layer_{l}': kernel_ih [in, 4 * hidden] ('lstm_in', 'lstm_gates'), kernel_hh [hidden,
    4 * hidden] ('lstm_in', 'lstm_gates'), bias [4 * hidden] ('lstm_gates',).
    """

    hidden: int
    num_layers: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.hidden
        for layer in range(self.num_layers):
            scope = f"layer_{layer}"
            init = nn.initializers.uniform(scale=2.0 / math.sqrt(h))
            shifted = lambda key, shape, dtype, init=init: init(key, shape, dtype) - 1.0 / math.sqrt(h)  # noqa: E731
            w_ih = self.param(f"{scope}_kernel_ih", nn.with_logical_partitioning(shifted, ("lstm_in", "lstm_gates")),
                              (x.shape[-1], 4 * h), self.param_dtype)
            w_hh = self.param(f"{scope}_kernel_hh", nn.with_logical_partitioning(shifted, ("lstm_in", "lstm_gates")),
                              (h, 4 * h), self.param_dtype)
            bias = self.param(f"{scope}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("lstm_gates",)),
                              (4 * h,), self.param_dtype)
            inputs = jnp.einsum("btf,fg->tbg", x.astype(self.dtype), w_ih.astype(self.dtype)) + bias

            def step(carry, gates_x, w_hh=w_hh):
                hidden, cell = carry
                gates = gates_x + hidden @ w_hh.astype(self.dtype)
                i, f, g, o = jnp.split(gates, 4, axis=-1)
                cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
                hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
                return (hidden, cell), hidden

            zeros = jnp.zeros((x.shape[0], h), self.dtype)
            _, outputs = jax.lax.scan(step, (zeros, zeros), inputs)
            x = jnp.transpose(outputs, (1, 0, 2))
        return x


# ------------------------------------------------------------------------------------------ position encodings


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucketing of (key position - query position) into `num_buckets` ids.

    Distances below num_buckets/2 (per direction) get a bucket each; larger ones share log-spaced buckets up
    to `max_distance`, beyond which everything falls in the last bucket.
    """
    buckets = jnp.zeros_like(relative_position)
    distance = -relative_position  # > 0 when the key lies before the query
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (distance < 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    max_exact = num_buckets // 2
    is_exact = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_exact, distance, large)


class CausalBlockBias(NamedTuple):
    """A relative position bias for causal attention split into query blocks, kept as its table and bucket ids
    so that each layer gathers its own copy (dot_product_attention, `bias=`).

    The bias of block i is table[:, buckets[i]]: [1, heads, q_i, k_i]. Gathered per layer, the gradient of
    each layer's block is scattered into the table on its own; a bias computed once and shared by the layers
    instead has one gradient fusion reading every layer's and block's logits gradient at once (24 arrays for
    6 layers and 4 blocks), which XLA's CPU backend runs at a fraction of the memory bandwidth (~10% of the
    peer configuration's training step; README, Benchmarks).

    table: [heads, num_buckets + 1] fp32, the last column MASK_VALUE (the causal mask);
    buckets: per block, [q_i, k_i] int32 ids into the table's columns.
    """
    table: jax.Array
    buckets: tuple

    def block(self, i: int) -> jax.Array:
        return jnp.take(self.table, self.buckets[i], axis=1)[None]


class RelativePositionBias(nn.Module):
    """T5 relative position bias: a learned scalar per (bucket, head), shared by all layers.

    Called: bias [1, heads, q_len, k_len] for query positions [q_len] and key positions [k_len], or
    [batch, heads, q_len, k_len] for per-example positions [batch, q_len] and [batch, k_len].
    `causal_blocks(ranges)`: the causal bias of the query blocks [(start, end)] over `end` keys each, as a
    CausalBlockBias (the same values as the call's, causally masked and sliced per block).
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self):
        self.table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        relative = key_positions[..., None, :] - query_positions[..., :, None]  # [(batch,) q, k]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = jnp.take(self.table, buckets, axis=0)  # [(batch,) q, k, heads]
        if bias.ndim == 3:
            return jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)
        return jnp.transpose(bias, (0, 3, 1, 2)).astype(jnp.float32)

    def causal_blocks(self, ranges: Sequence[tuple[int, int]]) -> CausalBlockBias:
        table = jnp.concatenate([jnp.transpose(self.table).astype(jnp.float32),
                                 jnp.full((self.num_heads, 1), MASK_VALUE, jnp.float32)], axis=1)
        buckets = []
        for start, end in ranges:
            queries = jnp.arange(start, end, dtype=jnp.int32)[:, None]
            keys = jnp.arange(end, dtype=jnp.int32)[None, :]
            ids = relative_position_bucket(keys - queries, self.bidirectional, self.num_buckets, self.max_distance)
            buckets.append(jnp.where(keys <= queries, ids, self.num_buckets))
        return CausalBlockBias(table, tuple(buckets))


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary position embedding on x [batch, length, heads, head_dim] at positions [batch, length]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, l, 1, half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# -------------------------------------------------------------------------------------------------- attention

MASK_VALUE = -1e10


def _grouped_query(query: jax.Array, kv_heads: int) -> jax.Array:
    """[b, q, heads, d] -> [b, q, kv_heads, group, d]; query head h = kv_head * group + g."""
    b, q, h, d = query.shape
    return query.reshape(b, q, kv_heads, h // kv_heads, d)


@jax.custom_vjp
def _add_batch_shared(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """logits [batch, ...] + bias [1, ...] (the same shape otherwise). The bias gradient sums the batch slices
    with elementwise adds: XLA's CPU backend streams those at memory speed, while the reduction over the major
    axis that autodiff gives runs at a few hundred MB/s (README, Benchmarks). Batches over 16 use the reduction:
    one fused add per example would read too many arrays at once."""
    return logits + bias


def _add_batch_shared_fwd(logits, bias):
    return logits + bias, None


def _add_batch_shared_bwd(_, grad):
    if grad.shape[0] > 16:
        return grad, jnp.sum(grad, axis=0, keepdims=True)
    total = grad[:1]
    for i in range(1, grad.shape[0]):
        total = total + grad[i:i + 1]
    return grad, total


_add_batch_shared.defvjp(_add_batch_shared_fwd, _add_batch_shared_bwd)


def add_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """logits + bias, where bias broadcasts to logits; a bias shared by the batch ([1, ...], the same shape
    otherwise) gets its gradient through _add_batch_shared."""
    if bias.ndim == logits.ndim and bias.shape[0] == 1 and bias.shape[1:] == logits.shape[1:]:
        return _add_batch_shared(logits, bias)
    return logits + bias


def _masked_softmax(logits: jax.Array, bias: Optional[jax.Array], mask: Optional[jax.Array]) -> jax.Array:
    """softmax(logits + bias) over the last axis, with mask-False positions given no weight (fp32)."""
    if bias is not None:
        logits = add_bias(logits, bias)
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def _attend(query, key, value, bias, mask, dropout_rate, dropout_rng, dtype):
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    query = (query * (1.0 / math.sqrt(head_dim))).astype(dtype)
    if kv_heads == heads:  # multi-head: the 4-D form, which XLA's CPU backend runs fastest
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key.astype(dtype), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("bqkgd,bskd->bkgqs", _grouped_query(query, kv_heads), key.astype(dtype),
                            preferred_element_type=jnp.float32).reshape(batch, heads, q_len, key.shape[1])
    weights = _masked_softmax(logits, bias, mask)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(dtype)
    if kv_heads == heads:
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(dtype))
    weights = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, key.shape[1])
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, value.astype(dtype))
    return out.reshape(batch, q_len, heads, head_dim)


def _slice_qk(x: Optional[jax.Array], q_start: int, q_end: int, k_end: int) -> Optional[jax.Array]:
    if x is None:
        return None
    return x[..., q_start if x.shape[-2] > 1 else 0:q_end if x.shape[-2] > 1 else 1, :k_end]


def causal_query_block_ranges(length: int, blocks: int) -> Optional[list[tuple[int, int]]]:
    """The query blocks [(start, end)] that dot_product_attention splits causal attention over `length` tokens
    into (block i attends to keys [0, end_i)), or None where it does not split (blocks <= 1, or fewer than two
    tokens per block)."""
    if blocks <= 1 or length < 2 * blocks:
        return None
    block = -(-length // blocks)
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def split_causal_bias(bias: Optional[jax.Array], ranges: Optional[Sequence[tuple[int, int]]]):
    """bias [..., length, length] -> a tuple of the per-block slices [..., end_i - start_i, end_i] of the query
    blocks `ranges` (causal_query_block_ranges) that dot_product_attention reads; unchanged without blocks.

    Slice once, before the layers, when every layer shares one bias (a per-example relative bias, or the causal
    mask alone): the layers then read their blocks without slicing, and a bias gradient sums the layers' block
    gradients on the blocks' shapes before one pad per block, where slicing per layer pads every layer's every
    block to the full [heads, length, length]."""
    if bias is None or ranges is None:
        return bias
    return tuple(_slice_qk(bias, start, end, end) for start, end in ranges)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, bias,
                          mask: Optional[jax.Array], dropout_rate: float = 0.0,
                          dropout_rng: Optional[jax.Array] = None, dtype: DType = jnp.float32,
                          causal_query_blocks: int = 1) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      query: [batch, q_len, heads, head_dim]; key, value: [batch, k_len, kv_heads, head_dim], where kv_heads
        divides heads (grouped-query attention; kv_heads == heads is multi-head attention).
      bias: added to the logits, broadcastable to [batch, heads, q_len, k_len] (relative position bias and,
        folded in, a -1e10 mask); or, with causal_query_blocks, the tuple split_causal_bias returns or a
        CausalBlockBias (RelativePositionBias.causal_blocks).
      mask: bool, broadcastable to [batch, heads, q_len, k_len]; False positions get no weight.
      causal_query_blocks: if > 1, the attention is known to be causal with q_len == k_len: queries are split
        into this many blocks (causal_query_block_ranges) and block i attends only to keys up to its last
        query, skipping the masked upper triangle (about 40% of the score and value FLOPs for 4 blocks). The
        result is the same.
    Returns:
      [batch, q_len, heads, head_dim] in `dtype`. Logits and softmax are computed in fp32.
    """
    length = query.shape[1]
    ranges = causal_query_block_ranges(length, causal_query_blocks) if length == key.shape[1] else None
    if isinstance(bias, CausalBlockBias):  # (a NamedTuple: tested before the plain tuple)
        block_biases = [bias.block(i) for i in range(len(bias.buckets))]
    elif isinstance(bias, tuple):
        block_biases = list(bias)
    else:
        block_biases = None
    if block_biases is not None and (ranges is None or len(block_biases) != len(ranges)):
        raise ValueError(f"bias is split into {len(block_biases)} query blocks, but this attention over {length} "
                         f"queries and {key.shape[1]} keys with causal_query_blocks={causal_query_blocks} uses "
                         f"{0 if ranges is None else len(ranges)}")
    if ranges is None:
        return _attend(query, key, value, bias, mask, dropout_rate, dropout_rng, dtype)
    outputs = []
    for i, (start, end) in enumerate(ranges):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        block_bias = _slice_qk(bias, start, end, end) if block_biases is None else block_biases[i]
        outputs.append(_attend(query[:, start:end], key[:, :end], value[:, :end], block_bias,
                               _slice_qk(mask, start, end, end), dropout_rate, rng, dtype))
    return jnp.concatenate(outputs, axis=1)


def cached_attention(query: jax.Array, cached_keys: jax.Array, cached_values: jax.Array, *,
                     bias: Optional[jax.Array], mask: Optional[jax.Array], dtype: DType = jnp.float32) -> jax.Array:
    """Attention of new queries over a KV cache that already holds their own keys (decoding; no dropout).

    Args:
      query: [batch, q_len, heads, head_dim].
      cached_keys, cached_values: [batch * kv_heads, capacity, head_dim], or [capacity, head_dim] when
        batch * kv_heads is 1.
      bias, mask: as in dot_product_attention, over [batch, heads, q_len, capacity]; slots not yet written
        must be masked (the causal mask does it).
    Returns:
      [batch, q_len, heads, head_dim].
    """
    batch, q_len, heads, head_dim = query.shape
    rows = 1 if cached_keys.ndim == 2 else cached_keys.shape[0]
    kv_heads = rows // batch
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    # [b, q, kv, g, d] -> [b * kv, g * q, d]: one matmul per (example, kv head) covers its query group.
    q = jnp.transpose(_grouped_query(query * scale, kv_heads), (0, 2, 3, 1, 4))
    q = q.reshape(rows, group * q_len, head_dim).astype(dtype)
    keys, values = cached_keys.astype(dtype), cached_values.astype(dtype)
    if cached_keys.ndim == 2:
        logits = jnp.einsum("md,kd->mk", q[0], keys, preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("nmd,nkd->nmk", q, keys, preferred_element_type=jnp.float32)
    weights = _masked_softmax(logits.reshape(batch, heads, q_len, -1), bias, mask)
    weights = weights.reshape(rows, group * q_len, -1).astype(dtype)
    if cached_keys.ndim == 2:
        out = jnp.einsum("mk,kd->md", weights[0], values)
    else:
        out = jnp.einsum("nmk,nkd->nmd", weights, values)
    out = out.reshape(batch, kv_heads, group, q_len, head_dim)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, heads, head_dim)


def encoder_block(x: jax.Array, *, heads: int, head_dim: int, mlp_dim: int, activation: str, epsilon: float,
                  pre_norm: bool, dtype: DType, mask: Optional[jax.Array] = None,
                  norm_names: tuple[str, str] = ("attention_norm", "output_norm"),
                  mlp_names: tuple[str, str] = ("intermediate", "output")) -> jax.Array:
    """One transformer encoder layer as torch's encoders write it (biased projections, layer norms), created in
    the calling module: call it from an `nn.compact` method, whose scope holds the parameters.

    x [batch, length, hidden] -> same. Pre-norm: x + attention(LN1(x)), then + MLP(LN2(...)); post-norm
    (BERT, HuBERT): LN1(x + attention(x)), then LN2(... + MLP(...)). Parameters: Dense 'query', 'key', 'value'
    ([hidden, heads, head_dim]), 'attention_out', the two norms `norm_names` and the MLP `mlp_names`
    ([hidden, mlp_dim], [mlp_dim, hidden]). mask: [batch, heads or 1, length, length] bool (True: attend), or
    None. activation: a key of ACTIVATIONS.
    """
    hidden = x.shape[-1]
    heads_layout = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

    def attention(h):
        q, k, v = (constrain(Dense((heads, head_dim), ("embed", "heads", "kv"), bias_axes=("heads", "kv"),
                                   dtype=dtype, name=n)(h), heads_layout) for n in ("query", "key", "value"))
        h = dot_product_attention(q, k, v, bias=None, mask=mask, dtype=dtype)
        return Dense((hidden,), ("heads", "kv", "embed"), num_contract=2, bias_axes=("embed",), dtype=dtype,
                     name="attention_out")(h)

    def feed_forward(h):
        h = Dense((mlp_dim,), ("embed", "mlp"), bias_axes=("mlp",), dtype=dtype, name=mlp_names[0])(h)
        h = constrain(ACTIVATIONS[activation](h), ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((hidden,), ("mlp", "embed"), bias_axes=("embed",), dtype=dtype, name=mlp_names[1])(h)

    first, second = (layer_norm(name, epsilon) for name in norm_names)
    if pre_norm:
        x = x + attention(first(x).astype(dtype))
        x = x + feed_forward(second(x).astype(dtype))
    else:
        x = first(x + attention(x.astype(dtype)))
        x = second(x + feed_forward(x.astype(dtype)))
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))
