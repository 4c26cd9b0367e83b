"""Every shipped config loads and validates; the paper recipe holds the values of Appendix B."""
import importlib
import pathlib
import subprocess
import sys

import pytest

from contrastood import config_lib, errors, models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name, arg=None):
    return importlib.import_module(f"contrastood.configs.{name}").get_config(arg)


CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
VARIANTS = {"cifar10": ["", "cpu", "cpu,width=2"], "cifar100": ["", "cpu"], "digits": ["", "smoke"],
            "cifar10_shared": ["", "cpu"], "folder": ["", "cpu"]}


@pytest.mark.parametrize("name,arg", [(n, a) for n in CONFIGS for a in VARIANTS.get(n, [""])])
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


def test_variant_arguments_are_typed():
    assert load("cifar10", "cpu,width=2").model.width == 2
    assert load("cifar10", "cpu").model.name == "resnet_tiny"
    with pytest.raises(errors.ConfigError, match="unknown config variant argument 'gpu'; valid: cpu, width"):
        load("cifar10", "gpu")
    with pytest.raises(errors.ConfigError, match="width='two' is not a int"):
        load("cifar10", "width=two")
    args = config_lib.parse_arg("smoke,steps=5,rate=0.5", smoke=False, steps=1, rate=1.0, name="x")
    assert (args.smoke, args.steps, args.rate, args.name) == (True, 5, 0.5, "x")


def test_every_config_covers_every_scorer_registered():
    from contrastood.ood import scorers

    assert scorers.resolve(load("digits").ood.scorers) == tuple(
        sorted(scorers.REGISTRY, key=lambda n: (scorers.REGISTRY[n].rank, n)))


def test_unknown_variant_and_bad_values_fail_fast():
    c = load("cifar10", "cpu")
    c.augment.color_prob = 1.5
    with pytest.raises(ValueError):
        config_lib.validate_config(c)
    c = load("cifar10", "cpu")
    c.ood.scorers = ("gaussian", "mahalanobiss")
    with pytest.raises(ValueError, match="mahalanobiss"):
        config_lib.validate_config(c)


def test_unknown_override_key_is_rejected_by_the_command_line():
    out = subprocess.run([sys.executable, "-m", "contrastood.main", "--config=configs/cifar10.py:cpu",
                          "--workdir=/tmp/unused", "--config.train.lerning_rate=0.1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "lerning_rate" in out.stderr
