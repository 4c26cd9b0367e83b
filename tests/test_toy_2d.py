"""examples/toy_2d.py (the paper's Fig. 2 toy): the --tiny CLI run writes a real figure and a sane JSON.

The science is not asserted beyond a loose floor on the contrastive AUROC: at this size the supervised
model's AUROC is *not* near 0.5 (seeds 0-4 at --tiny: supervised 0.979-0.997, contrastive 0.992-0.997),
so the paper's contrast does not show here and is left to the example's docstring and JSON.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import PIL.Image

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this module out

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "toy_2d.py"
METHODS = ("supervised", "contrastive")


def test_toy_2d_tiny(tmp_path):
    out = tmp_path / "toy"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the example runs on one device; skip conftest's 8 forced CPU devices
    proc = subprocess.run([sys.executable, str(EXAMPLE), f"--out={out}", "--tiny", "--seed=3"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "AUROC" in proc.stdout and "wall time" in proc.stdout

    png = out / "toy_2d.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with PIL.Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width >= 800 and height >= 300 and width > height  # two panels side by side
    assert png.stat().st_size > 20_000
    # Drawn: dark and light ink, and colour (the heatmap), not a flat or grey image.
    assert pixels.min() < 60 and pixels.max() > 230
    assert np.abs(pixels.astype(int) - pixels.mean(axis=2, keepdims=True)).max() > 50

    summary = json.loads((out / "toy_2d.json").read_text())
    for key in ("auroc", "test_accuracy", "train_accuracy", "final_losses", "input_space_gaussian_auroc",
                "steps", "seed", "tiny", "hyperparameters", "wall_time_s"):
        assert key in summary, key
    assert summary["seed"] == 3 and summary["tiny"] is True
    assert summary["steps"] == summary["hyperparameters"]["steps"] > 0
    assert summary["wall_time_s"] > 0
    for method in METHODS:
        value = summary["auroc"][method]
        assert math.isfinite(value) and 0.0 <= value <= 1.0, (method, value)
        # Two classes, separable by x1 with a wide margin: chance is 0.5.
        assert summary["test_accuracy"][method] >= 0.9, summary["test_accuracy"]
        assert summary["train_accuracy"][method] >= 0.9, summary["train_accuracy"]
        assert math.isfinite(summary["final_losses"][method]["loss"])
    # Contrastive features keep x2: >= 0.992 for seeds 0-4 at --tiny, so 0.9 leaves a wide margin.
    assert summary["auroc"]["contrastive"] > 0.9, summary["auroc"]
    assert 0.0 <= summary["input_space_gaussian_auroc"] <= 1.0
