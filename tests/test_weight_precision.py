"""Decoding with narrow weights (musiclm_jax.weight_precision): which parameters narrow, the int8 rounding, and
greedy decoding and logits of a trained tiny stage against float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import adam_steps, init_params, random_batch, tiny_model
from musiclm_jax import weight_precision

GREEDY_TOKENS = 20  # tokens decoded greedily that must equal float32's, for each example


def _leaves_by_name(params):
    return {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(
                x, weight_precision.Int8Weight))[0]}


def test_only_kernels_and_embedding_tables_narrow():
    model = tiny_model(position_encoding="relative")
    params = init_params(model)
    floats = weight_precision.weight_bytes(params)
    for precision, kind in (("bfloat16", jnp.bfloat16), ("int8", weight_precision.Int8Weight)):
        narrow = _leaves_by_name(weight_precision.for_decoding(params, precision))
        for name, leaf in _leaves_by_name(params).items():
            narrowed = name.endswith(("['kernel']", "['embedding']"))
            assert narrowed == (narrow[name] is not leaf and not isinstance(narrow[name], np.ndarray)
                                and (isinstance(narrow[name], weight_precision.Int8Weight)
                                     or narrow[name].dtype == jnp.bfloat16)), name
            if narrowed:
                assert isinstance(narrow[name], weight_precision.Int8Weight) if kind is not jnp.bfloat16 else \
                    narrow[name].dtype == jnp.bfloat16
                assert narrow[name].shape == leaf.shape
            else:  # norms, the relative position bias: untouched float32
                assert narrow[name].dtype == jnp.float32
    assert any("rel" in name for name in _leaves_by_name(params))
    assert weight_precision.weight_bytes(weight_precision.for_decoding(params, "bfloat16")) < 0.55 * floats
    assert weight_precision.weight_bytes(weight_precision.for_decoding(params, "int8")) < 0.35 * floats
    assert weight_precision.for_decoding(params, "float32") is params
    with pytest.raises(ValueError, match="'fp8'"):
        weight_precision.for_decoding(params, "fp8")


def test_int8_rounds_to_the_nearest_step_of_each_slice():
    w = np.random.RandomState(0).randn(64, 3, 5).astype(np.float32) * np.array([1, 10, 0.01])[None, :, None]
    w[:, 0, 0] = 0.0  # an all-zero slice keeps scale 1 and values 0
    q = weight_precision.quantize_int8(w)
    assert q.values.dtype == np.int8 and q.scale.shape == (1, 3, 5)
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert np.all(err <= q.scale / 2 + 1e-7)
    np.testing.assert_array_equal(np.abs(q.values).max(0)[1:], 127)  # each slice uses the full range
    assert q.scale[0, 0, 0] == 1.0 and not q.values[:, 0, 0].any()


@pytest.fixture(scope="module")
def trained_tiny_stage():
    """A tiny stage (tied embeddings) trained to memorise 4 random sequences: its next tokens are clear."""
    model = tiny_model(target_length=GREEDY_TOKENS)
    batch = random_batch(model, 4, seed=1)
    params, _, history = adam_steps(model, init_params(model), {}, batch, steps=150, learning_rate=1e-2)
    assert float(history[-1]["cross_entropy"]) < 0.05  # learnt: the greedy tokens below are not near-ties
    return model, params, batch


@pytest.mark.parametrize("precision,logit_tolerance", [("bfloat16", 0.15), ("int8", 0.5)])
def test_narrow_decoding_equals_float32_greedy_on_a_trained_stage(trained_tiny_stage, precision, logit_tolerance):
    model, params, batch = trained_tiny_stage
    narrow = weight_precision.for_decoding(params, precision)
    prefix = jnp.asarray(batch["decoder_target_tokens"][:, :model.prefix_length])
    greedy = jax.jit(lambda p: model.predict_batch(p, {"prefix_tokens": prefix}, jax.random.key(0), temperature=0.0))
    reference = np.asarray(greedy(params))
    np.testing.assert_array_equal(reference, batch["decoder_target_tokens"][:, model.prefix_length:])  # memorised
    np.testing.assert_array_equal(np.asarray(greedy(narrow)), reference)  # all GREEDY_TOKENS of each example
    # Teacher-forced logits on the target range, which span about 21 (std 2.7): within the tolerance (observed
    # 0.095 for bfloat16, 0.34 for int8; mean errors 0.012 and 0.033).
    lo, hi = model.layout.id_range("semantic")
    full = np.asarray(model.logits(params, batch))[..., lo:hi]
    close = np.asarray(model.logits(narrow, batch))[..., lo:hi]
    assert np.ptp(full) > 10
    assert 0 < np.max(np.abs(close - full)) < logit_tolerance
    # The cost in cross-entropy on these tokens is small against the float32 figure.
    ce = lambda p: -float(jnp.sum(model.score_batch(p, batch))) / batch["decoder_loss_weights"].sum()
    assert abs(ce(narrow) - ce(params)) < 0.01


def test_kernel_weights_wrap_the_same_narrowed_leaves():
    """matvec='kernel' wraps exactly the leaves that narrow, in KernelWeight; int8 scales vary along the last axis
    only, so each 2-D view has one scale per column; an unknown matvec is an error."""
    params = init_params(tiny_model(position_encoding="relative"))
    is_leaf = lambda x: isinstance(x, (weight_precision.Int8Weight, weight_precision.KernelWeight))
    for precision in weight_precision.PRECISIONS:
        xla = _leaves_by_name(weight_precision.for_decoding(params, precision))
        kernel = dict((jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(
            weight_precision.for_decoding(params, precision, "kernel"), is_leaf=is_leaf)[0])
        assert kernel.keys() == xla.keys()
        for name, leaf in kernel.items():
            if not name.endswith(("['kernel']", "['embedding']")):
                assert not isinstance(leaf, weight_precision.KernelWeight), name
                continue
            assert isinstance(leaf, weight_precision.KernelWeight) and leaf.shape == xla[name].shape, name
            inner = leaf.weight
            assert type(inner) is type(xla[name]) or precision != "int8", name
            if isinstance(inner, weight_precision.Int8Weight):
                scale = np.asarray(inner.scale)
                assert scale.shape == (1,) + inner.shape[1:]
                np.testing.assert_array_equal(scale, np.broadcast_to(scale.reshape(-1)[-inner.shape[-1]:], scale.shape))
                err = np.abs(np.asarray(inner.dequantize()) - np.asarray(_leaves_by_name(params)[name]))
                assert np.all(err <= scale / 2 + 1e-7), name
    with pytest.raises(ValueError, match="'cuda'"):
        weight_precision.for_decoding(params, "int8", "cuda")


@pytest.mark.parametrize("precision", weight_precision.PRECISIONS)
def test_kernel_products_equal_the_dequantized_weights(trained_tiny_stage, precision):
    """Every kernel weight of a trained stage, through weight_precision.matmul with 1 and 3 rows (the kernel) and
    20 rows (XLA), both layouts (Dense kernels, the tied output projection): equal to x @ dequantized weight in
    float64 within float32 rounding."""
    _, params, _ = trained_tiny_stage
    wrapped = weight_precision.for_decoding(params, precision, "kernel")
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(
        wrapped, is_leaf=lambda x: isinstance(x, weight_precision.KernelWeight))
        if isinstance(leaf, weight_precision.KernelWeight)]
    assert len(leaves) > 5
    rng = np.random.RandomState(0)
    for leaf in leaves:
        inner = leaf.weight
        full = np.asarray(inner.dequantize() if isinstance(inner, weight_precision.Int8Weight)
                          else jnp.asarray(inner, jnp.float32), np.float64)
        for equation in (None, weight_precision.TIED_EQUATION):
            if equation is None:
                view = leaf.reshape((full.shape[0], -1))
                w2 = full.reshape(full.shape[0], -1)
            elif leaf.ndim == 2:
                view, w2 = leaf, full.T
            else:
                continue
            for rows in (1, 3, 20):
                x = rng.randn(rows, w2.shape[0]).astype(np.float32)
                y = np.asarray(jax.jit(lambda x: weight_precision.matmul(x, view, jnp.float32, equation))(x))
                reference = x.astype(np.float64) @ w2
                bound = np.abs(x.astype(np.float64)) @ np.abs(w2)
                # The kernel sums in float32; XLA's path (20 rows) rounds x to bfloat16 for narrow weights.
                tol = 2e-6 * w2.shape[0] ** 0.5 if rows <= 16 or precision == "float32" else 1e-2
                np.testing.assert_array_less(np.abs(y - reference), tol * bound + 1e-30)


@pytest.mark.parametrize("precision,logprob_tolerance", [("float32", 1e-5), ("bfloat16", 0.02), ("int8", 0.05)])
def test_kernel_decoding_equals_float32_greedy_on_a_trained_stage(trained_tiny_stage, precision, logprob_tolerance):
    """Greedy decoding with the CPU kernel (4 rows a step): all GREEDY_TOKENS of each example equal float32's with
    XLA, and the chosen tokens' log-probabilities are within the tolerance (float32: the kernel alone)."""
    model, params, batch = trained_tiny_stage
    prefix = jnp.asarray(batch["decoder_target_tokens"][:, :model.prefix_length])
    greedy = jax.jit(lambda p: model.predict_batch_with_aux(p, {"prefix_tokens": prefix}, jax.random.key(0),
                                                            temperature=0.0))
    tokens, aux = greedy(params)
    wrapped = weight_precision.for_decoding(params, precision, "kernel")
    assert "musiclm_matvec" in greedy.lower(wrapped).as_text()  # the decoding steps call the kernel
    kernel_tokens, kernel_aux = greedy(wrapped)
    np.testing.assert_array_equal(np.asarray(kernel_tokens), np.asarray(tokens))
    difference = np.max(np.abs(np.asarray(kernel_aux["logprobs"]) - np.asarray(aux["logprobs"])))
    print(f"{precision}: largest log-probability difference {difference:.2e}")
    assert difference < logprob_tolerance
