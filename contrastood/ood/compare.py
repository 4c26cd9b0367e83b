r"""A baseline against ours in the paper's layouts: Table 3 and Figures 4, 5 and 6.

  python -m contrastood.main --mode=compare --workdir=OURS --baseline_workdir=BASELINE

Both workdirs must have been evaluated (ood_report.json, ood_scores.npz) on the same OOD sets. The
CLP numbers (Table 3's CLP range, Fig. 6's x-axis, Fig. 4c's bins) come from the CLP study of OURS
(`--mode=clp`, clp_scores.npz), or of the baseline when only it has one; without either, those parts
are left out with a note. Everything is the Gaussian score of Eq. 2 for both models, as in the paper
(same architecture, transformations and scoring; only the training differs). Outputs in OURS/compare/:
compare.json, compare.md (also printed), table3.md, fig4ab_histograms.png, fig4c_auroc_by_clp_bin.png,
fig5_failures_<set>_{baseline,ours}.png, fig6_auroc_vs_clp.png, and TensorBoard summaries compare/...
"""
from __future__ import annotations

import io
import json
import logging

import ml_collections
import numpy as np

from contrastood import errors, summaries, workdir as workdir_lib
from contrastood.data import pipeline, sources
from contrastood.ood import clp, metrics, plots

SCORER = "gaussian"
METRICS = (("fpr_at_95_tpr_in", "FPR@95%TPR ↓"), ("auroc", "AUROC ↑"), ("aupr_in", "AUPR ↑"),
           ("detection_accuracy", "DtAcc ↑"))


class Evaluated:
    """One evaluated workdir: its report, per-sample scores, config, and CLP study if any."""

    def __init__(self, path):
        self.path = workdir_lib.as_path(path)
        report = self.path / "ood_report.json"
        if not report.exists():
            raise errors.WorkdirError(f"{self.path} has no ood_report.json; evaluate it first "
                                      f"(python -m contrastood.main --mode=evaluate --workdir={self.path} ...)")
        self.report = json.loads(report.read_text())
        with np.load(io.BytesIO((self.path / "ood_scores.npz").read_bytes())) as scores:
            self.scores = dict(scores)
        self.config = ml_collections.ConfigDict(self.report["config"])
        self.clp = self.clp_scores = None
        if (self.path / "clp_report.json").exists() and (self.path / "clp_scores.npz").exists():
            self.clp = json.loads((self.path / "clp_report.json").read_text())
            with np.load(io.BytesIO((self.path / "clp_scores.npz").read_bytes())) as arrays:
                self.clp_scores = dict(arrays)

    def score(self, set_name: str) -> np.ndarray:
        key = f"{'in_distribution' if set_name is None else set_name}/{SCORER}"
        if key not in self.scores:
            raise errors.WorkdirError(f"{self.path}: no {SCORER} scores for {set_name or 'the test set'} (was the "
                                      f"{SCORER} scorer configured and did it run? see its ood_report.md)")
        return self.scores[key]


def _classwise_points(model: Evaluated, clp_of: Evaluated, set_name: str) -> list[dict]:
    """One point per OOD class of a set: AUROC of that class against the in-distribution test set."""
    labels = model.scores.get(f"{set_name}/labels")
    entry = clp_of.clp["ood_sets"].get(set_name)
    if labels is None or entry is None:
        return []
    names = list(entry["classwise_clp"])  # the labels present, in increasing order (clp_study)
    inside, scores = model.score(None), model.score(set_name)
    points = []
    keys = np.unique(labels) if labels.min() >= 0 else np.array([-1])
    for index, key in enumerate(keys):
        name = names[index] if len(names) == len(keys) else str(key)
        points.append({"dataset": set_name, "label": name, "key": int(key), "clp": entry["classwise_clp"][name],
                       "auroc": metrics.auroc(inside, scores[_members(labels, key)])})
    return points


def _members(labels: np.ndarray, key: int) -> np.ndarray:
    return labels == key if key >= 0 else np.ones(len(labels), bool)


