"""The ablation study's smallest setting runs end to end, so the script cannot rot."""
import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402


@pytest.mark.slow
def test_smoke_study_writes_table_and_skips_finished_runs(tmp_path, monkeypatch):
    args = ["--preset=smoke", "--seeds=0", "--variants=supervised,contrastive+ls", f"--out={tmp_path}"]
    table = ablation.main(args)  # one variant of each code path keeps the test short
    assert set(table) == {"supervised", "contrastive+ls"}
    for entry in table.values():
        assert 0 <= entry["test_accuracy"]["mean"] <= 1
        for per_scorer in entry["sets"].values():
            assert set(per_scorer) == set(ablation.study.SCORERS)
            assert all(0 <= s["auroc_mean"] <= 1 for s in per_scorer.values())
            assert all(math.isnan(s["ood_rank_std_across_seeds"]) for s in per_scorer.values())  # one seed
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["meta"]["seeds"] == [0]
    text = (tmp_path / "ablation.md").read_text()
    assert "| contrastive+ls |" in text and "| ✓ | ✓ |" in text and "| x | x |" in text  # Table 2's LS/CT rows

    # A second invocation finds every run finished and trains nothing.
    from contrastood import train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    again = ablation.main(args)
    for name, per_scorer in table["supervised"]["sets"].items():
        for scorer, values in per_scorer.items():
            assert again["supervised"]["sets"][name][scorer]["auroc"] == values["auroc"]

    # The same --out with other settings is refused, naming what differs, rather than mixing studies.
    with pytest.raises(SystemExit, match=r"model.width: 1 -> 2.*its own --out"):
        ablation.main(args + ["--width=2"])


def test_rank_spread_across_seeds(tmp_path):
    import numpy as np

    for seed, shift in ((0, 0.0), (1, 1.0)):
        d = tmp_path / f"run{seed}"
        d.mkdir()
        np.savez(d / "ood_scores.npz", **{"in_distribution/gaussian": np.arange(10.0),
                                          "ood/gaussian": np.array([2.5, 5.5]) + shift})
    # ranks: seed 0 -> [30, 60]; seed 1 -> [40, 70]; std over seeds = 5 for both samples
    assert ablation.rank_std_across_seeds([tmp_path / "run0", tmp_path / "run1"], "ood", "gaussian") == 5.0


def test_train_fraction_is_a_fixed_subset_shared_by_every_variant():
    from contrastood import errors
    from contrastood.data import sources

    full = ablation.study.get_config("preset=smoke,variant=supervised")
    configs = [ablation.study.get_config(f"preset=smoke,variant={v},seed={s},train_fraction=0.25")
               for v in ("supervised", "contrastive+ls") for s in (0, 1)]
    assert len({c.data.train for c in configs}) == 1  # seeds change the training, not the data
    n_full = len(sources.load(full.data.train))
    n_part = len(sources.load(configs[0].data.train))
    assert abs(n_part - n_full / 4) <= 0.05 * n_full
    with pytest.raises(errors.ConfigError, match="train_fraction"):
        ablation.study.get_config("preset=smoke,variant=supervised,train_fraction=0")


@pytest.mark.slow
def test_a_sweep_writes_the_paper_layout(tmp_path):
    table = ablation.main(["--preset=smoke", "--seeds=0", "--sweep=temperature", "--values=0.5,1", f"--out={tmp_path}"])
    assert set(table) == {"0.5", "1"}
    text = (tmp_path / "ablation.md").read_text()
    assert "| τ | AUROC D_in=" in text and "| 0.5 |" in text and "OOD rank σ" in text
    config = json.loads((tmp_path / "runs" / "temperature=1_seed0" / "config.json").read_text())
    assert config["train"]["temperature"] == 1.0 and config["train"]["contrastive"] is True
