"""The jaxpr FLOP count (musiclm_jax.flops) against hand counts: products, scans, grouped convolutions."""
import jax
import jax.numpy as jnp
import pytest

from musiclm_jax.flops import matmul_flops


def test_products_scans_and_convolutions_count_as_by_hand():
    a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert matmul_flops(lambda a, b: a @ b, a, b) == 2 * 4 * 8 * 16
    assert matmul_flops(jax.jit(jax.checkpoint(lambda a, b: a @ b)), a, b) == 2 * 4 * 8 * 16
    batched = jnp.ones((3, 4, 8))
    assert matmul_flops(lambda x, b: jnp.einsum("bij,jk->bik", x, b), batched, b) == 3 * 2 * 4 * 8 * 16

    def layers(x, w):  # 5 scanned layers: XLA's cost analysis would count one
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]
    assert matmul_flops(layers, jnp.ones((4, 16)), jnp.ones((16, 16))) == 5 * 2 * 4 * 16 * 16

    x = jnp.ones((2, 3, 100))  # [batch, channels, time]
    conv = lambda x, k, g: jax.lax.conv_general_dilated(x, k, (1,), "SAME", feature_group_count=g)  # noqa: E731
    assert matmul_flops(lambda x, k: conv(x, k, 1), x, jnp.ones((6, 3, 5))) == 2 * 2 * 6 * 100 * 3 * 5
    assert matmul_flops(lambda x, k: conv(x, k, 3), x, jnp.ones((6, 1, 5))) == 2 * 2 * 6 * 100 * 1 * 5
    assert matmul_flops(lambda x: jax.lax.cond(x.sum() > 0, lambda: x @ b, lambda: x @ b * 2), a) == 2 * 4 * 8 * 16


def test_a_while_loop_is_refused():
    with pytest.raises(ValueError, match="while loop"):
        matmul_flops(lambda x: jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]),
                                                  (0, x))[1], jnp.ones((4, 4)))
