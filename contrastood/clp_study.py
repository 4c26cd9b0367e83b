"""The CLP study (paper Sec. 4, App. C): train the ensemble on the union of datasets, compute CLPs,
and read the detector's score along the CLP axis.

Ensemble members are ordinary supervised runs of `train.train_and_evaluate` (their own workdirs
under `WORKDIR/clp/member_K`, so each checkpoints, resumes, and is never retrained once finished),
configured by `config_lib.clp_member_config`. Their logits come from `features.FeatureExtractor`
(cached per model and data). When WORKDIR holds a trained detector, its Eq. 2 Gaussian score on the
same union test set is read along the CLP axis: AUROC per OOD class against class-wise CLP
(Fig. 1/6) and AUROC in sample-wise CLP bins (Fig. 4c).
"""
from __future__ import annotations

import io
import json
import logging

import jax
import ml_collections
import numpy as np

from contrastood import (checkpointing, config_lib, errors, models, parallel, summaries, train,
                         workdir as workdir_lib)
from contrastood.data import sources, specs
from contrastood.ood import clp, evaluate, plots
from contrastood.ood import features as features_lib


class UnionDataset:
    def __init__(self, name: str, train_spec: str, test_spec: str):
        self.name, self.train_spec, self.test_spec = name, train_spec, test_spec


def parse_datasets(entries) -> list[UnionDataset]:
    """'name=TRAIN_SPEC|TEST_SPEC' entries of `config.clp.datasets` (validated by config_lib)."""
    out = [UnionDataset(*entry) for entry in config_lib.parse_clp_datasets(entries)]
    if len(out) < 2:
        raise errors.ConfigError("clp.datasets needs the in-distribution dataset and at least one other")
    return out


def run(config: ml_collections.ConfigDict, workdir, detector_state=None) -> dict:
    mesh = parallel.create_mesh()
    config_lib.validate_config(config, num_devices=mesh.devices.size)
    path = workdir_lib.as_path(workdir)
    with workdir_lib.locked(path, command="the CLP study"):
        if jax.process_index() == 0:
            workdir_lib.check_writable(path)
        return _run(config, path, detector_state, mesh)


