"""A CPU matrix-vector kernel for batch-1 decoding (XLA FFI custom call `musiclm_matvec`, source `matvec.cc`).

At batch 1 a decoding step is a chain of matrix-vector products, and its time is the weight bytes over the memory
bandwidth. XLA's CPU backend runs such a product on one core, and before a bfloat16 or int8 weight's dot it writes
a float32 copy of the weight, so narrow weights decode no faster than float32 (`benchmarks/lm_sample.py`). This
kernel reads the weight at its own width (float32, bfloat16 or int8), widens it in registers, and splits the
rows over every core (helper threads that spin for 2 ms after their last chunk, so a decoding step's products do
not each pay a thread's wake-up).

`matvec(x, w)` is the product; the library is compiled from `matvec.cc` on first use with the system C++
compiler (`$CXX`, else `c++`) for this CPU (-march=native), cached under `$MUSICLM_JAX_KERNEL_CACHE` (default
~/.cache/musiclm_jax/kernels) by a hash of the source, the compiler and its version, the flags, jaxlib's version
and the CPU's flags, and registered with XLA once per process. A missing compiler is an error naming `$CXX`; nothing falls back
silently.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "musiclm_matvec"
MAX_ROWS = 16  # kMaxRows in matvec.cc: more rows than this is a matrix product, left to XLA
SOURCE = pathlib.Path(__file__).with_name("matvec.cc")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno")


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"musiclm_jax.kernels.matvec: no C++ compiler {cxx!r} on PATH (set $CXX) to build "
                           f"{SOURCE.name}; decode with decode_matvec='xla' instead")
    return path


def library_path() -> pathlib.Path:
    """The compiled kernel library for this source, CPU and jaxlib, built now if it is not cached."""
    import jaxlib
    cxx = _compiler()
    key = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cxx.encode(), version.encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode()):
        key.update(part)
    cache = pathlib.Path(os.environ.get("MUSICLM_JAX_KERNEL_CACHE")
                         or pathlib.Path.home() / ".cache" / "musiclm_jax" / "kernels")
    lib = cache / f"matvec-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # several processes may build at once: rename into place
        out = pathlib.Path(tmp) / lib.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(out, lib)
    return lib


@functools.lru_cache(maxsize=None)
def register() -> pathlib.Path:
    """Builds (if needed) and registers the `musiclm_matvec` target with XLA's CPU backend, once per process."""
    lib = library_path()
    handle = ctypes.cdll.LoadLibrary(str(lib))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handle.MusiclmMatvec), platform="cpu")
    return lib


def matvec(x: jax.Array, w: jax.Array, transposed: bool = False, threads: int = 0) -> jax.Array:
    """x [m, k] float32 (m <= MAX_ROWS) times w -> [m, n] float32, on CPU.

    w: float32, bfloat16 or int8 (values as they are: a scale is the caller's), [k, n], or [n, k] with
    transposed=True (an embedding table used as the output projection). threads: 1 runs on the calling thread
    only; any other value splits the weight over every core the process may run on (the caller and one helper
    thread per further core, kept for the process). Sums are float32.
    """
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"matvec: x {x.shape} and w {w.shape} must be 2-D")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"matvec: x has {x.shape[0]} rows; the kernel takes at most {MAX_ROWS}")
    k, n = (w.shape[1], w.shape[0]) if transposed else w.shape
    if x.shape[1] != k:
        raise ValueError(f"matvec: x {x.shape} does not contract with w {w.shape} (transposed={transposed})")
    if jnp.dtype(w.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8)):
        raise ValueError(f"matvec: weight dtype {w.dtype}; expected float32, bfloat16 or int8")
    register()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.float32), w, transposed=bool(transposed), threads=np.int64(threads))
