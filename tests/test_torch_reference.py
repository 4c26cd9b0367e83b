"""benchmarks/torch_reference.py: the PyTorch model has the flax model's parameters, and its losses,
optimiser and colour ops compute what contrastood's do, so the speed comparison is like for like."""
import pytest

torch = pytest.importorskip("torch")

import importlib.util
import json
import math
import pathlib
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from contrastood import augment, losses, models, train

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"


@pytest.fixture(scope="module")
def tr():
    spec = importlib.util.spec_from_file_location("torch_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flax_param_count(name, width, num_classes, proj_dim):
    config = ml_collections.ConfigDict(dict(name=name, width=width, proj_dim=proj_dim, proj_hidden_dim=0,
                                            dtype="float32"))
    model = models.create_model(config, num_classes)
    # Shapes of model.init on a tiny input (eval_shape: nothing is computed).
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name,width,num_classes,proj_dim", [
    ("resnet_tiny", 1, 10, 128), ("resnet_tiny", 2, 100, 32), ("resnet_tiny", 3, 7, 16),
    ("resnet18", 1, 10, 128), ("resnet18", 2, 100, 64), ("resnet50", 1, 10, 128)])
def test_parameter_count_equals_flax_model(tr, name, width, num_classes, proj_dim):
    torch_model = tr.create_model(name, width, num_classes, proj_dim)
    assert tr.count_parameters(torch_model) == flax_param_count(name, width, num_classes, proj_dim)


def test_decay_mask_matches_train_py(tr):
    """LARS decays / trust-ratios the same number of parameters as contrastood.train's mask."""
    torch_model = tr.create_model("resnet_tiny", 1, 10, 32)
    opt = tr.LARS(torch_model.parameters(), lr=0.1)
    config = ml_collections.ConfigDict(dict(name="resnet_tiny", width=1, proj_dim=32, proj_hidden_dim=0,
                                            dtype="float32"))
    params = jax.eval_shape(lambda: models.create_model(config, 10).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))["params"]
    mask = train._decay_mask(params)
    decayed = sum(math.prod(p.shape) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    assert sum(p.numel() for p in opt.decay_params) == decayed
    assert len(opt.decay_params) == sum(jax.tree.leaves(mask))


@pytest.mark.parametrize("memory_format", ["contiguous_format", "channels_last"])
def test_output_shapes(tr, memory_format):
    model = tr.create_model("resnet_tiny", 1, 7, 16).set_memory_format(getattr(torch, memory_format))
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    for train_mode in (True, False):
        model.train(train_mode)
        out = model(images)
        assert out["pre_logits"].shape == (4, 64)
        assert out["logits"].shape == (4, 7)
        assert out["proj"].shape == (4, 16)
        assert all(v.dtype == torch.float32 for v in out.values())
    # float images in [0, 1] give the same as their uint8 originals
    torch.testing.assert_close(model(images.float() / 255.0)["logits"], out["logits"])


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_nt_xent_matches_contrastood(tr, temperature):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 12, 16)).astype(np.float32)
    loss, acc = tr.nt_xent(torch.from_numpy(z1), torch.from_numpy(z2), temperature)
    ref_loss, ref_acc = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature)
    np.testing.assert_allclose(loss.item(), float(ref_loss), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acc.item(), float(ref_acc), atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.01, 0.1])
def test_smoothed_cross_entropy_matches_contrastood(tr, label_smoothing):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 16)
    loss, acc = tr.smoothed_cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing)
    ref_loss, ref_acc = losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing)
    np.testing.assert_allclose(loss.item(), float(ref_loss), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acc.item(), float(ref_acc), atol=1e-6)


