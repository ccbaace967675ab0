"""A run directory written without training: a model gin file's model with given (converted) or random-initialised
parameters, its config.gin and a step-0 checkpoint, as `python -m musiclm_jax.train` would leave them. What the
weight imports (`python -m musiclm_jax.convert`) write, and how tests and benchmarks make random-init frozen
models. Training side (it builds the train state, optimizer included); loading one back for inference is
checkpoint_loading's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax

from musiclm_jax import gin_utils, partitioning
from musiclm_jax.checkpoints import Checkpointer


def write_run_directory(model_dir: str, gin_file: str, bindings: Sequence[str], params: Optional[dict] = None,
                        what: str = "converted", subtree: Optional[str] = None,
                        flax_mutables: Optional[dict] = None, seed: int = 0) -> str:
    """Writes run directory `model_dir`: `gin_file`'s model built with `bindings` (e.g. converted sizes), its freshly
    initialised train state (from `seed`) with `params` put in (at params[subtree] if given; shapes checked) and, if
    given, `flax_mutables`; then config.gin and a step-0 checkpoint. With params=None the run holds the random
    initialisation (weight importers pass theirs; tests make random-init frozen models this way)."""
    import numpy as np

    from musiclm_jax import train as train_lib

    with gin_utils.private_config():
        gin_utils.parse_gin([gin_file], [f"MODEL_DIR = {model_dir!r}"] + list(bindings))
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
    checkpointer = Checkpointer(model_dir, async_save=False)
    checkpointer.save(state, 0)
    checkpointer.close()
    return model_dir
