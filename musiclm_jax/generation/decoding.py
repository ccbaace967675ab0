"""Jitted incremental sampling with a KV cache: temperature, top-k, top-p, per-example RNG, vocabulary ranges.

The loop is a `lax.scan` over the new tokens; the model is abstracted as `step_fn(tokens [B, 1], cache) ->
(logits [B, V], cache)`, so the same sampler serves every stage (and guidance, which wraps step_fn).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def mask_to_range(logits: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """Keeps logits [B, V] whose ids lie in [low, high) (scalars or [B]); the rest become -inf."""
    ids = jnp.arange(logits.shape[-1])
    low = jnp.reshape(low, (-1, 1))
    high = jnp.reshape(high, (-1, 1))
    return jnp.where((ids >= low) & (ids < high), logits, NEG_INF)


def _static(value) -> bool:
    """True for a value known at trace time (a Python number or a concrete array), False for a tracer."""
    return not isinstance(value, jax.core.Tracer)


def _cutoff(logits: jax.Array, top_k, top_p) -> jax.Array:
    """[B, 1]: the smallest logit of each row [B, V] that top-k and then top-p keep, from one descending sort.
    top_k <= 0 or >= V and top_p >= 1 leave their part off (-inf); the settings may be traced."""
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    index = jnp.broadcast_to(jnp.clip(top_k, 1, vocab) - 1, logits.shape[:-1] + (1,)).astype(jnp.int32)
    kth = jnp.where((top_k > 0) & (top_k < vocab), jnp.take_along_axis(descending, index, axis=-1), -jnp.inf)
    descending = jnp.where(descending >= kth, descending, NEG_INF)  # the top-k survivors, still in order
    probs = jax.nn.softmax(descending, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the most likely token always: nothing before it
    nucleus = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.maximum(kth, jnp.where(top_p < 1.0, nucleus, -jnp.inf))


def _filtered(logits: jax.Array, top_k, top_p) -> jax.Array:
    """filter_top_p(filter_top_k(logits, top_k), top_p) with one sort of the rows (ties at a cutoff kept)."""
    return jnp.where(logits >= _cutoff(logits, top_k, top_p), logits, NEG_INF)


def filter_top_k(logits: jax.Array, top_k) -> jax.Array:
    """Keeps the top_k largest logits per row [B, V] (ties at the threshold kept); top_k <= 0 disables.

    top_k may be traced (a jitted argument): then the rows are sorted only when the filter is on (lax.cond), so
    one compiled program serves every value."""
    vocab = logits.shape[-1]
    if _static(top_k):
        if top_k <= 0 or top_k >= vocab:
            return logits
        threshold = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
        return jnp.where(logits >= threshold, logits, NEG_INF)
    return jax.lax.cond((top_k > 0) & (top_k < vocab), lambda v: _filtered(v, top_k, 1.0), lambda v: v, logits)


def filter_top_p(logits: jax.Array, top_p) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of largest logits whose probability reaches top_p.

    The most likely token is always kept; top_p >= 1 disables. top_p may be traced, as top_k in filter_top_k.
    """
    if _static(top_p):
        return logits if top_p >= 1.0 else _filtered(logits, 0, top_p)
    return jax.lax.cond(top_p < 1.0, lambda v: _filtered(v, 0, top_p), lambda v: v, logits)


def sample_logits(logits: jax.Array, keys: jax.Array, *, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """Draws one token per row of logits [B, V] with its own key (keys: [B] typed keys). temperature 0 = greedy.

    The settings may be traced (one compiled program for every value): then the rows are sorted only when top-k
    or top-p is on (one lax.cond), and the greedy token and the drawn one are both computed and one is kept."""
    if _static(temperature) and _static(top_k) and _static(top_p):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
        return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    filtering = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)
    scaled = jax.lax.cond(filtering, lambda v: _filtered(v, top_k, top_p), lambda v: v, scaled)
    drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1).astype(jnp.int32))


def per_example_keys(rng: Optional[jax.Array], batch_size: int) -> jax.Array:
    """[B] typed keys: `rng` split B ways, or `rng` itself if it already is a [B] array of keys."""
    if rng is None:
        rng = jax.random.key(0)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 1 and rng.shape[0] == batch_size:
        return rng
    if rng.ndim != 0:
        raise ValueError(f"rng must be one key or {batch_size} keys, got shape {rng.shape}")
    return jax.random.split(rng, batch_size)


