"""oneDNN convolutions (contrastood.onednn_conv), direct and Winograd, against lax.conv_general_dilated:
values, gradients, sharding over 8 devices, fall-backs, the FLOP count, the kernel cache and the choice
of kernels."""
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastood import models, onednn_conv, parallel, perf
from contrastood.config_lib import base_config

pytestmark = pytest.mark.skipif(onednn_conv.load() is not None, reason=f"oneDNN unavailable: {onednn_conv.load()}")

NHWC = ("NHWC", "HWIO", "NHWC")
# (batch, size, in, out, kernel, stride, padding): SAME with odd/even sizes, VALID, explicit asymmetric
CASES = [
    (4, 9, 3, 8, 3, 1, "SAME"),
    (4, 8, 5, 6, 3, 2, "SAME"),
    (2, 11, 4, 8, 7, 2, "SAME"),
    (4, 8, 6, 4, 1, 2, "SAME"),
    (3, 7, 4, 5, 3, 1, "VALID"),
    (2, 8, 3, 4, 3, 2, ((0, 2), (1, 0))),
]


def _loss(conv, padding, stride):
    def loss(x, w, t):
        y = conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)
        return jnp.sum((y.astype(jnp.float32) - t) ** 2), y
    return loss


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"k{c[4]}s{c[5]}-{c[6] if isinstance(c[6], str) else 'explicit'}"
                                             for c in CASES])
def test_forward_and_both_gradients_match_lax(case, dtype):
    n, size, cin, cout, k, stride, padding = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, size, size, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.3, dtype)
    ref_y = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    t = jnp.asarray(rng.normal(size=ref_y.shape), jnp.float32)
    results = {}
    for name, conv in (("lax", jax.lax.conv_general_dilated), ("onednn", onednn_conv.conv_general_dilated)):
        grad = jax.jit(jax.value_and_grad(_loss(conv, padding, stride), argnums=(0, 1), has_aux=True))
        (loss, y), (dx, dw) = grad(x, w, t)
        results[name] = [np.asarray(v, np.float32) for v in (y, dx, dw)]
        if name == "onednn":
            text = grad.lower(x, w, t).compile().as_text()
            assert text.count('custom_call_target="contrastood_conv_') == 3, "not the oneDNN kernels"
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=4e-2, atol=0.15)
    for got, want, what in zip(results["onednn"], results["lax"], ("y", "dx", "dw")):
        assert got.shape == want.shape, what
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got / scale, want / scale, err_msg=what, **tol)


@pytest.mark.parametrize("dtype, cin, cout", [("float32", 4, 6), ("bfloat16", 16, 32)])  # bf16: im2col's gradient
def test_sharded_over_devices_matches_one_device_and_gathers_no_activations(dtype, cin, cout):
    """Batch-sharded over 8 devices, each device convolves its shard and the weight gradient is summed."""
    assert jax.device_count() == 8
    mesh = parallel.create_mesh()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * 0.3, dtype)

    def loss(x, w):
        y = onednn_conv.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    one = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    sharded = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                      in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))
    xs, ws = jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(w, NamedSharding(mesh, P()))
    many = sharded(xs, ws)
    text = sharded.lower(xs, ws).compile().as_text()
    assert "all-gather" not in text
    assert f"{'f32' if dtype == 'float32' else 'bf16'}[2,4,4,{cout}]" in text  # each device's output shard: 16 / 8
    assert ("Im2colBackwardWeights" in text) == (dtype == "bfloat16")
    assert many[1][0].sharding.spec == P("data") and many[1][1].sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(one)[:2], jax.tree.leaves(many)[:2]):  # the loss and dx: batch-local
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)
    # dw: each device sums its 2 images, then the 8 sums are added, in bfloat16 rounded 8 times (float32: 1e-5).
    dw_one, dw_many = (np.asarray(v[1][1], np.float32) for v in (one, many))
    assert np.abs(dw_many - dw_one).max() <= (1e-5 if dtype == "float32" else 1e-2) * np.abs(dw_one).max()


def test_devices_in_one_process_split_the_cores_between_their_calls():
    """Each device's convolutions run at the same time as the others', so each call gets its share of the cores."""
    assert [onednn_conv.threads_per_call(8, 2, {}), onednn_conv.threads_per_call(2, 16, {}),
            onednn_conv.threads_per_call(3, 8, {})] == [1, 8, 2]
    assert onednn_conv.threads_per_call(1, 16, {}) == 0  # one device: OpenMP's default, all cores
    assert onednn_conv.threads_per_call(8, 2, {"OMP_NUM_THREADS": "2"}) == 0  # the user's setting wins
    mesh = parallel.create_mesh()
    x = jax.device_put(jnp.ones((16, 8, 8, 4)), NamedSharding(mesh, P("data")))
    w = jnp.ones((3, 3, 4, 6))

    def step(x, w):
        return jax.grad(lambda x, w: jnp.sum(jnp.sin(onednn_conv.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=NHWC))), argnums=(0, 1))(x, w)

    want = onednn_conv.threads_per_call(8, len(os.sched_getaffinity(0)))
    sharded = jax.jit(step).lower(x, w).compile().as_text()
    unsharded = jax.jit(step).lower(np.ones((16, 8, 8, 4), np.float32), w).compile().as_text()
    assert sharded.count(f"threads = {want} : i64") == 3  # forward, backward-data, backward-weights
    assert unsharded.count("threads = 0 : i64") == 3


