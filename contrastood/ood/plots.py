"""Figures for the OOD report (Winkens et al. 2020, Figs. 1, 4, 5, 6, 7, 8).

Every function writes a PNG to `path` and returns the very same pixels as a uint8 [H, W, 3] array,
ready for a TensorBoard image summary (e.g. clu's `writer.write_images`).

Figures are built with the object-oriented `Figure` + Agg canvas rather than pyplot, so nothing is
kept in pyplot's global figure registry: the report can run inside a long training job without
leaking figures, and from several threads. The Agg backend is also selected module-wide so that
any pyplot use that follows (e.g. by scipy) never needs a display.

Score convention everywhere: higher score = more in-distribution; ROC curves and AUROC treat the
in-distribution set as the positive class.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402  (imports below come after the backend is chosen)
import PIL.Image  # noqa: E402
import scipy.cluster.hierarchy  # noqa: E402
import sklearn.metrics  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from contrastood import workdir  # noqa: E402
from contrastood.ood import metrics  # noqa: E402

_DPI = 100
# Matplotlib's default colour cycle; datasets keep their colour across figures by insertion order.
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
            "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
# Cell values are written into the confusion matrix only while they stay legible.
_MAX_ANNOTATED_CELLS = 20


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _finish(figure: Figure, path) -> np.ndarray:
    """Renders `figure`, writes it as PNG to `path` (any epath: local or gs://) and returns the pixels."""
    figure.canvas.draw()
    image = np.ascontiguousarray(np.asarray(figure.canvas.buffer_rgba())[..., :3])
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    workdir.atomic_write_bytes(workdir.as_path(path), buffer.getvalue())
    return image


def _as_scores(scores, name: str) -> np.ndarray:
    return metrics.validated_scores(name, scores)


def _as_score_sets(out_scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not out_scores:
        raise ValueError("out_scores is empty; pass at least one {dataset_name: scores} entry.")
    return {name: _as_scores(scores, f"out_scores[{name!r}]") for name, scores in out_scores.items()}


def _colour(index: int) -> str:
    return _COLOURS[index % len(_COLOURS)]


def score_histograms(in_scores, out_scores: Mapping[str, np.ndarray], path, *, title: str,
                     score_name: str) -> np.ndarray:
    """Density histograms of in-dist vs each OOD set's scores on shared bins (Fig. 4a/b).

    Shared bins make the overlap, i.e. what AUROC measures, directly visible; densities make sets
    of different sizes comparable.
    """
    in_scores = _as_scores(in_scores, "in_scores")
    out_scores = _as_score_sets(out_scores)
    edges = np.histogram_bin_edges(np.concatenate([in_scores, *out_scores.values()]), bins=60)
    figure = _new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.hist(in_scores, bins=edges, density=True, histtype="stepfilled", alpha=0.35,
              color="black", label=f"in-distribution (n={in_scores.size})")
    for index, (name, scores) in enumerate(out_scores.items()):
        axes.hist(scores, bins=edges, density=True, histtype="step", linewidth=1.6,
                  color=_colour(index), label=f"{name} (n={scores.size})")
    axes.set_xlabel(score_name)
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _finish(figure, path)


def roc_curves(in_scores, out_scores: Mapping[str, np.ndarray], path, *, title: str) -> np.ndarray:
    """One ROC curve per OOD set, in-distribution positive, with its AUROC in the legend."""
    in_scores = _as_scores(in_scores, "in_scores")
    out_scores = _as_score_sets(out_scores)
    figure = _new_figure(5.5, 5)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle=":", color="gray", label="chance (0.500)")
    for index, (name, scores) in enumerate(out_scores.items()):
        targets = np.concatenate([np.ones_like(in_scores), np.zeros_like(scores)])
        all_scores = np.concatenate([in_scores, scores])
        false_positive_rate, true_positive_rate, _ = sklearn.metrics.roc_curve(targets, all_scores)
        auroc = sklearn.metrics.roc_auc_score(targets, all_scores)
        axes.plot(false_positive_rate, true_positive_rate, color=_colour(index),
                  label=f"{name} ({auroc:.3f})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate (OOD accepted as in-dist)")
    axes.set_ylabel("true positive rate (in-dist accepted)")
    axes.set_title(title)
    axes.legend(title="OOD set (AUROC)", fontsize=8, loc="lower right")
    return _finish(figure, path)


def failure_grid(images_uint8, ranks, classes, class_names: Sequence[str], path, *, title: str,
                 max_images: int = 16) -> np.ndarray:
    """OOD images that the detector most confidently took as in-distribution (Fig. 5).

    `ranks` is each image's score as a percentile (0-100) of the in-distribution test scores
    (100 = scored above every in-dist image); `classes` is the index of its most activated class
    Gaussian, or None for a scorer that predicts no class. The `max_images` highest-ranked images are
    shown, highest first, each captioned with its rank and that class's name.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"images_uint8 must have dtype uint8, got {images.dtype}; pass raw pixels.")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images_uint8 must be [N, H, W, 3] (or greyscale [N, H, W]), got {images.shape}.")
    if images.shape[0] == 0:
        raise ValueError("images_uint8 is empty; there are no failure cases to show.")
    ranks = np.asarray(ranks, dtype=np.float64)
    classes = None if classes is None else np.asarray(classes)
    if ranks.shape != (images.shape[0],) or (classes is not None and classes.shape != (images.shape[0],)):
        raise ValueError(
            f"ranks {ranks.shape} and classes {classes.shape} need one entry per image "
            f"({images.shape[0]}).")
    if not np.all((ranks >= 0) & (ranks <= 100)):
        raise ValueError("ranks must be percentiles in [0, 100].")
    if classes is not None and (not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0
                                or classes.max() >= len(class_names)):
        raise ValueError(f"classes must be integer indices into class_names (len {len(class_names)}).")
    if not isinstance(max_images, (int, np.integer)) or max_images < 1:
        raise ValueError(f"max_images must be a positive integer, got {max_images!r}.")

    order = np.argsort(-ranks, kind="stable")[:max_images]
    num_columns = math.ceil(math.sqrt(order.size))
    num_rows = math.ceil(order.size / num_columns)
    figure = _new_figure(1.6 * num_columns, 1.75 * num_rows + 0.4)
    figure.suptitle(title)
    for position, index in enumerate(order):
        axes = figure.add_subplot(num_rows, num_columns, position + 1)
        image = images[index]
        axes.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                    interpolation="nearest")
        caption = f"{ranks[index]:.1f}%" + ("" if classes is None else f"\n[{class_names[classes[index]]}]")
        axes.set_title(caption, fontsize=8)
        axes.set_axis_off()
    return _finish(figure, path)


def auroc_vs_clp(points: Sequence[dict], path, *, title: str) -> np.ndarray:
    """AUROC of each OOD class against its class-wise CLP (Fig. 1 / Fig. 6).

    Each point is {"clp", "auroc", "dataset", "label"}: one colour per OOD dataset, each point
    annotated with its class label, so near-OOD failures (right, low) can be read off by name.
    """
    if not points:
        raise ValueError("points is empty; pass one dict per OOD class.")
    required = {"clp", "auroc", "dataset", "label"}
    for point in points:
        missing = required - set(point)
        if missing:
            raise ValueError(
                f"each point needs keys {sorted(required)}; missing {sorted(missing)} in {point}.")
    clps = np.array([point["clp"] for point in points], dtype=np.float64)
    aurocs = np.array([point["auroc"] for point in points], dtype=np.float64)
    if not (np.all(np.isfinite(clps)) and np.all(np.isfinite(aurocs))):
        raise ValueError("clp and auroc values must be finite.")
    datasets = list(dict.fromkeys(point["dataset"] for point in points))
    figure = _new_figure(8, 5)
    axes = figure.add_subplot()
    for index, dataset in enumerate(datasets):
        members = [i for i, point in enumerate(points) if point["dataset"] == dataset]
        axes.scatter(clps[members], aurocs[members], s=18, color=_colour(index), label=str(dataset))
    for point, clp, auroc in zip(points, clps, aurocs):
        axes.annotate(str(point["label"]), (clp, auroc), xytext=(2, 2), textcoords="offset points",
                      fontsize=6, alpha=0.8)
    axes.set_xlabel("class-wise confusion log probability (CLP)  \u2190 far OOD | near OOD \u2192")
    axes.set_ylabel("AUROC")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _finish(figure, path)


def auroc_by_clp_bins_plot(bins: Sequence[dict], path, *, title: str) -> np.ndarray:
    """AUROC per bin of sample-wise CLP (Fig. 4c), from `clp.auroc_by_clp_bins`.

    Bars span their CLP bin and are labelled with the bin's sample count; empty bins (NaN AUROC)
    are left blank.
    """
    if not bins:
        raise ValueError("bins is empty; compute them with clp.auroc_by_clp_bins().")
    required = {"clp_low", "clp_high", "count", "auroc"}
    for entry in bins:
        missing = required - set(entry)
        if missing:
            raise ValueError(f"each bin needs keys {sorted(required)}; missing {sorted(missing)} in {entry}.")
    lows = np.array([entry["clp_low"] for entry in bins], dtype=np.float64)
    highs = np.array([entry["clp_high"] for entry in bins], dtype=np.float64)
    aurocs = np.array([entry["auroc"] for entry in bins], dtype=np.float64)
    if not (np.all(np.isfinite(lows)) and np.all(np.isfinite(highs))) or np.any(highs < lows):
        raise ValueError("bin edges must be finite with clp_low <= clp_high.")
    filled = np.isfinite(aurocs)
    if not filled.any():
        raise ValueError("every bin is empty (all AUROCs are NaN); there is nothing to plot.")
    widths = np.maximum(highs - lows, 1e-9)
    figure = _new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.bar(lows[filled], aurocs[filled], width=widths[filled] * 0.95, align="edge",
             color="tab:blue", edgecolor="black", linewidth=0.5)
    for entry, low, width in zip(bins, lows, widths):
        if np.isfinite(entry["auroc"]):
            axes.text(low + width / 2, entry["auroc"], f"n={entry['count']}", ha="center",
                      va="bottom", fontsize=7)
    axes.set_ylim(0, 1.08)
    axes.set_xlabel("sample-wise confusion log probability (CLP)")
    axes.set_ylabel("AUROC")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    return _finish(figure, path)


def dendrogram_plot(linkage, class_names: Sequence[str], class_dataset: Sequence[str], path, *,
                    title: str) -> np.ndarray:
    """Class hierarchy from `clp.dendrogram_linkage` with leaf labels coloured by dataset (Fig. 8).

    Drawn sideways so that a hundred or more class names stay readable.
    """
    linkage = np.asarray(linkage, dtype=np.float64)
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError("a dendrogram needs at least 2 classes.")
    if len(class_dataset) != num_classes:
        raise ValueError(
            f"class_dataset ({len(class_dataset)}) needs one dataset name per class ({num_classes}).")
    if linkage.shape != (num_classes - 1, 4) or not scipy.cluster.hierarchy.is_valid_linkage(linkage):
        raise ValueError(
            f"linkage must be a valid scipy linkage matrix of shape ({num_classes - 1}, 4) for "
            f"{num_classes} classes, got shape {linkage.shape}; build it with clp.dendrogram_linkage().")
    datasets = list(dict.fromkeys(class_dataset))
    colour_of = {dataset: _colour(index) for index, dataset in enumerate(datasets)}
    figure = _new_figure(7, max(3.0, 0.16 * num_classes + 1.0))
    axes = figure.add_subplot()
    tree = scipy.cluster.hierarchy.dendrogram(
        linkage, labels=list(class_names), orientation="left", ax=axes, leaf_font_size=7,
        color_threshold=0, above_threshold_color="dimgray")
    # Tick labels follow the leaf order bottom to top; colour by position, not by (maybe repeated) name.
    for tick_label, leaf in zip(axes.get_yticklabels(), tree["leaves"]):
        tick_label.set_color(colour_of[class_dataset[leaf]])
    axes.set_xlabel("class distance")
    axes.set_title(title)
    axes.legend(handles=[Patch(color=colour_of[dataset], label=str(dataset)) for dataset in datasets],
                fontsize=8, loc="lower left")
    return _finish(figure, path)


def confusion_matrix_plot(matrix, names: Sequence[str], path, *, title: str) -> np.ndarray:
    """Heat map of a (dataset- or class-level) confusion matrix (Fig. 7); rows = true, cols = predicted.

    Values are written into the cells while the matrix is small; NaN rows (no test samples) stay blank.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square [K, K] array, got shape {matrix.shape}.")
    if len(names) != matrix.shape[0]:
        raise ValueError(f"names ({len(names)}) needs one name per row/column ({matrix.shape[0]}).")
    if np.any(np.isinf(matrix)) or not np.any(np.isfinite(matrix)):
        raise ValueError("matrix must have at least one finite value and no inf.")
    size = matrix.shape[0]
    side = min(14.0, max(4.0, 0.35 * size + 2.5))
    figure = _new_figure(side + 1.2, side)
    axes = figure.add_subplot()
    heat = axes.imshow(matrix, cmap="viridis", interpolation="nearest")
    figure.colorbar(heat, ax=axes, shrink=0.8)
    font_size = 9 if size <= 10 else 6
    axes.set_xticks(range(size), labels=[str(name) for name in names], rotation=45, ha="right",
                    fontsize=font_size)
    axes.set_yticks(range(size), labels=[str(name) for name in names], fontsize=font_size)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if size <= _MAX_ANNOTATED_CELLS:
        middle = 0.5 * (np.nanmin(matrix) + np.nanmax(matrix))  # viridis turns light above it
        for row in range(size):
            for column in range(size):
                value = matrix[row, column]
                if np.isfinite(value):
                    axes.text(column, row, f"{value:.3g}", ha="center", va="center", fontsize=font_size,
                              color="black" if value > middle else "white")
    return _finish(figure, path)


# ----------------------------------------------------------------------------------------------------
# Baseline against ours (--mode=compare): the paper's Fig. 4 and Fig. 6 layouts.

_BASELINE_GREY = "0.55"


def compare_auroc_vs_clp(ours: Sequence[dict], baseline: Sequence[dict], path, *, title: str) -> np.ndarray:
    """Fig. 6: class-wise AUROC against class-wise CLP, ours coloured by OOD set, the baseline in grey.

    Points are {"clp", "auroc", "dataset", "label"}, one per OOD class of each model, the same classes
    at the same CLP for both (the CLP is the ensemble's, not the detector's).
    """
    if not ours or not baseline:
        raise ValueError("both models need at least one OOD class point.")
    figure = _new_figure(9, 5)
    axes = figure.add_subplot()
    axes.scatter([p["clp"] for p in baseline], [p["auroc"] for p in baseline], s=22, color=_BASELINE_GREY,
                 marker="o", label="baseline (all sets)")
    datasets = list(dict.fromkeys(p["dataset"] for p in ours))
    for index, dataset in enumerate(datasets):
        members = [p for p in ours if p["dataset"] == dataset]
        axes.scatter([p["clp"] for p in members], [p["auroc"] for p in members], s=22, color=_colour(index),
                     label=f"ours: {dataset}")
    for p in ours:
        axes.annotate(str(p["label"]), (p["clp"], p["auroc"]), xytext=(2, 2), textcoords="offset points", fontsize=6,
                      alpha=0.8)
    axes.set_xlabel("class-wise confusion log probability (CLP)  \u2190 far OOD | near OOD \u2192")
    axes.set_ylabel("AUROC (Gaussian score, Eq. 2)")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _finish(figure, path)


def compare_histograms(panels: Sequence[dict], path, *, title: str) -> np.ndarray:
    """Fig. 4a/b: rows of panels, each {"title", "in_scores", "out_scores", "out_label"}, on shared bins."""
    if not panels:
        raise ValueError("no panels to draw.")
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure = _new_figure(5.5 * columns, 3.4 * rows + 0.4)
    figure.suptitle(title)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        inside, outside = _as_scores(panel["in_scores"], "in_scores"), _as_scores(panel["out_scores"], "out_scores")
        edges = np.histogram_bin_edges(np.concatenate([inside, outside]), bins=40)
        axes.hist(inside, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color="black",
                  label=f"in-distribution (n={inside.size})")
        axes.hist(outside, bins=edges, density=True, histtype="step", linewidth=1.6, color=_colour(index % 2),
                  label=f"{panel['out_label']} (n={outside.size})")
        axes.set_title(panel["title"], fontsize=9)
        axes.set_xlabel("s(x), Eq. 2")
        axes.legend(fontsize=7)
    return _finish(figure, path)


def compare_auroc_by_clp_bins(ours: Sequence[dict], baseline: Sequence[dict], path, *, title: str) -> np.ndarray:
    """Fig. 4c: AUROC per sample-wise CLP bin (the same bins) for ours and the baseline."""
    if len(ours) != len(baseline) or not ours:
        raise ValueError("both models need the same, non-empty list of bins.")
    centres = np.array([(b["clp_low"] + b["clp_high"]) / 2 for b in ours])
    width = np.array([max(b["clp_high"] - b["clp_low"], 1e-9) for b in ours]) * 0.4
    figure = _new_figure(8, 4.5)
    axes = figure.add_subplot()
    for shift, bins, colour, label in ((-0.5, baseline, _BASELINE_GREY, "baseline"), (0.5, ours, "tab:blue", "ours")):
        aurocs = np.array([b["auroc"] for b in bins], dtype=np.float64)
        filled = np.isfinite(aurocs)
        axes.bar(centres[filled] + shift * width[filled], aurocs[filled], width=width[filled], color=colour,
                 edgecolor="black", linewidth=0.5, label=label)
    for b, centre in zip(ours, centres):
        axes.text(centre, 1.02, f"n={b['count']}", ha="center", fontsize=7)
    axes.set_ylim(0, 1.1)
    axes.set_xlabel("sample-wise confusion log probability (CLP)")
    axes.set_ylabel("AUROC")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return _finish(figure, path)
