"""Throughput accounting: XLA-estimated FLOPs of a compiled step and the model FLOP utilisation (MFU).

MFU = (FLOPs the compiled step performs per device) x (steps per second) / (peak FLOP/s per device).
The FLOPs come from XLA's own cost analysis of the partitioned program, so they count what runs (two
views, forward, backward, optimiser), not a paper formula. The peak comes from `train.peak_tflops`
when set, else from the accelerator's data sheet (dense bf16/fp32), else, on CPUs, from a measured
matrix product in the compute dtype: there MFU reads as "fraction of the best this CPU does on a
large matmul under XLA", which is the ceiling a convolution network can approach.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import time

import jax
import jax.numpy as jnp

# Dense peak TFLOP/s per device (one chip; for GPUs the SXM parts), bf16 and fp32 (no TF32/sparsity).
_PEAK_TFLOPS = {
    "tpu v2": (45.0, 45.0 / 4),
    "tpu v3": (123.0, 123.0 / 4),
    "tpu v4": (275.0, 275.0 / 4),
    "tpu v5 lite": (197.0, 197.0 / 4),
    "tpu v5e": (197.0, 197.0 / 4),
    "tpu v5p": (459.0, 459.0 / 4),
    "tpu v5": (459.0, 459.0 / 4),
    "tpu v6 lite": (918.0, 918.0 / 4),
    "tpu v6e": (918.0, 918.0 / 4),
    "h200": (989.0, 67.0),
    "h100": (989.0, 67.0),
    "a100": (312.0, 19.5),
    "l4": (121.0, 30.0),
    "v100": (125.0, 15.7),
}


# XLA:CPU hands dots and convolutions to YNNPACK by default; on the development CPU (x86-64, AVX-512)
# the ResNet-18 train step then spent a quarter of its time in the transposes its weight-gradient
# convolutions need. Keeping reductions and elementwise fusions in YNNPACK but leaving dots and
# convolutions to XLA's own emitters measured 23.2 -> 55.7 passes/s (README, "Measured here").
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE",
}
DISABLE_ENV = "CONTRASTOOD_XLA_CPU_TUNING"


def compiler_options() -> dict[str, str]:
    """XLA options for every jitted step of this package (`jax.jit(..., compiler_options=...)`).

    CPU only; `CONTRASTOOD_XLA_CPU_TUNING=0` turns them off (XLA's defaults), e.g. to compare. An XLA
    that does not know an option (another jaxlib) gets none of them, with a warning, rather than failing.
    """
    if os.environ.get(DISABLE_ENV, "1") == "0" or jax.default_backend() != "cpu":
        return {}
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_supported() else {}


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(jnp.zeros(())).compile()
    except Exception as error:  # INVALID_ARGUMENT from XLA for unknown options or values
        logging.warning("XLA rejected the CPU tuning options %s (%s); using XLA's defaults",
                        CPU_COMPILER_OPTIONS, str(error).splitlines()[0][:200])
        return False
    return True


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, per device, from XLA's cost analysis (nan if absent)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # best-effort API: unimplemented on some backends
        return float("nan")
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops", float("nan"))
    return float(flops) if flops and flops > 0 else float("nan")


def table_peak_flops(device: jax.Device, dtype: str) -> float | None:
    """Data-sheet dense peak FLOP/s of one device in `dtype`, or None when the device is not listed."""
    kind = device.device_kind.lower()
    for name, (bf16, fp32) in _PEAK_TFLOPS.items():
        if re.search(rf"(^|\W){re.escape(name)}(\W|$)", kind):  # whole words: "l4" is not "l40s"
            return 1e12 * (bf16 if dtype == "bfloat16" else fp32)
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an XLA matrix product on the default backend (all its threads), in `dtype`,
    with XLA's default options and with `compiler_options()`, whichever is faster."""
    a = jnp.ones((size, size), dtype)
    best = math.inf
    for options in ({}, compiler_options()):
        matmul = jax.jit(lambda x: x @ x, compiler_options=options)
        jax.block_until_ready(matmul(a))
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a))
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_device(dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """-> (peak FLOP/s per local device, where the number comes from)."""
    if override_tflops and override_tflops > 0:
        return 1e12 * override_tflops, "config train.peak_tflops"
    device = jax.local_devices()[0]
    peak = table_peak_flops(device, dtype)
    if peak is not None:
        return peak, f"data sheet ({device.device_kind}, {dtype})"
    if device.platform == "cpu":
        # Forced CPU devices share the same cores, so each gets its share of the measured peak.
        peak = measured_matmul_flops(dtype) / jax.local_device_count()
        return peak, f"measured {dtype} matmul on this CPU / {jax.local_device_count()} devices"
    return float("nan"), f"unknown device kind {device.device_kind!r}; set --config.train.peak_tflops"


def mfu(flops_per_step_per_device: float, steps_per_sec: float, peak_per_device: float) -> float:
    """Model FLOP utilisation in [0, 1] (nan when either figure is unknown)."""
    if not (peak_per_device > 0) or math.isnan(flops_per_step_per_device):
        return float("nan")
    return flops_per_step_per_device * steps_per_sec / peak_per_device


def log_peak(dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
    peak, source = peak_flops_per_device(dtype, override_tflops)
    logging.info("MFU denominator: %.1f TFLOP/s per device (%s)", peak / 1e12, source)
    return peak, source
