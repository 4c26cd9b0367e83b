"""OOD evaluation of a trained model: every scorer x every OOD set x every metric, with a report.

Runs at the end of training, or on its own (`--mode=evaluate`) for the latest checkpoint of a
workdir. Features come from `features.FeatureExtractor` (cached per checkpoint step), scores from
`scorers`, numbers from `metrics`, and the report and plots from `report`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from contrastood import config_lib, models, parallel, train
from contrastood.ood import features as features_lib
from contrastood.ood import metrics, report, scorers


def restore_for_evaluation(config, workdir: str, mesh) -> tuple[Any, Any]:
    """(model, state) of the newest readable checkpoint in `workdir`."""
    model = models.create_model(config.model, config.data.num_classes)
    tx = train.create_optimizer(config, lambda step: config.train.learning_rate)  # structure only
    manager = train.checkpoint_manager(workdir, config)
    if not manager.all_steps():
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first "
                                f"(--mode=train) or point --workdir at a trained run")
    state = train.restore_latest(manager, train.abstract_train_state(model, tx, config, mesh))
    if state is None:
        raise RuntimeError(f"every checkpoint in {workdir}/checkpoints is unreadable; retrain or restore a backup")
    return model, state


def fit_scorers(config, train_feats: dict, num_classes: int) -> dict:
    """Fits, once per evaluation, what the configured scorers need from the training features."""
    ood, wanted = config.ood, set(config.ood.scorers)
    z, y = train_feats["pre_logits"], train_feats["labels"]
    fitted = {}
    if wanted & {"gaussian", "gaussian_no_logdet"}:
        fitted["gaussian"] = scorers.fit_gaussians(z, y, num_classes, tied=False, shrinkage=ood.shrinkage,
                                                   ridge=ood.ridge)
    if "mahalanobis" in wanted:
        fitted["tied"] = scorers.fit_gaussians(z, y, num_classes, tied=True, shrinkage=ood.shrinkage,
                                               ridge=ood.ridge)
    if "knn" in wanted:
        fitted["knn"] = scorers.fit_knn(z)
    return fitted


def compute_scores(config, fitted: dict, feats: dict) -> dict[str, dict]:
    """{scorer: {"scores": [N], "classes": [N] or None}} for one evaluated set (higher = more in-dist)."""
    out: dict[str, tuple] = {}
    z, logits = feats["pre_logits"], feats["logits"]
    for name in config.ood.scorers:
        if name in ("gaussian", "gaussian_no_logdet"):
            out[name] = scorers.gaussian_score(fitted["gaussian"], z, use_logdet=name == "gaussian")
        elif name == "mahalanobis":
            out[name] = scorers.mahalanobis_score(fitted["tied"], z)
        elif name == "msp":
            out[name] = (scorers.msp_score(logits), logits.argmax(-1))
        elif name == "energy":
            out[name] = (scorers.energy_score(logits), logits.argmax(-1))
        elif name == "odin":
            out[name] = (feats["odin"], logits.argmax(-1))
        elif name == "knn":
            out[name] = (scorers.knn_score(fitted["knn"], z, k=config.ood.knn_k), None)
    return {k: {"scores": np.asarray(s, np.float64), "classes": None if c is None else np.asarray(c)}
            for k, (s, c) in out.items()}


def evaluate(config, workdir: str, state: Any = None) -> dict:
    """Scores the in-distribution test set and every `config.ood.sets` entry; writes the report."""
    from contrastood import input_pipeline  # the only TensorFlow user

    mesh = parallel.create_mesh()
    config_lib.validate_config(config, num_devices=mesh.devices.size)
    if not config.data.test:
        raise ValueError("OOD evaluation needs an in-distribution test set; set --config.data.test=SPEC")
    if state is None:
        model, state = restore_for_evaluation(config, workdir, mesh)
    else:
        model = models.create_model(config.model, config.data.num_classes)
    step = int(state.step)
    extractor = features_lib.FeatureExtractor(model, state, config, mesh, workdir)
    load = lambda spec: input_pipeline.load_arrays(  # noqa: E731
        spec, image_size=config.data.image_size, seed=config.seed, data_dir=config.data.data_dir or None)

    train_data, test_data = load(config.data.train), load(config.data.test)
    train_feats, test_feats = extractor(train_data, fit_only=True), extractor(test_data)
    accuracy = float(np.mean(test_feats["logits"].argmax(-1) == test_feats["labels"]))
    logging.info("step %d: in-distribution test accuracy %.4f", step, accuracy)
    fitted = fit_scorers(config, train_feats, config.data.num_classes)
    in_scores = compute_scores(config, fitted, test_feats)

    results: dict[str, dict] = {}
    ood_data: dict[str, Any] = {}
    ood_scores: dict[str, dict] = {}
    for name, spec in config.ood.sets.items():
        data = load(spec)
        ood_data[name] = data
        feats = extractor(data)
        ood_scores[name] = compute_scores(config, fitted, feats)
        results[name] = {scorer: metrics.compute_all(in_scores[scorer]["scores"], s["scores"])
                         for scorer, s in ood_scores[name].items()}
        results[name]["num_examples"] = int(len(data.labels))
        logging.info("%s (%s): AUROC %s", name, spec,
                     {k: round(v["auroc"], 4) for k, v in results[name].items() if isinstance(v, dict)})

    summary = {
        "step": step,
        "in_distribution": {"train": config.data.train, "test": config.data.test, "test_accuracy": accuracy,
                            "num_test_examples": int(len(test_data.labels))},
        "scorers": list(config.ood.scorers),
        "results": results,
    }
    if jax.process_index() == 0:
        report.write(summary, workdir, config=config, in_scores=in_scores, ood_scores=ood_scores,
                     ood_data=ood_data, class_names=test_data.class_names)
    return summary
