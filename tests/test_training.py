"""Training with the real trainer on the synthetic task: learning on two meshes, accumulation, cross-mesh restore."""
import json
import math
import os

import jax
import numpy as np
import pytest

from helpers import init_params, random_batch, tiny_model
from musiclm_jax import optimizers, partitioning
from musiclm_jax.checkpoints import Checkpointer
from musiclm_jax.data.dataset_config import DatasetConfig
from musiclm_jax.tasks import synthetic
from musiclm_jax.train import make_train_setup, train
from musiclm_jax.train_state import TrainState
from musiclm_jax.trainer import make_train_step

STEPS = 250
TARGET_LENGTH = 32
# The task's floor is 0.73 nats per token; a model that learnt only token frequencies sits at log(64) = 4.16.
LOSS_BELOW = 1.5


def _model():
    return tiny_model(prefix_length=12, target_length=TARGET_LENGTH, layout=synthetic.SEMANTIC_TINY_LAYOUT,
                      embed_dim=64, num_heads=4, head_dim=16, mlp_dim=256)


def _train(model_dir, ici, steps=STEPS, **kwargs):
    data = DatasetConfig("synthetic_semantic_tiny", {"inputs": 12, "targets": TARGET_LENGTH}, "train", 32, seed=0)
    opt = optimizers.create_optimizer(
        learning_rate=optimizers.create_schedule(peak_value=5e-3, warmup_steps=10, decay="cosine", decay_steps=STEPS),
        weight_decay=0.01)
    args = dict(model=_model(), optimizer=opt, train_dataset_cfg=data, model_dir=str(model_dir), total_steps=steps,
                mesh_config=partitioning.MeshConfig(ici_parallelism=ici), log_period=1, checkpoint_period=1000,
                tensorboard=False)
    args.update(kwargs)
    return train(**args)


def _losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def run_2x4(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("run_2x4")
    _train(model_dir, {"data": 2, "model": 4})
    return model_dir


def test_tiny_lm_learns_the_synthetic_task_on_2x4_and_4x2_meshes_alike(run_2x4, tmp_path):
    _train(tmp_path, {"data": 4, "model": 2})
    a, b = _losses(run_2x4), _losses(tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    unigram = math.log(64)
    final_a = np.mean([a[s] for s in range(STEPS - 9, STEPS + 1)])
    final_b = np.mean([b[s] for s in range(STEPS - 9, STEPS + 1)])
    assert a[1] > unigram and final_a < LOSS_BELOW and final_b < LOSS_BELOW, (a[1], final_a, final_b)
    # Same data, same init, different layouts: the curves agree to float rounding, which grows slowly.
    diffs = np.array([abs(a[s] - b[s]) for s in range(1, STEPS + 1)])
    assert diffs[:20].max() < 1e-4 and diffs.max() < 2e-2, diffs.max()


def test_checkpoint_saved_on_2x4_restores_onto_8x1_and_training_continues(run_2x4, tmp_path):
    first = tmp_path / "run"
    _train(first, {"data": 2, "model": 4}, steps=10, checkpoint_period=10)
    saved = Checkpointer(str(first))
    assert saved.latest_step() == 10
    # Restore onto (8, 1): the arrays come back laid out for the new mesh, with identical values.
    model = _model()
    opt = optimizers.create_optimizer(learning_rate=1e-3)
    for shape in ({"data": 2, "model": 4}, {"data": 8, "model": 1}):
        partitioner = partitioning.Partitioner(partitioning.mesh_from_shape(shape))
        setup = make_train_setup(model=model, optimizer=opt, batch_size=32, partitioner=partitioner)
        with partitioner.activate():
            restored = saved.restore(setup.abstract_state)
        wi = restored.params["layers_0"]["mlp"]["wi_0"]["kernel"]
        assert wi.sharding.shard_shape(wi.shape) == (64, 256 // shape["model"])
        if shape["data"] == 2:
            reference = jax.device_get(restored.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), reference)
    saved.close()
    # Continue the same run on (8, 1) to step 20: it resumes at 10 and keeps learning like the 2x4 run.
    _train(first, {"data": 8, "model": 1}, steps=20, checkpoint_period=10)
    resumed, reference_run = _losses(first), _losses(run_2x4)
    assert sorted(resumed) == list(range(1, 21))
    assert max(abs(resumed[s] - reference_run[s]) for s in range(1, 21)) < 1e-3


def test_gradient_accumulation_equals_the_full_batch():
    model = tiny_model()
    params = init_params(model)
    batch = random_batch(model, 8)
    batch["decoder_loss_weights"][:3, -5:] = 0  # unequal token counts per microbatch
    opt = optimizers.create_optimizer(learning_rate=1e-2)
    state = TrainState.create({"params": params}, opt.tx)
    full = jax.jit(make_train_step(model, opt, 1))(state, batch, jax.random.key(0))
    accumulated = jax.jit(make_train_step(model, opt, 4))(state, batch, jax.random.key(0))
    # Adam scales each update by its gradient's own size, so summing microbatches in another order moves a
    # near-zero gradient's update by more than its rounding: 2.3e-6 seen on an AVX-512 CPU, also before the
    # relative bias changes; a wrong accumulation moves updates by ~lr = 1e-2.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), full[0].params, accumulated[0].params)
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(full[1][key], accumulated[1][key], rtol=1e-5)
    assert float(accumulated[1]["loss_weight"]) == 8 * model.target_length - 15


def test_adafactor_and_schedules():
    schedule = optimizers.create_schedule(peak_value=1.0, warmup_steps=10, decay="linear", decay_steps=110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                               [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    rsqrt = optimizers.create_schedule(peak_value=1.0, warmup_steps=100, decay="rsqrt")
    np.testing.assert_allclose(rsqrt(300), math.sqrt(100 / 300), rtol=1e-6)
    with pytest.raises(ValueError, match="decay_steps"):
        optimizers.create_schedule(peak_value=1.0, warmup_steps=10, decay="cosine")
    model = tiny_model()
    batch = random_batch(model, 8)
    opt = optimizers.create_optimizer(name="adafactor", learning_rate=1e-2)
    state = TrainState.create({"params": init_params(model)}, opt.tx)
    step = jax.jit(make_train_step(model, opt, 1))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]  # memorises one batch
