"""The CPU's vector flags as the kernels may use them: /proc/cpuinfo's, less what an ISA cap takes away.

Why: `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's own knob, which PyTorch's bundled oneDNN reads too) makes a
machine with AVX-512 run as an AVX2-only one, so that both frameworks can be compared there
(benchmarks/vs_pytorch.py --max_isa). The package's own bfloat16 kernels (the Winograd F(2x2) path in
onednn_conv) use AVX512_BF16 instructions outside oneDNN, so they must see the cap as well, and the
per-CPU caches in `perf` must key a capped machine apart from the uncapped one. No JAX here: the
PyTorch reference imports this too.
"""
from __future__ import annotations

import os

CAP_ENV = "ONEDNN_MAX_CPU_ISA"  # oneDNN 3.x reads this name (DNNL_MAX_CPU_ISA is its older spelling)

# oneDNN's ISA levels, lowest first (its cpu_isa names); a cap at one allows the flags of it and below.
_LEVELS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
           "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
           "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")
# The /proc/cpuinfo flags each level is the first to allow.
_FIRST_ALLOWED = {"AVX": ("avx",), "AVX2": ("avx2", "fma"), "AVX2_VNNI": ("avx_vnni",),
                  "AVX512_CORE": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"),
                  "AVX512_CORE_VNNI": ("avx512_vnni",), "AVX512_CORE_BF16": ("avx512_bf16",),
                  "AVX512_CORE_FP16": ("avx512_fp16",), "AVX512_CORE_AMX": ("amx_tile", "amx_bf16", "amx_int8"),
                  "AVX512_CORE_AMX_FP16": ("amx_fp16",)}


def cap(environ=os.environ) -> str | None:
    """The ISA cap in force (an upper-case oneDNN level name), or None for none (unset, DEFAULT or ALL).

    An unknown name fails fast: oneDNN would ignore it silently and the comparison would not be capped."""
    value = (environ.get(CAP_ENV) or environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if value in ("", "DEFAULT", "ALL"):
        return None
    if value not in _LEVELS:
        raise ValueError(f"{CAP_ENV}={value!r} is not a oneDNN ISA level; use one of {', '.join(_LEVELS)}, "
                         "or unset it")
    return value


def allowed(flags, environ=os.environ) -> set[str]:
    """`flags` (from /proc/cpuinfo) less those above the cap: every AVX-512/AMX extension (any flag named
    avx512*/amx*, even ones the table does not know) above an AVX2 cap, and the table's flags above the others."""
    level = cap(environ)
    flags = set(flags)
    if level is None:
        return flags
    rank = _LEVELS.index(level)
    denied = {f for lvl, named in _FIRST_ALLOWED.items() if _LEVELS.index(lvl) > rank for f in named}
    if rank < _LEVELS.index("AVX512_CORE"):
        denied |= {f for f in flags if f.startswith(("avx512", "amx"))}
    return flags - denied