def test_lars_matches_optax_lars_with_train_masks(tr):
    rng = np.random.default_rng(2)
    shapes = {"kernel": (3, 3, 4, 5), "dense": (6, 4), "scale": (5,), "bias": (4,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    tx = optax.lars(0.3, weight_decay=1e-2, weight_decay_mask=train._decay_mask,
                    trust_ratio_mask=train._decay_mask, momentum=0.9)
    jax_params = jax.tree.map(jnp.asarray, params)
    state = tx.init(jax_params)
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = tr.LARS(torch_params.values(), lr=0.3, momentum=0.9, weight_decay=1e-2)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(g[k])
        opt.step()
        opt.zero_grad()
    for k in shapes:
        np.testing.assert_allclose(torch_params[k].detach().numpy(), np.asarray(jax_params[k]), rtol=1e-5, atol=1e-6)


def test_colour_ops_match_contrastood(tr):
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(3, 8, 8, 3)).astype(np.float32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    saturation, hue, contrast = np.array([0.6, 1.0, 1.4]), np.array([0.1, 0.0, -0.07]), np.array([0.7, 1.3, 1.0])
    got = tr.adjust_hsv(x, torch.tensor(saturation, dtype=torch.float32), torch.tensor(hue, dtype=torch.float32))
    got_contrast = tr.adjust_contrast(x, torch.tensor(contrast, dtype=torch.float32))
    for i in range(3):
        ref = augment._adjust_hsv(jnp.asarray(images[i]), saturation[i], hue[i])
        np.testing.assert_allclose(got[i].permute(1, 2, 0).numpy(), np.asarray(ref), atol=1e-5)
        ref = augment._adjust_contrast(jnp.asarray(images[i]), contrast[i])
        np.testing.assert_allclose(got_contrast[i].permute(1, 2, 0).numpy(), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(tr.to_grayscale(x)[:, 0].numpy(), np.asarray(augment._to_grayscale(
        jnp.asarray(images)))[..., 0], atol=1e-6)


def test_augmentations(tr):
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    x = tr.to_float_nchw(images)
    # whole-image crop, no flip, no colour: the input comes back (bilinear at pixel centres)
    same = tr.simclr_augment(x, crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=False, color_prob=0.0,
                             grayscale_prob=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    views = tr.two_views(images)
    assert views.shape == (12, 3, 32, 32) and views.min() >= 0 and views.max() <= 1
    assert not torch.allclose(views[:6], views[6:])  # two independent views
    standard = tr.standard_augment(images)
    assert standard.shape == (6, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):  # every crop is a (possibly mirrored) 32 x 32 window of the padded image
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)  # [9, 9, 3, 32, 32]
        match = (windows == standard[i]).flatten(2).all(-1) | (windows == standard[i].flip(-1)).flatten(2).all(-1)
        assert match.any()


@pytest.mark.parametrize("extra", [[], ["--supervised", "--augment=both"]])
def test_cli_tiny_run(tmp_path, extra):
    out = tmp_path / "torch.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--models=resnet_tiny", "--batch_size=8", "--steps=2",
                             "--modes=fp32", f"--json={out}", *extra],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "passes/s" in result.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["torch_version"] == torch.__version__
    assert data["meta"]["cpu_model"] and data["meta"]["threads"] >= 1
    rows = data["results"]
    assert len(rows) == 2  # default --augment=both: on and off
    for row in rows:
        assert row["passes_s"] > 0 and math.isfinite(row["loss"])
        assert row["views"] == (1 if extra else 2)
        assert row["passes_s"] == pytest.approx(row["views"] * row["img_s"])


@pytest.mark.slow
def test_vs_pytorch_side_by_side_run(tmp_path):
    """The side-by-side command: every JAX option set and PyTorch mode gets a row, and the ratios are the
    best rows' quotient."""
    script = SCRIPT.parent / "vs_pytorch.py"
    run = subprocess.run([sys.executable, str(script), "--models=resnet_tiny", "--batch=8", "--seconds=0.1",
                          "--torch_steps=1", "--rounds=1", f"--out={tmp_path}"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "vs_pytorch.json").read_text())
    rows = result["rows"]
    ours = [r for r in rows if r["framework"] == "contrastood" and r.get("host_malloc", True)]
    glibc_defaults = [r for r in rows if r.get("host_malloc") is False]
    theirs = [r for r in rows if r["framework"] != "contrastood"]
    from contrastood import onednn_conv, perf

    conv = "winograd" if onednn_conv.load() is None else "xla"  # the last kernel of the benchmark's list
    # On glibc Linux, one more row: the default option set with host_memory off, not counted as ours.
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert [r["mode"] for r in glibc_defaults] == [
            f"float32, conv {conv}, XLA {perf.DEFAULT_CANDIDATE[conv]}, glibc malloc defaults (CONTRASTOOD_HOST_MALLOC=0)"]
        assert glibc_defaults[0]["passes_s"] > 0

    assert {r["mode"].split("XLA ")[1] for r in ours} >= {"xla_defaults"}
    assert {r["mode"].split("XLA ")[1] for r in ours} == {n for n in perf.CPU_CANDIDATES if perf._supported(n)}
    assert {r["mode"].split(", XLA")[0] for r in ours} >= {"float32, conv xla", f"float32, conv {conv}"} | (
        {"float32, conv onednn"} if conv == "winograd" else set())
    bf16_rows = {r["mode"].split(", XLA")[0] for r in ours if r["mode"].startswith("bfloat16")}
    assert bf16_rows == ({"bfloat16, conv onednn", "bfloat16, conv winograd"}
                         if perf.cpu_has_bf16() and conv == "winograd" else set())
    assert {r["mode"] for r in theirs} >= {"fp32", "fp32_cl", "fp32, malloc as contrastood's",
                                           "fp32_cl, malloc as contrastood's"}  # glibc's defaults, then ours
    assert all(r["passes_s"] > 0 for r in rows)
    summary = result["summary"]["resnet_tiny"]
    assert summary["ours"]["passes_s"] == max(r["passes_s"] for r in ours)
    assert summary["pytorch_best"]["passes_s"] == max(r["passes_s"] for r in theirs)
    assert math.isclose(summary["ratio"], summary["ours"]["passes_s"] / summary["pytorch_best"]["passes_s"])
    assert "ratio to best" in (tmp_path / "vs_pytorch.md").read_text()
    # Then each pair head to head: the same two modes in alternating rounds, the median of their ratios.
    for pair, ours_key, theirs_key in [("best", "ours", "pytorch_best"),
                                        ("float32", "ours_float32", "pytorch_best_float32")]:
        rounds = summary[f"head_to_head_{pair}"]
        assert rounds["ours_mode"] == summary[ours_key]["mode"]
        assert rounds["pytorch_mode"] == summary[theirs_key]["torch_mode"] + ", malloc as contrastood's"
        assert len(rounds["ours"]) == len(rounds["pytorch"]) == 1 and min(rounds["ours"] + rounds["pytorch"]) > 0
        assert rounds["median_ratio"] == pytest.approx(rounds["ours"][0] / rounds["pytorch"][0])
    assert "Head to head, alternating rounds per pair (1 of each" in (tmp_path / "vs_pytorch.md").read_text()
