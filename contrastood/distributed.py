"""Multi-process start-up: `jax.distributed.initialize()` before anything touches a JAX device.

A multi-host run is one process per host (or per GPU), all running the same command; they meet at
process 0's coordinator, after which `jax.devices()` lists every device of every process and the
('data',) mesh of `parallel` spans them all. Where the settings come from, first match wins:

1. Explicit, per field: the flags of `contrastood.main`, `--coordinator_address=HOST:PORT`
   `--num_processes=N` `--process_id=I`, else the environment variables
   `CONTRASTOOD_COORDINATOR=HOST:PORT`, `CONTRASTOOD_NUM_PROCESSES=N`, `CONTRASTOOD_PROCESS_ID=I`.
   HOST:PORT is where process 0 listens (any free port; every process passes the same value),
   I runs over 0..N-1. Setting one of the three means setting all three. N = 1 initialises nothing.
2. Detected (mode `auto`, the default): a multi-worker Cloud TPU environment, i.e.
   `TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` listing several hosts, or
   `MEGASCALE_COORDINATOR_ADDRESS` (multi-slice), or a Cloud TPU VM as detected by JAX at import
   (libtpu and TPU chips present). Then `jax.distributed.initialize()` is called without arguments
   and JAX's own cluster detection finds coordinator, process count and id.
3. Otherwise nothing is called: the single-process run, exactly as without this module.

The mode (`--distributed`, else `CONTRASTOOD_DISTRIBUTED`) is `auto`, `on` (always initialise;
what is not given explicitly is left to JAX's cluster detection: Cloud TPU, Slurm `srun`, Open MPI
`mpirun`, mpi4py with JAX_CLUSTER_DETECTION...) or `off` (never initialise, whatever is set).

Per-process device selection is JAX's: `JAX_LOCAL_DEVICE_IDS=0,1` (or `CUDA_VISIBLE_DEVICES`) when
several processes share one GPU machine. Cross-process collectives on CPU go through gloo, the
default of `jax_cpu_collectives_implementation` in the JAX this package requires.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

MODES = ("auto", "on", "off")
ENV_MODE = "CONTRASTOOD_DISTRIBUTED"
ENV_COORDINATOR = "CONTRASTOOD_COORDINATOR"
ENV_NUM_PROCESSES = "CONTRASTOOD_NUM_PROCESSES"
ENV_PROCESS_ID = "CONTRASTOOD_PROCESS_ID"

_FIX = ("start every process with --coordinator_address=HOST:PORT --num_processes=N --process_id=I "
        f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), HOST:PORT being where process 0 "
        "listens and I = 0..N-1")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Arguments for `jax.distributed.initialize`; None = left to JAX's cluster detection."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    reason: str


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer; {_FIX}") from None


def _check_address(address: str, name: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}={address!r} is not HOST:PORT (e.g. 10.0.0.1:12355, or "
                         f"localhost:12355 for processes on one machine); {_FIX}")
    return address


def _multi_worker_tpu_env(environ: Mapping[str, str]) -> str | None:
    for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in environ.get(var, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"{var} lists {len(hosts)} hosts"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS is set (multi-slice TPU)"
    return None


def _on_cloud_tpu_vm() -> bool:
    """JAX's own detection at import (libtpu installed and TPU chips present); False if unknown."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def resolve(mode: str | None = None, coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, *, environ: Mapping[str, str] | None = None,
            on_cloud_tpu_vm: bool | None = None) -> Settings | None:
    """The settings `initialize` would use, or None for a single-process run. Touches no device.

    Arguments (the flags) override the CONTRASTOOD_* variables of `environ` (default os.environ)
    field by field; invalid or incomplete settings raise ValueError naming the fix.
    """
    environ = os.environ if environ is None else environ
    mode = mode or environ.get(ENV_MODE) or "auto"
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r} (--distributed or {ENV_MODE}) must be one of {', '.join(MODES)}")
    if mode == "off":
        return None
    address = coordinator_address or environ.get(ENV_COORDINATOR) or None
    address_name = "--coordinator_address" if coordinator_address else ENV_COORDINATOR
    count = num_processes if num_processes is not None else _int(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    count_name = "--num_processes" if num_processes is not None else ENV_NUM_PROCESSES
    index = process_id if process_id is not None else _int(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    index_name = "--process_id" if process_id is not None else ENV_PROCESS_ID

    if address is not None:
        _check_address(address, address_name)
    if count is not None and count < 1:
        raise ValueError(f"{count_name}={count} must be >= 1; {_FIX}")
    if index is not None and index < 0:
        raise ValueError(f"{index_name}={index} must be >= 0; {_FIX}")
    if count is not None and index is not None and index >= count:
        raise ValueError(f"{index_name}={index} is out of range for {count_name}={count}: process ids run "
                         f"from 0 to {count - 1}; {_FIX}")

    explicit = {"coordinator address": address, "number of processes": count, "process id": index}
    given = [k for k, v in explicit.items() if v is not None]
    if mode == "on":
        return Settings(address, count, index, "--distributed=on")
    if given:
        if count == 1:
            return None  # one process: nothing to coordinate
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(f"multi-process settings are incomplete: {', '.join(given)} given but "
                             f"{' and '.join(missing)} missing; {_FIX}. (On a cluster JAX can detect, e.g. Slurm "
                             f"or Cloud TPU, --distributed=on leaves the missing ones to JAX.)")
        return Settings(address, count, index, "explicit settings")
    reason = _multi_worker_tpu_env(environ)
    if reason is None and (on_cloud_tpu_vm if on_cloud_tpu_vm is not None else _on_cloud_tpu_vm()):
        reason = "Cloud TPU VM"
    if reason is not None:
        return Settings(None, None, None, reason)
    return None


def initialize(mode: str | None = None, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when `resolve` says so; True if the runtime is up.

    Must run before anything touches a JAX device (jax.devices(), jax.process_index(), any array).
    Calling it again once initialised does nothing.
    """
    settings = resolve(mode, coordinator_address, num_processes, process_id)
    import jax

    if jax.distributed.is_initialized():
        return True
    if settings is None:
        return False
    logging.info("initialising JAX distributed (%s): coordinator %s, %s processes, this is process %s",
                 settings.reason, settings.coordinator_address or "auto", settings.num_processes or "auto",
                 "auto" if settings.process_id is None else settings.process_id)
    try:
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id)
    except ValueError as error:
        if settings.reason != "Cloud TPU VM":
            raise
        # Only the VM was detected and JAX's cluster detection found no multi-host setting: one process.
        logging.warning("Cloud TPU VM without a detectable cluster (%s); running as one process", error)
        return False
    logging.info("JAX distributed initialised: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
