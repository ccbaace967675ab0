"""Loading a trained model from its run directory (MODEL_DIR): the config.gin the run saved + its parameters.

This is the one place outside the entry points that reads gin: a run's configuration is how its model is
rebuilt (as t5x's infer does). The run's config.gin is parsed in a private gin configuration
(gin_utils.private_config), so loading a model never touches the caller's. Only the parameters and the model's
other Flax collections (`flax_mutables`, e.g. the codec's codebooks) are read from the checkpoint, by orbax
partial restore: the optimizer state, which is twice the parameters under Adam, is neither read nor held.
Used by every inference object (Codec, SemanticTokenizer, MuLan, the stages of MusicLM), export and
fine-tuning (INIT_CHECKPOINT). Writing a run directory without training (imports, random-init test models) is
run_directory.py's, on the training side.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from musiclm_jax import gin_utils, partitioning
from musiclm_jax.checkpoints import Checkpointer

CONFIG_FILE = "config.gin"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from its run's config.gin, with the parameters of one checkpoint.

    Attributes:
      model: the model object the run trained (a models.BaseModel).
      params: its 'params' collection, jax.Arrays laid out on the loading mesh.
      flax_mutables: its other Flax collections ({} for the token LMs).
      step: the checkpoint's step.
    """

    model: Any
    params: Any
    flax_mutables: Any
    step: int


def model_from_run(model_dir: str) -> Any:
    """The model object of training run MODEL_DIR, built from its config.gin in a private gin configuration.

    Raises FileNotFoundError naming the directory if it has no config.gin.
    """
    config = os.path.join(model_dir, CONFIG_FILE)
    if not epath.Path(config).exists():
        raise FileNotFoundError(f"{model_dir} has no {CONFIG_FILE}: not a training run directory")
    with gin_utils.private_config():
        gin_utils.parse_gin([config], [], finalize=False)
        return gin_utils.bound_arguments("train", ["model"], {})["model"]


def abstract_variables(model: Any, partitioner: partitioning.Partitioner) -> dict:
    """{collection: tree of jax.ShapeDtypeStruct} of `model`'s Flax variables, each with its sharding on the
    partitioner's mesh (the model's logical axis rules), computed without allocating them."""
    init_shapes = model.input_shapes(partitioner.data_parallel_size)
    rng = jax.random.key(0)  # made before the mesh is active: an abstract (AOT) mesh cannot run it
    with partitioner.activate():
        boxed = jax.eval_shape(lambda rng: model.get_initial_variables(rng, init_shapes), rng)
        shardings = partitioner.logical_to_sharding(partitioner.logical_specs(boxed, "parameter"))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        partitioning.unbox(boxed), shardings)