@pytest.mark.parametrize("kwargs", [dict(rhs_dilation=(2, 2)), dict(lhs_dilation=(2, 2), padding=((1, 1), (1, 1))),
                                    dict(feature_group_count=2), dict(dimension_numbers=("NCHW", "OIHW", "NCHW")),
                                    dict(padding=((-1, 0), (0, 0)))],
                         ids=["dilation", "lhs_dilation", "groups", "nchw", "cropping"])
def test_calls_the_kernel_does_not_cover_go_to_lax(kwargs):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 2 if "feature_group_count" in kwargs else 4, 4)), jnp.float32)
    if "dimension_numbers" in kwargs:
        x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC) | kwargs
    ours = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(x, w, **args))
    np.testing.assert_allclose(ours(x, w), jax.lax.conv_general_dilated(x, w, **args), rtol=1e-5, atol=1e-5)
    assert "contrastood_conv" not in ours.lower(x, w).as_text()


def test_flop_count_equals_xlas_count_of_the_same_convolutions():
    """XLA counts nothing for custom calls; hlo_flops restores exactly what it counts for its own convs."""
    rng = np.random.default_rng(3)
    for n, size, cin, cout, k, stride, padding in CASES[:4]:
        x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
        flops = {}
        for name, conv in (("lax", jax.lax.conv_general_dilated), ("onednn", onednn_conv.conv_general_dilated)):
            f = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, (stride, stride), padding,
                                                           dimension_numbers=NHWC)), argnums=(0, 1)))
            flops[name] = perf.step_flops(f.lower(x, w).compile())
        np.testing.assert_allclose(flops["onednn"], flops["lax"], rtol=0.02)


def test_the_model_has_the_same_parameters_and_outputs_with_either_kernel():
    config = base_config()
    config.model.name, config.model.width, config.model.proj_dim = "resnet_tiny", 1, 16
    outputs, params = {}, {}
    config.model.width = 4  # 64-256 channels: the last two stages' 3x3 layers are Winograd's under "winograd"
    for conv in ("xla", "onednn", "winograd"):
        config.model.conv = conv
        model = models.create_model(config.model, 10, image_size=16)
        assert model.conv_impl == conv
        images = jnp.asarray(np.random.default_rng(4).uniform(size=(8, 16, 16, 3)), jnp.float32)
        variables = model.init(jax.random.key(0), images, train=False)

        def loss(params):
            out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(out["logits"] ** 2) + jnp.sum(out["proj"] ** 2), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        outputs[conv], params[conv] = (out, grads), variables["params"]
    assert jax.tree.structure(params["xla"]) == jax.tree.structure(params["onednn"])
    for a, b in zip(jax.tree.leaves(params["xla"]), jax.tree.leaves(params["onednn"])):
        np.testing.assert_array_equal(a, b)  # same initialisation: checkpoints move between kernels
    for conv in ("onednn", "winograd"):
        for a, b in zip(jax.tree.leaves(outputs["xla"]), jax.tree.leaves(outputs[conv])):
            scale = max(1.0, float(np.abs(np.asarray(a)).max()))
            np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, rtol=1e-4, atol=1e-4,
                                       err_msg=conv)


def test_without_a_measured_choice_onednn_steps_get_xlas_default_options(monkeypatch, tmp_path):
    monkeypatch.delenv(perf.OPTIONS_ENV, raising=False)
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path))
    assert perf.compiler_options("some-workload", "onednn") == perf.CPU_CANDIDATES["xla_defaults"] == {}
    assert perf.compiler_options("some-workload", "xla") == perf.CPU_COMPILER_OPTIONS
    config = base_config()
    assert perf.compiler_options("some-workload", "winograd") == {}
    assert perf.workload(config, 8).endswith("-norm_fused-conv_winograd")  # both change which options are fastest
    config.model.conv = "xla"
    assert perf.workload(config, 8).endswith("-conv_xla")


def test_choice_of_kernels_and_its_errors():
    assert onednn_conv.resolve("xla", "cpu") == "xla"
    assert onednn_conv.resolve("auto", "cpu") == "winograd"  # Winograd where it applies, direct elsewhere
    assert onednn_conv.resolve("onednn", "cpu") == "onednn"
    assert onednn_conv.resolve("winograd", "cpu") == "winograd"
    assert onednn_conv.resolve("auto", "gpu") == "xla"
    with pytest.raises(ValueError, match="unknown model.conv 'fast'; choose one of"):
        onednn_conv.resolve("fast", "cpu")
    with pytest.raises(ValueError, match="CPU backends only.*model.conv=auto or xla"):
        onednn_conv.resolve("onednn", "tpu")
    with pytest.raises(ValueError, match="model.conv=winograd runs on CPU backends only"):
        onednn_conv.resolve("winograd", "gpu")


