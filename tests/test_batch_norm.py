"""contrastood.batch_norm against flax's nn.BatchNorm and jax.nn.relu: variables, outputs, statistics and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastood import batch_norm, config_lib, models, parallel


def _run(cls, x, dtype, train=True):
    module = cls(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    variables = module.init(jax.random.key(0), x)
    features = x.shape[-1]
    params = {"scale": jnp.linspace(0.5, 1.5, features), "bias": jnp.linspace(-1.0, 1.0, features)}
    stats = {"mean": jnp.linspace(-0.2, 0.3, features), "var": jnp.linspace(0.5, 2.0, features)}
    assert jax.tree.structure(variables) == jax.tree.structure({"params": params, "batch_stats": stats})

    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(3 * y.astype(jnp.float32))), (y, updates["batch_stats"])

    (_, (y, new_stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    return y, new_stats, grads


@pytest.mark.parametrize("shape", [(16, 5, 5, 8), (12, 6)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_matches_flax_batch_norm_in_training(shape, dtype, tol):
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, shape), dtype)
    want, got = _run(nn.BatchNorm, x, dtype), _run(batch_norm.BatchNorm, x, dtype)
    assert got[0].dtype == want[0].dtype == dtype
    y, want_y = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    np.testing.assert_allclose(y, want_y, rtol=tol, atol=tol * np.abs(want_y).max())
    for name in ("mean", "var"):  # the running averages
        np.testing.assert_allclose(got[1][name], want[1][name], rtol=1e-5, atol=1e-6)
    (dparams, dx), (want_dparams, want_dx) = got[2], want[2]
    assert dx.dtype == dtype and dparams["scale"].dtype == jnp.float32
    for a, b in ((dparams["scale"], want_dparams["scale"]), (dparams["bias"], want_dparams["bias"]), (dx, want_dx)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_matches_flax_batch_norm_with_running_averages():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 3, 8)), jnp.float32)
    want, got = _run(nn.BatchNorm, x, jnp.float32, train=False), _run(batch_norm.BatchNorm, x, jnp.float32, False)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[2][1], want[2][1], rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences():
    from jax.test_util import check_grads

    x = jnp.asarray(np.random.default_rng(2).normal(1.0, 2.0, (6, 2, 2, 3)), jnp.float32)
    scale, bias = jnp.array([0.7, 1.3, -0.4]), jnp.array([0.1, -0.2, 0.3])

    def f(x, scale, bias):
        return jnp.sum(jnp.cos(batch_norm.train_batch_norm(x, scale, bias, 1e-5, x.dtype)[0]))

    check_grads(f, (x, scale, bias), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_statistics_are_global_over_a_batch_sharded_over_eight_devices():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = parallel.create_mesh(jax.devices()[:8])
    x = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4, 4, 8)), jnp.float32)
    module = batch_norm.BatchNorm(momentum=0.9)
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * jnp.arange(1.0, 9.0)), updates

    step = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    single = step(variables["params"], x)
    sharded = step(variables["params"], jax.device_put(x, NamedSharding(mesh, P("data"))))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_the_model_has_the_same_variables_and_results_with_either_batch_norm():
    config = config_lib.base_config()
    config.model.name, config.model.width, config.model.proj_dim, config.model.conv = "resnet_tiny", 1, 16, "xla"
    images = jnp.asarray(np.random.default_rng(4).uniform(size=(8, 16, 16, 3)), jnp.float32)
    results = {}
    for norm in batch_norm.IMPLS:
        config.model.norm = norm
        model = models.create_model(config.model, 10, image_size=16)
        variables = model.init(jax.random.key(0), images, train=False)

        def loss(params):
            out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                       train=True, mutable=["batch_stats"])
            return jnp.sum(out["logits"] ** 2) + jnp.sum(out["proj"] ** 2), (out, updates)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        results[norm] = (variables, aux, grads)
    (v_flax, aux_flax, g_flax), (v_fused, aux_fused, g_fused) = results["flax"], results["fused"]
    assert jax.tree.structure(v_flax) == jax.tree.structure(v_fused)  # checkpoints move between them
    for a, b in zip(jax.tree.leaves(v_flax), jax.tree.leaves(v_fused)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves((aux_flax, g_flax)), jax.tree.leaves((aux_fused, g_fused))):
        scale = max(1.0, float(np.abs(np.asarray(a)).max()))
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, rtol=1e-4, atol=1e-4)


def test_an_unknown_norm_names_the_choices():
    config = config_lib.base_config()
    config.model.name, config.model.norm = "resnet_tiny", "layer"
    with pytest.raises(ValueError, match=r"model.norm 'layer'.*\('fused', 'flax'\)"):
        models.create_model(config.model, 10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_validate_config_names_the_override_for_an_unknown_norm():
    config = config_lib.base_config()
    config.model.norm = "layer"
    with pytest.raises(ValueError, match=r"set --config.model.norm to one of \('fused', 'flax'\)"):
        config_lib.validate_config(config)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_has_jax_relus_values_and_gradient(dtype):
    x = jnp.asarray(np.concatenate([np.random.default_rng(5).normal(size=61), [0.0, -0.0, 1e-30]]), dtype)
    g = jnp.asarray(np.random.default_rng(6).normal(size=64), dtype)
    y, vjp = jax.vjp(batch_norm.relu, x)
    want_y, want_vjp = jax.vjp(jax.nn.relu, x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32), np.asarray(want_vjp(g)[0], np.float32))
