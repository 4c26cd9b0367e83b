"""End-to-end OOD evaluation on the embedded digits demo, feature extraction exactness, cache identity,
scorer failures, and the CLP study."""
import importlib
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from contrastood import augment, checkpointing, clp_study, config_lib, errors, models, parallel, train
from contrastood.data import sources
from contrastood.ood import evaluate, features, scorers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
    return importlib.import_module(f"contrastood.configs.{name}").get_config(arg)


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
    names = scorers.resolve(config.ood.scorers)
    assert set(names) == set(scorers.REGISTRY) and len(names) == 13 and report["failed_scorers"] == {}
    for name, per_scorer in report["results"].items():
        assert set(names) <= set(per_scorer)
        for scorer in names:
            m = per_scorer[scorer]
            for key in ("auroc", "aupr_in", "aupr_out", "aupr_in_trapezoid", "aupr_out_trapezoid",
                        "fpr_at_95_tpr_in", "fpr_at_95_tpr_out", "detection_accuracy", "ood_rank_mean"):
                assert np.isfinite(m[key]), (name, scorer, key)
                assert 0 <= m[key] <= (100 if key == "ood_rank_mean" else 1)
    table = (workdir / "ood_report.md").read_text()
    assert table.count("| near_digits_6to9 |") == len(names) and "trapezoid" in table
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
    data = sources.load("sklearn:digits:test#limit=37")
    model = models.from_config(config)
    mesh = parallel.create_mesh()
    config = config.copy_and_resolve_references()
    config.eval_batch_size = 16
    extractor = features.FeatureExtractor(model, state, config, mesh, workdir=None)
    got = extractor(data)
    direct = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         augment.to_float(data.fetch(np.arange(37), 32)), train=False)
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
    with pytest.raises(errors.CheckpointError, match="train first"):
        evaluate.evaluate(config, str(tmp_path))
    with pytest.raises(errors.WorkdirError, match="does not exist"):
        evaluate.evaluate(config, str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()  # a mistyped workdir is not created


@pytest.mark.slow
def test_feature_cache_never_describes_another_model_or_other_data(demo_run, tmp_path):
    """Was: the cache key was (step, spec), so a retrained model or a rewritten npz got stale features."""
    config, workdir, state, summary = demo_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    # Another model at the same step: delete the checkpoints, retrain with another seed.
    shutil.rmtree(run / "checkpoints")
    other = config.copy_and_resolve_references()
    other.seed = 1
    other_state = train.train_and_evaluate(other, str(run))
    fresh = evaluate.evaluate(other, str(run), state=other_state)
    model, test = models.from_config(other), sources.load(other.data.test)
    logits = model.apply({"params": other_state.params, "batch_stats": other_state.batch_stats},
                         augment.to_float(test.fetch(np.arange(len(test)), 32)), train=False)["logits"]
    labels = test.labels
    assert fresh["in_distribution"]["test_accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)))
    assert fresh["in_distribution"]["test_accuracy"] != summary["in_distribution"]["test_accuracy"]
    # Other images at the same path.
    images = (np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3))).astype(np.uint8)
    np.savez(tmp_path / "ood.npz", images=images, labels=np.full(40, -1))
    other.ood.sets = config_lib.ood_sets(file=f"npz:{tmp_path / 'ood.npz'}")
    first = evaluate.evaluate(other, str(run), state=other_state)["results"]["file"]["msp"]["auroc"]
    np.savez(tmp_path / "ood.npz", images=np.full_like(images, 128), labels=np.full(40, -1))
    second = evaluate.evaluate(other, str(run), state=other_state)["results"]["file"]["msp"]["auroc"]
    assert first != second


def test_a_failing_scorer_is_reported_and_the_others_run(demo_run, tmp_path):
    config, workdir, state, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    sparse = config.copy_and_resolve_references()
    # Two training examples of class 5: Ledoit-Wolf's shrinkage is 0 there and the covariance singular.
    digits = sources.load("sklearn:digits:train#classes=0-5")
    keep = np.concatenate([np.flatnonzero(digits.labels < 5), np.flatnonzero(digits.labels == 5)[:2]])
    np.savez(tmp_path / "train.npz", images=digits.fetch(keep, 8)[..., 0], labels=digits.labels[keep])
    sparse.data.train = f"npz:{tmp_path / 'train.npz'}"
    sparse.ood.scorers = ("gaussian", "msp", "mahalanobis")
    summary = evaluate.evaluate(sparse, str(run), state=state)
    assert "gaussian" in summary["failed_scorers"] and "singular" in summary["failed_scorers"]["gaussian"]
    assert set(summary["results"]["far_noise"]) == {"msp", "mahalanobis", "num_examples"}
    assert "could not run" in (run / "ood_report.md").read_text()


