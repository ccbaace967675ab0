"""Multi-process JAX start-up, switched on by environment variables (set by launch/tpu_run.sh).

Every entry point goes through `gin_utils.run`, which calls `maybe_initialize()` before anything touches a JAX
backend (jax.distributed.initialize must come first). What it does depends on the environment:

  MUSICLM_COORDINATOR=HOST:PORT      explicit set-up (tpu_run.sh --local N: one process per CPU "host" over
  MUSICLM_NUM_PROCESSES=N            loopback). All three must be set together; they win over
  MUSICLM_PROCESS_ID=I               MUSICLM_DISTRIBUTED.
  MUSICLM_DISTRIBUTED=1              TPU pod (tpu_run.sh on every worker): jax.distributed.initialize() with no
                                     arguments; JAX reads coordinator, process count and index from the TPU VM
                                     metadata.
  none of these, or MUSICLM_DISTRIBUTED=0: a single process; nothing happens.

On CPU, cross-process collectives need a collectives implementation; jax 0.10 defaults
`jax_cpu_collectives_implementation` to "gloo", so nothing is set here (the jax config flag or its environment
variable JAX_CPU_COLLECTIVES_IMPLEMENTATION overrides it). The number of CPU devices per process comes from
XLA_FLAGS=--xla_force_host_platform_device_count=K, which tpu_run.sh --local sets for each process.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

ENV_DISTRIBUTED = "MUSICLM_DISTRIBUTED"
ENV_COORDINATOR = "MUSICLM_COORDINATOR"
ENV_NUM_PROCESSES = "MUSICLM_NUM_PROCESSES"
ENV_PROCESS_ID = "MUSICLM_PROCESS_ID"
_EXPLICIT = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)

_initialized = False  # set once this module has initialized jax.distributed (makes a second call a no-op)


class DistributedConfigError(ValueError):
    """A MUSICLM_* distributed environment variable is missing or malformed (the message names it)."""


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name].strip()
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"{name}={env[name]!r} is not an integer") from None


def config_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """Reads the MUSICLM_* variables -> keyword arguments for jax.distributed.initialize, or None (single process).

    Explicit set-up gives {'coordinator_address', 'num_processes', 'process_id'}; MUSICLM_DISTRIBUTED=1 gives {}
    (JAX auto-detects on TPU). Raises DistributedConfigError naming the variable when a value is malformed.
    """
    env = os.environ if env is None else env
    given = [name for name in _EXPLICIT if env.get(name, "").strip()]
    if given:
        missing = [name for name in _EXPLICIT if name not in given]
        if missing:
            raise DistributedConfigError(f"{', '.join(given)} set but {', '.join(missing)} not: explicit "
                                         f"distributed set-up needs all of {', '.join(_EXPLICIT)}")
        coordinator = env[ENV_COORDINATOR].strip()
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedConfigError(f"{ENV_COORDINATOR}={coordinator!r} is not HOST:PORT (e.g. 127.0.0.1:8476)")
        num_processes = _int_var(env, ENV_NUM_PROCESSES)
        if num_processes < 1:
            raise DistributedConfigError(f"{ENV_NUM_PROCESSES}={num_processes} must be >= 1")
        process_id = _int_var(env, ENV_PROCESS_ID)
        if not 0 <= process_id < num_processes:
            raise DistributedConfigError(f"{ENV_PROCESS_ID}={process_id} must be in [0, {num_processes}) "
                                         f"({ENV_NUM_PROCESSES}={num_processes})")
        return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    flag = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if flag in ("", "0", "false", "no"):
        return None
    if flag in ("1", "true", "yes"):
        return {}
    raise DistributedConfigError(f"{ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r} must be 1 or 0")


def maybe_initialize(env: Optional[Mapping[str, str]] = None) -> bool:
    """Initializes jax.distributed if the environment asks for it; returns whether it is (now) initialized.

    Idempotent: a second call (or a call after someone else initialized jax.distributed) does nothing. Must run
    before the first JAX computation in the process. Prints one line
    `distributed: process i of n, k local devices, m global` when it initializes.
    """
    global _initialized
    config = config_from_env(env)  # validate first, so a malformed value fails fast even on a second call
    if config is None:
        return False
    import jax
    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return True
    jax.distributed.initialize(**config)
    _initialized = True
    print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local devices, {jax.device_count()} global", flush=True)
    return True


def sum_over_processes(values):
    """Each process's float64 array (the same shape on all) -> their sum over processes, bit for bit the same on
    every process. The arrays travel as raw bytes (no float32 rounding on the way, whatever jax_enable_x64 says)
    and are added in process order; with one process the array comes back unchanged."""
    import jax
    import numpy as np
    values = np.ascontiguousarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(values.reshape(-1).view(np.uint32)))
    parts = [np.ascontiguousarray(row).view(np.float64).reshape(values.shape) for row in gathered]
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def value_of_process_0(value: int) -> int:
    """An integer as process 0 sees it, on every process (e.g. whether a file exists, decided once)."""
    import jax
    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (nothing with one process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
