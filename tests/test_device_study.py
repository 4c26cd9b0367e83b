"""benchmarks/device_study.py at its smoke size: the pack, the TensorFlow-free run, the planner, the results."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_study  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this module out


@pytest.fixture(scope="module")
def fake_shared_data(tmp_path_factory):
    """The five npz files of ../shared/data, with generated images (so CI needs no data)."""
    root = tmp_path_factory.mktemp("shared_data")
    rng = np.random.default_rng(0)

    def write(name, n, classes, names):
        labels = np.arange(n) % classes if classes else np.full(n, -1)
        base = ((labels[:, None, None, None] % 10) * 20 + 30).astype(np.int64)
        images = np.clip(base + rng.integers(-30, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez(root / name, images=images, labels=labels, label_names=np.asarray(names))

    cifar = [f"c{i}" for i in range(10)]
    write("cifar10-train-part1of2.npz", 300, 10, cifar)
    write("cifar10-train-part2of2.npz", 300, 10, cifar)
    write("cifar10-test.npz", 200, 10, cifar)
    write("tinyimagenet32-test.npz", 120, 0, [])
    write("dtd10-all.npz", 60, 10, [f"t{i}" for i in range(10)])
    return root


def test_pack_fits_its_budget_and_keeps_the_evaluation_sets_lossless(fake_shared_data, tmp_path):
    with pytest.raises(SystemExit, match="evaluation sets alone take"):
        device_study.pack(fake_shared_data, tmp_path / "small", max_mib=0.3)
    manifest = device_study.pack(fake_shared_data, tmp_path / "pack", max_mib=1.5)
    files = sum(p.stat().st_size for p in (tmp_path / "pack").iterdir())
    assert files <= 1.5 * 2**20 + 4096
    sets = manifest["sets"]
    assert sets["test"]["encoding"] == sets["dtd"]["encoding"] == "PNG (lossless)"
    assert sets["train"]["encoding"] == "JPEG q90 4:4:4"
    assert 0 < sets["train"]["count"] < 360  # as many of the 360 class 0-5 images as fit
    data = tmp_path / "data"
    device_study.unpack(tmp_path / "pack", data)
    original = np.load(fake_shared_data / "cifar10-test.npz")
    unpacked = np.load(data / "cifar10-test.npz")
    order = np.argsort(np.random.default_rng(0).permutation(200)[:200])  # all 200 kept, in source order
    np.testing.assert_array_equal(unpacked["images"], original["images"][np.sort(order)])
    train = np.load(data / "cifar10-train-0to5.npz")
    assert set(train["labels"].tolist()) <= set(range(6))
    counts = np.bincount(train["labels"], minlength=6)
    assert counts.max() - counts.min() <= 1  # class balanced
    assert np.all(np.load(data / "tinyimagenet32-test.npz")["labels"] == -1)


def test_smoke_run_without_tensorflow_writes_every_result(fake_shared_data, tmp_path):
    device_study.pack(fake_shared_data, tmp_path / "pack", max_mib=4.0)  # every training image fits
    out, workdir = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_study.py"), "run", "--smoke",
                           "--block_tensorflow", f"--pack={tmp_path / 'pack'}", f"--out={out}", f"--workdir={workdir}",
                           "--budget_s=600"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "device_study.json").read_text())
    assert result["meta"]["backend"] == "cpu"
    assert len(result["throughput"]) == 2 and all(r["passes_s"] > 0 for r in result["throughput"])
    plan = result["plan"]
    assert plan["variants"][:2] == ["supervised", "contrastive+ls"] and plan["steps_per_stage"] >= 1
    assert "plan:" in " ".join(result["log"])  # logged before anything trained
    assert set(result["science"]["runs"]) >= {"supervised_seed0", "contrastive+ls_seed0"}
    table = (out / "science.md").read_text()
    assert "| x | x |" in table and "| ✓ | ✓ |" in table and "near_cifar10_6to9" in table
    throughput = (out / "throughput.md").read_text()
    assert "contrastood (JAX)" in throughput
    if result["torch"] and not result["torch"].get("error"):
        assert "PyTorch" in throughput and "x (" in result["torch"]["ratio"]