_RESOLVE = textwrap.dedent("""
    import json, sys
    from contrastood import onednn_conv
    out = {"problem": onednn_conv.load(), "auto": onednn_conv.resolve("auto", "cpu")}
    try:
        onednn_conv.resolve("onednn", "cpu")
    except RuntimeError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")


def _run(code: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_onednn_auto_falls_back_to_xla_and_onednn_names_the_fix(tmp_path):
    out = _run(_RESOLVE, {onednn_conv.LIBRARY_ENV: str(tmp_path / "missing" / "libdnnl.so.3"),
                          onednn_conv.CACHE_ENV: str(tmp_path / "cache")})
    assert out["auto"] == "xla"
    assert "pip install onednn-cpu-gomp" in out["problem"] and "--config.model.conv=xla" in out["problem"]
    assert out["error"].startswith("model.conv=onednn, but the oneDNN kernel is unavailable")


def test_without_a_compiler_the_error_says_so(tmp_path):
    out = _run(_RESOLVE, {"CXX": str(tmp_path / "no-such-g++"), onednn_conv.CACHE_ENV: str(tmp_path / "cache")})
    assert out["auto"] == "xla" and "no C++ compiler" in out["problem"] and "install g++" in out["problem"]


def test_parallel_processes_build_the_kernel_once(tmp_path):
    """Test workers start together: one builds under the lock, the others load its library."""
    cache = tmp_path / "cache"
    code = "from contrastood import onednn_conv; print(onednn_conv.load() or 'ok')"
    env = {**os.environ, onednn_conv.CACHE_ENV: str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 and out.strip().endswith("ok") for p, (out, _) in zip(procs, outputs)), outputs
    built = sorted(os.listdir(cache / "kernels"))
    assert len([f for f in built if f.endswith(".so")]) == 1, built  # no half-written temporaries left


# --- Winograd F(4x4, 3x3) ---

def _targets(compiled_text: str) -> list[str]:
    import re
    return sorted(re.findall(r'custom_call_target="contrastood_conv_(\w+)"', compiled_text))


def _winograd(x, w, *args, **kwargs):
    return onednn_conv.conv_general_dilated(x, w, *args, winograd=True, **kwargs)


# (batch, size, in, out): one tile (4x4), several, rectangular channel counts, a batch of one
WINO_CASES = [(3, 4, 64, 64), (2, 8, 64, 96), (2, 12, 80, 64), (1, 16, 128, 64)]


@pytest.mark.parametrize("case", WINO_CASES, ids=[f"{c[1]}px-{c[2]}to{c[3]}" for c in WINO_CASES])
def test_winograd_forward_and_both_gradients_match_lax(case):
    """Golden: lax at float32 HIGHEST. Measured error about 1e-5 of the output's scale (F(4x4,3x3)'s
    transforms scale values by up to 8 and 1/24), so 2e-4 leaves room and still fails on any wrong tap."""
    n, size, cin, cout = case
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * (2 / (9 * cin)) ** 0.5, jnp.float32)
    lax_conv = functools.partial(jax.lax.conv_general_dilated, precision=jax.lax.Precision.HIGHEST)
    ref_y = lax_conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    t = jnp.asarray(rng.normal(size=ref_y.shape), jnp.float32)
    results = {}
    for name, conv in (("lax", lax_conv), ("winograd", _winograd)):
        grad = jax.jit(jax.value_and_grad(_loss(conv, "SAME", 1), argnums=(0, 1), has_aux=True))
        (_, y), (dx, dw) = grad(x, w, t)
        results[name] = [np.asarray(v) for v in (y, dx, dw)]
        if name == "winograd":  # forward and backward-data are Winograd forwards, plus its weight gradient
            assert _targets(grad.lower(x, w, t).compile().as_text()) == [
                "WinoBackwardWeights", "WinoForward", "WinoForward"]
    for got, want, what in zip(results["winograd"], results["lax"], ("y", "dx", "dw")):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=2e-4, err_msg=what)
        assert np.abs(got - want).max() / scale > 0, "bit-equal to lax: not Winograd's arithmetic"


@pytest.mark.parametrize("dtype, size, cin, cout, k, stride, padding", [
    (dtype, *case) for dtype in ("float32", "bfloat16") for case in [
        (8, 64, 64, 3, 2, "SAME"),
        (8, 64, 64, 1, 1, "SAME"),
        (8, 64, 64, 3, 1, "VALID"),
        (8, 48, 64, 3, 1, "SAME"),   # below WINOGRAD_MIN_CHANNELS: measured slower than direct
        (8, 72, 64, 3, 1, "SAME"),   # not a multiple of 16 channels
    ]] + [
    ("float32", 6, 64, 64, 3, 1, "SAME"),   # not whole 4x4 tiles
    ("bfloat16", 7, 64, 64, 3, 1, "SAME"),  # not whole 2x2 tiles
], ids=[f"{d}-{c}" for d in ("f32", "bf16") for c in ("stride2", "1x1", "valid", "48ch", "72ch")] + [
    "f32-size6", "bf16-size7"])
def test_layers_winograd_does_not_cover_run_the_direct_kernels(dtype, size, cin, cout, k, stride, padding,
                                                               monkeypatch):
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: True)  # the bfloat16 cases must not depend on this CPU
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.1, dtype)
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(_winograd(x, w, (stride, stride), padding,
                                                        dimension_numbers=NHWC).astype(jnp.float32) ** 2),
                         argnums=(0, 1)))
    # A strided bfloat16 layer's weight gradient is the im2col matmul (im2col_weight_gradient), not Winograd either.
    weights = "Im2colBackwardWeights" if (dtype, stride) == ("bfloat16", 2) else "BackwardWeights"
    assert _targets(f.lower(x, w).compile().as_text()) == sorted(["BackwardData", weights, "Forward"])


def test_bfloat16_layers_stay_direct_on_cpus_without_bfloat16_hardware(monkeypatch):
    """There oneDNN emulates bfloat16 products, so Winograd's would gain nothing measured."""
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: False)
    x, w = jnp.ones((2, 8, 8, 64), jnp.bfloat16), jnp.ones((3, 3, 64, 64), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(_winograd(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
                                              .astype(jnp.float32) ** 2), (0, 1)))
    assert _targets(f.lower(x, w).compile().as_text()) == ["BackwardData", "BackwardWeights", "Forward"]


