"""Throughput accounting: XLA FLOP counts and model FLOP utilisation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastood import perf


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
    """The CPU tuning changes which emitter runs the convolutions, not what a train step computes."""
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
    for tuning in ("0", "1"):
        monkeypatch.setenv(perf.DISABLE_ENV, tuning)
        assert bool(perf.compiler_options()) == (tuning == "1")
        state = parallel.replicate(train.create_train_state(jax.random.key(0), model, tx, 32), mesh)
        step = train.jit_train_step(train.make_train_step(model, tx, config, 1, schedule), mesh)
        programs[tuning] = step.lower(state, parallel.to_global(batch, mesh)).compile().as_text()
        for _ in range(2):
            state, metrics = step(state, parallel.to_global(batch, mesh))
        results[tuning] = jax.device_get((metrics, state.params))
    assert programs["0"] != programs["1"], "jit_train_step did not pass perf.compiler_options() to XLA"
    (m0, p0), (m1, p1) = results["0"], results["1"]
    for key in ("loss", "contrastive_loss", "class_loss", "grad_norm"):
        np.testing.assert_allclose(m0[key], m1[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
