"""Make glibc keep freed host memory, so XLA:CPU does not page-fault its buffers in again on every step.

XLA:CPU mallocs each execution's buffers (a few hundred MiB for a ResNet train step) and frees them
when the step ends. glibc serves a block above 32 MiB with a fresh mmap, and in a worker thread's
arena it uses mmap for every block above 64 MiB. Each step therefore touches fresh pages for its
whole working set. On the 2-core VM measured (results/README.md), the tiny ResNet's forward and
backward pass at 256 images took 111,519 minor page faults per step and about 490 ms; with the
memory reused, 0 faults and about 300 ms (the full train step: 561 -> 706 passes/s). PyTorch's eager
tensors are smaller than the threshold, so glibc already reuses them: 0 faults per step.

`configure()` turns the faults off with three mallopt settings:
- one arena, so no thread gets an mmap-backed heap;
- no block is served with mmap;
- freed memory is never trimmed back to the OS. A 2 GiB trim threshold was tried first: ResNet-18's
  step (over 2 GiB of buffers at 256 views) then faulted 778,750 pages per step and ran slower than
  with glibc's defaults.

The settings only hold for threads that have not allocated yet, so `configure()` must run before JAX
starts its CPU client: `contrastood.main` calls it before anything else, as do the benchmarks and the
test suite; a library user calls it first. It acts only:
- on Linux with glibc;
- when the input pipeline does not decode on host threads (`host_decoding=False`). One arena makes
  those threads share one malloc lock with XLA's: a 40-step folder run (224 px JPEGs cropped to 64 px
  on the host; two runs each) logged 228-305 images/s with the settings against 271-353 without, so runs
  on folders or with host crops keep glibc's defaults;
- when the backend will be the CPU (on a GPU or TPU host the step buffers live on the device, so the
  faults do not arise there, and its input threads keep glibc's per-thread arenas);
- when JAX has not started a backend yet;
- when the user has not set GLIBC_TUNABLES for malloc;
- and when CONTRASTOOD_HOST_MALLOC is not 0.

The cost: the process keeps the memory of its peak until it exits, and the peak can be higher: in
folder runs of 10 and 40 steps (benchmarks/input_throughput.py) it was 1599-1809 MiB with the
settings against 1428-1446 without them.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

ENV = "CONTRASTOOD_HOST_MALLOC"  # 0: leave glibc's malloc settings alone
# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = -1  # mallopt(M_TRIM_THRESHOLD, -1): never give freed memory back (glibc's documented value)
# The same three settings for another process, which reads them at its start (benchmarks/vs_pytorch.py gives
# PyTorch the same malloc); 1 TiB of free memory before a trim is never, in practice.
GLIBC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"

# What configure() did in this process, and why (for the log and the tests).
state = {"applied": False, "reason": "not called"}


def _backend_will_be_cpu() -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed.

    The check looks for what JAX's own plugin discovery looks for: `jax_plugins` entry points or
    namespace modules (CUDA, ROCm, Metal and other PJRT plugins), and libtpu. It imports nothing.
    """
    platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", "")).strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    try:
        if list(importlib.metadata.entry_points(group="jax_plugins")):
            return False
    except Exception:  # a broken distribution's metadata must not stop the import
        return False
    return importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def decodes_on_host(config) -> bool:
    """Whether a run of `config` decodes on host threads: folder sources, or data.crop='host'.

    A spec that does not parse counts as not decoding; the run reports it later, in its own words.
    """
    from contrastood import errors
    from contrastood.data import specs

    if config.data.crop == "host":
        return True
    try:
        return any(specs.parse_spec(spec).kind == "folder" for spec in (config.data.train, config.data.unlabelled)
                   if spec)
    except errors.ContrastoodError:
        return False


def _jax_backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and bridge.backends_are_initialized())


def configure(host_decoding: bool = False) -> dict:
    """Applies the malloc settings where they pay (see the module docstring); returns `state`.

    host_decoding: the run's input pipeline decodes or crops images on host threads (`decodes_on_host`).
    Only the first call in a process acts.
    """
    if state["reason"] != "not called":
        return state
    if os.environ.get(ENV, "1") == "0":
        reason = f"{ENV}=0"
    elif host_decoding:
        reason = "the input pipeline decodes on host threads, which one malloc arena slows"
    elif not sys.platform.startswith("linux"):
        reason = f"not Linux ({sys.platform})"
    elif "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        reason = "GLIBC_TUNABLES sets malloc options already"
    elif not _backend_will_be_cpu():
        reason = "the JAX backend will be an accelerator"
    elif _jax_backend_started():
        reason = "JAX's backend had already started (its threads keep their arenas)"
    else:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            version = libc.gnu_get_libc_version().decode()
            done = [libc.mallopt(option, value) for option, value in
                    ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))]
        except (OSError, AttributeError):
            reason = "the C library is not glibc"
        else:
            if all(done):
                state.update(applied=True, reason=f"glibc {version}: one arena, no mmap, no trimming")
                return state
            reason = f"glibc {version} refused a mallopt setting ({done})"
    state.update(applied=False, reason=reason)
    return state
