"""OOD report figures: each writes a readable PNG and returns exactly its pixels."""
import numpy as np
import PIL.Image
import pytest

from contrastood.ood import clp, plots

RNG = np.random.default_rng(0)
IN_SCORES = RNG.normal(2.0, 1.0, size=200)
OUT_SCORES = {"cifar100": RNG.normal(0.5, 1.0, size=150), "svhn": RNG.normal(-2.0, 0.5, size=100)}


def _check_png(path, image):
    """The PNG exists, PIL can open it, it holds the returned pixels, and it is not blank."""
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert path.stat().st_size > 1000
    with PIL.Image.open(path) as png:
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), image)
    # A drawn figure has dark ink on a light background, not a single flat colour.
    assert image.min() < 100 and image.max() > 200 and image.reshape(-1, 3).std(axis=0).max() > 10


def test_score_histograms(tmp_path):
    path = tmp_path / "hist.png"
    image = plots.score_histograms(IN_SCORES, OUT_SCORES, path, title="CIFAR-10 vs OOD",
                                   score_name="log-likelihood")
    _check_png(path, image)
    # Identical scores everywhere still gives a valid histogram.
    image = plots.score_histograms(np.ones(5), {"same": np.ones(3)}, path, title="t", score_name="s")
    _check_png(path, image)


def test_roc_curves(tmp_path):
    path = tmp_path / "nested" / "roc.png"  # missing parent directories are created
    _check_png(path, plots.roc_curves(IN_SCORES, OUT_SCORES, path, title="ROC"))


def test_failure_grid(tmp_path):
    images = RNG.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    ranks = np.linspace(50.0, 99.9, 20)
    classes = np.arange(20) % 3
    path = tmp_path / "fail.png"
    image = plots.failure_grid(images, ranks, classes, ["cat", "dog", "ship"], path,
                               title="most confident failures", max_images=9)
    _check_png(path, image)
    # Greyscale inputs and fewer images than max_images work too.
    _check_png(path, plots.failure_grid(images[:2, ..., 0], ranks[:2], classes[:2],
                                        ["cat", "dog", "ship"], path, title="t"))
    # A scorer that predicts no class (knn): ranks only.
    _check_png(path, plots.failure_grid(images, ranks, None, ["cat", "dog", "ship"], path, title="t"))


def test_auroc_vs_clp(tmp_path):
    points = [{"clp": -1.0 - i, "auroc": 0.7 + 0.02 * i, "dataset": "CIFAR-100", "label": f"c{i}"}
              for i in range(5)]
    points += [{"clp": -9.0, "auroc": 0.99, "dataset": "SVHN", "label": "7"}]
    path = tmp_path / "scatter.png"
    _check_png(path, plots.auroc_vs_clp(points, path, title="AUROC vs CLP"))


def test_auroc_by_clp_bins_plot_from_clp_bins(tmp_path):
    sample_clp = RNG.uniform(-10.0, 0.0, size=150)
    bins = clp.auroc_by_clp_bins(sample_clp, OUT_SCORES["cifar100"], IN_SCORES, num_bins=6)
    bins.append({"clp_low": 0.0, "clp_high": 1.0, "count": 0, "auroc": float("nan")})  # empty bin
    path = tmp_path / "bins.png"
    _check_png(path, plots.auroc_by_clp_bins_plot(bins, path, title="AUROC per CLP bin"))


def test_dendrogram_plot(tmp_path):
    confusion = np.array([
        [0.80, 0.15, 0.03, 0.02],
        [0.20, 0.75, 0.03, 0.02],
        [0.01, 0.01, 0.90, 0.08],
        [0.01, 0.02, 0.10, 0.87],
    ])
    linkage = clp.dendrogram_linkage(clp.class_distance(confusion))
    path = tmp_path / "dendrogram.png"
    image = plots.dendrogram_plot(linkage, ["cat", "dog", "7", "3"],
                                  ["CIFAR-10", "CIFAR-10", "SVHN", "SVHN"], path, title="classes")
    _check_png(path, image)
    # Leaf labels are coloured by dataset: both tab:blue (CIFAR-10) and tab:orange (SVHN) appear.
    pixels = image.reshape(-1, 3).astype(int)
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert np.any(np.abs(pixels - rgb).sum(axis=1) < 30), rgb


def test_confusion_matrix_plot(tmp_path):
    matrix = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [np.nan, np.nan, np.nan]])
    path = tmp_path / "confusion.png"
    _check_png(path, plots.confusion_matrix_plot(matrix, ["CIFAR-10", "CIFAR-100", "SVHN"], path,
                                                 title="dataset confusion"))


@pytest.mark.parametrize("call, match", [
    (lambda p: plots.score_histograms([], OUT_SCORES, p, title="t", score_name="s"), "in_scores"),
    (lambda p: plots.score_histograms(IN_SCORES, {}, p, title="t", score_name="s"), "out_scores"),
    (lambda p: plots.roc_curves(IN_SCORES, {"a": [np.nan]}, p, title="t"), "NaN"),
    (lambda p: plots.failure_grid(np.zeros((0, 8, 8, 3), np.uint8), [], [], ["a"], p, title="t"),
     "empty"),
    (lambda p: plots.failure_grid(np.zeros((1, 8, 8, 3)), [1.0], [0], ["a"], p, title="t"), "uint8"),
    (lambda p: plots.failure_grid(np.zeros((1, 8, 8, 3), np.uint8), [101.0], [0], ["a"], p, title="t"),
     "percentiles"),
    (lambda p: plots.failure_grid(np.zeros((1, 8, 8, 3), np.uint8), [1.0], [1], ["a"], p, title="t"),
     "class_names"),
    (lambda p: plots.auroc_vs_clp([], p, title="t"), "empty"),
    (lambda p: plots.auroc_vs_clp([{"clp": 0.0, "auroc": 0.5}], p, title="t"), "missing"),
    (lambda p: plots.auroc_by_clp_bins_plot([], p, title="t"), "empty"),
    (lambda p: plots.auroc_by_clp_bins_plot(
        [{"clp_low": 0.0, "clp_high": 1.0, "count": 0, "auroc": float("nan")}], p, title="t"),
     "every bin is empty"),
    (lambda p: plots.dendrogram_plot(np.zeros((2, 4)), ["a", "b"], ["x", "x"], p, title="t"),
     "linkage"),
    (lambda p: plots.dendrogram_plot(np.zeros((1, 4)), ["a", "b"], ["x"], p, title="t"),
     "class_dataset"),
    (lambda p: plots.confusion_matrix_plot(np.zeros((2, 3)), ["a", "b"], p, title="t"), "square"),
    (lambda p: plots.confusion_matrix_plot(np.eye(2), ["a"], p, title="t"), "names"),
    (lambda p: plots.confusion_matrix_plot(np.full((2, 2), np.nan), ["a", "b"], p, title="t"),
     "finite"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, call, match):
    path = tmp_path / "never.png"
    with pytest.raises(ValueError, match=match):
        call(path)
    assert not path.exists()