def test_a_scorer_without_class_predictions_still_gets_its_failure_grids(demo_run, tmp_path):
    """Was: without `gaussian` the grid fell back to class -1, which the plot rejects."""
    config, workdir, state, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    only_knn = config.copy_and_resolve_references()
    only_knn.ood.scorers = ("knn",)
    only_knn.compare.baseline = False
    shutil.rmtree(run / "plots")
    summary = evaluate.evaluate(only_knn, str(run), state=state)
    assert summary["failed_scorers"] == {}
    for name in config.ood.sets:
        assert (run / "plots" / f"failures_{name}.png").stat().st_size > 1000


def test_evaluate_refuses_a_read_only_workdir_before_extracting(demo_run, tmp_path, monkeypatch):
    config, workdir, _, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    shutil.rmtree(run / "features")
    monkeypatch.setattr(features.FeatureExtractor, "_extract", lambda *a: pytest.fail("extracted before the check"))
    os.chmod(run, 0o555)
    try:
        if os.access(run, os.W_OK):  # root writes read-only directories: make the filesystem refuse instead
            import errno

            from etils import epath

            path_type, real_write = type(epath.Path(run)), type(epath.Path(run)).write_bytes

            def read_only(self, data):
                if str(self).startswith(str(run)):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
                return real_write(self, data)

            monkeypatch.setattr(path_type, "write_bytes", read_only)
        with pytest.raises(errors.WorkdirError, match="not writable"):
            evaluate.evaluate(config, str(run))
    finally:
        os.chmod(run, 0o755)


def test_evaluating_another_model_is_a_mismatch_not_unreadable(demo_run, tmp_path):
    config, workdir, _, _ = demo_run
    wider = config.copy_and_resolve_references()
    wider.model.width = 2
    with pytest.raises(errors.CheckpointMismatchError, match=r"holds another model.*model.width: 1 -> 2"):
        checkpointing.restore_model(str(workdir), wider, parallel.create_mesh())


@pytest.fixture(scope="module")
def clp_run(demo_run):
    config, workdir, state, _ = demo_run
    return clp_study.run(config, str(workdir), detector_state=state)


@pytest.mark.slow
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


@pytest.mark.slow
def test_clp_finished_members_are_not_retrained(demo_run, clp_run, monkeypatch):
    config, workdir, state, _ = demo_run

    def no_training(*args, **kwargs):
        def step(*a, **k):
            raise AssertionError("a finished ensemble member was retrained")
        return step

    monkeypatch.setattr(train, "make_train_step", no_training)
    again = clp_study.run(config, str(workdir), detector_state=state)
    assert again["dataset_clp"] == clp_run["dataset_clp"]


@pytest.mark.slow
def test_compare_writes_table3_and_figures_4_to_6(demo_run, clp_run, tmp_path):
    """The paper's baseline (supervised, no smoothing) against ours, in Table 3's layout."""
    from contrastood.ood import compare

    config, workdir, _, ours = demo_run
    assert set(clp_run["ood_sets"]) == set(config.ood.sets)  # the CLP of every evaluated OOD set
    baseline_config = config_lib.baseline_config(config)
    assert (baseline_config.train.contrastive, baseline_config.train.label_smoothing) == (False, 0.0)
    baseline_dir = str(tmp_path / "baseline")
    baseline = evaluate.evaluate(baseline_config, baseline_dir,
                                 state=train.train_and_evaluate(baseline_config, baseline_dir))
    summary = compare.run(baseline_dir, str(workdir))
    near = summary["table3"]["near_digits_6to9"]["auroc"]
    assert near == {"baseline": baseline["results"]["near_digits_6to9"]["gaussian"]["auroc"],
                    "ours": ours["results"]["near_digits_6to9"]["gaussian"]["auroc"]}
    table = (workdir / "compare" / "table3.md").read_text()
    assert "| CLP range |" in table and f"{100 * near['baseline']:.1f} / {100 * near['ours']:.1f}" in table
    labels = {p["label"] for p in summary["fig6"]["ours"]}
    assert labels == {"6", "7", "8", "9", "far_noise"}  # one point per OOD class, at the ensemble's CLP
    for png in ("fig4ab_histograms.png", "fig4c_auroc_by_clp_bin.png", "fig6_auroc_vs_clp.png",
                "fig5_failures_near_digits_6to9_baseline.png", "fig5_failures_near_digits_6to9_ours.png"):
        assert (workdir / "compare" / png).stat().st_size > 1000, png


def test_clp_dataset_entries_are_validated():
    with pytest.raises(errors.ConfigError, match="TRAIN_SPEC"):
        clp_study.parse_datasets(["digits=sklearn:digits:train", "noise=noise:gaussian|noise:gaussian"])
    with pytest.raises(errors.ConfigError, match="at least one other"):
        clp_study.parse_datasets(["digits=sklearn:digits:train|sklearn:digits:test"])
