"""Every shipped config loads and validates; the paper recipe holds the values of Appendix B."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from contrastood import config_lib, models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name,arg", [("cifar10", None), ("cifar10", "cpu"), ("cifar100", None), ("cifar100", "cpu"),
                                      ("digits", None), ("digits", "smoke"), ("cifar10_shared", None),
                                      ("cifar10_shared", "cpu"), ("clp_cifar10", None)])
def test_configs_validate(name, arg):
    config = load(name, arg)
    config_lib.validate_config(config, num_devices=8)


@pytest.mark.parametrize("name,smoothing,stage2", [("cifar10", 0.01, 100), ("cifar100", 0.1, 200)])
def test_paper_recipe(name, smoothing, stage2):
    c = load(name)
    model = models.create_model(c.model, c.data.num_classes)
    assert models.feature_dim(model) == 6144 and c.model.proj_dim == 128
    assert (c.train.batch_size, c.train.stage1_epochs, c.train.stage2_epochs) == (2048, 1000, stage2)
    assert (c.train.optimizer, c.train.learning_rate, c.train.momentum, c.train.weight_decay) == ("lars", 1.0, 0.9, 1e-6)
    assert (c.train.class_weight, c.train.label_smoothing, c.train.temperature, c.train.warmup_epochs) == \
        (100.0, smoothing, 1.0, 30.0)
    assert config_lib.stage_steps(c, 50_000) == (25 * 1000, 25 * stage2, 25 * 30)


def test_clp_union_is_the_papers_486_classes():
    c = load("clp_cifar10")
    assert [d.split("=")[0] for d in c.clp.datasets] == ["cifar10", "cifar100", "svhn", "places365", "gaussian_noise"]
    assert (c.clp.num_members, c.clp.model, c.clp.batch_size, c.clp.epochs, c.clp.learning_rate) == \
        (5, "resnet34", 1024, 500, 0.2)


def test_unknown_variant_and_bad_values_fail_fast():
    with pytest.raises(ValueError, match="variant"):
        load("cifar10", "gpu")
    c = load("cifar10", "cpu")
    c.augment.color_prob = 1.5
    with pytest.raises(ValueError):
        config_lib.validate_config(c)
    c = load("cifar10", "cpu")
    c.ood.scorers = ["gaussian", "mahalanobiss"]
    with pytest.raises(ValueError, match="mahalanobiss"):
        config_lib.validate_config(c)


def test_unknown_override_key_is_rejected_by_the_command_line():
    out = subprocess.run([sys.executable, "-m", "contrastood.main", "--config=configs/cifar10.py:cpu",
                          "--workdir=/tmp/unused", "--config.train.lerning_rate=0.1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "lerning_rate" in out.stderr
