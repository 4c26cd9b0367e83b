r"""CIFAR-10, Winkens et al. 2020 Appendix B recipe (the default), plus a `:cpu` variant.

  python -m contrastood.main --config=configs/cifar10.py --workdir=gs://BUCKET/c10     # paper recipe (TPU pod)
  python -m contrastood.main --config=configs/cifar10.py:cpu --workdir=DIR             # minutes on a 2-core CPU
  python -m contrastood.main --config=configs/cifar10.py:cpu,width=2 --workdir=DIR     # variant arguments

Arguments: `cpu` (tiny ResNet, small batch, 80 steps), `width=W` (the width multiplier). Ablations of
the paper are plain overrides, e.g. `--config.train.contrastive=False` (supervised baseline),
`--config.train.label_smoothing=0`, `--config.train.class_weight=10`, `--config.train.temperature=0.5`,
`--config.model.name=resnet18`.
"""
from contrastood import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, cpu=False, width=0)
    config = config_lib.base_config()
    config.data.train = "tfds:cifar10:train"
    config.data.test = "tfds:cifar10:test"
    config.data.num_classes = 10
    config.train.label_smoothing = 0.01
    config.train.stage2_epochs = 100
    # The paper's OOD sets for CIFAR-10 (Table 1); Places365 is resized to 32x32 by the pipeline.
    config.ood.sets = config_lib.ood_sets(
        cifar100="tfds:cifar100:test",
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