# --- Winograd F(2x2, 3x3), bfloat16 ---

# (batch, size, in, out): one tile (2x2), several, rectangular channel counts, a batch of one
# The last two: 1280 tiles, several chunks per thread in both kernels (each thread's own weight-gradient sum);
# 272 x 256 channels, past the per-thread sums (the team shares each chunk's matmul).
WINO_BF16_CASES = [(3, 2, 64, 64), (2, 6, 64, 96), (2, 4, 80, 64), (1, 10, 128, 64), (20, 16, 64, 64), (2, 4, 272, 256)]


@pytest.mark.parametrize("case", WINO_BF16_CASES, ids=[f"{c[1]}px-{c[2]}to{c[3]}" for c in WINO_BF16_CASES])
def test_winograd_bf16_forward_and_both_gradients_match_lax(case, monkeypatch):
    """Golden: lax at float32 HIGHEST on the same bfloat16 values, rounded to bfloat16 where the model's
    convolution rounds (dx, dw). The direct bfloat16 kernel's forward is 2-3e-3 of the output's scale away
    (its output rounding); Winograd's rounding of the transformed tiles adds about as much again (measured
    4-7e-3 for y, dx and dw), so the bound is 1.5e-2, and y must stay within 4x the direct kernel's error."""
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: True)  # the kernel runs on any CPU; only its speed differs
    n, size, cin, cout = case
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * (2 / (9 * cin)) ** 0.5, jnp.bfloat16)

    def lax_conv(x, w, *args, **kwargs):  # float32 products of the bfloat16 values, rounded like the model's conv
        return jax.lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), *args,
                                            precision=jax.lax.Precision.HIGHEST, **kwargs).astype(jnp.bfloat16)

    t = jnp.asarray(rng.normal(size=(n, size, size, cout)), jnp.float32)
    results = {}
    for name, conv in (("lax", lax_conv), ("direct", onednn_conv.conv_general_dilated), ("winograd", _winograd)):
        grad = jax.jit(jax.value_and_grad(_loss(conv, "SAME", 1), argnums=(0, 1), has_aux=True))
        (_, y), (dx, dw) = grad(x, w, t)
        results[name] = [np.asarray(v, np.float32) for v in (y, dx, dw)]
        if name == "winograd":
            assert _targets(grad.lower(x, w, t).compile().as_text()) == [
                "Wino2BackwardWeights", "Wino2Forward", "Wino2Forward"]
            _, again = grad(x, w, t)  # the threads split the work the same way every call: the same bits
            for first, second in zip((dx, dw), again):
                np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(second, np.float32))
    # y, unrounded, as the reference for how far each kernel's forward is
    y32 = np.asarray(jax.lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), "SAME",
                                                  dimension_numbers=NHWC, precision=jax.lax.Precision.HIGHEST))
    scale = float(np.abs(y32).max())
    direct_error = np.abs(results["direct"][0] - y32).max() / scale
    winograd_error = np.abs(results["winograd"][0] - y32).max() / scale
    assert 0 < winograd_error <= max(4 * direct_error, 4e-3), (winograd_error, direct_error)
    for got, want, what in zip(results["winograd"], results["lax"], ("y", "dx", "dw")):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=1.5e-2, err_msg=what)
        assert np.abs(got - want).max() / scale > 0, "bit-equal to lax: not Winograd's arithmetic"


def test_winograd_bf16_one_instruction_tile_rounding_gives_the_same_bits_as_the_exact_one(monkeypatch):
    """On AVX512_BF16 CPUs the transforms round the matmul's tiles with VCVTNEPS2BF16, which flushes denormals to
    zero where the exact rounding keeps them; the matmul's bfloat16 dot products treat them as zero either way. So
    y, dx and dw must be bit-equal with the exact rounding, here with one image of denormal pixels (its tiles are
    all denormal) and several chunks per thread (1280 tiles)."""
    kernel, error = onednn_conv._kernel()
    assert error is None, error
    if not kernel.contrastood_bf16_dot_stores(1):
        pytest.skip("this CPU has no AVX512_BF16: the transforms always round exactly")
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: True)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(20, 16, 16, 64))
    x[3] *= 1e-39  # below bfloat16's smallest normal (1.2e-38)
    x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.06, jnp.bfloat16)
    assert 0 < np.abs(np.asarray(x[3], np.float32)).max() < 1.2e-38  # (numpy: XLA's ops flush denormals)
    t = jnp.asarray(rng.normal(size=(20, 16, 16, 64)), jnp.float32)
    grad = jax.jit(jax.value_and_grad(_loss(_winograd, "SAME", 1), argnums=(0, 1), has_aux=True))
    assert _targets(grad.lower(x, w, t).compile().as_text()) == ["Wino2BackwardWeights", "Wino2Forward",
                                                                 "Wino2Forward"]
    runs = []
    try:
        for on in (1, 0):
            kernel.contrastood_bf16_dot_stores(on)
            (_, y), (dx, dw) = grad(x, w, t)
            runs.append([np.asarray(v, np.float32) for v in (y, dx, dw)])
    finally:
        kernel.contrastood_bf16_dot_stores(1)
    for one, exact, what in zip(*runs, ("y", "dx", "dw")):
        np.testing.assert_array_equal(one, exact, err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_winograd_sharded_over_devices_matches_one_device_and_gathers_no_activations(dtype, monkeypatch):
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: True)
    assert jax.device_count() == 8
    mesh = parallel.create_mesh()
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 64)), dtype)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.05, dtype)

    def loss(x, w):
        return jnp.sum(jnp.sin(_winograd(x, w, (1, 1), "SAME", dimension_numbers=NHWC).astype(jnp.float32)))

    one = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    sharded = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                      in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))
    xs, ws = jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(w, NamedSharding(mesh, P()))
    many = sharded(xs, ws)
    text = sharded.lower(xs, ws).compile().as_text()
    short = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    assert "all-gather" not in text and f"{short}[2,8,8,64]" in text  # 16 / 8 images per device
    prefix = "Wino" if dtype == "float32" else "Wino2"
    assert _targets(text) == [f"{prefix}BackwardWeights", f"{prefix}Forward", f"{prefix}Forward"]
    assert many[1][0].sharding.spec == P("data") and many[1][1].sharding.is_fully_replicated
    # float rounding of other matmul blockings and, in bfloat16, of the per-device sums
    atol = 1e-5 if dtype == "float32" else 1e-2
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(b / scale, a / scale, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_winograd_flops_count_as_the_direct_convolutions_they_replace(dtype, monkeypatch):
    """MFU stays in model FLOPs: a Winograd layer counts what XLA counts for the same convolution (plus XLA's
    own count of the weight transforms, which does not grow with the batch: 9% at batch 2, 0.6% at 32)."""
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: True)
    x, w = jnp.ones((32, 8, 8, 64), dtype), jnp.ones((3, 3, 64, 80), dtype)
    flops = {}
    for name, conv in (("lax", jax.lax.conv_general_dilated), ("winograd", _winograd)):
        f = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)),
                             argnums=(0, 1)))
        flops[name] = perf.step_flops(f.lower(x, w).compile())
    np.testing.assert_allclose(flops["winograd"], flops["lax"], rtol=0.02)


