"""The CPU matrix-vector kernel (musiclm_jax.kernels.matvec): its products against numpy in float64, every weight
width and both layouts, odd sizes (masked lanes, k not a multiple of 4), one or two threads, inside a scan; and
the errors it raises."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.kernels import matvec


def _weight(rng, shape, dtype):
    w = rng.randn(*shape)
    if dtype == jnp.int8:
        return jnp.asarray(np.clip(np.rint(w * 40), -127, 127), jnp.int8)
    return jnp.asarray(w, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
@pytest.mark.parametrize("transposed", [False, True])
def test_products_equal_numpy(dtype, transposed):
    rng = np.random.RandomState(0)
    for rows, k, n, threads in ((1, 512, 2048, 0), (3, 37, 21, 2), (16, 130, 67, 1), (2, 5, 1, 2)):
        w = _weight(rng, (n, k) if transposed else (k, n), dtype)
        x = jnp.asarray(rng.randn(rows, k), jnp.float32)
        y = jax.jit(lambda x, w: matvec.matvec(x, w, transposed=transposed, threads=threads))(x, w)
        w64 = np.asarray(w.astype(jnp.float32), np.float64)
        reference = np.asarray(x, np.float64) @ (w64.T if transposed else w64)
        assert y.shape == (rows, n) and y.dtype == jnp.float32
        # float32 sums of k terms: relative to the sum of |terms|, within a few float32 roundings per term.
        scale = np.abs(np.asarray(x, np.float64)) @ np.abs(w64.T if transposed else w64)
        np.testing.assert_array_less(np.abs(np.asarray(y) - reference), 1e-6 * k ** 0.5 * scale + 1e-30,
                                     err_msg=f"{rows}x{k} @ {k}x{n}, threads {threads}")


def test_a_scan_of_products_equals_xla():
    """The kernel in a lax.scan (as in the decoding loop), its weight a loop constant: equal to XLA's dot."""
    rng = np.random.RandomState(1)
    w = jnp.asarray(rng.randn(64, 64) / 8, jnp.bfloat16)

    def run(product):
        return jax.jit(lambda x: jax.lax.scan(lambda h, _: (jnp.tanh(product(h)), None), x, None, length=50)[0])

    x = jnp.asarray(rng.randn(2, 64), jnp.float32)
    ours = run(lambda h: matvec.matvec(h, w))(x)
    xla = run(lambda h: jnp.dot(h, w.astype(jnp.float32), precision="highest"))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=2e-5)


def test_bad_inputs_are_errors_naming_the_problem():
    x = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="at most 16"):
        matvec.matvec(jnp.ones((17, 8)), jnp.ones((8, 4)))
    with pytest.raises(ValueError, match="does not contract"):
        matvec.matvec(x, jnp.ones((4, 8)))
    with pytest.raises(ValueError, match="float16"):
        matvec.matvec(x, jnp.ones((8, 4), jnp.float16))
    with pytest.raises(ValueError, match="2-D"):
        matvec.matvec(x, jnp.ones((8, 4, 2)))


def test_a_missing_compiler_is_an_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("MUSICLM_JAX_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no-such-compiler-xyz"):
        matvec.library_path()
