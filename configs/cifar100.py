r"""CIFAR-100, Winkens et al. 2020 Appendix B recipe (the default), plus a `:cpu` variant.

See configs/cifar10.py for usage and ablation overrides.
"""
from contrastood import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config(arg)
    config.data.train = "tfds:cifar100:train"
    config.data.test = "tfds:cifar100:test"
    config.data.num_classes = 100
    config.train.label_smoothing = 0.1
    config.train.stage2_epochs = 200
    config.ood.sets = {
        "cifar10": "tfds:cifar10:test",
        "svhn": "tfds:svhn_cropped:test",
        "places365": "tfds:places365_small:validation",
        "gaussian_noise": "noise:gaussian:10000",
    }
    if arg == "cpu":
        config_lib.apply_cpu_variant(config)
        config.ood.sets = {"gaussian_noise": "noise:gaussian:1000"}
    return config