def test_the_winograd_kernel_rejects_shapes_it_does_not_cover_with_the_reason():
    u = jnp.ones((36, 24, 32))
    with pytest.raises(Exception, match="height and width multiples of 4, channels of 16"):
        jax.block_until_ready(onednn_conv._call("WinoForward", (1, 8, 8, 32), jnp.float32, jnp.ones((1, 8, 8, 24)),
                                                u, (1, 1), (1, 1, 1, 1)))
    with pytest.raises(Exception, match=r"transformed weights must be \[36, c, o\]"):
        jax.block_until_ready(onednn_conv._call("WinoForward", (1, 8, 8, 32), jnp.float32, jnp.ones((1, 8, 8, 32)),
                                                u, (1, 1), (1, 1, 1, 1)))


def test_the_bf16_winograd_kernel_rejects_what_it_does_not_cover_with_the_reason():
    bf16 = jnp.bfloat16
    u = jnp.ones((16, 32, 32), bf16)
    call = functools.partial(onednn_conv._call, strides=(1, 1), padding=(1, 1, 1, 1))
    with pytest.raises(Exception, match="height and width multiples of 2, channels of 16"):
        jax.block_until_ready(call("Wino2Forward", (1, 7, 7, 32), bf16, jnp.ones((1, 7, 7, 32), bf16), u))
    with pytest.raises(Exception, match="bfloat16 only"):
        jax.block_until_ready(call("Wino2Forward", (1, 8, 8, 32), jnp.float32, jnp.ones((1, 8, 8, 32)), u))
    with pytest.raises(Exception, match=r"transformed weights must be bfloat16 \[16, c, o\]"):
        jax.block_until_ready(call("Wino2Forward", (1, 8, 8, 32), bf16, jnp.ones((1, 8, 8, 32), bf16),
                                   jnp.ones((36, 32, 32), bf16)))
    with pytest.raises(Exception, match="du float32"):
        x = jnp.ones((1, 8, 8, 32), bf16)
        jax.block_until_ready(call("Wino2BackwardWeights", (16, 32, 32), bf16, x, x))


