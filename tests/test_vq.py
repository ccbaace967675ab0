"""vq.py, the one nearest-code and residual-VQ implementation, against brute-force numpy."""
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import vq


def test_nearest_code_and_residual_vq_match_brute_force():
    rng = np.random.RandomState(0)
    codebooks = rng.randn(3, 16, 8).astype(np.float32)
    x = rng.randn(5, 7, 8).astype(np.float32)
    codes = np.asarray(vq.rvq_encode(jnp.asarray(x), jnp.asarray(codebooks)))
    assert codes.shape == (5, 7, 3) and codes.dtype == np.int32
    residual = x.reshape(-1, 8).astype(np.float64)
    for level in range(3):
        want = np.argmin(((residual[:, None] - codebooks[level][None]) ** 2).sum(-1), axis=1)
        np.testing.assert_array_equal(codes.reshape(-1, 3)[:, level], want)
        residual = residual - codebooks[level][want]
    decoded = np.asarray(vq.rvq_decode(jnp.asarray(codes), jnp.asarray(codebooks)))
    np.testing.assert_allclose(decoded.reshape(-1, 8), x.reshape(-1, 8) - residual, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(vq.rvq_encode(jnp.asarray(x), jnp.asarray(codebooks), 2)),
                                  codes[..., :2])  # fewer levels: a prefix
    with pytest.raises(ValueError, match="num_levels=4: the residual VQ has 3 levels"):
        vq.rvq_encode(jnp.asarray(x), jnp.asarray(codebooks), 4)


def test_distances_are_clamped_and_ties_go_to_the_lowest_code():
    codebook = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1e4]])
    ids, d = vq.nearest_code_and_distance(jnp.asarray([[1.0, 0.0], [1e4, 1e4]]), codebook)
    assert ids.tolist() == [0, 2] and float(d[0]) == 0.0
    assert float(jnp.min(vq.squared_distances(jnp.asarray([[1e4, 1e4]]), jnp.asarray([[1e4, 1e4]])))) >= 0.0
