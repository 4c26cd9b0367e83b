"""Throughput accounting: XLA-estimated FLOPs of a compiled step and the model FLOP utilisation (MFU).

MFU = (FLOPs the compiled step performs per device) x (steps per second) / (peak FLOP/s per device).
The FLOPs come from XLA's own cost analysis of the partitioned program, so they count what runs (two
views, forward, backward, optimiser), not a paper formula. The peak comes from `train.peak_tflops`
when set, else from the accelerator's data sheet (dense bf16/fp32), else, on CPUs, from a measured
matrix product in the compute dtype: there MFU reads as "fraction of the best this CPU does on a
large matmul under XLA", which is the ceiling a direct convolution can approach. Winograd layers
(onednn_conv.winograd_conv3x3, winograd_bf16_conv3x3) count as the direct convolutions they replace, so
the FLOPs stay the model's; they do 1/4 (F(4x4), float32) or 1/2.25 (F(2x2), bfloat16) of the
multiplications, so a step's MFU can pass 100% on a CPU.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from contrastood import cpu_isa, host_memory

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


# XLA:CPU option sets tried on each new CPU (see choose_cpu_options). With XLA's defaults YNNPACK runs
# dots and convolutions too; on the CPUs measured so far (an Intel Xeon with AVX-512/AMX, an AMD EPYC
# with AVX-512/BF16) keeping only reductions and elementwise fusions in YNNPACK was fastest: ResNet-18's
# step 23.2 -> 55.7 and 18.9 -> 36.6 passes/s (results/README.md), because the weight-gradient
# convolutions no longer need transposes.
_R, _E = "LIBRARY_FUSION_TYPE_REDUCE", "LIBRARY_FUSION_TYPE_ELTWISE"
CPU_CANDIDATES = {
    "xla_defaults": {},
    "ynn_reduce_eltwise": {"xla_cpu_experimental_ynn_fusion_type": f"{_R},{_E}"},
    "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
CPU_COMPILER_OPTIONS = CPU_CANDIDATES["ynn_reduce_eltwise"]  # the choice on the CPUs measured so far
# With oneDNN's convolutions (model.conv, contrastood.onednn_conv) there are no weight-gradient transposes
# left to avoid, and YNNPACK's elementwise fusions make XLA materialise every BatchNorm broadcast: on the
# AMD EPYC of results/cpu_speed XLA's defaults ran ResNet-18's step at 44.6 against 35.3 passes/s.
DEFAULT_CANDIDATE = {"xla": "ynn_reduce_eltwise", "onednn": "xla_defaults", "winograd": "xla_defaults"}
DISABLE_ENV = "CONTRASTOOD_XLA_CPU_TUNING"  # 0: XLA's defaults; 1 (default): the cached measured choice
OPTIONS_ENV = "CONTRASTOOD_XLA_CPU_OPTIONS"  # a name of CPU_CANDIDATES: use it, measure nothing
LAYER_TUNING_ENV = "CONTRASTOOD_CONV_LAYER_TUNING"  # 0: Winograd by its fixed rule, no per-layer measurements
CACHE_ENV = "CONTRASTOOD_CACHE_DIR"  # where the per-CPU choice is kept (default ~/.cache/contrastood)
_MIN_GAIN = 1.05  # a candidate must beat XLA's defaults by 5% to be chosen (below that it is noise)
# Measuring costs about one compile per candidate: shorter runs take the cached choice, or the default.
TUNE_MIN_STEPS = 1000


def compiler_options(workload: str | None = None, conv: str = "xla") -> dict[str, str]:
    """XLA options for a jitted step of this package (`jax.jit(..., compiler_options=...)`).

    CPU backends only. The training loop measures the candidates on its own step the first time a
    CPU model (and jax version) meets a workload (`choose`), and caches the winner; a step of a
    workload with a cached choice gets it, any other step (and every step of a multi-process run)
    the default for its convolution kernels `conv` (DEFAULT_CANDIDATE: CPU_COMPILER_OPTIONS for XLA's).
    `CONTRASTOOD_XLA_CPU_OPTIONS=NAME` picks a candidate by name and measures nothing;
    `CONTRASTOOD_XLA_CPU_TUNING=0` gives XLA's defaults. An option this XLA does not know (another
    jaxlib) drops that candidate, with a warning, rather than failing.
    """
    if os.environ.get(DISABLE_ENV, "1") == "0" or jax.default_backend() != "cpu":
        return {}
    forced = os.environ.get(OPTIONS_ENV)
    if forced:
        if forced not in CPU_CANDIDATES:
            raise ValueError(f"{OPTIONS_ENV}={forced!r}; use one of {sorted(CPU_CANDIDATES)}")
        return dict(CPU_CANDIDATES[forced]) if _supported(forced) else {}
    # Several processes must compile the same program (their replicated states would drift apart under
    # different options, and a host measuring alone would wait forever in the step's collectives), and
    # each host has its own cache: they all take the fixed default.
    cached = _read_table(_cache_file()).get(_key(workload)) if workload and jax.process_count() == 1 else None
    if cached and cached.get("choice") in CPU_CANDIDATES:
        return dict(CPU_CANDIDATES[cached["choice"]])
    default = DEFAULT_CANDIDATE.get(conv, "ynn_reduce_eltwise")
    return dict(CPU_CANDIDATES[default]) if _supported(default) else {}


def workload(config, num_devices: int) -> str:
    """The key a measured choice is cached under: what decides which XLA:CPU options are fastest."""
    from contrastood import onednn_conv

    conv = onednn_conv.resolve(config.model.get("conv", "auto"), jax.default_backend())
    return (f"{config.model.name}-x{config.model.width}-{config.model.dtype}-{config.data.image_size}px-"
            f"b{config.train.batch_size // max(num_devices, 1)}x{num_devices}-"
            f"{'contrastive' if config.train.contrastive else 'supervised'}-norm_{config.model.get('norm', 'fused')}-"
            f"conv_{conv}")


def _tuning_allowed() -> bool:
    # One process only: every process must compile the same program.
    return jax.default_backend() == "cpu" and jax.process_count() == 1 and os.environ.get(DISABLE_ENV, "1") != "0"


def tuning_active() -> bool:
    """Whether `choose` would measure (a CPU backend, one process, tuning on, no option set forced by name)."""
    return _tuning_allowed() and not os.environ.get(OPTIONS_ENV)


def layer_tuning_enabled() -> bool:
    """Whether per-layer kernel choices (onednn_conv.choose_layers) are measured and used: a CPU backend, one
    process, CONTRASTOOD_XLA_CPU_TUNING not 0 and CONTRASTOOD_CONV_LAYER_TUNING not 0. Forcing an XLA option set
    by name (CONTRASTOOD_XLA_CPU_OPTIONS) leaves them on."""
    return _tuning_allowed() and os.environ.get(LAYER_TUNING_ENV, "1") != "0"


def choose(workload: str, seconds_per_step, conv: str = "xla") -> dict[str, str]:
    """The fastest candidate for `workload` on this CPU, measured once and cached.

    `seconds_per_step(options)` compiles and times the real step with those options. Measuring happens
    under an exclusive file lock, so parallel processes (test workers) measure once and the others read
    the result. A candidate must beat XLA's defaults by 5% to be chosen (below that it is noise).
    """
    if not tuning_active():
        return compiler_options(workload, conv)
    key = _key(workload)
    with locked_table(_cache_file()) as table:
        if key in table and table[key].get("choice") in CPU_CANDIDATES:
            return dict(CPU_CANDIDATES[table[key]["choice"]])
        started = time.perf_counter()
        timings = {name: seconds_per_step(dict(options)) for name, options in CPU_CANDIDATES.items()
                   if _supported(name)}
        choice = min(timings, key=timings.get)
        if "xla_defaults" in timings and timings[choice] * _MIN_GAIN > timings["xla_defaults"]:
            choice = "xla_defaults"
        table[key] = {"choice": choice, "seconds_per_step": timings, "workload": workload,
                      "identity": cpu_identity(), "measured_at": time.strftime("%Y-%m-%d %H:%M"),
                      "measuring_took_s": round(time.perf_counter() - started, 1)}
        logging.info("XLA:CPU options for %s on %s: %s (seconds per step %s; measured once, cached in %s)",
                     workload, cpu_identity()["cpu"], choice, timings, _cache_file())
        return dict(CPU_CANDIDATES[choice])


@contextlib.contextmanager
def locked_table(path: str):
    """The JSON table of measurements at `path`, held under an exclusive file lock so that parallel processes
    (test workers) measure once and the others read the result; written back atomically if it changed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table = _read_table(path)
            before = json.dumps(table, sort_keys=True)
            yield table
            if json.dumps(table, sort_keys=True) != before:
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(table, f, indent=2)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def _supported(name: str) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_CANDIDATES[name]).lower(jnp.zeros(())).compile()
    except Exception as error:  # INVALID_ARGUMENT from XLA for unknown options or values
        logging.warning("XLA rejected the CPU options %s = %s (%s); not using them", name, CPU_CANDIDATES[name],
                        str(error).splitlines()[0][:200])
        return False
    return True