def _run(config, workdir, detector_state, mesh) -> dict:
    datasets = parse_datasets(config.clp.datasets)
    load = dict(image_size=config.data.image_size, seed=config.seed, data_dir=config.data.data_dir or None)
    union_train = sources.load_union([d.train_spec for d in datasets], **load)
    union_test = sources.load_union([d.test_spec for d in datasets], **load)
    train_parts, test_parts = union_train.layout, union_test.layout
    for d, a, b in zip(datasets, train_parts, test_parts):
        if a.num_classes != b.num_classes:
            raise errors.DataError(f"clp dataset {d.name!r}: train part has {a.num_classes} classes, test part "
                                   f"{b.num_classes}; both parts must cover the same classes")
    num_classes = union_train.num_classes
    class_dataset = np.concatenate([np.full(p.num_classes, i) for i, p in enumerate(train_parts)])
    first = train_parts[0]
    in_classes = (np.asarray(sorted(specs.parse_classes(config.clp.in_classes, what="clp.in_classes")))
                  if config.clp.in_classes else np.arange(first.first_class, first.first_class + first.num_classes))
    if in_classes.max() >= num_classes:
        raise errors.ConfigError(f"clp.in_classes={config.clp.in_classes!r} names classes beyond the union's "
                                 f"{num_classes}; give ids in 0..{num_classes - 1}")
    clp_dir = workdir / "clp"
    logging.info("CLP: union of %d datasets, %d classes, %d train / %d test examples, %d members",
                 len(datasets), num_classes, len(union_train), len(union_test), config.clp.num_members)

    # The evaluation's OOD sets get a CLP too (Eq. 4 with D_test = the set): Table 3's CLP ranges and
    # the x-axis of Fig. 6 for any set, whether or not it is part of the union.
    ood_sources = {name: evaluate.load_source(spec, config) for name, spec in config.ood.sets.items()}
    member_logits, ood_logits = [], {name: [] for name in ood_sources}
    for member in range(config.clp.num_members):
        mcfg = config_lib.clp_member_config(config, member, num_classes, union_train.name)
        member_dir = clp_dir / f"member_{member}"
        state = train.train_and_evaluate(mcfg, member_dir, train_source=union_train)
        model = models.from_config(mcfg, train_source=union_train)
        extractor = features_lib.FeatureExtractor(model, state, mcfg, mesh, member_dir)
        feats = extractor(union_test, fit_only=True)
        for name, source in ood_sources.items():
            ood_logits[name].append(extractor(source, fit_only=True)["logits"])
        member_logits.append(feats["logits"])
        accuracy = float(np.mean(feats["logits"].argmax(-1) == union_test.labels))
        logging.info("CLP member %d: union test accuracy %.4f", member, accuracy)
    probs = clp.ensemble_probs(np.stack(member_logits))
    labels = union_test.labels
    ensemble_accuracy = float(np.mean(probs.argmax(-1) == labels))

    per_dataset = {}
    classwise_all = clp.classwise_clp(probs, labels, in_classes)
    for i, (d, part) in enumerate(zip(datasets, test_parts)):
        in_part = (labels >= part.first_class) & (labels < part.first_class + part.num_classes)
        classes = {int(k): v for k, v in classwise_all.items() if class_dataset[k] == i}
        lo, hi = clp.clp_range(classes)
        per_dataset[d.name] = {"clp": clp.dataset_clp(probs[in_part], in_classes), "classwise_min": lo,
                               "classwise_max": hi, "num_test_examples": int(in_part.sum())}
    confusion = clp.class_confusion(probs, labels, num_classes)
    distance = clp.class_distance(confusion)
    dataset_matrix = clp.dataset_confusion(confusion, class_dataset, len(datasets))
    # "dataset:class"; an unlabelled dataset is one class, named after the dataset alone.
    class_names = [datasets[class_dataset[k]].name if train_parts[class_dataset[k]].num_classes == 1
                   and union_train.class_names[k] == train_parts[class_dataset[k]].spec
                   else f"{datasets[class_dataset[k]].name}:{union_train.class_names[k]}" for k in range(num_classes)]

    ood_sets, sample_arrays = {}, {}
    for name, source in ood_sources.items():
        set_probs = clp.ensemble_probs(np.stack(ood_logits[name]))
        set_labels = source.labels if source.num_classes else np.zeros(len(source), np.int32)
        names = source.class_names or [name]
        classwise = clp.classwise_clp(set_probs, set_labels, in_classes)
        lo, hi = clp.clp_range(classwise)
        ood_sets[name] = {"clp": clp.dataset_clp(set_probs, in_classes), "classwise_min": lo, "classwise_max": hi,
                          "classwise_clp": {names[k]: v for k, v in classwise.items()}, "num_examples": len(source)}
        sample_arrays[f"{name}/sample_clp"] = clp.sample_clp(set_probs, in_classes)
        sample_arrays[f"{name}/labels"] = np.asarray(source.labels)

    summary = {
        "datasets": [vars(d) for d in datasets],
        "num_classes": num_classes,
        "in_classes": in_classes.tolist(),
        "num_members": config.clp.num_members,
        "ensemble_test_accuracy": ensemble_accuracy,
        "dataset_clp": per_dataset,
        "classwise_clp": {class_names[k]: v for k, v in classwise_all.items()},
        "dataset_confusion": {"names": [d.name for d in datasets], "matrix": dataset_matrix.tolist()},
        "ood_sets": ood_sets,
    }
    detector = _join_detector(config, workdir, detector_state, union_test, probs, in_classes, class_dataset,
                              datasets, class_names, mesh)  # collective: every process
    if detector is not None:
        summary["detector"] = detector["summary"]

    if jax.process_index() == 0:  # plots, reports and summaries: process 0 alone
        plot_dir = workdir / "plots"
        images = {
            "clp/dendrogram": plots.dendrogram_plot(clp.dendrogram_linkage(distance), class_names,
                                                    [datasets[i].name for i in class_dataset],
                                                    plot_dir / "clp_dendrogram.png",
                                                    title="Classes of the union, average linkage on CLP confusion distance"),
            "clp/dataset_confusion": plots.confusion_matrix_plot(dataset_matrix, [d.name for d in datasets],
                                                                plot_dir / "clp_dataset_confusion.png",
                                                                title="Ensemble confusion between datasets"),
        }
        if detector is not None:
            images.update(_detector_plots(detector, plot_dir))
        workdir_lib.atomic_write_text(workdir / "clp_report.json", json.dumps(summary, indent=2, default=float))
        buffer = io.BytesIO()
        np.savez(buffer, **sample_arrays)  # per-sample CLP of every OOD set: Fig. 4c and Fig. 6 in --mode=compare
        workdir_lib.atomic_write_bytes(workdir / "clp_scores.npz", buffer.getvalue())
        table = markdown(summary)
        workdir_lib.atomic_write_text(workdir / "clp_report.md", table)
        print(table, flush=True)
        writer = summaries.create_writer(workdir)
        step = int(detector_state.step) if detector_state is not None else 0
        writer.write_scalars(step, {f"clp/{name}/clp": v["clp"] for name, v in per_dataset.items()})
        writer.write_images(step, {k: v[None] for k, v in images.items()})
        writer.flush()
    return summary


