"""ISA caps (ONEDNN_MAX_CPU_ISA): what the kernels may use, as oneDNN and contrastood.perf see it."""
import json
import os
import subprocess
import sys

import pytest

from contrastood import cpu_isa, perf

# A Sapphire Rapids' vector flags (AVX-512 with BF16 and FP16, AMX) and some that no cap touches.
SPR = {"sse4_2", "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd",
       "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "amx_tile", "amx_bf16", "amx_int8", "sha_ni"}


@pytest.mark.parametrize("value", [None, "", "default", "ALL", "avx512_core_amx_fp16"])
def test_no_cap_or_the_highest_keeps_every_flag(value):
    environ = {} if value is None else {cpu_isa.CAP_ENV: value}
    assert cpu_isa.allowed(SPR, environ) == SPR


@pytest.mark.parametrize("value, denied", [
    ("AVX2", {f for f in SPR if f.startswith(("avx512", "amx"))} | {"avx_vnni"}),
    ("avx2_vnni", {f for f in SPR if f.startswith(("avx512", "amx"))}),
    ("AVX512_CORE", {"avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}),
    ("AVX512_CORE_BF16", {"avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}),
    ("AVX512_CORE_AMX", set()),
    ("SSE41", {f for f in SPR if f.startswith(("avx", "amx")) or f == "fma"}),
])
def test_a_cap_takes_away_the_flags_above_it(value, denied):
    assert cpu_isa.allowed(SPR, {cpu_isa.CAP_ENV: value}) == SPR - denied


def test_older_spelling_and_unknown_levels():
    assert cpu_isa.cap({"DNNL_MAX_CPU_ISA": "avx2"}) == "AVX2"
    with pytest.raises(ValueError, match="ONEDNN_MAX_CPU_ISA='AVX3'.*AVX512_CORE"):
        cpu_isa.allowed(SPR, {cpu_isa.CAP_ENV: "avx3"})


def test_perf_sees_the_cap():
    """A capped process has no bf16 hardware and keys its cached choices apart from an uncapped one."""
    code = ("import json; from contrastood import perf; "
            "print(json.dumps([perf.cpu_has_bf16(), perf.cpu_identity()['isa'], perf._key('w')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, cpu_isa.CAP_ENV: "AVX2"})
    has_bf16, isa, key = json.loads(out.stdout.strip().splitlines()[-1])
    assert not has_bf16
    assert not [f for f in isa.split() if f.startswith(("avx512", "amx"))]
    uncapped = perf.cpu_identity()["isa"]
    assert set(isa.split()) <= set(uncapped.split())
    if "avx512f" in uncapped.split():  # this CPU has something to take away: the keys must differ
        assert key != perf._key("w")


def test_torch_reference_sees_the_cap(monkeypatch):
    pytest.importorskip("torch")
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"
    spec = importlib.util.spec_from_file_location("torch_reference_cap", script)
    tr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tr)
    _, uncapped = tr.cpu_info()
    monkeypatch.setenv(cpu_isa.CAP_ENV, "AVX2")
    _, flags = tr.cpu_info()
    assert not tr.cpu_has_bf16(flags)
    assert flags == {f for f in uncapped if not f.startswith(("avx512", "amx")) and f != "avx_vnni"}