def test_a_bf16_model_under_winograd_matches_the_direct_kernels(monkeypatch):
    """The whole model in bfloat16: its 64-channel-and-wider 3x3 layers take Winograd F(2x2)."""
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: True)
    config = base_config()
    config.model.name, config.model.width, config.model.proj_dim, config.model.dtype = "resnet_tiny", 4, 16, "bfloat16"
    images = jnp.asarray(np.random.default_rng(4).uniform(size=(8, 16, 16, 3)), jnp.float32)
    results = {}
    for conv in ("onednn", "winograd"):
        config.model.conv = conv
        model = models.create_model(config.model, 10, image_size=16)
        variables = model.init(jax.random.key(0), images, train=False)

        def loss(params):
            out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(out["logits"].astype(jnp.float32) ** 2), out

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        results[conv] = step(variables["params"])
        targets = _targets(step.lower(variables["params"]).compile().as_text())
        assert ("Wino2Forward" in targets) == (conv == "winograd")
    for a, b in zip(jax.tree.leaves(results["onednn"]), jax.tree.leaves(results["winograd"])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(1e-3, float(np.abs(a).max()))
        np.testing.assert_allclose(b / scale, a / scale, rtol=0, atol=5e-2)


@pytest.fixture
def layer_tuning(monkeypatch, tmp_path):
    """Per-layer kernel measurements on (the suite turns them off), cached under tmp_path."""
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(perf.DISABLE_ENV, raising=False)
    monkeypatch.delenv(perf.LAYER_TUNING_ENV, raising=False)


def test_each_winograd_layer_shape_takes_the_kernel_measured_faster_on_this_cpu(monkeypatch, tmp_path,
                                                                                 layer_tuning):
    """choose_layers times Winograd against the direct kernels for every layer shape Winograd supports in a
    traced computation, on its mesh, once per CPU (cached); the next trace follows the choice per shape, a second
    call measures nothing, and CONTRASTOOD_XLA_CPU_TUNING=0 restores the fixed rule."""
    mesh = parallel.create_mesh()
    rng = np.random.default_rng(9)
    x = jax.device_put(jnp.asarray(rng.normal(size=(16, 8, 8, 64)), jnp.float32), NamedSharding(mesh, P("data")))
    narrow, wide = (jax.device_put(jnp.asarray(rng.normal(size=(3, 3, 64, o)) * 0.05, jnp.float32),
                                   NamedSharding(mesh, P())) for o in (64, 96))

    def loss(x, narrow, wide):
        return sum(jnp.sum(_winograd(x, w, (1, 1), "SAME", dimension_numbers=NHWC) ** 2) for w in (narrow, wide))

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))
    real, timed = onednn_conv._layer_seconds, []

    def slower_narrow_winograd(x_shape, w_shape, dtype, mesh_):
        seconds = real(x_shape, w_shape, dtype, mesh_)  # the real timing runs (its result is this CPU's)
        assert set(seconds) == {"winograd", "direct"} and all(0 < s < 10 for s in seconds.values())
        timed.append((x_shape, w_shape))
        return {"winograd": 2.0, "direct": 1.0} if w_shape[3] == 64 else {"winograd": 1.0, "direct": 1.0}

    monkeypatch.setattr(onednn_conv, "_layer_seconds", slower_narrow_winograd)
    measured = onednn_conv.choose_layers(lambda: jax.eval_shape(loss, x, narrow, wide), mesh)
    assert sorted(timed) == [((16, 8, 8, 64), (3, 3, 64, 64)), ((16, 8, 8, 64), (3, 3, 64, 96))]
    assert sorted(measured.values()) == ["direct", "winograd"]  # direct must win by 5%; a tie keeps Winograd
    table = json.loads((tmp_path / onednn_conv.LAYER_TABLE).read_text())
    assert {tuple(e["w"]): e["choice"] for e in table.values()} == {(3, 3, 64, 64): "direct",
                                                                    (3, 3, 64, 96): "winograd"}
    # The narrow layer now runs direct (forward, backward-data, weight gradient); the wide one stays Winograd.
    assert _targets(grads.lower(x, narrow, wide).compile().as_text()) == [
        "BackwardData", "BackwardWeights", "Forward", "WinoBackwardWeights", "WinoForward", "WinoForward"]
    np.testing.assert_allclose(*(np.asarray(g) for g in (grads(x, narrow, wide)[1], jax.jit(jax.grad(
        lambda x, w: jnp.sum(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC) ** 2),
        1))(x, narrow))), rtol=1e-4, atol=1e-3)

    monkeypatch.setattr(onednn_conv, "_layer_seconds", lambda *args: pytest.fail("measured again"))
    assert onednn_conv.choose_layers(lambda: jax.eval_shape(loss, x, narrow, wide), mesh) == {}
    monkeypatch.setenv(perf.DISABLE_ENV, "0")
    assert _targets(jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, narrow, wide).compile().as_text()) == [
        "WinoBackwardWeights", "WinoBackwardWeights", "WinoForward", "WinoForward", "WinoForward", "WinoForward"]