@functools.lru_cache(maxsize=None)
def cpu_identity() -> dict[str, str]:
    """What a choice depends on: the CPU model and vector ISA (as capped by ONEDNN_MAX_CPU_ISA, cpu_isa), the
    jax/jaxlib version, the device count."""
    import jaxlib

    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "asimd", "sve")
                    usable = cpu_isa.allowed(line.split(":", 1)[1].split())  # less an ONEDNN_MAX_CPU_ISA cap
                    flags = " ".join(sorted(f for f in usable if f in wanted))
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "isa": flags, "cores": str(os.cpu_count()),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "devices": str(jax.local_device_count())}


def _key(workload: str | None) -> str:
    return "|".join([f"{k}={v}" for k, v in sorted(cpu_identity().items())] + [f"workload={workload}"])


def cache_root() -> str:
    """Where measured choices and compiled kernels (onednn_conv) are kept: $CONTRASTOOD_CACHE_DIR or
    ~/.cache/contrastood."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "contrastood")


def _cache_file() -> str:
    root = cache_root()
    return os.path.join(root, "xla_cpu_options.json")


def _read_table(path: str) -> dict:
    try:
        with open(path) as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, per device, from XLA's cost analysis (nan if absent).

    XLA counts nothing for custom calls, so oneDNN's convolutions are added from their shapes in the
    compiled (partitioned, per-device) HLO."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # best-effort API: unimplemented on some backends
        return float("nan")
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops", float("nan"))
    try:
        from contrastood import onednn_conv

        flops = (flops if flops and flops > 0 else 0.0) + onednn_conv.hlo_flops(compiled.as_text())
    except Exception:  # as_text is best-effort too
        pass
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
    for options in ({}, compiler_options()):  # the better of XLA's defaults and the chosen options
        matmul = jax.jit(lambda x: x @ x, compiler_options=options)
        jax.block_until_ready(matmul(a))
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a))
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product hardware (avx512_bf16 or amx_bf16 in /proc/cpuinfo) that no
    ONEDNN_MAX_CPU_ISA cap takes away."""
    return any(flag in cpu_identity()["isa"].split() for flag in ("avx512_bf16", "amx_bf16"))


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
        n = jax.local_device_count()
        if dtype == "bfloat16":
            # XLA's own bf16 matmul does not use bf16 dot-product units (it measured below float32 here), but
            # oneDNN's convolutions do. AVX512_BF16 does two multiply-adds per float32 lane, so the float32 rate
            # x 2 is its ceiling; AMX's tiles go far past that (oneDNN's bf16 1x1 convolution ran at 5-7x XLA's
            # float32 matmul on a 2-core Xeon), so oneDNN's measured bf16 rate counts too.
            factor = 2.0 if cpu_has_bf16() else 1.0
            rates = {"measured bfloat16 matmul": measured_matmul_flops("bfloat16"),
                     f"{factor:g} x measured float32 matmul": factor * measured_matmul_flops("float32")}
            if cpu_has_bf16():
                from contrastood import onednn_conv

                rates["measured oneDNN bfloat16 1x1 convolution"] = onednn_conv.measured_flops("bfloat16")
            rates = {name: rate for name, rate in rates.items() if rate == rate}  # drop nan (no oneDNN kernel)
            best = max(rates, key=rates.get)
            return rates[best] / n, (f"{best}, the highest of {', '.join(rates)} on this CPU"
                                     f"{' (bf16 hardware)' if factor > 1 else ''} / {n} devices")
        peak = measured_matmul_flops(dtype) / n
        return peak, f"measured {dtype} matmul on this CPU / {n} devices"
    return float("nan"), f"unknown device kind {device.device_kind!r}; set --config.train.peak_tflops"


def mfu(flops_per_step_per_device: float, steps_per_sec: float, peak_per_device: float) -> float:
    """Model FLOP utilisation in [0, 1] (nan when either figure is unknown)."""
    if not (peak_per_device > 0) or math.isnan(flops_per_step_per_device):
        return float("nan")
    return flops_per_step_per_device * steps_per_sec / peak_per_device


def log_peak(dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
    peak, source = peak_flops_per_device(dtype, override_tflops)
    logging.info("MFU denominator: %.1f TFLOP/s per device (%s)", peak / 1e12, source)
    if jax.default_backend() == "cpu":
        logging.info("host malloc: %s (%s)", "reuses freed step buffers" if host_memory.state["applied"]
                     else "glibc defaults", host_memory.state["reason"])
    return peak, source