def table3(baseline: Evaluated, ours: Evaluated, sets: list[str], clp_of: Evaluated | None) -> list[str]:
    d_in = ours.report["in_distribution"]["test"]
    lines = ["| D_in | D_out | CLP range | " + " | ".join(h for _, h in METRICS) + " |",
             "|---|---|---|" + "---:|" * len(METRICS), ]
    for i, name in enumerate(sets):
        clp_range = "-"
        if clp_of is not None and name in clp_of.clp.get("ood_sets", {}):
            e = clp_of.clp["ood_sets"][name]
            clp_range = (f"{e['classwise_min']:.1f}" if abs(e["classwise_max"] - e["classwise_min"]) < 0.05
                         else f"[{e['classwise_min']:.1f} to {e['classwise_max']:.1f}]")
        b, o = baseline.report["results"][name][SCORER], ours.report["results"][name][SCORER]
        cells = [f"{100 * b[k]:.1f} / {100 * o[k]:.1f}" for k, _ in METRICS]
        lines.append(f"| {'`' + d_in + '`' if i == 0 else ''} | {name} | {clp_range} | " + " | ".join(cells) + " |")
    return lines


def run(baseline_workdir, ours_workdir) -> dict:
    baseline, ours = Evaluated(baseline_workdir), Evaluated(ours_workdir)
    sets = [s for s in ours.report["results"] if s in baseline.report["results"]]
    if not sets:
        raise errors.ConfigError("the two workdirs share no OOD set; evaluate both on the same config.ood.sets")
    for model in (baseline, ours):
        missing = [s for s in sets if SCORER not in model.report["results"][s]]
        if missing:
            raise errors.ConfigError(f"{model.path} has no {SCORER} results for {missing}; evaluate with "
                                     f"--config.ood.scorers including {SCORER}")
    clp_of = ours if ours.clp is not None else baseline if baseline.clp is not None else None
    out = ours.path / "compare"
    summary = {"baseline": str(baseline.path), "ours": str(ours.path), "scorer": SCORER, "sets": sets,
               "clp_from": str(clp_of.path) if clp_of else None,
               "test_accuracy": {"baseline": baseline.report["in_distribution"]["test_accuracy"],
                                 "ours": ours.report["in_distribution"]["test_accuracy"]},
               "table3": {s: {k: {"baseline": baseline.report["results"][s][SCORER][k],
                                  "ours": ours.report["results"][s][SCORER][k]} for k, _ in METRICS} for s in sets}}
    images = {}
    lines = [f"# Baseline / ours (Table 3 layout; {SCORER} score, Eq. 2, for both; metrics in %)", "",
             f"Baseline: `{baseline.path}` (step {baseline.report['step']}, test accuracy "
             f"{100 * summary['test_accuracy']['baseline']:.1f}%). Ours: `{ours.path}` (step {ours.report['step']}, "
             f"test accuracy {100 * summary['test_accuracy']['ours']:.1f}%). AUPR is average precision with "
             "in-distribution positive; FPR@95%TPR has in-distribution positive (the paper's convention).", "",
             *table3(baseline, ours, sets, clp_of), ""]
    workdir_lib.atomic_write_text(out / "table3.md", "\n".join(table3(baseline, ours, sets, clp_of)) + "\n")

    if clp_of is None:
        lines.append("No CLP study in either workdir: run `--mode=clp` on OURS for the CLP range, Fig. 4 and Fig. 6.")
    else:
        points = {"ours": [], "baseline": []}
        for name in sets:
            points["ours"] += _classwise_points(ours, clp_of, name)
            points["baseline"] += _classwise_points(baseline, clp_of, name)
        summary["fig6"] = points
        if points["ours"] and points["baseline"]:
            images["compare/fig6_auroc_vs_clp"] = plots.compare_auroc_vs_clp(
                points["ours"], points["baseline"], out / "fig6_auroc_vs_clp.png",
                title="Class-wise AUROC vs class-wise CLP (colour: ours, grey: baseline)")
            # Fig. 4a/b: the nearest and the farthest OOD class, both models.
            near = max(points["ours"], key=lambda p: p["clp"])
            far = min(points["ours"], key=lambda p: p["clp"])
            panels = []
            for which, point in (("near", near), ("far", far)):
                for label, model in (("baseline", baseline), ("ours", ours)):
                    members = _members(model.scores[f"{point['dataset']}/labels"], point["key"])
                    panels.append({"title": f"{label}: {which} OOD class {point['dataset']}:{point['label']} "
                                            f"(CLP {point['clp']:.2f})",
                                   "in_scores": model.score(None), "out_scores": model.score(point["dataset"])[members],
                                   "out_label": f"{point['label']}"})
            images["compare/fig4ab_histograms"] = plots.compare_histograms(
                panels, out / "fig4ab_histograms.png", title="Scores of a near (top) and a far (bottom) OOD class")
            summary["fig4ab"] = {"near": near, "far": far}
        # Fig. 4c: AUROC in bins of sample-wise CLP over every OOD sample of every set.
        with_clp = [s for s in sets if f"{s}/sample_clp" in clp_of.clp_scores]
        if with_clp:
            sample = np.concatenate([clp_of.clp_scores[f"{s}/sample_clp"] for s in with_clp])
            finite = np.isfinite(sample)
            bins = {label: clp.auroc_by_clp_bins(sample[finite],
                                                 np.concatenate([model.score(s) for s in with_clp])[finite],
                                                 model.score(None), num_bins=int(ours.config.clp.num_bins))
                    for label, model in (("baseline", baseline), ("ours", ours))}
            summary["fig4c"] = bins
            images["compare/fig4c_auroc_by_clp_bin"] = plots.compare_auroc_by_clp_bins(
                bins["ours"], bins["baseline"], out / "fig4c_auroc_by_clp_bin.png",
                title="AUROC across the sample-wise CLP spectrum (all OOD sets)")
            lines += ["Fig. 4c, AUROC (%) per sample-wise CLP bin, baseline / ours:", "",
                      "| CLP bin | N | baseline | ours |", "|---|---:|---:|---:|"]
            for b, o in zip(bins["baseline"], bins["ours"]):
                lines.append(f"| [{b['clp_low']:.2f}, {b['clp_high']:.2f}] | {b['count']} | "
                             f"{100 * b['auroc']:.1f} | {100 * o['auroc']:.1f} |")
            lines.append("")

    # Fig. 5: each model's worst mistakes on every set, percentile rank and [most activated Gaussian].
    images.update(_failure_grids(baseline, ours, sets, out))
    summary["figures"] = sorted(k.split("/", 1)[1] for k in images)
    workdir_lib.atomic_write_text(out / "compare.json", json.dumps(summary, indent=2, default=float))
    text = "\n".join(lines) + "\n"
    workdir_lib.atomic_write_text(out / "compare.md", text)
    print(text, flush=True)
    writer = summaries.summary_writer(out)
    step = int(ours.report["step"])
    writer.write_scalars(step, {f"compare/{s}/{k}/{label}": summary["table3"][s][k][label]
                                for s in sets for k, _ in METRICS for label in ("baseline", "ours")})
    writer.write_images(step, {k: v[None] for k, v in images.items()})
    writer.flush()
    logging.info("comparison written to %s", out)
    return summary


