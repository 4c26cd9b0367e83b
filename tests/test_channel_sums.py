"""contrastood.channel_sums: the one-pass CPU kernel against float64 numpy, sharded against unsharded,
and its jnp fallback."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastood import channel_sums, parallel

pytestmark = pytest.mark.skipif(channel_sums.load() is not None, reason=f"kernel unavailable: {channel_sums.load()}")


def _want(x, dy):
    xf = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    gf = np.asarray(dy, np.float64).reshape(-1, x.shape[-1])
    return xf.sum(0), (xf ** 2).sum(0), gf.sum(0), (gf * xf).sum(0)


@pytest.mark.parametrize("shape", [(130, 5, 3, 16), (7, 3), (65, 1), (2, 2, 2, 2, 9)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sums_match_float64(shape, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), dtype)
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    text = jax.jit(channel_sums.moments).lower(x).compile().as_text()
    assert "contrastood_channel_moments" in text  # the kernel, not the fallback
    got = (*jax.jit(channel_sums.moments)(x), *jax.jit(channel_sums.dots)(x, dy))
    for a, b in zip(got, _want(x, dy)):
        assert a.dtype == jnp.float32 and a.shape == (shape[-1],)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


def test_the_jnp_fallback_gives_the_same_sums(monkeypatch):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 4, 4, 8)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(64, 4, 4, 8)), jnp.bfloat16)
    kernel = (*channel_sums.moments(x), *channel_sums.dots(x, dy))
    monkeypatch.setattr(channel_sums, "_use_kernel", lambda x: False)
    assert "contrastood_channel" not in jax.jit(channel_sums.moments).lower(x).compile().as_text()
    fallback = (*channel_sums.moments(x), *channel_sums.dots(x, dy))
    for a, b in zip(kernel, fallback):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_a_batch_sharded_over_eight_devices_sums_over_all_of_them():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = parallel.create_mesh(jax.devices()[:8])
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(32, 3, 3, 8)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(32, 3, 3, 8)), jnp.float32)
    both = jax.jit(lambda x, dy: (*channel_sums.moments(x), *channel_sums.dots(x, dy)))
    sharding = NamedSharding(mesh, P("data"))
    sharded = both(jax.device_put(x, sharding), jax.device_put(dy, sharding))
    assert all(s.sharding.is_fully_replicated for s in sharded)
    for a, b in zip(sharded, _want(x, dy)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_the_sums_fall_back_to_jnp(tmp_path):
    code = ("import jax.numpy as jnp; from contrastood import channel_sums as c; "
            "s = c.moments(jnp.ones((4, 3))); print(c.load() is not None, [float(v) for v in s[0]])")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "CONTRASTOOD_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "True [4.0, 4.0, 4.0]"
    assert "BatchNorm sums: jnp's, because no C++ compiler" in out.stderr
