"""Residual VQ: EMA against a hand computation, dead codes, quantizer dropout, decoding, data parallelism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import mesh
from musiclm_jax import partitioning
from musiclm_jax.networks.quantizers import STATE, ResidualVQ, RVQConfig


def _init(cfg, x):
    return ResidualVQ(cfg).init({"params": jax.random.key(0)}, x)


def _train(cfg, variables, x, seed=0):
    (q, codes, aux), updated = ResidualVQ(cfg).apply(variables, x, train=True, rng=jax.random.key(seed),
                                                     mutable=[STATE])
    return q, codes, aux, updated[STATE]


def test_ema_update_matches_a_hand_computation():
    cfg = RVQConfig(num_quantizers=1, codebook_size=3, dim=2, decay=0.9, epsilon=1e-5, kmeans_init=False,
                    dead_code_threshold=0.0, quantizer_dropout=False)
    x = jnp.array([[[0.0, 0.1], [1.0, 0.9], [1.1, 1.0], [-2.0, 0.0]]])
    codebook = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], np.float32)
    size = np.array([1.0, 2.0, 3.0], np.float32)
    total = np.array([[0.0, 0.0], [2.0, 2.0], [15.0, 15.0]], np.float32)
    variables = {STATE: {"codebook": codebook[None], "cluster_size": size[None], "embed_sum": total[None],
                         "initialized": np.ones((1,), np.float32)}}
    _, codes, _, state = _train(cfg, variables, x)
    np.testing.assert_array_equal(codes[0, :, 0], [0, 1, 1, 0])
    # By hand: counts (2, 2, 0); sums code0 = (0,.1)+(-2,0), code1 = (1,.9)+(1.1,1).
    counts = np.array([2.0, 2.0, 0.0])
    sums = np.array([[-2.0, 0.1], [2.1, 1.9], [0.0, 0.0]])
    new_size = 0.9 * size + 0.1 * counts
    new_total = 0.9 * total + 0.1 * sums
    n = new_size.sum()
    smoothed = (new_size + 1e-5) / (n + 3 * 1e-5) * n
    np.testing.assert_allclose(state["cluster_size"][0], new_size, rtol=1e-6)
    np.testing.assert_allclose(state["embed_sum"][0], new_total, rtol=1e-6)
    np.testing.assert_allclose(state["codebook"][0], new_total / smoothed[:, None], rtol=1e-5)


def test_dead_codes_are_replaced_by_batch_vectors():
    cfg = RVQConfig(num_quantizers=1, codebook_size=4, dim=2, decay=0.9, kmeans_init=False,
                    dead_code_threshold=1.0, quantizer_dropout=False)
    x = jax.random.normal(jax.random.key(1), (1, 16, 2))
    codebook = np.array([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0], [0.5, 0.5]], np.float32)
    size = np.array([10.0, 0.1, 0.1, 10.0], np.float32)  # codes 1 and 2 are dead (and far from the data)
    variables = {STATE: {"codebook": codebook[None], "cluster_size": size[None],
                         "embed_sum": (codebook * size[:, None])[None], "initialized": np.ones((1,), np.float32)}}
    _, _, _, state = _train(cfg, variables, x)
    rows = {tuple(np.round(r, 5)) for r in np.asarray(x[0])}
    for code in (1, 2):
        assert tuple(np.round(np.asarray(state["codebook"][0, code]), 5)) in rows
        assert float(state["cluster_size"][0, code]) == 1.0
    for code in (0, 3):  # live codes keep their EMA update
        assert tuple(np.round(np.asarray(state["codebook"][0, code]), 5)) not in rows


def test_quantizer_dropout_uses_and_updates_only_levels_below_n_q():
    cfg = RVQConfig(num_quantizers=6, codebook_size=8, dim=4, kmeans_init=False, dead_code_threshold=0.0,
                    quantizer_dropout=True)
    x = jax.random.normal(jax.random.key(2), (5, 7, 4))
    variables = _init(cfg, x)
    for seed in range(4):
        q, codes, aux, state = _train(cfg, variables, x, seed)
        n_q = np.asarray(aux["num_levels"])
        assert n_q.min() >= 1 and n_q.max() <= 6
        vq = ResidualVQ(cfg)
        for b in range(5):
            expected = vq.apply(variables, codes[b:b + 1, :, :n_q[b]], method=ResidualVQ.decode)
            np.testing.assert_allclose(q[b:b + 1], expected, atol=1e-5)
        # Levels no example reached keep their statistics exactly.
        for level in range(n_q.max(), 6):
            for key in ("codebook", "cluster_size", "embed_sum"):
                np.testing.assert_array_equal(state[key][level], variables[STATE][key][level])
        assert not np.array_equal(state["cluster_size"][0], variables[STATE]["cluster_size"][0])


def test_quantizer_dropout_is_a_probability_per_example():
    """DAC's setting: with probability p an example draws n_q uniformly in [1, N], else it uses all N; 1.0 is
    SoundStream's (every example), 0.0 none. p = 0.5 over 4 levels: P(n_q = 4) = 0.5 + 0.5 / 4."""
    x = jax.random.normal(jax.random.key(2), (4000, 1, 4))
    fractions = {}
    for p in (0.0, 0.5, 1.0):
        cfg = RVQConfig(num_quantizers=4, codebook_size=8, dim=4, kmeans_init=False, dead_code_threshold=0.0,
                        quantizer_dropout=p)
        n_q = np.asarray(_train(cfg, _init(cfg, x), x)[2]["num_levels"])
        fractions[p] = [float(np.mean(n_q == n)) for n in range(1, 5)]
    assert fractions[0.0] == [0.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(fractions[1.0], [0.25] * 4, atol=0.03)
    np.testing.assert_allclose(fractions[0.5], [0.125, 0.125, 0.125, 0.625], atol=0.03)
    # True (the earlier boolean setting) is 1.0, with the same draws.
    cfg = RVQConfig(num_quantizers=4, codebook_size=8, dim=4, kmeans_init=False, dead_code_threshold=0.0,
                    quantizer_dropout=True)
    assert [float(np.mean(np.asarray(_train(cfg, _init(cfg, x), x)[2]["num_levels"]) == n))
            for n in range(1, 5)] == fractions[1.0]
    with pytest.raises(ValueError, match="quantizer_dropout 1.5 must be a probability"):
        RVQConfig(quantizer_dropout=1.5)


def test_decoding_the_first_levels_sums_their_code_vectors():
    cfg = RVQConfig(num_quantizers=5, codebook_size=16, dim=3)
    x = jax.random.normal(jax.random.key(3), (2, 9, 3))
    variables = _init(cfg, x)
    vq = ResidualVQ(cfg)
    codes = vq.apply(variables, x, method=ResidualVQ.encode)
    codebook = np.asarray(variables[STATE]["codebook"])
    for n in (1, 3, 5):
        decoded = vq.apply(variables, codes[..., :n], method=ResidualVQ.decode)
        by_hand = sum(codebook[level][np.asarray(codes[..., level])] for level in range(n))
        np.testing.assert_allclose(decoded, by_hand, atol=1e-6)
        assert np.array_equal(vq.apply(variables, x, n, method=ResidualVQ.encode), codes[..., :n])


def test_kmeans_init_straight_through_and_commitment():
    cfg = RVQConfig(num_quantizers=2, codebook_size=4, dim=2, kmeans_init=True, kmeans_iters=10,
                    dead_code_threshold=0.0, quantizer_dropout=False)
    centers = np.array([[3.0, 3.0], [-3.0, 3.0], [3.0, -3.0], [-3.0, -3.0]])
    x = jnp.asarray((centers[np.arange(64) % 4] + 0.1 * np.random.RandomState(0).randn(64, 2))[None], jnp.float32)
    variables = _init(cfg, x)
    q, _, aux, state = _train(cfg, variables, x)
    assert np.all(state["initialized"] == 1)
    first_level = np.asarray(state["codebook"][0])
    assert max(np.min(np.linalg.norm(first_level - c, axis=1)) for c in centers) < 0.2  # k-means found them
    assert float(aux["commitment_loss"]) < 0.05
    weights = jax.random.normal(jax.random.key(4), x.shape)
    grad = jax.grad(lambda v: jnp.sum(ResidualVQ(cfg).apply(variables, v, train=True, rng=jax.random.key(0),
                                                          mutable=[STATE])[0][0] * weights))(x)
    np.testing.assert_allclose(grad, weights, atol=1e-6)  # straight-through


def test_ema_statistics_are_identical_on_a_2x4_mesh_and_one_device():
    cfg = RVQConfig(num_quantizers=3, codebook_size=16, dim=8, quantizer_dropout=True, dead_code_threshold=0.5)
    x = jax.random.normal(jax.random.key(5), (8, 12, 8))
    variables = _init(cfg, x)
    step = jax.jit(lambda v, x: _train(cfg, v, x, 7))
    single = step(variables, x)
    partitioner = partitioning.Partitioner(mesh(2, 4))
    with partitioner.activate():
        sharded_x = jax.device_put(x, partitioner.batch_sharding(3))
        assert sharded_x.sharding.shard_shape(x.shape) == (4, 12, 8)
        sharded = step(variables, sharded_x)
    for key in ("codebook", "cluster_size", "embed_sum"):
        np.testing.assert_allclose(sharded[3][key], single[3][key], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sharded[1], single[1])
