"""Throughput accounting: XLA FLOP counts and model FLOP utilisation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastood import onednn_conv, perf


def test_step_flops_counts_a_matmul():
    m, k, n = 64, 96, 32
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert perf.step_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.05)


def test_mfu_arithmetic_and_unknowns():
    assert perf.mfu(1e9, 10.0, 1e11) == pytest.approx(0.1)
    assert math.isnan(perf.mfu(float("nan"), 10.0, 1e11))
    assert math.isnan(perf.mfu(1e9, 10.0, float("nan")))


def test_peak_sources():
    peak, source = perf.peak_flops_per_device("float32", override_tflops=2.5)
    assert peak == 2.5e12 and "config" in source
    peak, source = perf.peak_flops_per_device("float32")  # CPU: measured, split over the forced devices
    assert "measured" in source and np.isfinite(peak)
    assert peak * jax.local_device_count() == pytest.approx(perf.measured_matmul_flops("float32"))
    # bfloat16: never below the float32 rate, twice it where the CPU has bf16 dot-product units, or oneDNN's
    # measured bf16 rate there if that is higher (AMX)
    bf16_peak, source = perf.peak_flops_per_device("bfloat16")
    factor = 2.0 if perf.cpu_has_bf16() else 1.0
    rates = [perf.measured_matmul_flops("bfloat16"), factor * perf.measured_matmul_flops("float32")]
    if perf.cpu_has_bf16() and onednn_conv.load() is None:
        rates.append(onednn_conv.measured_flops("bfloat16"))
        assert "oneDNN bfloat16 1x1 convolution" in source
    assert bf16_peak * jax.local_device_count() == pytest.approx(max(rates))
    assert f"{factor:g} x measured float32 matmul" in source

    class Device:
        device_kind = "TPU v4"
    assert perf.table_peak_flops(Device(), "bfloat16") == 275e12
    Device.device_kind = "NVIDIA H100 80GB HBM3"
    assert perf.table_peak_flops(Device(), "float32") == 67e12
    Device.device_kind = "NVIDIA L40S"  # not an L4
    assert perf.table_peak_flops(Device(), "bfloat16") is None
    Device.device_kind = "TPU v5 lite"
    assert perf.table_peak_flops(Device(), "bfloat16") == 197e12
    Device.device_kind = "some new chip"
    assert perf.table_peak_flops(Device(), "bfloat16") is None


def test_cpu_compiler_options_keep_the_numbers(monkeypatch):
    """Every candidate changes which emitter runs the convolutions, not what a train step computes."""
    from contrastood import config_lib, models, parallel, train

    config = config_lib.base_config()
    config_lib.apply_cpu_variant(config)
    config.data.train = "generated"
    config.model.proj_dim = 8
    config.train.batch_size = 16
    model = models.create_model(config.model, 4)
    schedule = train.learning_rate_schedule(config, 1, 1, 1)
    tx = train.create_optimizer(config, schedule)
    mesh = parallel.create_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 4, 16).astype(np.int32)}
    results, programs = {}, {}
    for name, options in perf.CPU_CANDIDATES.items():
        state = parallel.replicate(train.create_train_state(jax.random.key(0), model, tx, 32), mesh)
        step = train.jit_train_step(train.make_train_step(model, tx, config, 1, schedule), mesh, options)
        programs[name] = step.lower(state, parallel.to_global(batch, mesh)).compile().as_text()
        for _ in range(2):
            state, metrics = step(state, parallel.to_global(batch, mesh))
        results[name] = jax.device_get((metrics, state.params))
    assert len(set(programs.values())) == len(programs), "jit_train_step did not pass its options to XLA"
    m0, p0 = results["xla_defaults"]
    for name, (m1, p1) in results.items():
        for key in ("loss", "contrastive_loss", "class_loss", "grad_norm"):
            np.testing.assert_allclose(m0[key], m1[key], rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
    monkeypatch.setenv(perf.DISABLE_ENV, "0")
    assert perf.compiler_options() == {}
    monkeypatch.setenv(perf.DISABLE_ENV, "1")
    monkeypatch.setenv(perf.OPTIONS_ENV, "ynn_off")
    assert perf.compiler_options() == perf.CPU_CANDIDATES["ynn_off"]
    monkeypatch.setenv(perf.OPTIONS_ENV, "fastest")
    with pytest.raises(ValueError, match="CONTRASTOOD_XLA_CPU_OPTIONS='fastest'"):
        perf.compiler_options()


def test_the_choice_is_measured_once_per_cpu_and_workload_even_by_parallel_processes(tmp_path):
    """Four processes on a new CPU (an empty cache) race: one measures, the others read its choice."""
    import subprocess
    import sys

    code = f"""
import json, os, time
from contrastood import perf
calls = []
def seconds_per_step(options):
    calls.append(options)
    time.sleep(0.5)
    return 2.0 if options == {{}} else 1.0 if options == perf.CPU_CANDIDATES["ynn_off"] else 1.5
options = perf.choose("race-workload", seconds_per_step)
print(json.dumps({{"measured": len(calls), "options": options}}))
"""
    env = {**__import__("os").environ, perf.CACHE_ENV: str(tmp_path), perf.OPTIONS_ENV: ""}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    outs = [__import__("json").loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(o["measured"] for o in outs) == [0, 0, 0, len(perf.CPU_CANDIDATES)]
    assert all(o["options"] == perf.CPU_CANDIDATES["ynn_off"] for o in outs)  # the fastest of the fake timings
    table = __import__("json").loads((tmp_path / "xla_cpu_options.json").read_text())
    (entry,) = table.values()
    assert entry["choice"] == "ynn_off" and entry["workload"] == "race-workload"
    assert entry["identity"]["jax"] == jax.__version__
    # A candidate within 5% of XLA's defaults does not displace them.
    code_close = code.replace("race-workload", "close-workload").replace(
        "return 2.0 if options == {} else 1.0", "return 1.0 if options == {} else 0.97")
    out = subprocess.run([sys.executable, "-c", code_close], capture_output=True, text=True, env=env, timeout=300)
    assert __import__("json").loads(out.stdout.strip().splitlines()[-1])["options"] == {}


def test_a_multi_process_run_takes_the_fixed_default_and_measures_nothing(tmp_path, monkeypatch):
    """Processes must compile one program: a host's cached choice is ignored and nothing is measured (a
    host measuring alone would block in the step's collectives)."""
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(perf.OPTIONS_ENV, raising=False)
    monkeypatch.delenv(perf.DISABLE_ENV, raising=False)
    assert perf.choose("mp-workload", lambda options: 2.0 if options == perf.CPU_CANDIDATES["ynn_off"] else 1.0) == {}
    assert perf.compiler_options("mp-workload") == {}  # one process: the cached choice, XLA's defaults
    assert perf.CPU_COMPILER_OPTIONS != {}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not perf.tuning_active()
    assert perf.choose("other-workload", lambda options: pytest.fail("measured in a multi-process run")) \
        == perf.CPU_COMPILER_OPTIONS
    assert perf.compiler_options("mp-workload") == perf.CPU_COMPILER_OPTIONS