def test_each_strided_layer_takes_the_gradient_kernels_measured_faster_on_this_cpu(monkeypatch, tmp_path,
                                                                                   layer_tuning):
    """choose_layers times oneDNN's data and weight gradients against col2im's and im2col's matmuls for every
    strided layer of a traced computation, on its mesh, once per CPU (cached); the next trace follows each choice,
    and without a measurement (or with layer tuning off) the fixed rule holds: oneDNN's data gradient."""
    mesh = parallel.create_mesh()
    rng = np.random.default_rng(10)
    x = jax.device_put(jnp.asarray(rng.normal(size=(16, 8, 8, 32)), jnp.bfloat16), NamedSharding(mesh, P("data")))
    w3, w1 = (jax.device_put(jnp.asarray(rng.normal(size=(k, k, 32, 64)) * 0.05, jnp.bfloat16),
                             NamedSharding(mesh, P())) for k in (3, 1))

    def loss(x, w3, w1):
        return sum(jnp.sum(onednn_conv.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=NHWC)
                           .astype(jnp.float32) ** 2) for w in (w3, w1))

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))
    assert _targets(grads.lower(x, w3, w1).compile().as_text()) == [  # the fixed rule, before any measurement
        "BackwardData", "BackwardData", "BackwardWeights", "Forward", "Forward", "Im2colBackwardWeights"]
    real, timed = onednn_conv._strided_seconds, []

    def col2im_and_onednn_weights_faster(x_shape, w_shape, dtype, strides, padding, mesh_):
        seconds = real(x_shape, w_shape, dtype, strides, padding, mesh_)  # the real timing runs
        assert set(seconds) == {"data_direct", "data_col2im", "weights_direct", "weights_im2col"}
        assert all(0 < s < 10 for s in seconds.values())
        timed.append((x_shape, w_shape, strides, padding))
        return {"data_direct": 2.0, "data_col2im": 1.0, "weights_direct": 1.0, "weights_im2col": 2.0}

    monkeypatch.setattr(onednn_conv, "_strided_seconds", col2im_and_onednn_weights_faster)
    measured = onednn_conv.choose_layers(lambda: jax.eval_shape(jax.grad(loss, (0, 1, 2)), x, w3, w1), mesh)
    assert sorted(timed) == [((16, 8, 8, 32), (1, 1, 32, 64), (2, 2), (0, 0, 0, 0)),
                             ((16, 8, 8, 32), (3, 3, 32, 64), (2, 2), (0, 1, 0, 1))]
    assert sorted(measured.values()) == ["data col2im, weights direct"] * 2
    table = json.loads((tmp_path / onednn_conv.LAYER_TABLE).read_text())
    assert sorted((e["w"][0], e["data"], e["weights"]) for e in table.values()) == [
        (1, "col2im", "direct"), (3, "col2im", "direct")]
    compiled = jax.jit(jax.grad(loss, (0, 1, 2)))
    assert _targets(compiled.lower(x, w3, w1).compile().as_text()) == [
        "BackwardWeights", "BackwardWeights", "Col2imBackwardData", "Col2imBackwardData", "Forward", "Forward"]
    want = jax.jit(jax.grad(lambda x, w3, w1: sum(jnp.sum(jax.lax.conv_general_dilated(
        x.astype(jnp.float32), w.astype(jnp.float32), (2, 2), "SAME", dimension_numbers=NHWC) ** 2)
        for w in (w3, w1)), (0, 1, 2)))(x, w3, w1)
    for got, ref in zip(compiled(x, w3, w1), want):
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(np.asarray(got, np.float32) / scale, np.asarray(ref) / scale, atol=2e-2)

    monkeypatch.setattr(onednn_conv, "_strided_seconds", lambda *args: pytest.fail("measured again"))
    assert onednn_conv.choose_layers(lambda: jax.eval_shape(jax.grad(loss, (0, 1, 2)), x, w3, w1), mesh) == {}
    monkeypatch.setenv(perf.LAYER_TUNING_ENV, "0")
    assert "Col2imBackwardData" not in _targets(jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, w3, w1).compile()
                                                .as_text())


def _strided_gradient(case, wrt: int, seed: int):
    """-> (ours compiled, ours, lax's in float32, lax's step FLOPs): the gradient of a strided conv of bfloat16 (or
    float32) inputs with respect to x (wrt=0) or w (wrt=1), for a random output cotangent."""
    dtype, n, size, cin, cout, k, stride, padding = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, size, size, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.3, dtype)

    def grad(conv, x, w, g):
        def f(*xw):
            return conv(*xw, (stride, stride), padding, dimension_numbers=NHWC)
        return jax.vjp(lambda v: f(*((v, w) if wrt == 0 else (x, v))), (x, w)[wrt])[1](g)[0]

    y_shape = jax.eval_shape(lambda: jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                                  dimension_numbers=NHWC)).shape
    g = jnp.asarray(rng.normal(size=y_shape), dtype)
    as_f32 = [v.astype(jnp.float32) for v in (x, w, g)]
    reference = jax.jit(functools.partial(grad, jax.lax.conv_general_dilated))
    compiled = jax.jit(functools.partial(grad, onednn_conv.conv_general_dilated)).lower(x, w, g).compile()
    return (compiled, np.asarray(compiled(x, w, g), np.float32), np.asarray(reference(*as_f32)),
            perf.step_flops(reference.lower(*as_f32).compile()))


# (dtype, batch, size, in, out, kernel, stride, padding): strided layers whose data gradient is matmul + col2im
COL2IM_CASES = [
    ("bfloat16", 4, 8, 16, 32, 3, 2, "SAME"),
    ("bfloat16", 3, 9, 16, 8, 3, 2, "SAME"),  # odd size, output channels not a multiple of 16
    ("bfloat16", 2, 11, 16, 16, 5, 3, ((2, 1), (0, 2))),  # stride 3, asymmetric explicit padding
    ("bfloat16", 2, 9, 32, 16, 1, 2, "VALID"),  # 1x1 stride 2: every other pixel's gradient is zero
    ("bfloat16", 6, 32, 128, 16, 3, 2, "SAME"),  # one image per chunk: 6 chunks on the threads
    ("float32", 2, 8, 16, 32, 3, 2, "SAME"),
    ("float32", 2, 6, 128, 16, 3, 2, "SAME"),
]


@pytest.mark.parametrize("case", COL2IM_CASES, ids=[f"{c[0]}-{c[2]}px-c{c[3]}k{c[5]}s{c[6]}" for c in COL2IM_CASES])
def test_strided_data_gradients_by_col2im_match_lax(case, monkeypatch):
    """The data gradient of the same inputs, to bfloat16 (float32) rounding of the sum, counted as its FLOPs."""
    monkeypatch.setattr(onednn_conv, "strided_gradients_measured", lambda *args: (True, False))
    compiled, got, want, lax_flops = _strided_gradient(case, wrt=0, seed=6)
    assert _targets(compiled.as_text()) == ["Col2imBackwardData"]
    np.testing.assert_allclose(perf.step_flops(compiled), lax_flops, rtol=0.02)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5 if case[0] == "float32" else 4e-3)
    if case[5] == 1:  # 1x1 stride 2: the pixels no output reads get exactly zero
        assert not got[:, 1::2].any() and not got[:, :, 1::2].any()


