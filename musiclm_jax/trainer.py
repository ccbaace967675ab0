"""The train and eval steps: pure functions of (state, batch) that the Partitioner compiles.

`make_train_step` handles gradient accumulation over microbatches (interleaved rows, so every microbatch is
spread over all data-parallel devices) weighted by each microbatch's `loss_weight`, so that accumulating M
microbatches gives the same update as one batch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from musiclm_jax.models import BaseModel
from musiclm_jax.optimizers import Optimizer
from musiclm_jax.train_state import TrainState


def _weighted(metrics, weight):
    return {k: v * weight for k, v in metrics.items() if k != "loss_weight"}


def _split_microbatches(batch, num_microbatches: int):
    """{k: [B, ...]} -> {k: [M, B/M, ...]} where microbatch m holds rows m, m+M, m+2M, ..."""
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_microbatches} microbatches")
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(model: BaseModel, optimizer: Optimizer, num_microbatches: int = 1) -> Callable:
    """Returns train_step(state, batch, rng) -> (new state, metrics).

    rng is the run's dropout key; the step folds in state.step, so a resumed run draws the same dropout.
    Metrics: the model's (averaged over microbatches by loss_weight), plus grad_norm, learning_rate and
    loss_weight (summed).
    """
    grad_fn = jax.value_and_grad(model.train_loss_fn, has_aux=True)

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if num_microbatches <= 1:
            (_, (metrics, mutables)), grads = grad_fn(state.params, state.flax_mutables, batch, rng)
            weight = metrics.get("loss_weight", jnp.float32(1.0))
            summed = _weighted(metrics, weight)
        else:
            micro = _split_microbatches(batch, num_microbatches)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            _, (abstract_metrics, _) = jax.eval_shape(model.train_loss_fn, state.params, state.flax_mutables,
                                                      jax.tree.map(lambda x: x[0], micro), rng)
            init = (zeros, {k: jnp.zeros((), jnp.float32) for k in abstract_metrics if k != "loss_weight"},
                    jnp.zeros((), jnp.float32), state.flax_mutables)

            def body(carry, xs):
                acc_grads, acc_metrics, acc_weight, mutables = carry
                index, microbatch = xs
                (_, (metrics, mutables)), grads = grad_fn(state.params, mutables, microbatch,
                                                          jax.random.fold_in(rng, index))
                weight = metrics.get("loss_weight", jnp.float32(1.0))
                acc_grads = jax.tree.map(lambda a, g: a + weight * g, acc_grads, grads)
                acc_metrics = jax.tree.map(jnp.add, acc_metrics, _weighted(metrics, weight))
                return (acc_grads, acc_metrics, acc_weight + weight, mutables), None

            (grads, summed, weight, mutables), _ = jax.lax.scan(body, init, (jnp.arange(num_microbatches), micro))
            grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1e-9), grads)
        metrics = {k: v / jnp.maximum(weight, 1e-9) for k, v in summed.items()}
        metrics["loss_weight"] = weight
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = optimizer.schedule(state.step)
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, flax_mutables=mutables)
        return new_state, metrics

    return train_step


def make_eval_step(model: BaseModel) -> Callable:
    """Returns eval_step(params, flax_mutables, batch) -> metrics (deterministic)."""
    def eval_step(params, flax_mutables, batch):
        return model.eval_fn(params, batch, flax_mutables)
    return eval_step
