"""Loading a trained model from its run directory (MODEL_DIR): the config.gin the run saved + a checkpoint.

This is the one place outside the entry points that reads gin: a run's configuration is how its model is
rebuilt (as t5x's infer does). Used by the codec (and later tokenizer, MuLan and generation) front ends.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

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


def write_run_directory(model_dir: str, gin_file: str, bindings: Sequence[str], params: Optional[dict] = None,
                        what: str = "converted", subtree: Optional[str] = None,
                        flax_mutables: Optional[dict] = None, seed: int = 0) -> str:
    """Writes run directory `model_dir`: `gin_file`'s model built with `bindings` (e.g. converted sizes), its freshly
    initialised train state (from `seed`) with `params` put in (at params[subtree] if given; shapes checked) and, if
    given, `flax_mutables`; then config.gin and a step-0 checkpoint. With params=None the run holds the random
    initialisation (weight importers pass theirs; tests make random-init frozen models this way)."""
    import numpy as np

    from musiclm_jax import train as train_lib

    gin_utils.parse_gin([gin_file], [f"MODEL_DIR = {model_dir!r}"] + list(bindings))
    try:
        args = gin_utils.bound_arguments("train", ["model", "optimizer"], {})
        partitioner = partitioning.Partitioner(partitioning.create_mesh())
        setup = train_lib.make_train_setup(model=args["model"], optimizer=args["optimizer"],
                                           batch_size=partitioner.data_parallel_size, partitioner=partitioner)
        fresh = setup.init_state(jax.random.key(seed))
        params = fresh.params if params is None and subtree is None else params
        if params is None:
            raise ValueError("write_run_directory: subtree needs params")
        target = fresh.params if subtree is None else fresh.params[subtree]
        expected, got = jax.tree.map(np.shape, target), jax.tree.map(np.shape, params)
        if expected != got:
            raise ValueError(f"converted {what} parameters do not match the model built from its config:\n"
                             f"expected {expected}\ngot {got}")
        shardings = setup.state_shardings.params
        with partitioner.activate():
            if subtree is None:
                new_params = jax.device_put(params, shardings)
            else:
                new_params = dict(fresh.params, **{subtree: jax.device_put(params, shardings[subtree])})
            state = fresh.replace(params=new_params)
            if flax_mutables is not None:
                state = state.replace(flax_mutables=jax.device_put(flax_mutables,
                                                                   setup.state_shardings.flax_mutables))
        gin_utils.save_config(model_dir)
    finally:
        gin.clear_config()
    checkpointer = Checkpointer(model_dir, async_save=False)
    checkpointer.save(state, 0)
    checkpointer.close()
    return model_dir
