"""Training: `python -m musiclm_jax.train --gin_file=... --gin.MODEL_DIR="'...'" [--gin.TRAIN_STEPS=N]`.

`train()` is a plain function (gin binds its arguments at the entry point only). Read it top to bottom:
mesh -> input -> state (created sharded, or restored) -> compiled step -> loop (log, eval, checkpoint,
preemption). Outputs in MODEL_DIR: config.gin, metrics.jsonl, tensorboard/, checkpoints/, input_state/.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from etils import epath

from musiclm_jax import gin_utils, partitioning
from musiclm_jax.checkpoints import Checkpointer
from musiclm_jax.data.dataset_config import DatasetConfig
from musiclm_jax.metrics_writer import ConsoleLog, MetricsWriter
from musiclm_jax.models import BaseModel
from musiclm_jax.optimizers import Optimizer
from musiclm_jax.preemption import PreemptionWatcher
from musiclm_jax.train_state import TrainState
from musiclm_jax.trainer import make_eval_step, make_train_step


@dataclasses.dataclass
class TrainSetup:
    """What a run compiles: shared by train() and the AOT compiler (musiclm_jax.aot)."""

    partitioner: partitioning.Partitioner
    abstract_state: Any  # TrainState of ShapeDtypeStructs with shardings
    state_shardings: Any
    batch_shardings: dict
    init_state: Callable[[jax.Array], Any]  # rng -> sharded TrainState
    train_step: Callable  # jitted (state, batch, rng) -> (state, metrics), state donated
    eval_step: Callable  # jitted (params, flax_mutables, batch) -> metrics


def make_train_setup(*, model: BaseModel, optimizer: Optimizer, batch_size: int, partitioner: partitioning.Partitioner,
                     num_microbatches: int = 1) -> TrainSetup:
    """Sharded state layout and compiled steps for `model` at global `batch_size` on the partitioner's mesh."""
    partitioner.check_global_batch(batch_size, "train batch_size")
    if num_microbatches > 1 and (batch_size // partitioner.data_parallel_size) % num_microbatches:
        raise partitioning.MeshShapeError(
            f"num_microbatches={num_microbatches} does not divide the per-device batch "
            f"{batch_size // partitioner.data_parallel_size} (batch_size={batch_size})")
    init_shapes = model.input_shapes(partitioner.data_parallel_size)

    def init_variables(rng):
        return model.get_initial_variables(rng, init_shapes)

    def make_state(variables):
        return TrainState.create(variables, optimizer.tx)

    abstract_state, state_shardings = partitioner.abstract_train_state(init_variables, make_state, jax.random.key(0))
    batch_shardings = {k: partitioner.batch_sharding(len(s)) for k, s in model.input_shapes(batch_size).items()}
    replicated = partitioner.replicated()
    train_step = partitioner.jit(make_train_step(model, optimizer, num_microbatches),
                                 in_shardings=(state_shardings, batch_shardings, replicated),
                                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_step = partitioner.jit(make_eval_step(model),
                                in_shardings=(state_shardings.params, state_shardings.flax_mutables, batch_shardings),
                                out_shardings=replicated)
    return TrainSetup(partitioner, abstract_state, state_shardings, batch_shardings,
                      lambda rng: partitioner.create_train_state(init_variables, make_state, rng)[0],
                      train_step, eval_step)


def _initialize_from(state: TrainState, setup: TrainSetup, init_dir: str, strict: bool, model_dir: str) -> TrainState:
    """`state` with the variables of run `init_dir` (checkpoint_loading.initialize_from); writes the report."""
    from musiclm_jax import checkpoint_loading
    abstract = {"params": setup.abstract_state.params, "flax_mutables": setup.abstract_state.flax_mutables}
    with setup.partitioner.activate():
        variables, report = checkpoint_loading.initialize_from(
            init_dir, abstract, {"params": state.params, "flax_mutables": state.flax_mutables}, strict)
    print(f"train: {report.summary()}", flush=True)
    if jax.process_index() == 0:
        path = epath.Path(model_dir) / "init_checkpoint.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(report), indent=1))
    return state.replace(params=variables["params"], flax_mutables=variables["flax_mutables"])


def _mean_metrics(history: Sequence[dict]) -> dict[str, float]:
    fetched = jax.device_get(list(history))
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def evaluate(eval_step: Callable, state: TrainState, eval_input, partitioner: partitioning.Partitioner,
             num_batches: int) -> dict[str, float]:
    """Metrics averaged (weighted by loss_weight) over the first `num_batches` batches of eval_input."""
    eval_input.reset()
    totals: dict[str, float] = {}
    weight_sum = 0.0
    for _ in range(num_batches):
        try:
            batch = next(eval_input)
        except StopIteration:
            break
        metrics = jax.device_get(eval_step(state.params, state.flax_mutables, partitioner.shard_batch(batch)))
        weight = float(metrics.get("loss_weight", 1.0))
        weight_sum += weight
        for k, v in metrics.items():
            if k != "loss_weight":
                totals[k] = totals.get(k, 0.0) + weight * float(v)
    if weight_sum == 0:
        raise ValueError("evaluation input produced no examples")
    return {k: v / weight_sum for k, v in totals.items()}


def train(*, model: BaseModel, optimizer: Optimizer, train_dataset_cfg: DatasetConfig, model_dir: str,
          total_steps: int, mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
          logical_axis_rules: Optional[Sequence] = None, num_microbatches: int = 1, seed: int = 0,
          log_period: int = 100, checkpoint_period: int = 1000, keep_checkpoints: Optional[int] = 3,
          async_checkpointing: bool = True, eval_dataset_cfg: Optional[DatasetConfig] = None,
          eval_period: int = 0, eval_batches: int = 10, tensorboard: bool = True,
          init_checkpoint: Optional[str] = None, init_checkpoint_strict: bool = False) -> dict[str, float]:
    """Trains `model` for `total_steps` optimizer steps, resuming from MODEL_DIR's latest checkpoint if any.

    Args:
      model, optimizer: what to train and how.
      train_dataset_cfg: the training input (its batch_size is global).
      model_dir: run directory (checkpoints, metrics, config).
      total_steps: train until the state's step reaches this.
      mesh_config, logical_axis_rules: the device mesh and the logical-axis rules (default: the standard ones).
      num_microbatches: gradient accumulation; each step averages this many microbatches.
      seed: parameter init and dropout seed (the input has its own seed in the dataset config).
      log_period: write metrics every N steps (averaged over them) and at the end.
      checkpoint_period, keep_checkpoints, async_checkpointing: checkpoint every N steps and at the end.
      eval_dataset_cfg, eval_period, eval_batches: evaluate every eval_period steps (0: never) on that many
        batches.
      tensorboard: also write TensorBoard events.
      init_checkpoint: fine-tuning (t5x's): another run's MODEL_DIR whose latest checkpoint gives this run its
        starting variables by name (parameters and Flax collections, any mesh; not its optimizer state or step),
        when this run has no checkpoint of its own yet. Names it lacks or holds with other shapes keep their
        initial values and are reported (printed, and written to MODEL_DIR/init_checkpoint.json), or are an
        error with init_checkpoint_strict.
    Returns:
      the last logged metrics (training and, if evaluated, 'eval/...').
    """
    from musiclm_jax.data.input_pipeline import SeqioInputPipeline, missing_split  # the data side (TensorFlow)

    # Mesh and compiled steps.
    mesh = partitioning.create_mesh(mesh_config)
    partitioner = partitioning.Partitioner(mesh, logical_axis_rules)
    setup = make_train_setup(model=model, optimizer=optimizer, batch_size=train_dataset_cfg.batch_size,
                             partitioner=partitioner, num_microbatches=num_microbatches)

    # Input: first the files it needs (MuLan's caption vocabulary), made here and nowhere else.
    model.prepare_assets()
    train_input = SeqioInputPipeline(train_dataset_cfg, model.feature_converter_name,
                                     feature_converter_kwargs=model.feature_converter_kwargs)
    train_input.check_vocab_size(model.vocab_size)
    if getattr(model, "layout", None) is not None:
        from musiclm_jax.data import stages
        stages.check_layout(train_dataset_cfg.mixture_or_task_name, model.layout)
    eval_input = None
    if eval_dataset_cfg is not None and eval_period > 0:
        missing = missing_split(eval_dataset_cfg)
        if missing:
            print(f"train: {missing}, so this run trains without evaluation (eval_period is ignored)", flush=True)
        else:
            partitioner.check_global_batch(eval_dataset_cfg.batch_size, "eval batch_size")
            eval_input = SeqioInputPipeline(eval_dataset_cfg, model.feature_converter_name,
                                            feature_converter_kwargs=model.feature_converter_kwargs)

    # State: restored from the latest checkpoint (with the input position), or created sharded.
    checkpointer = Checkpointer(model_dir, max_to_keep=keep_checkpoints, async_save=async_checkpointing)
    writer = MetricsWriter(model_dir, tensorboard=tensorboard)
    root_rng = jax.random.key(seed)
    if checkpointer.latest_step() is not None:
        with partitioner.activate():
            state = checkpointer.restore(setup.abstract_state, input_pipeline=train_input)
        writer.truncate_after(int(state.step))
        print(f"train: resumed from step {int(state.step)} in {model_dir}", flush=True)
    else:
        state = setup.init_state(jax.random.fold_in(root_rng, 0))
        if init_checkpoint:
            state = _initialize_from(state, setup, init_checkpoint, init_checkpoint_strict, model_dir)
    dropout_rng = jax.random.fold_in(root_rng, 1)

    # Loop.
    console = ConsoleLog(total_steps)
    watcher = PreemptionWatcher()
    step = int(state.step)
    history: list[dict] = []
    last: dict[str, float] = {}
    last_saved = step
    window_start, window_step = time.perf_counter(), step
    try:
        with partitioner.activate():
            while step < total_steps:
                batch = partitioner.shard_batch(next(train_input))
                state, metrics = setup.train_step(state, batch, dropout_rng)
                history.append(metrics)
                step += 1
                record: dict[str, float] = {}
                if step % log_period == 0 or step == total_steps:
                    record = _mean_metrics(history)
                    now = time.perf_counter()
                    record["steps_per_sec"] = (step - window_step) / (now - window_start)
                    history, window_start, window_step = [], now, step
                if eval_input is not None and step % eval_period == 0:
                    eval_metrics = evaluate(setup.eval_step, state, eval_input, partitioner, eval_batches)
                    record.update({f"eval/{k}": v for k, v in eval_metrics.items()})
                if record:
                    writer.write(step, record)
                    console(step, record)
                    last = record
                if step % checkpoint_period == 0 or step == total_steps:
                    checkpointer.save(state, step, train_input)
                    last_saved = step
                if watcher.should_stop():
                    print(f"train: SIGTERM received; saving step {step} and exiting", flush=True)
                    if last_saved != step:
                        checkpointer.save(state, step, train_input)
                    break
    finally:
        checkpointer.close()
        writer.close()
        watcher.close()
        train_input.close()
        if eval_input is not None:
            eval_input.close()
    return last


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Entry point: parses --gin_file / --gin.X flags, saves MODEL_DIR/config.gin, runs train() and returns its
    last logged metrics."""
    import gin

    def run(flags):
        del flags
        model_dir = gin_utils.bound_arguments("train", ["model_dir"], {})["model_dir"]
        if jax.process_index() == 0:
            gin_utils.save_config(model_dir)
        return gin.get_configurable(train)()

    return gin_utils.run(run, argv=argv)


if __name__ == "__main__":
    # Gin files import this module as `musiclm_jax.train`; run that copy, not this __main__ one.
    from musiclm_jax import train as _train_module
    _train_module.main()
