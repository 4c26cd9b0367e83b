"""The OOD report: ood_report.json, ood_report.md (also printed), TensorBoard summaries and PNG plots."""
from __future__ import annotations

import io
import json
import logging
from typing import Any, Mapping

import numpy as np

from contrastood import summaries, workdir as workdir_lib
from contrastood.data import pipeline, sources
from contrastood.ood import metrics, plots

# (key in metrics.compute_all, column header)
COLUMNS = (
    ("auroc", "AUROC"),
    ("aupr_in", "AUPR-in"),
    ("aupr_out", "AUPR-out"),
    ("fpr_at_95_tpr_in", "FPR@95TPR (in+)"),
    ("fpr_at_95_tpr_out", "FPR@95TPR (out+)"),
    ("detection_accuracy", "Det. acc."),
    ("ood_rank_mean", "Mean OOD rank %"),
)


def markdown_table(summary: Mapping[str, Any]) -> str:
    ind = summary["in_distribution"]
    lines = [
        f"# OOD report (checkpoint step {summary['step']})",
        "",
        f"In-distribution: train `{ind['train']}`, test `{ind['test']}` "
        f"({ind['num_test_examples']} examples), test accuracy **{100 * ind['test_accuracy']:.2f}%**.",
        "Scores: higher = more in-distribution. FPR@95TPR (in+) treats in-distribution as positive "
        "(ODIN, Winkens et al.); (out+) treats OOD as positive (OpenOOD). AUPR is average precision "
        "(sklearn); OpenOOD and pytorch-ood integrate the PR curve with the trapezoid rule instead, which "
        "ood_report.json holds as aupr_in_trapezoid / aupr_out_trapezoid. Metrics in %.",
        "",
        "| OOD set | N | scorer | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for name, per_scorer in summary["results"].items():
        for scorer in summary["scorers"]:
            if scorer not in per_scorer:
                continue
            m = per_scorer[scorer]
            cells = [f"{m[k]:.2f}" if k == "ood_rank_mean" else f"{100 * m[k]:.2f}" for k, _ in COLUMNS]
            lines.append(f"| {name} | {per_scorer['num_examples']} | {scorer} | " + " | ".join(cells) + " |")
    failed = summary.get("failed_scorers") or {}
    if failed:
        lines += ["", "Scorers that could not run (the others are unaffected):", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in failed.items()]
    return "\n".join(lines) + "\n"


def write(summary: dict, workdir, *, config, in_scores: Mapping[str, dict], ood_scores: Mapping[str, dict],
          ood_data: Mapping[str, Any], class_names) -> None:
    """Writes the JSON and Markdown report, the plots, and `ood/...` TensorBoard summaries."""
    workdir = workdir_lib.as_path(workdir)
    summary = dict(summary)
    summary["config"] = json.loads(config.to_json_best_effort())
    workdir_lib.atomic_write_text(workdir / "ood_report.json", json.dumps(summary, indent=2, default=float))
    # Per-sample scores, for analyses across runs (e.g. the OOD-rank spread over seeds, --mode=compare).
    arrays = {f"in_distribution/{k}": v["scores"] for k, v in in_scores.items()}
    arrays.update({f"in_distribution/{k}/classes": v["classes"] for k, v in in_scores.items()
                   if v["classes"] is not None})
    arrays.update({f"{name}/{k}": v["scores"] for name, s in ood_scores.items() for k, v in s.items()})
    arrays.update({f"{name}/{k}/classes": v["classes"] for name, s in ood_scores.items() for k, v in s.items()
                   if v["classes"] is not None})
    arrays.update({f"{name}/labels": np.asarray(data.labels) for name, data in ood_data.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    workdir_lib.atomic_write_bytes(workdir / "ood_scores.npz", buffer.getvalue())
    table = markdown_table(summary)
    workdir_lib.atomic_write_text(workdir / "ood_report.md", table)
    print(table, flush=True)

    step = summary["step"]
    # TensorBoard only: the table above already puts these numbers in the log, once and readable.
    writer = summaries.summary_writer(workdir)
    scalars = {f"ood/{name}/{scorer}/{metric}": value
               for name, per_scorer in summary["results"].items()
               for scorer, values in per_scorer.items() if isinstance(values, dict)
               for metric, value in values.items()}
    scalars["ood/in_distribution/test_accuracy"] = summary["in_distribution"]["test_accuracy"]
    writer.write_scalars(step, scalars)

    if config.ood.plots and ood_scores:
        images = _plots(workdir, config, in_scores, ood_scores, ood_data, class_names)
        writer.write_images(step, {k: v[None] for k, v in images.items()})
    writer.flush()
    logging.info("OOD report written to %s", workdir / "ood_report.md")


def pipeline_pool():
    return sources.thread_pool(pipeline.default_workers())  # decode workers for the failure grids


def _plots(workdir, config, in_scores, ood_scores, ood_data, class_names) -> dict[str, np.ndarray]:
    """Fig. 4a/b histograms and ROC curves per scorer; Fig. 5 failure grid per OOD set."""
    plot_dir = workdir / "plots"
    images = {}
    for scorer in in_scores:
        outs = {name: s[scorer]["scores"] for name, s in ood_scores.items() if scorer in s}
        images[f"ood/histogram/{scorer}"] = plots.score_histograms(
            in_scores[scorer]["scores"], outs, plot_dir / f"histogram_{scorer}.png",
            title=f"{scorer} score: in-distribution test vs OOD", score_name=f"{scorer} score")
        images[f"ood/roc/{scorer}"] = plots.roc_curves(
            in_scores[scorer]["scores"], outs, plot_dir / f"roc_{scorer}.png",
            title=f"ROC, {scorer} score (in-distribution positive)")
    grid_scorer = "gaussian" if "gaussian" in in_scores else next(iter(in_scores))
    names = list(class_names) if class_names else [str(i) for i in range(config.data.num_classes)]
    for name, s in ood_scores.items():
        if grid_scorer not in s:  # the scorer failed on this set (its reason is in the report)
            continue
        scored = s[grid_scorer]
        ranks = metrics.ood_rank(in_scores[grid_scorer]["scores"], scored["scores"])
        classes = scored["classes"]
        safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
        # Only the shown images are read (the OOD set may be files on disk).
        worst = np.argsort(-ranks, kind="stable")[:config.ood.failure_grid_images]
        shown = ood_data[name].fetch(worst, config.data.image_size, pipeline_pool())
        images[f"ood/failures/{safe}"] = plots.failure_grid(
            shown, ranks[worst], None if classes is None else classes[worst], names, plot_dir / f"failures_{safe}.png",
            title=f"{name}: most in-distribution-looking OOD images ({grid_scorer} score)",
            max_images=config.ood.failure_grid_images)
    return images