def _failure_grids(baseline: Evaluated, ours: Evaluated, sets: list[str], out) -> dict:
    images = {}
    config = ours.config
    names = list(ours.report["in_distribution"].get("class_names") or []) or None
    for set_name in sets:
        try:
            source = sources.load(config.ood.sets[set_name], image_size=config.data.image_size, seed=config.seed,
                                  data_dir=config.data.data_dir or None)
        except errors.ContrastoodError as error:  # the data moved since: the grids are left out
            logging.warning("failure grid of %s left out: %s", set_name, error)
            continue
        for label, model in (("baseline", baseline), ("ours", ours)):
            scores = model.score(set_name)
            classes = model.scores.get(f"{set_name}/{SCORER}/classes")
            ranks = metrics.ood_rank(model.score(None), scores)
            worst = np.argsort(-ranks, kind="stable")[:int(config.ood.failure_grid_images)]
            shown = source.fetch(worst, config.data.image_size, sources.thread_pool(pipeline.default_workers()))
            class_names = names or [str(i) for i in range(int(config.data.num_classes))]
            safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in set_name)
            images[f"compare/fig5_failures_{safe}_{label}"] = plots.failure_grid(
                shown, ranks[worst], None if classes is None else classes[worst], class_names,
                out / f"fig5_failures_{safe}_{label}.png",
                title=f"{label}: {set_name} images ranked most in-distribution (rank %, [most activated Gaussian])",
                max_images=int(config.ood.failure_grid_images))
    return images