def checkpoint_path(model_dir: str, step: Optional[int] = None) -> tuple[str, int]:
    """(path of the saved train state of checkpoint `step` (default: the latest), step) in MODEL_DIR."""
    checkpointer = Checkpointer(model_dir, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise FileNotFoundError(f"{model_dir} has no checkpoint" + (f" at step {step}" if step is not None
                                                                        else ""))
        return str(checkpointer.model_dir / "checkpoints" / str(step) / "default"), step
    finally:
        checkpointer.close()


def saved_tree(model_dir: str, step: Optional[int] = None) -> dict:
    """The saved train state's tree of MODEL_DIR's checkpoint, with orbax metadata leaves (shape, dtype); reads no
    array. Keys: 'step', 'params', 'opt_state', 'flax_mutables'."""
    return _tree_metadata(checkpoint_path(model_dir, step)[0])


def _tree_metadata(path: str) -> dict:
    return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree


def restore_subtrees(path: str, target: dict) -> dict:
    """Reads only the subtrees named in `target` ({key: tree of ShapeDtypeStructs with shardings}, a part of the
    saved tree) from the orbax checkpoint at `path`: orbax partial restore, every array placed as its target."""
    target = {k: v for k, v in target.items() if jax.tree.leaves(v)}
    if not target:
        return {}
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return dict(restored)


def load_model(model_dir: str, step: Optional[int] = None,
               mesh_config: partitioning.MeshConfig = partitioning.MeshConfig()) -> LoadedModel:
    """The model of MODEL_DIR with the parameters (and flax_mutables) of its latest, or `step`, checkpoint, laid out
    on this host's devices by `mesh_config`; the optimizer state is not read.

    Raises FileNotFoundError naming the directory if it has no config.gin or no checkpoint.
    """
    model = model_from_run(model_dir)
    path, step = checkpoint_path(model_dir, step)
    partitioner = partitioning.Partitioner(partitioning.create_mesh(mesh_config))
    abstract = abstract_variables(model, partitioner)
    target = {"params": abstract["params"],
              "flax_mutables": {k: v for k, v in abstract.items() if k != "params"}}
    with partitioner.activate():
        restored = restore_subtrees(path, target)
    return LoadedModel(model, jax.block_until_ready(restored["params"]),
                       jax.block_until_ready(restored.get("flax_mutables", {})), step)


@dataclasses.dataclass(frozen=True)
class InitReport:
    """What `initialize_from` took from another run: variable names ('params/layers_0/.../kernel') by outcome."""

    source: str
    step: int
    restored: tuple[str, ...]
    not_found: tuple[str, ...]
    shape_mismatch: tuple[str, ...]  # 'name: source (a, b) != model (c, d)'

    def summary(self) -> str:
        total = len(self.restored) + len(self.not_found) + len(self.shape_mismatch)
        lines = [f"initialised {len(self.restored)} of {total} variables from {self.source} (step {self.step})"]
        if self.not_found:
            lines.append(f"not found there (kept at their initial values): {', '.join(self.not_found)}")
        if self.shape_mismatch:
            lines.append(f"shape mismatches (kept at their initial values): {'; '.join(self.shape_mismatch)}")
        return "\n".join(lines)


def initialize_from(init_dir: str, abstract: dict, current: dict, strict: bool = False) -> tuple[dict, InitReport]:
    """Takes the variables of another run's latest checkpoint by name, as t5x's fine-tuning does.

    Args:
      init_dir: the other run's MODEL_DIR (its latest checkpoint is read; any mesh).
      abstract: {'params': ..., 'flax_mutables': ...} ShapeDtypeStructs of this run, with this run's shardings.
      current: the same trees, freshly initialised (kept where the source has no such variable).
      strict: a name the source does not have, or has with another shape, is an error (else it is reported and
        keeps its initial value).
    Returns:
      ({'params', 'flax_mutables'} with every variable found in the source under the same name and shape
      replaced by the source's value, laid out as `abstract`; the report). The optimizer state and the step are
      not taken: a fine-tuning run starts at step 0 with a fresh optimizer.
    """
    path, step = checkpoint_path(init_dir)
    keys = ("params", "flax_mutables")
    saved = _tree_metadata(path)
    saved_shapes = {name: tuple(meta.shape) for name, meta in traverse_util.flatten_dict(
        {key: saved.get(key) or {} for key in keys}, sep="/").items()}
    wanted, not_found, mismatch = {}, [], []
    for name, leaf in traverse_util.flatten_dict({key: abstract[key] for key in keys}, sep="/").items():
        if name not in saved_shapes:
            not_found.append(name)
        elif saved_shapes[name] != tuple(leaf.shape):
            mismatch.append(f"{name}: source {saved_shapes[name]} != model {tuple(leaf.shape)}")
        else:
            wanted[name] = leaf
    report = InitReport(init_dir, step, tuple(wanted), tuple(not_found), tuple(mismatch))
    if strict and (not_found or mismatch):
        raise ValueError(f"INIT_CHECKPOINT {init_dir} (strict): {report.summary()}")
    if not wanted:
        raise ValueError(f"INIT_CHECKPOINT {init_dir}: no variable of this model is there under the same name and "
                         f"shape ({report.summary()})")
    restored = restore_subtrees(path, traverse_util.unflatten_dict(wanted, sep="/"))
    merged = traverse_util.flatten_dict({key: current[key] for key in keys}, keep_empty_nodes=True, sep="/")
    merged.update(traverse_util.flatten_dict(restored, sep="/"))
    out = traverse_util.unflatten_dict(merged, sep="/")  # the structure of `current`, empty collections included
    return {key: out[key] for key in keys}, report