def test_col2im_sharded_over_devices_matches_one_device():
    """Batch-sharded over 8 devices, each device scatters its own images' gradient: the same bits as on one."""
    mesh = parallel.create_mesh()
    rng = np.random.default_rng(7)
    dy = jnp.asarray(rng.normal(size=(16, 4, 4, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) * 0.3, jnp.bfloat16)
    call = lambda dy, w: onednn_conv._col2im_backward_data(dy, w, (16, 8, 8, 16), (2, 2), (0, 1, 0, 1))
    one = jax.jit(call)(dy, w)
    sharded = jax.jit(call, in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))
    many = sharded(dy, w)
    assert "all-gather" not in sharded.lower(dy, w).compile().as_text()
    assert many.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(one, np.float32), np.asarray(many, np.float32))


def test_the_col2im_kernel_rejects_what_it_does_not_cover_with_the_reason():
    dy = jnp.zeros((2, 4, 4, 32), jnp.bfloat16)
    with pytest.raises(Exception, match="input channels of 16"):
        onednn_conv._call("Col2imBackwardData", (2, 8, 8, 24), jnp.bfloat16, dy,
                          jnp.zeros((3, 3, 24, 32), jnp.bfloat16), (2, 2), (1, 1, 1, 1))
    with pytest.raises(Exception, match=r"dy \[n, ho, wo, o\], w"):  # a zero stride: checked before it divides
        onednn_conv._call("Col2imBackwardData", (2, 8, 8, 16), jnp.bfloat16, dy,
                          jnp.zeros((3, 3, 16, 32), jnp.bfloat16), (0, 2), (1, 1, 1, 1))
    with pytest.raises(Exception, match=r"dy \[n, ho, wo, o\], w"):  # mixed dtypes
        onednn_conv._call("Col2imBackwardData", (2, 8, 8, 16), jnp.bfloat16, dy,
                          jnp.zeros((3, 3, 16, 32), jnp.float32), (2, 2), (1, 1, 1, 1))
    with pytest.raises(Exception, match="do not match"):
        onednn_conv._call("Col2imBackwardData", (2, 10, 10, 16), jnp.bfloat16, dy,
                          jnp.zeros((3, 3, 16, 32), jnp.bfloat16), (2, 2), (1, 1, 1, 1))


# (dtype, batch, size, in, out, kernel, stride, padding): strided layers whose weight gradient is im2col + matmul
IM2COL_CASES = [
    ("bfloat16", 4, 8, 16, 32, 3, 2, "SAME"),
    ("bfloat16", 3, 9, 8, 16, 3, 2, "SAME"),  # odd size: the last row and column of taps fall in the padding
    ("bfloat16", 2, 11, 4, 16, 5, 3, ((2, 1), (0, 2))),  # stride 3, asymmetric explicit padding
    ("bfloat16", 4, 32, 128, 16, 3, 2, "SAME"),  # 1024 output positions: two chunks, one per thread, summed
    ("float32", 2, 6, 128, 16, 3, 2, "SAME"),
]


@pytest.mark.parametrize("case", IM2COL_CASES, ids=[f"{c[0]}-{c[2]}px-k{c[5]}s{c[6]}" for c in IM2COL_CASES])
def test_strided_weight_gradients_by_im2col_match_lax(case):
    """The weight gradient of the same inputs, to bfloat16 (float32) rounding of the sum."""
    compiled, got, want, _ = _strided_gradient(case, wrt=1, seed=5)
    assert _targets(compiled.as_text()) == ["Im2colBackwardWeights"]
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5 if case[0] == "float32" else 4e-3)


@pytest.mark.parametrize("dtype, cin, cout, k, stride, why", [
    ("bfloat16", 16, 16, 3, 1, "stride 1: oneDNN's kernel was faster"),
    ("bfloat16", 16, 32, 1, 2, "1x1: oneDNN's kernel was faster"),
    ("bfloat16", 16, 24, 3, 2, "output channels not a multiple of 16"),
    ("float32", 64, 128, 3, 2, "float32 below 128 input channels: oneDNN's kernel was as fast"),
])
def test_other_weight_gradients_stay_with_onednns_kernel(dtype, cin, cout, k, stride, why):
    x = jnp.zeros((2, 8, 8, cin), dtype)
    w = jnp.zeros((k, k, cin, cout), dtype)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(onednn_conv.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=NHWC).astype(jnp.float32))))
    assert "Im2colBackwardWeights" not in _targets(grad.lower(w).compile().as_text()), why


def test_the_im2col_kernel_rejects_what_it_does_not_cover_with_the_reason():
    x = jnp.zeros((2, 8, 8, 16), jnp.bfloat16)
    with pytest.raises(Exception, match="output channels of 16"):
        onednn_conv._call("Im2colBackwardWeights", (3, 3, 16, 24), jnp.bfloat16, x, jnp.zeros((2, 4, 4, 24), jnp.bfloat16),
                          (2, 2), (1, 1, 1, 1))
    with pytest.raises(Exception, match=r"x \[n, h, w, c\], dy"):  # a zero stride: checked before it divides
        onednn_conv._call("Im2colBackwardWeights", (3, 3, 16, 32), jnp.bfloat16, x, jnp.zeros((2, 4, 4, 32), jnp.bfloat16),
                          (0, 2), (1, 1, 1, 1))
    with pytest.raises(Exception, match="do not match"):
        onednn_conv._call("Im2colBackwardWeights", (3, 3, 16, 32), jnp.bfloat16, x, jnp.zeros((2, 5, 5, 32), jnp.bfloat16),
                          (2, 2), (1, 1, 1, 1))
