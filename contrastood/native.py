"""Compiles the package's C++ XLA FFI kernels (contrastood/kernels/*.cc) once, into the cache.

Why here: a wheel would need a build per jaxlib and CPU, so the few kernels are built on first use
with the system's C++ compiler (a few seconds) into the directory `perf` caches in, keyed by their
source, jaxlib, compiler and link flags, under a file lock so that parallel test workers build once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

from contrastood import perf

KERNELS = pathlib.Path(__file__).resolve().parent / "kernels"


def compiler() -> str:
    """$CXX, else g++ (or c++); fails with the fix when there is none."""
    wanted = os.environ.get("CXX") or "g++"
    found = shutil.which(wanted) or (None if os.environ.get("CXX") else shutil.which("c++"))
    if not found:
        raise RuntimeError(f"no C++ compiler ({wanted}) found to build contrastood's CPU kernels; "
                           "install g++ or point CXX at one")
    return found


def build(source: pathlib.Path, flags: list[str], key: list[bytes] = ()) -> str:
    """The path of `source` compiled to a shared library with `flags` (and `key`: more cache-key parts)."""
    import jax
    import jaxlib

    cxx = compiler()
    digest = hashlib.sha256(b"|".join([source.read_bytes(), jaxlib.__version__.encode(), cxx.encode(),
                                       " ".join(flags).encode(), *key])).hexdigest()[:16]
    out_dir = os.path.join(perf.cache_root(), "kernels")
    out = os.path.join(out_dir, f"{source.stem}-{digest}.so")
    if os.path.exists(out):
        return out
    os.makedirs(out_dir, exist_ok=True)
    with open(out + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: one builds, the others wait and load it
        if os.path.exists(out):
            return out
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so")
        os.close(fd)
        command = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type",
                   f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp, *flags]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building {source.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: a reader never sees half a library
    return out
