"""The decoder-only Transformer: cached decoding equals full recompute, options agree, prefix-LM semantics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params, random_batch, tiny_model
from musiclm_jax.models import cross_entropy
from musiclm_jax.generation.token_layout import TokenLayout

VARIANTS = [
    dict(position_encoding="relative"),
    dict(position_encoding="rope"),
    dict(position_encoding="relative", bidirectional_prefix=True),
    dict(position_encoding="rope", bidirectional_prefix=True, scan_layers=True, remat_policy="full"),
    dict(position_encoding="relative", scan_layers=True),
    dict(position_encoding="relative", num_kv_heads=1),  # multi-query
    dict(position_encoding="rope", num_kv_heads=2, bidirectional_prefix=True, scan_layers=True),  # grouped
]


def _stepwise_logits(model, params, batch):
    """Logits from the KV cache: prefill the prompt (BOS + prefix; placed by time for a time-aligned model), then
    one input token per step."""
    inputs = jnp.asarray(batch["decoder_input_tokens"])
    prompt_len = model.prefix_length + 1
    cache = model.init_cache(inputs.shape[0], inputs.shape[1])
    prefix_mask = jnp.asarray(batch["decoder_causal_attention"][:, :prompt_len])
    decode_step = jax.jit(model.decode_step, static_argnames="prefill")
    logits, cache = decode_step(params, inputs[:, :prompt_len], cache, prefix_mask, prefill=True)
    out = [logits]
    for t in range(prompt_len, inputs.shape[1]):
        step_logits, cache = decode_step(params, inputs[:, t:t + 1], cache)
        out.append(step_logits)
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("batch_size", [1, 3])  # batch 1 exercises the cache layout without its leading axis
def test_cached_decoding_equals_full_recompute(variant, batch_size):
    model = tiny_model(**variant)
    params = init_params(model)
    batch = random_batch(model, batch_size)
    full = model.logits(params, batch)
    cached = _stepwise_logits(model, params, batch)
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_greedy_cached_sampling_equals_full_recompute_argmax(variant):
    model = tiny_model(**variant)
    params = init_params(model)
    batch = random_batch(model, 2, seed=3)
    prefix = batch["decoder_target_tokens"][:, :model.prefix_length]
    tokens, aux = jax.jit(lambda p, x: model.predict_batch_with_aux(p, {"prefix_tokens": x}, temperature=0.0))(
        params, prefix)
    # Recompute: feed [prefix | sampled] through the full model, greedy within the semantic range.
    seq = jnp.concatenate([prefix, tokens], axis=1)
    full_batch = dict(batch, decoder_input_tokens=jnp.concatenate([jnp.zeros((2, 1), jnp.int32), seq[:, :-1]], 1))
    logits = model.logits(params, full_batch)[:, model.prefix_length:]
    low, high = model.layout.level_ranges("semantic")[0]
    ids = jnp.arange(logits.shape[-1])
    logits = jnp.where((ids >= low) & (ids < high), logits, -1e30)
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    expected_lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(aux["logprobs"], expected_lp, atol=1e-5)


def test_scan_and_remat_match_unrolled_loss_and_gradients():
    plain = tiny_model()
    params = init_params(plain)
    batch = random_batch(plain, 4)
    loss_plain, grads_plain = jax.value_and_grad(lambda p: plain.loss_fn(p, batch, None)[0])(params)
    for options in (dict(remat_policy="full"), dict(remat_policy="minimal"), dict(remat_policy="dots")):
        other = tiny_model(**options)
        loss, grads = jax.value_and_grad(lambda p: other.loss_fn(p, batch, None)[0])(params)
        np.testing.assert_allclose(loss, loss_plain, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, grads_plain)
    # Scanned layers hold the same weights stacked on a leading 'layers' axis.
    scanned = tiny_model(scan_layers=True)
    stacked = dict(params)
    layer_names = [k for k in params if k.startswith("layers_")]
    stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layer_names])
    for k in layer_names:
        del stacked[k]
    np.testing.assert_allclose(scanned.loss_fn(stacked, batch, None)[0], loss_plain, rtol=1e-6)


def test_parameter_count_and_bfloat16_compute():
    model = tiny_model()
    params = init_params(model)
    assert sum(x.size for x in jax.tree.leaves(params)) == model.network.num_params()
    bf16 = tiny_model(dtype="bfloat16")
    batch = random_batch(model, 2)
    loss32 = model.loss_fn(params, batch, None)[0]
    loss16 = bf16.loss_fn(params, batch, None)[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init_params(bf16)))  # fp32 parameters
    assert bf16.logits(params, batch).dtype == jnp.float32  # fp32 logits
    assert abs(float(loss16) - float(loss32)) < 0.05 * float(loss32)


def test_loss_only_on_targets_and_prefix_visibility():
    model = tiny_model(bidirectional_prefix=True)
    params = init_params(model)
    batch = random_batch(model, 2)
    base = model.loss_fn(params, batch, None)[1]
    assert float(base["loss_weight"]) == 2 * model.target_length
    # The loss is a mean over target tokens of the per-token cross-entropy.
    logits = model.logits(params, batch)
    nll, _ = cross_entropy(logits, jnp.asarray(batch["decoder_target_tokens"]))
    expected = float(jnp.sum(nll * batch["decoder_loss_weights"]) / (2 * model.target_length))
    np.testing.assert_allclose(float(base["cross_entropy"]), expected, rtol=1e-6)
    # Bidirectional prefix: position 0 sees the last prefix token; causal: it does not.
    changed = dict(batch)
    changed["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
    last_prefix = batch["decoder_input_tokens"][:, model.prefix_length]
    changed["decoder_input_tokens"][:, model.prefix_length] = last_prefix % 32 + 1
    for bidirectional, should_change in ((True, True), (False, False)):
        m = tiny_model(bidirectional_prefix=bidirectional)
        first = m.logits(params, batch)[:, 0]
        first_changed = m.logits(params, changed)[:, 0]
        assert bool(jnp.any(jnp.abs(first - first_changed) > 1e-4)) == should_change


def test_dropout_is_active_only_with_an_rng():
    model = tiny_model(dropout_rate=0.3)
    params = init_params(model)
    batch = random_batch(model, 2)
    det1 = model.loss_fn(params, batch, None)[0]
    det2 = model.loss_fn(params, batch, None)[0]
    drop1 = model.loss_fn(params, batch, jax.random.key(1))[0]
    drop2 = model.loss_fn(params, batch, jax.random.key(2))[0]
    assert float(det1) == float(det2)
    assert float(drop1) != float(drop2) and float(drop1) != float(det1)


def test_config_errors_name_the_setting():
    from musiclm_jax.networks.transformer import TransformerConfig
    with pytest.raises(ValueError, match="position_encoding"):
        TransformerConfig(vocab_size=10, position_encoding="alibi")
    with pytest.raises(ValueError, match="remat_policy"):
        TransformerConfig(vocab_size=10, remat_policy="some")
    with pytest.raises(ValueError, match="vocab_size=10"):
        tiny_model(vocab_size=10)
    with pytest.raises(KeyError, match="no token group 'acoustic'"):
        tiny_model(target_group="acoustic")


def test_causal_query_blocks_give_the_same_logits_and_gradients():
    reference = tiny_model(causal_query_blocks=1)
    params = init_params(reference)
    batch = random_batch(reference, 3)  # length 32

    def loss_and_grads(model):
        return jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])(params)

    ref_loss, ref_grads = loss_and_grads(reference)
    for blocks in (3, 4, 8):  # 3 does not divide 32: the last block is shorter
        model = tiny_model(causal_query_blocks=blocks)
        np.testing.assert_allclose(model.logits(params, batch), reference.logits(params, batch), atol=1e-5)
        loss, grads = loss_and_grads(model)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_the_relative_bias_per_query_block_equals_the_whole_bias_and_its_gradient():
    """RelativePositionBias.causal_blocks (gathered per layer) and the batch-shared bias add (its gradient by
    elementwise adds) give the values and gradients of the whole causal bias added by broadcasting."""
    from musiclm_jax import layers
    relpos = layers.RelativePositionBias(num_heads=3, num_buckets=8, max_distance=16)
    positions = jnp.arange(20)
    variables = relpos.init(jax.random.key(0), positions, positions)
    whole = relpos.apply(variables, positions, positions)  # [1, 3, 20, 20]
    causal = positions[None, :] <= positions[:, None]
    masked = jnp.where(causal, whole, layers.MASK_VALUE)
    ranges = layers.causal_query_block_ranges(20, 3)
    assert ranges == [(0, 7), (7, 14), (14, 20)]
    blocks = relpos.apply(variables, ranges, method=layers.RelativePositionBias.causal_blocks)
    for i, (start, end) in enumerate(ranges):
        np.testing.assert_array_equal(blocks.block(i), masked[:, :, start:end, :end])
    # The batch-shared add: same values, and the bias gradient is the batch sum (within float32 rounding).
    logits = jax.random.normal(jax.random.key(1), (5, 3, 20, 20))
    weights = jax.random.normal(jax.random.key(2), (5, 3, 20, 20))
    for batch in (5, 17):  # 17: the reduction fallback
        lg = jnp.tile(logits, (4, 1, 1, 1))[:batch]
        wt = jnp.tile(weights, (4, 1, 1, 1))[:batch]
        shared = jax.grad(lambda b: jnp.sum(jnp.sin(layers.add_bias(lg, b)) * wt))(whole)
        plain = jax.grad(lambda b: jnp.sum(jnp.sin(lg + b) * wt))(whole)
        np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-5)
        assert not np.allclose(shared, 0.0)
    # A bias split into blocks that the attention does not use is an error, not a silent mismatch.
    q = jnp.zeros((1, 20, 3, 4))
    with pytest.raises(ValueError, match="split into 3 query blocks"):
        layers.dot_product_attention(q, q, q, bias=blocks, mask=None, causal_query_blocks=4)


def _coarse_like(position_encoding="relative", **kwargs):
    """A coarse-stage layout in miniature: 3 MuLan levels, 5 semantic frames, 40 target tokens (2 levels x 20
    frames), so a semantic frame spans 8 target tokens."""
    from musiclm_jax.models import TokenLMModel
    from musiclm_jax.networks.transformer import TransformerConfig
    from musiclm_jax.generation.token_layout import TokenLayout
    layout = TokenLayout.from_tuples((("mulan", 3, 8), ("semantic", 1, 16), ("coarse", 2, 16)))
    network = TransformerConfig(embed_dim=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64,
                                position_encoding=position_encoding)
    return TokenLMModel(network, layout, ("mulan", "semantic"), "coarse", 8, 40, **kwargs)


def _coarse_batch(model, batch_size, seed=0):
    rng = np.random.RandomState(seed)
    layout = model.layout
    seq = np.concatenate([layout.to_global(rng.randint(0, 8, (batch_size, 3)), "mulan"),
                          layout.to_global(rng.randint(0, 16, (batch_size, 5)), "semantic"),
                          layout.to_global(rng.randint(0, 16, (batch_size, 40)), "coarse")], axis=1).astype(np.int32)
    inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), seq[:, :-1]], axis=1)
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": seq,
            "decoder_loss_weights": (np.arange(48) >= 8)[None].repeat(batch_size, 0).astype(np.int32),
            "decoder_causal_attention": (np.arange(48) <= 8)[None].repeat(batch_size, 0).astype(np.int32)}


@pytest.mark.parametrize("position_encoding", ["relative", "rope"])
def test_time_aligned_positions_place_conditioning_with_its_targets_and_decode_exactly(position_encoding):
    model = _coarse_like(position_encoding, time_aligned_groups=("semantic",))
    assert model.ticks_per_frame == {"semantic": 8.0}
    batch = _coarse_batch(model, 3)
    positions = np.asarray(model.positions(jnp.asarray(batch["decoder_input_tokens"])))
    # BOS and MuLan keep their index; semantic frame f sits with target token 8 f (the first target, input 9).
    np.testing.assert_array_equal(positions[0, :9], [0, 1, 2, 3, 9, 17, 25, 33, 41])
    np.testing.assert_array_equal(positions[:, 9:], np.broadcast_to(np.arange(9, 48), (3, 39)))
    # A prompt without targets places the frames where the first sampled token will go (the prompt's length).
    np.testing.assert_array_equal(np.asarray(model.positions(jnp.asarray(batch["decoder_input_tokens"][:, :9]))),
                                  positions[:, :9])
    params = init_params(model)
    full = model.logits(params, batch)
    plain = _coarse_like(position_encoding)
    assert not np.allclose(plain.logits(params, batch), full, atol=1e-3)  # the positions change the model
    cached = _stepwise_logits(model, params, batch)
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)
    # Sampling goes through the same prefill: greedy tokens equal the full recompute's argmax.
    prefix = batch["decoder_target_tokens"][:, :8]
    tokens, _ = model.predict_batch_with_aux(params, {"prefix_tokens": prefix}, temperature=0.0, numdecode_steps=6)
    seq = np.concatenate([prefix, np.asarray(tokens)], axis=1)
    inputs = np.concatenate([np.zeros((3, 1), np.int32), seq[:, :-1]], axis=1)
    logits = np.asarray(model.module.apply({"params": params}, jnp.asarray(inputs), None,
                                           model.positions(jnp.asarray(inputs))))[:, 8:]
    ranges = model.layout.level_ranges("coarse")
    for j in range(6):
        low, high = ranges[j % 2]
        np.testing.assert_array_equal(np.asarray(tokens)[:, j], low + np.argmax(logits[:, j, low:high], axis=-1))


def test_several_time_aligned_groups_place_each_frame_with_its_targets():
    """The coarse stage with melody: one melody and one semantic token per semantic frame, both placed with the
    target tokens of their frame (relative distance 0), PAD keeping its index."""
    from musiclm_jax.models import TokenLMModel
    base = _coarse_like()
    layout = TokenLayout.from_tuples((("mulan", 3, 8), ("melody", 1, 13), ("semantic", 1, 16), ("coarse", 2, 16)))
    network = dataclasses.replace(base.network, vocab_size=None)
    model = TokenLMModel(network, layout, ("mulan", "melody", "semantic"), "coarse", 13, 40,
                         time_aligned_groups=("melody", "semantic"), optional_groups={"melody": 0.5})
    assert model.ticks_per_frame == {"melody": 8.0, "semantic": 8.0}
    rng = np.random.RandomState(0)
    mulan = layout.to_global(rng.randint(0, 8, (2, 3)), "mulan")
    tune = layout.to_global(rng.randint(0, 13, (2, 5)), "melody")
    tune[1, 3:] = 0  # the second example's melody ends after 3 frames (PAD)
    semantic = layout.to_global(rng.randint(0, 16, (2, 5)), "semantic")
    targets = layout.to_global(rng.randint(0, 16, (2, 6)), "coarse")
    seq = np.concatenate([np.zeros((2, 1), np.int32), mulan, tune, semantic, targets], axis=1).astype(np.int32)
    positions = np.asarray(model.positions(jnp.asarray(seq)))
    first = 14  # the index of the first target token
    frames = first + 8 * np.arange(5)
    np.testing.assert_array_equal(positions[0], np.concatenate([np.arange(4), frames, frames, np.arange(14, 20)]))
    np.testing.assert_array_equal(positions[1, 4:9], [frames[0], frames[1], frames[2], 7, 8])
    np.testing.assert_array_equal(positions[1, 9:14], frames)
    with pytest.raises(ValueError, match="leaves 9 tokens for .'melody', 'semantic'. .* multiple of their 2 levels"):
        TokenLMModel(network, layout, ("mulan", "melody", "semantic"), "coarse", 12, 40,
                     time_aligned_groups=("melody", "semantic"))


def test_time_aligned_groups_errors_name_the_setting():
    with pytest.raises(ValueError, match="'fine' is not a prefix group"):
        _coarse_like(time_aligned_groups=("fine",))
    with pytest.raises(ValueError, match="names a group twice"):
        _coarse_like(time_aligned_groups=("semantic", "semantic"))
    from musiclm_jax.models import TokenLMModel
    model = _coarse_like()
    with pytest.raises(ValueError, match=r"prefix_length=3 leaves 0 tokens for \('semantic',\)"):
        TokenLMModel(model.network, model.layout, ("mulan", "semantic"), "coarse", 3, 40,
                     time_aligned_groups=("semantic",))
