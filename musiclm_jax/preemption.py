"""SIGTERM handling for preemptible TPU VMs: note the signal, save at the next step boundary, exit 0.

With several processes the flag is shared (any process signalled -> all stop at the same step), since every
process must take part in the checkpoint save.
"""
from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Installs a SIGTERM handler; `should_stop()` tells the loop (on every process alike) to save and leave."""

    def __init__(self):
        self._signalled = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._signalled = True

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self._signalled
        flags = multihost_utils.process_allgather(np.array([self._signalled], np.int32))
        return bool(np.any(flags))

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
