"""Classifier-free guidance of the stages: conditioning dropout in training, guided KV-cached sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import partitioning
from musiclm_jax.models import TokenLMModel
from musiclm_jax.networks.transformer import TransformerConfig
from musiclm_jax.generation.params import GenerationParams
from musiclm_jax.generation.stage_sampling import Stage, StageSpec
from musiclm_jax.generation.token_layout import TokenLayout

LAYOUT = TokenLayout.from_tuples((("mulan", 3, 8), ("semantic", 1, 16), ("coarse", 2, 8)))
NET = TransformerConfig(embed_dim=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64, dropout_rate=0.0,
                        position_encoding="relative")


def _model(dropout=0.0, optional=None):
    return TokenLMModel(NET, LAYOUT, prefix_groups=("mulan", "semantic"), target_group="coarse", prefix_length=7,
                        target_length=8, guidance_groups=("mulan",), conditioning_dropout=dropout,
                        optional_groups=optional)


def _params(model):
    boxed = model.get_initial_variables(jax.random.key(0), model.input_shapes(2))
    return partitioning.unbox(boxed)["params"]


def _prefix(batch=3, seed=0):
    rng = np.random.RandomState(seed)
    mulan = rng.randint(0, 8, (batch, 3)) + LAYOUT.level_ranges("mulan")[:, 0]
    semantic = rng.randint(0, 16, (batch, 4)) + LAYOUT.offset("semantic")
    return np.concatenate([mulan, semantic], axis=1).astype(np.int32)


def _batch(prefix, targets):
    sequence = np.concatenate([prefix, targets], axis=1)
    inputs = np.pad(sequence[:, :-1], ((0, 0), (1, 0)))
    weights = (np.arange(sequence.shape[1]) >= prefix.shape[1]).astype(np.int32)[None].repeat(len(prefix), 0)
    causal = (np.arange(sequence.shape[1]) <= prefix.shape[1]).astype(np.int32)[None].repeat(len(prefix), 0)
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": sequence, "decoder_loss_weights": weights,
            "decoder_causal_attention": causal}


def test_conditioning_dropout_replaces_only_the_mulan_tokens_by_pad():
    model = _model(dropout=0.5)
    prefix = _prefix()
    targets = (np.random.RandomState(1).randint(0, 8, (3, 8)) + np.tile(LAYOUT.level_ranges("coarse")[:, 0], 4))
    batch = {k: jnp.asarray(v) for k, v in _batch(prefix, targets.astype(np.int32)).items()}
    dropped = model.drop_conditioning(batch, jnp.array([True, False, True]))
    want_targets = np.array(batch["decoder_target_tokens"])
    want_targets[[0, 2], :3] = 0
    np.testing.assert_array_equal(dropped["decoder_target_tokens"], want_targets)
    np.testing.assert_array_equal(dropped["decoder_input_tokens"], np.pad(want_targets[:, :-1], ((0, 0), (1, 0))))
    # In training, the examples to drop are drawn per example from the dropout key.
    params = _params(model)
    key = jax.random.key(7)
    loss = float(model.loss_fn(params, batch, key)[0])
    _, drop_key = jax.random.split(key)
    drop = jax.random.bernoulli(drop_key, 0.5, (3,))
    want = float(_model().loss_fn(params, model.drop_conditioning(batch, drop), None)[0])
    assert loss == pytest.approx(want, rel=1e-6)
    assert float(model.loss_fn(params, batch, None)[0]) == pytest.approx(
        float(_model().loss_fn(params, batch, None)[0]), rel=1e-6)  # evaluation: nothing dropped


def test_optional_group_dropout_is_drawn_apart_from_the_guidance_drop():
    # 'semantic' plays the optional conditioning (as the melody tokens do): dropped with its own probability.
    model = TokenLMModel(NET, LAYOUT, prefix_groups=("mulan", "semantic"), target_group="coarse", prefix_length=7,
                         target_length=8, guidance_groups=("mulan",), conditioning_dropout=0.5,
                         optional_groups={"semantic": 0.5})
    targets = (np.random.RandomState(2).randint(0, 8, (3, 8)) + np.tile(LAYOUT.level_ranges("coarse")[:, 0], 4))
    batch = {k: jnp.asarray(v) for k, v in _batch(_prefix(), targets.astype(np.int32)).items()}
    params = _params(model)
    key = jax.random.key(11)
    loss = float(model.loss_fn(params, batch, key)[0])
    rest, guidance_key = jax.random.split(key)
    _, optional_key = jax.random.split(rest)
    want_batch = model.drop_conditioning(batch, jax.random.bernoulli(guidance_key, 0.5, (3,)))
    drop = jax.random.bernoulli(optional_key, 0.5, (3,))
    want_batch = model.drop_conditioning(want_batch, drop, ("semantic",))
    dropped = np.array(want_batch["decoder_target_tokens"][:, 3:7])
    assert np.all(dropped[np.array(drop)] == 0) and np.all(dropped[~np.array(drop)] > 0)
    assert loss == pytest.approx(float(_model().loss_fn(params, want_batch, None)[0]), rel=1e-6)
    with pytest.raises(ValueError, match="optional_groups"):
        TokenLMModel(NET, LAYOUT, ("mulan", "semantic"), "coarse", 7, 8, guidance_groups=("mulan",),
                     optional_groups={"mulan": 0.5})


def test_guidance_scale_one_is_plain_conditional_sampling():
    model = _model()
    params, prefix = _params(model), _prefix()
    keys = jax.random.split(jax.random.key(3), 3)
    plain, aux = model.predict_batch_with_aux(params, {"prefix_tokens": prefix}, keys, temperature=1.0)
    same, aux_same = model.predict_batch_with_aux(params, {"prefix_tokens": prefix}, keys, temperature=1.0,
                                                  guidance_scale=1.0)
    np.testing.assert_array_equal(plain, same)
    np.testing.assert_allclose(aux["logprobs"], aux_same["logprobs"])


@pytest.mark.parametrize("optional", [False, True], ids=["mulan_dropped", "optional_group_dropped_too"])
def test_guided_logits_are_the_extrapolation_of_conditional_and_unconditional(optional):
    # With an optional group ('semantic' plays the melody), the unconditional input has PAD in its place too, so
    # guidance strengthens a given melody as it does the caption (MusicGen drops text and melody together).
    model = _model(optional={"semantic": 0.2} if optional else None)
    assert model.unconditional_groups == (("mulan", "semantic") if optional else ("mulan",))
    assert StageSpec.of(model).guidance_groups == model.unconditional_groups  # what generation and serving drop
    params, prefix = _params(model), _prefix()
    scale = 3.0
    # Greedy decoding of one token: the guided argmax, computed by hand from two teacher-forced passes.
    tokens, aux = model.predict_batch_with_aux(params, {"prefix_tokens": prefix}, jax.random.key(0),
                                               temperature=0.0, guidance_scale=scale, numdecode_steps=4)
    unconditional = prefix.copy()
    unconditional[:, :7 if optional else 3] = 0
    for step in range(4):
        so_far = np.asarray(tokens[:, :step])

        def last_logits(p):
            seq = np.concatenate([np.zeros((3, 1), np.int32), p, so_far], axis=1)
            causal = (np.arange(seq.shape[1]) <= p.shape[1]).astype(np.int32)[None].repeat(3, 0)
            return np.asarray(model.logits(params, {"decoder_input_tokens": jnp.asarray(seq),
                                                    "decoder_causal_attention": jnp.asarray(causal)})[:, -1])
        cond, uncond = last_logits(prefix), last_logits(unconditional)
        guided = uncond + scale * (cond - uncond)
        low, high = LAYOUT.level_ranges("coarse")[step % 2]
        want = low + np.argmax(guided[:, low:high], axis=-1)
        np.testing.assert_array_equal(tokens[:, step], want)
        lp = jax.nn.log_softmax(np.where((np.arange(guided.shape[1]) >= low) & (np.arange(guided.shape[1]) < high),
                                         guided, -1e30), axis=-1)
        np.testing.assert_allclose(aux["logprobs"][:, step], np.take_along_axis(lp, want[:, None], 1)[:, 0],
                                   atol=1e-4)
    # The generation pipeline's sampler (stage_sampling.Stage.sample, through StageSpec) draws the same tokens.
    stage = Stage(model, params, "coarse")
    settings = GenerationParams(temperature=(0.0, 0.0, 0.0), guidance_scale=scale)
    np.testing.assert_array_equal(stage.sample(prefix, 4, 0, jax.random.split(jax.random.key(0), 3), settings, 0.0),
                                  tokens)


def test_guidance_needs_guidance_groups():
    model = TokenLMModel(NET, LAYOUT, prefix_groups=("mulan", "semantic"), target_group="coarse", prefix_length=7,
                         target_length=8)
    with pytest.raises(ValueError, match="needs a model with guidance_groups"):
        model.predict_batch_with_aux(_params(model), {"prefix_tokens": _prefix()}, guidance_scale=2.0)
    with pytest.raises(ValueError, match="must be prefix groups"):
        TokenLMModel(NET, LAYOUT, prefix_groups=("semantic",), target_group="coarse", prefix_length=4,
                     target_length=8, guidance_groups=("mulan",))
