"""End-to-end OOD evaluation on the embedded digits demo, feature extraction exactness, caching."""
import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from contrastood import augment, input_pipeline, models, parallel, train
from contrastood.ood import evaluate, features

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    config = load_config("digits", "smoke")
    workdir = tmp_path_factory.mktemp("digits")
    state = train.train_and_evaluate(config, str(workdir))
    summary = evaluate.evaluate(config, str(workdir), state=state)
    return config, workdir, state, summary


def test_report_has_every_scorer_set_and_metric(demo_run):
    config, workdir, _, summary = demo_run
    with open(workdir / "ood_report.json") as f:
        report = json.load(f)
    assert report["step"] == 8
    assert set(report["results"]) == set(config.ood.sets)
    for name, per_scorer in report["results"].items():
        assert set(config.ood.scorers) <= set(per_scorer)
        for scorer in config.ood.scorers:
            m = per_scorer[scorer]
            for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr_in", "fpr_at_95_tpr_out",
                        "detection_accuracy", "ood_rank_mean"):
                assert np.isfinite(m[key]), (name, scorer, key)
                assert 0 <= m[key] <= (100 if key == "ood_rank_mean" else 1)
    table = (workdir / "ood_report.md").read_text()
    assert table.count("| near_digits_6to9 |") == len(config.ood.scorers)
    for png in ("histogram_gaussian.png", "roc_gaussian.png", "failures_far_noise.png"):
        assert (workdir / "plots" / png).stat().st_size > 1000


def test_evaluate_mode_reuses_feature_cache(demo_run, monkeypatch):
    config, workdir, _, summary = demo_run

    def no_model(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features.FeatureExtractor, "_extract", no_model)
    again = evaluate.evaluate(config, str(workdir))  # restores the checkpoint, reads cached features
    assert again["results"] == summary["results"]


def test_extraction_scores_every_example_once(demo_run):
    """37 examples with batch 16 on 8 devices: padding is dropped and order kept."""
    config, workdir, state, _ = demo_run
    data = input_pipeline.load_arrays("sklearn:digits:test#limit=37")
    model = models.create_model(config.model, config.data.num_classes)
    mesh = parallel.create_mesh()
    config = config.copy_and_resolve_references()
    config.eval_batch_size = 16
    extractor = features.FeatureExtractor(model, state, config, mesh, workdir=None)
    got = extractor(data)
    direct = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         augment.to_float(data.images), train=False)
    assert got["pre_logits"].shape == (37, direct["pre_logits"].shape[1])
    np.testing.assert_allclose(got["pre_logits"], np.asarray(direct["pre_logits"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["logits"], np.asarray(direct["logits"]), rtol=1e-4, atol=1e-5)
    assert got["odin"].shape == (37,)
    np.testing.assert_array_equal(got["labels"], data.labels)


def test_tensorboard_has_ood_scalars(demo_run):
    from tensorboard.backend.event_processing import event_accumulator

    _, workdir, _, _ = demo_run
    tags = set()
    for path in workdir.glob("events.out.tfevents*"):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0})
        acc.Reload()
        tags |= set(acc.Tags()["tensors"])
    assert "ood/near_digits_6to9/gaussian/auroc" in tags
    assert "ood/far_noise/msp/fpr_at_95_tpr_in" in tags
    assert any(t.startswith("ood/histogram/") for t in tags)


def test_evaluate_without_checkpoint_names_the_fix(tmp_path):
    config = load_config("digits", "smoke")
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.evaluate(config, str(tmp_path))


@pytest.fixture(scope="module")
def clp_run(demo_run):
    from contrastood.ood import clp_runner

    config, workdir, state, _ = demo_run
    return clp_runner.run(config, str(workdir), detector_state=state)


def test_clp_report_and_plots(demo_run, clp_run):
    config, workdir, _, _ = demo_run
    summary = clp_run
    assert summary["num_classes"] == 12  # digits 0-9, photos, noise
    assert summary["in_classes"] == [0, 1, 2, 3, 4, 5]
    assert set(summary["dataset_clp"]) == {"digits", "photos", "noise"}
    for v in summary["dataset_clp"].values():
        assert v["clp"] <= 0 and v["classwise_min"] <= v["classwise_max"] <= 0
    by_class = {(p["dataset"], p["label"]) for p in summary["detector"]["auroc_by_class"]}
    assert by_class == {("digits", "6"), ("digits", "7"), ("digits", "8"), ("digits", "9"),
                        ("photos", "photos"), ("noise", "noise")}
    assert sum(b["count"] for b in summary["detector"]["auroc_by_sample_clp_bin"]) == 178 + 500 + 500
    assert json.loads((workdir / "clp_report.json").read_text())["num_members"] == 2
    for png in ("clp_dendrogram.png", "clp_dataset_confusion.png", "clp_auroc_vs_clp.png", "clp_auroc_by_bin.png"):
        assert (workdir / "plots" / png).stat().st_size > 1000


def test_clp_finished_members_are_not_retrained(demo_run, clp_run, monkeypatch):
    from contrastood.ood import clp_runner

    config, workdir, state, _ = demo_run

    def no_training(*args, **kwargs):
        def step(*a, **k):
            raise AssertionError("a finished ensemble member was retrained")
        return step

    monkeypatch.setattr(train, "make_train_step", no_training)
    again = clp_runner.run(config, str(workdir), detector_state=state)
    assert again["dataset_clp"] == clp_run["dataset_clp"]


def test_clp_dataset_entries_are_validated():
    from contrastood.ood import clp_runner

    with pytest.raises(ValueError, match="TRAIN_SPEC"):
        clp_runner.parse_datasets(["digits=sklearn:digits:train", "noise=noise:gaussian|noise:gaussian"])
    with pytest.raises(ValueError, match="at least one other"):
        clp_runner.parse_datasets(["digits=sklearn:digits:train|sklearn:digits:test"])
    np.testing.assert_array_equal(clp_runner.parse_classes("0-2,5", range(0)), [0, 1, 2, 5])
