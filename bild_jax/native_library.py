"""bild-jax's native CPU kernels (`native/*.cc`): compiled on first use, cached, registered with XLA's FFI.

The library is built with the machine's C++ compiler (`CXX`, else g++, c++ or clang++; `-O3 -march=native`)
and cached under `$BILD_JAX_CACHE` (default ~/.cache/bild_jax), keyed by the sources, jax's version, the
compiler, its flags and the CPU's features. Without a compiler, or with `BILD_JAX_NATIVE_MATMUL=0`, every
caller keeps XLA's own operations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import jax

from bild_jax.atomic import atomic_path

SOURCE_DIR = Path(__file__).parent / "native"
# FFI target -> symbol of its handler in the library.
TARGETS = {"bild_matmul": "BildMatmul", "bild_matmul_transposed": "BildMatmulTransposed",
           "bild_matmul_transposed_bf16": "BildMatmulTransposedBf16",
           "bild_attention": "BildAttention", "bild_widen_after": "BildWidenAfter", "bild_panels": "BildPanels",
           "bild_lookup": "BildLookup", "bild_decoder_step": "BildDecoderStep",
           "bild_log_normalizer": "BildLogNormalizer"}


def available() -> bool:
    """Whether the native kernels are enabled and built (builds them on first call)."""
    return os.environ.get("BILD_JAX_NATIVE_MATMUL", "1") != "0" and _library() is not None


def runs_here() -> bool:
    """Whether computations here take the native kernels: they run on one CPU device (a sharded model keeps
    XLA's operations, which the SPMD partitioner splits) and the kernels are `available`."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


@functools.cache
def has_amx() -> bool:
    """Whether the CPU multiplies bfloat16 matrices in AMX tiles (Linux flag `amx_bf16`), which XLA's dot
    uses: a [256, 256] x [256, 3072] product took 0.24x the float32 time on a 2-core Xeon."""
    return "amx_bf16" in _cpu_flags().split()


@functools.cache
def l2_cache_bytes() -> int:
    """Bytes of L2 cache of the cores this process may run on, each cache counted once (Linux sysfs; 0 where
    unknown)."""
    caches = {}
    for cpu in os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ():
        for index in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
            try:
                if (index / "level").read_text().strip() == "2":
                    caches[(index / "shared_cpu_list").read_text().strip()] = _bytes((index / "size").read_text())
            except (OSError, ValueError):
                continue
    return sum(caches.values())


def _bytes(size: str) -> int:
    """sysfs cache sizes such as "2048K" -> bytes."""
    size = size.strip()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
    return int(size[:-1] if scale > 1 else size) * scale


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels with their FFI targets registered, or None (with one warning) if they cannot be
    built."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"bild-jax: the native CPU kernels are unavailable ({error}); decoding on CPU uses "
                      f"XLA's operations, about 1.9x slower per step", RuntimeWarning, stacklevel=3)
        return None
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library


def _build() -> Path:
    """Path of the shared library for these sources, jaxlib and CPU, compiled now if not cached."""
    compiler = os.environ.get("CXX") or next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)
    if compiler is None:
        raise OSError("no C++ compiler found (set CXX)")
    sources = sorted(SOURCE_DIR.glob("*.cc"))
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
             f"-I{SOURCE_DIR}"]
    texts = [path.read_text() for path in sorted(SOURCE_DIR.glob("*.[ch]*"))]
    key = hashlib.sha256("\n".join([*texts, jax.__version__, compiler, *flags[:-1], platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("BILD_JAX_CACHE", Path.home() / ".cache" / "bild_jax")) / "native"
    library = cache / f"kernels-{key}.so"
    if not library.exists():
        with atomic_path(library) as partial:
            done = subprocess.run([compiler, *flags, *map(str, sources), "-o", str(partial)], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
    return library


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared between machines never runs code built for
    another CPU (`-march=native`)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""
