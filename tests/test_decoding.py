"""Sampling: filters against numpy references, per-example RNG, vocabulary ranges, sharded decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params, mesh, random_batch, tiny_model
from musiclm_jax import partitioning
from musiclm_jax.generation import decoding
from musiclm_jax.generation.token_layout import TokenLayout


def _np_top_k(logits, k):
    out = np.full_like(logits, decoding.NEG_INF)
    for i, row in enumerate(logits):
        keep = np.argsort(-row)[:k]
        out[i, keep] = row[keep]
    return out


def _np_top_p(logits, p):
    out = np.full_like(logits, decoding.NEG_INF)
    for i, row in enumerate(logits):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep = order[before < p]
        out[i, keep] = row[keep]
    return out


def test_top_k_and_top_p_match_numpy():
    logits = np.random.RandomState(0).randn(5, 50).astype(np.float32) * 3
    for k in (1, 5, 17):
        np.testing.assert_array_equal(decoding.filter_top_k(jnp.asarray(logits), k), _np_top_k(logits, k))
    for p in (0.05, 0.5, 0.9):
        np.testing.assert_array_equal(decoding.filter_top_p(jnp.asarray(logits), p), _np_top_p(logits, p))
    np.testing.assert_array_equal(decoding.filter_top_k(jnp.asarray(logits), 0), logits)
    np.testing.assert_array_equal(decoding.filter_top_p(jnp.asarray(logits), 1.0), logits)
    # Traced settings (jitted arguments), alone and together, filter as the static ones do.
    logits[0, :3] = logits[0].max()  # ties at the top
    traced_k = jax.jit(decoding.filter_top_k)
    traced_p = jax.jit(decoding.filter_top_p)
    both = jax.jit(decoding._filtered)
    for k, p in [(0, 1.0), (1, 1.0), (5, 1.0), (50, 1.0), (0, 0.5), (17, 0.9), (3, 0.05), (-1, 0.9)]:
        static = decoding.filter_top_p(decoding.filter_top_k(jnp.asarray(logits), k), p)
        np.testing.assert_array_equal(traced_k(jnp.asarray(logits), k), decoding.filter_top_k(jnp.asarray(logits), k))
        np.testing.assert_array_equal(traced_p(jnp.asarray(logits), p), decoding.filter_top_p(jnp.asarray(logits), p))
        np.testing.assert_array_equal(both(jnp.asarray(logits), k, p), static, err_msg=f"{k} {p}")


def test_sampling_follows_the_filtered_softmax():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.jit(jax.vmap(lambda k: decoding.sample_logits(logits, k[None], temperature=1.0, top_k=3)[0]))
    freq = np.bincount(np.asarray(draw(keys)), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)
    # temperature 2 flattens: p_i proportional to sqrt(p_i)
    draw_t = jax.jit(jax.vmap(lambda k: decoding.sample_logits(logits, k[None], temperature=2.0)[0]))
    freq_t = np.bincount(np.asarray(draw_t(keys)), minlength=4) / 20000
    expected = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(freq_t, expected / expected.sum(), atol=0.015)


def test_per_example_rng_does_not_depend_on_the_batch():
    model = tiny_model()
    params = init_params(model)
    prefix = random_batch(model, 3)["decoder_target_tokens"][:, :model.prefix_length]
    keys = jax.random.split(jax.random.key(7), 3)
    predict = jax.jit(lambda p, x, k: model.predict_batch(p, {"prefix_tokens": x}, k, top_k=20, top_p=0.95))
    together = predict(params, prefix, keys)
    alone = predict(params, prefix[1:2], keys[1:2])
    np.testing.assert_array_equal(together[1:2], alone)
    # Different keys give different samples; the same key the same ones.
    again = predict(params, prefix, keys)
    np.testing.assert_array_equal(together, again)
    other = predict(params, prefix, jax.random.split(jax.random.key(8), 3))
    assert not np.array_equal(together, other)


def test_samples_cycle_through_the_target_levels():
    # A coarse-like stage: 4 codec levels of 16 codes, frame-major.
    layout = TokenLayout.from_tuples((("mulan", 12, 8), ("coarse", 4, 16)))
    model = tiny_model(layout=layout, target_group="coarse", prefix_length=12, target_length=16)
    params = init_params(model)
    prefix = layout.to_global(np.random.RandomState(0).randint(0, 8, (2, 12)), "mulan")
    for first_level in (0, 3):
        tokens = model.predict_batch(params, {"prefix_tokens": jnp.asarray(prefix)}, jax.random.key(0),
                                     numdecode_steps=9, prompt_target_length=0) if first_level == 0 else \
            model.predict_batch(params, {"prefix_tokens": jnp.concatenate(
                [jnp.asarray(prefix), jnp.asarray(layout.to_global(np.zeros((2, 3), np.int32), "coarse"))], 1)},
                jax.random.key(0), numdecode_steps=9, prompt_target_length=3)
        ranges = layout.level_ranges("coarse")
        for t in range(9):
            low, high = ranges[(first_level + t) % 4]
            assert np.all((tokens[:, t] >= low) & (tokens[:, t] < high)), (first_level, t)
        codes = layout.to_local(np.asarray(tokens), "coarse", first_level=first_level)
        assert codes.min() >= 0 and codes.max() < 16


def test_decoding_sharded_on_a_mesh_equals_one_device():
    model = tiny_model(num_heads=4)
    params = init_params(model)
    prefix = jnp.asarray(random_batch(model, 4)["decoder_target_tokens"][:, :model.prefix_length])
    keys = jax.random.split(jax.random.key(3), 4)

    def predict(p, x, k):
        return model.predict_batch_with_aux(p, {"prefix_tokens": x}, k, temperature=0.9, top_k=10)

    single = jax.jit(predict)(params, prefix, keys)
    partitioner = partitioning.Partitioner(mesh(2, 4))
    abstract = model.get_initial_variables(jax.random.key(0), model.input_shapes(2))
    param_shardings = partitioner.logical_to_sharding(partitioner.logical_specs(abstract))["params"]
    batch_sharding = partitioner.batch_sharding(2)
    with partitioner.activate():
        sharded_params = jax.device_put(params, param_shardings)
        fn = partitioner.jit(predict, in_shardings=(param_shardings, batch_sharding, partitioner.batch_sharding(1)),
                             out_shardings=partitioner.batch_sharding(2))
        tokens, aux = fn(sharded_params, jax.device_put(prefix, batch_sharding), keys)
    np.testing.assert_array_equal(tokens, single[0])
    np.testing.assert_allclose(aux["logprobs"], single[1]["logprobs"], atol=1e-5)
    assert tokens.sharding.shard_shape(tokens.shape) == (2, tokens.shape[1])  # batch split over data=2
    # The mlp kernels really are split over the 4-way model axis.
    wi = sharded_params["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert wi.sharding.shard_shape(wi.shape) == (32, 16)


def test_rng_argument_errors():
    with pytest.raises(ValueError, match="one key or 3 keys"):
        decoding.per_example_keys(jax.random.split(jax.random.key(0), 2), 3)


def test_traced_sampling_settings_draw_what_static_ones_draw_with_one_program():
    """stage_sampling.Stage.sample passes temperature, top_k, top_p and the guidance scale as traced arguments (one
    compiled program for all their values): its tokens equal predict_batch's, whose settings are constants."""
    from helpers import TINY_LAYOUT
    from musiclm_jax.generation import params as generation_params
    from musiclm_jax.generation import stage_sampling
    from musiclm_jax.models import TokenLMModel
    network = tiny_model().network
    model = TokenLMModel(network, TINY_LAYOUT, ("mulan",), "semantic", 12, 20, guidance_groups=("mulan",))
    params = init_params(model)
    prefix = random_batch(model, 3)["decoder_target_tokens"][:, :model.prefix_length]
    keys = jax.random.split(jax.random.key(5), 3)
    stage = stage_sampling.Stage(model, params, "semantic")
    cases = [dict(temperature=0.0, top_k=0, top_p=1.0, guidance_scale=1.0),
             dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0),
             dict(temperature=0.7, top_k=5, top_p=1.0, guidance_scale=1.0),
             dict(temperature=1.3, top_k=0, top_p=0.8, guidance_scale=1.0)]
    cases += [dict(temperature=1.0, top_k=10, top_p=0.9, guidance_scale=3.0),
              dict(temperature=0.9, top_k=0, top_p=1.0, guidance_scale=1.5),
              dict(temperature=0.0, top_k=0, top_p=1.0, guidance_scale=2.0)]
    for case in cases:
        want = model.predict_batch(params, {"prefix_tokens": prefix}, keys, numdecode_steps=model.target_length,
                                   **case)
        got = stage.sample(prefix, model.target_length, 0, keys, generation_params.GenerationParams(
            top_k=case["top_k"], top_p=case["top_p"], guidance_scale=case["guidance_scale"]), case["temperature"])
        np.testing.assert_array_equal(got, np.asarray(want), err_msg=str(case))
    assert len(stage._samplers) == 2  # guided or not: the only compiled variants
