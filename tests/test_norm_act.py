"""contrastood.norm_act: BatchNorm's elementwise kernel passes bit for bit against their jnp expressions, sharded
against unsharded, NaNs kept, and the residual + ReLU BatchNorm against flax's BatchNorm, add and ReLU."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastood import batch_norm, channel_sums, norm_act, parallel

pytestmark = pytest.mark.skipif(norm_act.load() is not None, reason=f"kernel unavailable: {norm_act.load()}")


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = jnp.asarray(rng.normal(1.0, 3.0, shape), dtype)
    residual = jnp.asarray(rng.normal(size=shape), dtype)
    g = jnp.asarray(rng.normal(size=shape), dtype)
    vectors = [jnp.asarray(v, jnp.float32) for v in (rng.normal(size=c), rng.uniform(0.5, 1.5, c),
                                                     rng.normal(size=c), rng.uniform(size=c), rng.normal(size=c) / 10)]
    return x, residual, g, vectors


def _both(fn, *args):
    """(fn with the kernel, fn with jnp), each jitted, and whether the kernel's HLO calls it."""
    kernel = jax.jit(fn)
    text = kernel.lower(*args).compile().as_text()
    real = norm_act._use_kernel
    try:
        norm_act._use_kernel = lambda *a: False
        fallback = jax.jit(fn)(*args)
    finally:
        norm_act._use_kernel = real
    return kernel(*args), fallback, "ContrastoodNorm" in text


@pytest.mark.parametrize("shape", [(67, 5, 3, 16), (130, 24), (3, 2, 2, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_kernel_passes_equal_their_jnp_expressions_bit_for_bit(shape, dtype, with_residual, relu):
    x, residual, g, (mean, a, bias, k, q) = _inputs(shape, dtype)
    r = residual if with_residual else None
    y, want_y, called = _both(lambda x, r: norm_act.forward(x, mean, a, bias, r, relu, dtype), x, r)
    assert called and y.dtype == want_y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))

    def backward(x, g, y):
        return norm_act.backward(x, g, y, mean, a, k, bias / 7, q, relu, with_residual)

    (dx, dz), (want_dx, want_dz), called = _both(backward, x, g, want_y)
    assert called and dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32))
    if with_residual:
        np.testing.assert_array_equal(np.asarray(dz, np.float32), np.asarray(want_dz, np.float32))
    else:
        assert dz is None and want_dz is None


def test_masked_dots_match_float64_and_read_the_mask_from_the_output():
    x, _, g, _ = _inputs((130, 3, 3, 16), jnp.bfloat16, seed=1)
    y = jnp.maximum(x, 0)
    text = jax.jit(channel_sums.masked_dots).lower(x, g, y).compile().as_text()
    assert "contrastood_channel_masked_dots" in text
    got = jax.jit(channel_sums.masked_dots)(x, g, y)
    xf, gf, yf = (np.asarray(v, np.float64).reshape(-1, 16) for v in (x, g, y))
    dz = np.where(yf > 0, gf, 0.0)
    for a, b in zip(got, (dz.sum(0), (dz * xf).sum(0))):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_a_nan_stays_nan_through_the_relu_as_with_jnp_maximum():
    x = jnp.asarray([[np.nan, -1.0, 2.0, 0.5]] * 64, jnp.bfloat16)  # a NaN loss must still be caught
    ones, zeros = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)
    y, want, called = _both(lambda x: norm_act.forward(x, zeros, ones, zeros, None, True, jnp.bfloat16), x)
    assert called
    np.testing.assert_array_equal(np.asarray(y[0], np.float32), [np.nan, 0.0, 2.0, 0.5])
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_a_batch_sharded_over_eight_devices_gives_the_unsharded_results():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = parallel.create_mesh(jax.devices()[:8])
    x, residual, _, (_, _, _, _, _) = _inputs((32, 4, 4, 8), jnp.float32, seed=2)
    scale, bias = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-1.0, 1.0, 8)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

    def loss(x, residual, scale, bias):
        y = batch_norm.train_batch_norm(x, scale, bias, 1e-5, jnp.float32, residual, relu=True)[0]
        return jnp.sum(jnp.sin(y) * weights), y

    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))
    single = step(x, residual, scale, bias)
    sharding = NamedSharding(mesh, P("data"))
    text = step.lower(jax.device_put(x, sharding), jax.device_put(residual, sharding), scale, bias).compile().as_text()
    assert "ContrastoodNormAddAct" in text and "all-gather" not in text  # each device runs its own rows
    sharded = step(jax.device_put(x, sharding), jax.device_put(residual, sharding), scale, bias)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


class _FlaxNormAct(nn.Module):
    """The model's composition before the fused pass: relu(residual + nn.BatchNorm(x))."""

    @nn.compact
    def __call__(self, x, residual):
        y = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=x.dtype)(x)
        return jax.nn.relu(residual + y)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_residual_relu_batch_norm_matches_flax_batch_norm_add_and_relu(dtype, tol):
    x, residual, _, _ = _inputs((16, 5, 5, 8), dtype, seed=4)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
    results = []
    for module, kwargs in ((_FlaxNormAct(), {}), (batch_norm.BatchNorm(momentum=0.9), {"relu": True})):
        variables = module.init(jax.random.key(0), x, residual, **kwargs)
        params = {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1.0, 1.0, 8)}
        params = {"BatchNorm_0": params} if "BatchNorm_0" in variables["params"] else params

        def loss(params, x, residual):
            y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, residual,
                                      mutable=["batch_stats"], **kwargs)
            return jnp.sum(y.astype(jnp.float32) * weights), (y, updates["batch_stats"])

        (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, x, residual)
        results.append((y, jax.tree.leaves(stats), jax.tree.leaves(grads)))
    (want_y, want_stats, want_grads), (y, stats, grads) = results
    assert y.dtype == dtype and np.asarray(y, np.float32).min() == 0.0
    for a, b in zip([y, *stats, *grads], [want_y, *want_stats, *want_grads]):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_a_residual_of_another_shape_or_dtype_names_what_it_must_be():
    x = jnp.ones((4, 3, 3, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"residual must be \(4, 3, 3, 8\) bfloat16, got \(4, 3, 3, 8\) float32"):
        batch_norm.train_batch_norm(x, jnp.ones(8), jnp.zeros(8), 1e-5, jnp.bfloat16, jnp.ones(x.shape), relu=True)


def test_without_a_compiler_the_passes_fall_back_to_jnp(tmp_path):
    code = ("import jax.numpy as jnp; from contrastood import norm_act as n; "
            "v = jnp.ones(3); y = n.forward(-jnp.ones((4, 3)), v, v, v, None, True, jnp.float32); "
            "print(n.load() is not None, [float(t) for t in y[0]])")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "CONTRASTOOD_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "True [0.0, 0.0, 0.0]"  # relu((-1 - 1) * 1 + 1) = 0
    assert "BatchNorm elementwise passes: jnp's, because no C++ compiler" in out.stderr
