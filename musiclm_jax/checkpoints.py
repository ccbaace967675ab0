"""Checkpoints: the train state through orbax (async, keep N, restore onto any mesh), plus the input position.

Layout of MODEL_DIR:
  checkpoints/<step>/               orbax checkpoint of the train state (step, params, opt_state, flax_mutables)
  input_state/<step>/process_<i>*   each process's input-pipeline position at that step

The input position is written (synchronously, small) before the state's async save starts, so every complete
state checkpoint has its input position. Restoring takes target ShapeDtypeStructs carrying the shardings of
the *current* mesh, so a state saved on one mesh restores onto another. MODEL_DIR may be local or a cloud
path (gs://...), as for every file the trainer writes.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath


# orbax's replica-parallel saving has each replica of a replicated array write a slice of it, and slicing compiles
# one XLA program per array shape on a run's first save: 17.6 s of a 22.8 s SIGTERM exit for the tiny codec on 8
# CPU devices. Arrays whose slices would be under this many bytes are written whole by one replica instead
# (same files); larger ones, where parallel writes pay, stay replica-parallel.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 64 << 20
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL), override=True)


class StatefulInput(Protocol):
    """An input pipeline whose position can be saved and restored (see data.input_pipeline)."""

    def save_state(self, directory: str) -> None: ...

    def restore_state(self, directory: str) -> None: ...


class Checkpointer:
    """Saves and restores train states in `model_dir`.

    Args:
      model_dir: the run directory.
      max_to_keep: keep the newest N checkpoints (None: keep all).
      async_save: write checkpoints in the background while training goes on.
    """

    def __init__(self, model_dir: str, *, max_to_keep: Optional[int] = 3, async_save: bool = True):
        self.model_dir = epath.Path(model_dir)
        if "://" not in str(model_dir):
            self.model_dir = self.model_dir.absolute()
        self.manager = ocp.CheckpointManager(
            self.model_dir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def input_state_dir(self, step: int) -> str:
        return str(self.model_dir / "input_state" / str(step))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: Any, step: int, input_pipeline: Optional[StatefulInput] = None) -> None:
        """Saves `state` (a TrainState) as checkpoint `step` with the input pipeline's position."""
        if input_pipeline is not None:
            input_pipeline.save_state(self.input_state_dir(step))
        self.manager.save(step, args=ocp.args.StandardSave(state.as_dict()), force=True)
        self._prune_input_states()

    def restore(self, abstract_state: Any, step: Optional[int] = None,
                input_pipeline: Optional[StatefulInput] = None) -> Any:
        """Restores checkpoint `step` (default: latest) into the layout of `abstract_state`.

        Args:
          abstract_state: a TrainState of jax.ShapeDtypeStruct leaves with the target shardings
            (Partitioner.abstract_train_state).
          input_pipeline: if given, its position is restored to the one saved with the checkpoint.
        Returns:
          the restored TrainState.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state.as_dict()))
        if input_pipeline is not None:
            directory = self.input_state_dir(step)
            if not epath.Path(directory).is_dir():
                raise FileNotFoundError(f"checkpoint {step} has no input position in {directory}")
            input_pipeline.restore_state(directory)
        return abstract_state.replace_from_dict(restored)

    def _prune_input_states(self) -> None:
        root = self.model_dir / "input_state"
        if jax.process_index() != 0 or not root.is_dir():
            return
        # Checkpoints still being written are not listed yet: keep every input state newer than the oldest kept.
        kept = set(self.all_steps())
        oldest = min(kept) if kept else None
        for path in root.iterdir():
            if path.name.isdigit() and int(path.name) not in kept and oldest is not None and int(path.name) < oldest:
                path.rmtree(missing_ok=True)

    def wait(self) -> None:
        """Blocks until background saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
