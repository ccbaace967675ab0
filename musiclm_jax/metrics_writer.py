"""Training metrics to MODEL_DIR/metrics.jsonl, TensorBoard and a one-line console log (process 0 only).

metrics.jsonl holds one JSON object per logged step: {"step": int, "loss": float, "learning_rate": float,
"steps_per_sec": float, ...the model's metrics..., "eval/<metric>": float on evaluation steps}.
On resume, lines of steps after the restored checkpoint (work lost at the interruption) are dropped, so the
file reads as one run.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Mapping

import jax
from etils import epath


class MetricsWriter:
    """Writes scalar metrics of a run. Args: model_dir; tensorboard: also write TensorBoard event files."""

    def __init__(self, model_dir: str, *, tensorboard: bool = True):
        self.model_dir = model_dir
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(model_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from clu import metric_writers  # imports TensorFlow's summary writer
                self._tb = metric_writers.SummaryWriter(str(epath.Path(model_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops lines with step > `step` (left by an interrupted run that is now resumed from `step`)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in lines))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: float(v) for k, v in scalars.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.write_scalars(int(step), {k: float(v) for k, v in scalars.items()})
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_duration(seconds: float) -> str:
    """'H:MM:SS', with days as 'Dd H:MM:SS' (time.strftime wraps at 24 hours)."""
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class ConsoleLog:
    """One line per logged step: progress, loss, learning rate, speed, time left.

    The speed and the time left come from a moving average of the seconds per step, so that one slow window (a
    checkpoint, an evaluation, a hiccup of a shared machine) does not swing the estimate: each logged window of
    n steps moves the average by 1 - exp(-n / smoothing_steps) of its distance to the window's own seconds per
    step. The first window (which holds the compilation) only starts the average if no other comes; metrics.jsonl
    keeps every window's raw steps_per_sec.
    """

    def __init__(self, total_steps: int, smoothing_steps: float = 100.0):
        self.total_steps = total_steps
        self.smoothing_steps = float(smoothing_steps)
        self.enabled = jax.process_index() == 0
        self._last_step: int | None = None
        self._windows = 0
        self.seconds_per_step: float | None = None

    def _update_speed(self, step: int, rate: float) -> None:
        steps = step - self._last_step if self._last_step is not None else step
        self._last_step = step
        self._windows += 1
        sample = 1.0 / rate
        if self.seconds_per_step is None or self._windows == 2:  # the second window replaces the first
            self.seconds_per_step = sample
            return
        weight = 1.0 - math.exp(-max(steps, 1) / self.smoothing_steps)
        self.seconds_per_step += weight * (sample - self.seconds_per_step)

    def __call__(self, step: int, scalars: Mapping[str, float]) -> None:
        rate = scalars.get("steps_per_sec")
        if rate:
            self._update_speed(step, rate)
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.0f}%)"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        if "learning_rate" in scalars:
            parts.append(f"lr {scalars['learning_rate']:.2e}")
        if rate and self.seconds_per_step:
            eta = (self.total_steps - step) * self.seconds_per_step
            parts.append(f"{1.0 / self.seconds_per_step:.2f} steps/s eta {format_duration(eta)}")
        if "eval/loss" in scalars:
            parts.append(f"eval_loss {scalars['eval/loss']:.4f}")
        print(" ".join(parts), file=sys.stdout, flush=True)