def _join_detector(config, workdir, state, union_test, probs, in_classes, class_dataset, datasets,
                   class_names, mesh):
    """The detector's Eq. 2 score on the union test set, per OOD class and per sample-CLP bin."""
    train_source = evaluate.load_source(config.data.train, config)
    model = models.from_config(config, train_source=train_source)
    if state is None:
        with checkpointing.Checkpoints(workdir, create=False) as checkpoints:
            trained = bool(checkpoints.steps())
        if not trained:
            logging.info("no detector checkpoint in %s: CLP without the AUROC-vs-CLP analysis", workdir)
            return None
        model, state = checkpointing.restore_model(workdir, config, mesh, model=model)
    extractor = features_lib.FeatureExtractor(model, state, config, mesh, workdir, ("gaussian",))
    train_feats = extractor(train_source, fit_only=True)
    feats = extractor(union_test, fit_only=True)
    ctx = evaluate.fit_context(config, state, config.data.num_classes)
    fitted, failures = evaluate.fit_scorers(("gaussian",), train_feats, ctx)
    scored = evaluate.compute_scores(fitted, feats, ctx, failures, "the CLP union test set")
    if "gaussian" not in scored:
        logging.warning("the detector's Gaussian score failed (%s): CLP without the AUROC-vs-CLP analysis", failures)
        return None
    scores = scored["gaussian"]["scores"]
    labels = union_test.labels
    is_in = np.isin(labels, in_classes)
    in_scores, ood_scores, ood_labels = scores[is_in], scores[~is_in], labels[~is_in]
    sample_clp = clp.sample_clp(probs[~is_in], in_classes)
    per_class_auroc = clp.auroc_by_class(ood_labels, ood_scores, in_scores)
    classwise = clp.classwise_clp(probs, labels, in_classes)
    points = [{"clp": classwise[k], "auroc": a, "dataset": datasets[class_dataset[k]].name,
               "label": class_names[k].split(":", 1)[-1]} for k, a in per_class_auroc.items()]
    finite = np.isfinite(sample_clp)
    bins = clp.auroc_by_clp_bins(sample_clp[finite], ood_scores[finite], in_scores, num_bins=config.clp.num_bins)
    return {"points": points, "bins": bins, "summary": {
        "step": int(state.step), "scorer": "gaussian",
        "auroc_by_class": [{k: p[k] for k in ("label", "dataset", "clp", "auroc")} for p in points],
        "auroc_by_sample_clp_bin": bins}}


def _detector_plots(detector, plot_dir):
    return {
        "clp/auroc_vs_clp": plots.auroc_vs_clp(detector["points"], plot_dir / "clp_auroc_vs_clp.png",
                                               title="Detector AUROC per OOD class vs class-wise CLP"),
        "clp/auroc_by_clp_bin": plots.auroc_by_clp_bins_plot(detector["bins"],
                                                             plot_dir / "clp_auroc_by_bin.png",
                                                             title="Detector AUROC in bins of sample-wise CLP"),
    }


def markdown(summary: dict) -> str:
    lines = [f"# CLP report ({summary['num_members']} ensemble members, {summary['num_classes']} classes, "
             f"ensemble test accuracy {100 * summary['ensemble_test_accuracy']:.1f}%)", "",
             "| dataset | N test | CLP | class-wise CLP range |", "|---|---:|---:|---|"]
    for name, v in summary["dataset_clp"].items():
        lines.append(f"| {name} | {v['num_test_examples']} | {v['clp']:.2f} | "
                     f"[{v['classwise_min']:.2f} to {v['classwise_max']:.2f}] |")
    if summary.get("ood_sets"):
        lines += ["", "CLP of the evaluation's OOD sets (Eq. 4 on each set; class-wise over its labels):", "",
                  "| OOD set | N | CLP | class-wise CLP range |", "|---|---:|---:|---|"]
        for name, v in summary["ood_sets"].items():
            lines.append(f"| {name} | {v['num_examples']} | {v['clp']:.2f} | "
                         f"[{v['classwise_min']:.2f} to {v['classwise_max']:.2f}] |")
    if "detector" in summary:
        lines += ["", f"Detector (step {summary['detector']['step']}, Gaussian score): AUROC per OOD class",
                  "", "| class | dataset | class-wise CLP | AUROC |", "|---|---|---:|---:|"]
        for p in sorted(summary["detector"]["auroc_by_class"], key=lambda p: p["clp"]):
            lines.append(f"| {p['label']} | {p['dataset']} | {p['clp']:.2f} | {100 * p['auroc']:.2f} |")
    return "\n".join(lines) + "\n"
