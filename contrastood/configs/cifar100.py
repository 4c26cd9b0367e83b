r"""CIFAR-100, Winkens et al. 2020 Appendix B recipe (the default), plus a `:cpu` variant.

Arguments and ablation overrides as in configs/cifar10.py.
"""
from contrastood import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, cpu=False, width=0)
    config = config_lib.base_config()
    config.data.train = "tfds:cifar100:train"
    config.data.test = "tfds:cifar100:test"
    config.data.num_classes = 100
    config.data.mean, config.data.std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # CIFAR-100 train
    config.train.label_smoothing = 0.1
    config.train.stage2_epochs = 200
    config.ood.sets = config_lib.ood_sets(
        cifar10="tfds:cifar10:test",
        svhn="tfds:svhn_cropped:test",
        places365="tfds:places365_small:validation",
        gaussian_noise="noise:gaussian:10000",
    )
    if args.cpu:
        config_lib.apply_cpu_variant(config)
        config.ood.sets = config_lib.ood_sets(gaussian_noise="noise:gaussian:1000")
    if args.width:
        config.model.width = args.width
    return config
