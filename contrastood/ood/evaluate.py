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


def compute_scores(config, train_feats: dict, eval_feats: dict, num_classes: int) -> dict[str, dict]:
    """{scorer: {"scores": [N], "classes": [N] or None}} for one evaluated set."""
    ood = config.ood
    wanted = list(ood.scorers)
    out: dict[str, dict] = {}
    z_train, y_train = train_feats["pre_logits"], train_feats["labels"]
    z = eval_feats["pre_logits"]
    cache = train_feats.setdefault("_fitted", {})  # fitted once per evaluation, shared by all sets
    if "gaussian" in wanted or "gaussian_no_logdet" in wanted:
        if "gaussian" not in cache:
            cache["gaussian"] = scorers.fit_gaussians(z_train, y_train, num_classes, tied=False,
                                                      shrinkage=ood.shrinkage, ridge=ood.ridge)
        for name, use_logdet in (("gaussian", True), ("gaussian_no_logdet", False)):
            if name in wanted:
                s, c = scorers.gaussian_score(cache["gaussian"], z, use_logdet=use_logdet)
                out[name] = {"scores": s, "classes": c}
    if "mahalanobis" in wanted:
        if "tied" not in cache:
            cache["tied"] = scorers.fit_gaussians(z_train, y_train, num_classes, tied=True,
                                                  shrinkage=ood.shrinkage, ridge=ood.ridge)
        s, c = scorers.mahalanobis_score(cache["tied"], z)
        out["mahalanobis"] = {"scores": s, "classes": c}
    if "msp" in wanted:
        out["msp"] = {"scores": scorers.msp_score(eval_feats["logits"]), "classes": eval_feats["logits"].argmax(-1)}
    if "energy" in wanted:
        out["energy"] = {"scores": scorers.energy_score(eval_feats["logits"]), "classes": eval_feats["logits"].argmax(-1)}
    if "odin" in wanted:
        out["odin"] = {"scores": eval_feats["odin"], "classes": eval_feats["logits"].argmax(-1)}
    if "knn" in wanted:
        if "knn" not in cache:
            cache["knn"] = scorers.fit_knn(z_train)
        out["knn"] = {"scores": scorers.knn_score(cache["knn"], z, k=ood.knn_k), "classes": None}
    return {k: {"scores": np.asarray(v["scores"], np.float64),
                "classes": None if v["classes"] is None else np.asarray(v["classes"])} for k, v in out.items()}


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
    in_scores = compute_scores(config, train_feats, test_feats, config.data.num_classes)

    results: dict[str, dict] = {}
    ood_data: dict[str, Any] = {}
    ood_scores: dict[str, dict] = {}
    for name, spec in config.ood.sets.items():
        data = load(spec)
        ood_data[name] = data
        feats = extractor(data)
        ood_scores[name] = compute_scores(config, train_feats, feats, config.data.num_classes)
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
