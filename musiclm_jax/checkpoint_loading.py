"""Loading a trained model from its run directory (MODEL_DIR): the config.gin the run saved + a checkpoint.

This is the one place outside the entry points that reads gin: a run's configuration is how its model is
rebuilt (as t5x's infer does). Used by the codec (and later tokenizer, MuLan and generation) front ends.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import gin
import jax

from musiclm_jax import gin_utils, partitioning
from musiclm_jax.checkpoints import Checkpointer


def load_model_and_state(model_dir: str, step: Optional[int] = None,
                         mesh_config: partitioning.MeshConfig = partitioning.MeshConfig()) -> tuple[Any, Any]:
    """(model, TrainState) of MODEL_DIR's latest (or `step`) checkpoint, laid out on this host's devices.

    Raises FileNotFoundError naming the directory if it has no config.gin or no checkpoint.
    """
    from musiclm_jax import train as train_lib  # the run file binds train_lib.train

    config = os.path.join(model_dir, "config.gin")
    if not os.path.exists(config):
        raise FileNotFoundError(f"{model_dir} has no config.gin: not a training run directory")
    try:
        gin_utils.parse_gin([config], [], finalize=False)
        args = gin_utils.bound_arguments("train", ["model", "optimizer"], {})
    finally:
        gin.clear_config()
    model, optimizer = args["model"], args["optimizer"]
    partitioner = partitioning.Partitioner(partitioning.create_mesh(mesh_config))
    setup = train_lib.make_train_setup(model=model, optimizer=optimizer, batch_size=partitioner.data_parallel_size,
                                       partitioner=partitioner)
    checkpointer = Checkpointer(model_dir, async_save=False)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"{model_dir} has no checkpoint")
        with partitioner.activate():
            state = checkpointer.restore(setup.abstract_state, step)
    finally:
        checkpointer.close()
    return model, jax.block_until_ready(state)
