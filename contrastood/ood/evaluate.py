"""OOD evaluation of a trained model: every scorer x every OOD set x every metric, with a report.

Runs at the end of training, or on its own (`--mode=evaluate`) for the newest readable checkpoint of a
workdir, restored without the trainer (`checkpointing.restore_model`). Features come from
`features.FeatureExtractor` (cached per model, data and settings), scores from the registered
`scorers`, numbers from `metrics`, and the report and plots from `report`. A scorer that fails (a
class with too few examples for its covariance, say) is reported with its reason; the others run.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

import jax
import numpy as np

from contrastood import checkpointing, config_lib, errors, models, parallel, workdir as workdir_lib
from contrastood.data import sources
from contrastood.ood import features as features_lib
from contrastood.ood import metrics, report, scorers


def load_source(spec: str, config) -> sources.Source:
    return sources.load(spec, image_size=config.data.image_size, seed=config.seed,
                        data_dir=config.data.data_dir or None)


def fit_context(config, state, num_classes: int) -> scorers.FitContext:
    head = jax.device_get(state.params["class_head"])
    return scorers.FitContext(config=config, num_classes=num_classes,
                              head_kernel=np.asarray(head["kernel"], np.float64),
                              head_bias=np.asarray(head["bias"], np.float64))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def fit_scorers(names, train_feats: dict, ctx: scorers.FitContext) -> tuple[dict, dict]:
    """(fitted, failures): each scorer fitted once per evaluation; a failure is recorded, not raised."""
    fitted, failures = {}, {}
    for name in names:
        try:
            fitted[name] = scorers.REGISTRY[name].fit(train_feats, ctx)
        except Exception as error:  # pylint: disable=broad-except  # one scorer must not stop the rest
            failures[name] = _reason(error)
            logging.warning("scorer %s could not be fitted (%s)\n%s", name, failures[name], traceback.format_exc())
    return fitted, failures


def compute_scores(fitted: dict, feats: dict, ctx: scorers.FitContext, failures: dict,
                   where: str) -> dict[str, dict]:
    """{scorer: {"scores": [N], "classes": [N] or None}} for one evaluated set (higher = more in-dist)."""
    out = {}
    ctx.per_set = {}  # what scorers share within this set only (FitContext.for_this_set)
    for name, fit in fitted.items():
        if name in failures:
            continue
        try:
            score, classes = scorers.REGISTRY[name].score(fit, feats, ctx)
            score = metrics.validated_scores(f"{name} scores of {where}", score)
        except Exception as error:  # pylint: disable=broad-except
            failures[name] = f"{where}: {_reason(error)}"
            logging.warning("scorer %s failed on %s (%s)", name, where, failures[name])
            continue
        out[name] = {"scores": np.asarray(score, np.float64), "classes": None if classes is None else np.asarray(classes)}
    ctx.per_set = {}
    return out


def evaluate(config, workdir, state: Any = None) -> dict:
    """Scores the in-distribution test set and every `config.ood.sets` entry; writes the report."""
    mesh = parallel.create_mesh()
    config_lib.validate_config(config, num_devices=mesh.devices.size)
    if not config.data.test:
        raise errors.ConfigError("OOD evaluation needs an in-distribution test set; set --config.data.test=SPEC")
    path = workdir_lib.as_path(workdir)
    if not path.exists():  # never create a mistyped workdir
        raise errors.WorkdirError(f"the workdir {path} does not exist; check --workdir, or train first (--mode=train)")
    with workdir_lib.locked(path, command="evaluation"):
        return _evaluate(config, path, state, mesh)


def _evaluate(config, path, state, mesh) -> dict:
    if jax.process_index() == 0:
        workdir_lib.check_writable(path)  # before any feature is extracted
    train_source, test_source = load_source(config.data.train, config), load_source(config.data.test, config)
    model = models.from_config(config, train_source=train_source)
    if state is None:
        model, state = checkpointing.restore_model(path, config, mesh, model=model)
    step = int(state.step)
    names = scorers.resolve(config.ood.scorers)
    extractor = features_lib.FeatureExtractor(model, state, config, mesh, path, names)
    train_feats, test_feats = extractor(train_source, fit_only=True), extractor(test_source)
    accuracy = float(np.mean(test_feats["logits"].argmax(-1) == test_feats["labels"]))
    logging.info("step %d: in-distribution test accuracy %.4f", step, accuracy)
    ctx = fit_context(config, state, config.data.num_classes)
    fitted, failures = fit_scorers(names, train_feats, ctx)
    in_scores = compute_scores(fitted, test_feats, ctx, failures, "the in-distribution test set")

    results: dict[str, dict] = {}
    ood_data: dict[str, sources.Source] = {}
    ood_scores: dict[str, dict] = {}
    for name, spec in config.ood.sets.items():
        data = load_source(spec, config)
        ood_data[name] = data
        feats = extractor(data)
        ood_scores[name] = {k: v for k, v in compute_scores(fitted, feats, ctx, failures, name).items()
                            if k in in_scores}
        results[name] = {scorer: metrics.compute_all(in_scores[scorer]["scores"], s["scores"])
                         for scorer, s in ood_scores[name].items()}
        results[name]["num_examples"] = len(data)
        logging.info("%s (%s): AUROC %s", name, spec,
                     {k: round(v["auroc"], 4) for k, v in results[name].items() if isinstance(v, dict)})

    summary = {
        "step": step,
        "in_distribution": {"train": config.data.train, "test": config.data.test, "test_accuracy": accuracy,
                            "num_test_examples": len(test_source), "class_names": list(test_source.class_names)},
        "scorers": [n for n in names if n in in_scores],
        "failed_scorers": failures,
        "results": results,
    }
    if jax.process_index() == 0:
        report.write(summary, path, config=config, in_scores=in_scores, ood_scores=ood_scores,
                     ood_data=ood_data, class_names=test_source.class_names)
    return summary