def sample(step_fn: StepFn, cache: Any, first_logits: jax.Array, num_steps: int, keys: jax.Array, *,
           level_ranges: jax.Array, first_level: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> tuple[jax.Array, jax.Array, Any]:
    """Samples `num_steps` tokens autoregressively.

    Args:
      step_fn: (tokens [B, 1] int32, cache) -> (logits [B, V] fp32, cache); feeds one token per example.
      cache: the model's decoding state after the prompt.
      first_logits: [B, V] logits for the first new token (from the prompt's last position).
      num_steps: number of tokens to draw (static).
      keys: [B] typed PRNG keys, one per example, so an example's samples do not depend on the batch.
      level_ranges: [levels, 2] global id ranges; new token t must lie in level (first_level + t) % levels.
      temperature, top_k, top_p: sampling settings (temperature 0: greedy).
    Returns:
      (tokens [B, num_steps] int32, log-probabilities of the drawn tokens under the unfiltered
      range-restricted distribution [B, num_steps] fp32, final cache).
    """
    level_ranges = jnp.asarray(level_ranges, jnp.int32)
    num_levels = level_ranges.shape[0]

    def draw(logits, keys, t):
        low, high = level_ranges[(first_level + t) % num_levels]
        logits = mask_to_range(logits, low, high)
        next_keys = jax.vmap(jax.random.split)(keys)
        token = sample_logits(logits, next_keys[:, 1], temperature=temperature, top_k=top_k, top_p=top_p)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        return token, logprob, next_keys[:, 0]

    def body(carry, t):
        cache, logits, keys = carry
        token, logprob, keys = draw(logits, keys, t)
        logits, cache = step_fn(token[:, None], cache)
        return (cache, logits, keys), (token, logprob)

    carry = (cache, first_logits, keys)
    tokens = jnp.zeros((first_logits.shape[0], 0), jnp.int32)
    logprobs = jnp.zeros((first_logits.shape[0], 0), jnp.float32)
    if num_steps > 1:
        carry, (toks, lps) = jax.lax.scan(body, carry, jnp.arange(num_steps - 1))
        tokens, logprobs = toks.T, lps.T
    cache, logits, keys = carry
    # The last token needs no forward pass after it.
    token, logprob, _ = draw(logits, keys, num_steps - 1)
    return (jnp.concatenate([tokens, token[:, None]], axis=1),
            jnp.concatenate([logprobs, logprob[:, None]], axis=1), cache)


PrefillFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
ParamStepFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


def sample_after_prefix(prefill: PrefillFn, step: ParamStepFn, params: Any, prefix: jax.Array, keys: jax.Array, *,
                        num_steps: int, level_ranges: jax.Array, prompt_length: int = 0,
                        guidance_ranges: tuple[tuple[int, int], ...] = (), guidance_scale: float = 1.0,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        guided: Optional[bool] = None) -> tuple[jax.Array, jax.Array]:
    """Samples `num_steps` tokens after prefix [B, P] with a prefix LM's KV-cached decoder, optionally with
    classifier-free guidance. TokenLMModel.predict_batch_with_aux and the generation pipeline (including a stage
    served from exported functions, musiclm_jax.serving) all sample through this one function.

    prefill(params, tokens [N, P + 1], prefix_mask [N, P + 1] bool, slots int8 [C]) -> (logits of the last
      position [N, V], a KV cache of capacity C); step(params, tokens [N, 1], cache) -> (logits [N, V], cache).
    prefix: global ids, the conditioning then `prompt_length` already-known target tokens (continuation); a PAD
      (0) goes first, as in training. keys: one key or [B] keys. level_ranges: as `sample`.
    guidance_scale != 1: the batch runs twice, the second time with the conditioning tokens whose ids fall in
      `guidance_ranges` ([low, high) id ranges) set to PAD, and tokens are drawn from
      uncond + scale * (cond - uncond).
    guided: whether the batch runs twice (default: guidance_scale != 1). Give it when guidance_scale, like
      temperature, top_k and top_p, is a traced argument of a jitted caller (stage_sampling.Stage.sample), so that
      one compiled program serves every value of them.
    Returns (tokens [B, num_steps], log-probabilities [B, num_steps] under the distribution sampled from).
    """
    if num_steps < 1:
        raise ValueError(f"numdecode_steps must be >= 1, got {num_steps}")
    batch = prefix.shape[0]
    prompt = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.asarray(prefix, jnp.int32)], axis=1)
    conditioning = prompt.shape[1] - prompt_length
    in_conditioning = jnp.arange(prompt.shape[1]) < conditioning
    if guided is None:
        guided = guidance_scale != 1.0
    if guided:
        if not guidance_ranges:
            raise ValueError(f"guidance_scale={guidance_scale} needs a stage with guidance_groups")
        hit = jnp.zeros(prompt.shape, bool)
        for low, high in guidance_ranges:
            hit |= (prompt >= low) & (prompt < high)
        prompt = jnp.concatenate([prompt, jnp.where(hit & in_conditioning, 0, prompt)], axis=0)

    def combine(logits):
        if not guided:
            return logits
        cond, uncond = logits[:batch], logits[batch:]
        return uncond + guidance_scale * (cond - uncond)

    prefix_mask = jnp.broadcast_to(in_conditioning, prompt.shape)
    logits, cache = prefill(params, prompt, prefix_mask, jnp.zeros((prompt.shape[1] + num_steps - 1,), jnp.int8))

    def step_fn(tokens, cache):
        tokens = jnp.concatenate([tokens, tokens], axis=0) if guided else tokens
        logits, cache = step(params, tokens, cache)
        return combine(logits), cache

    tokens, logprobs, _ = sample(step_fn, cache, combine(logits), num_steps, per_example_keys(keys, batch),
                                 level_ranges=level_ranges, first_level=prompt_length, temperature=temperature,
                                 top_k=top_k, top_p=top_p)
    return tokens, logprobs
