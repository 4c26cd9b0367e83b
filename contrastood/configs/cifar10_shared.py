r"""CIFAR-10 from the real arrays in ../shared/data (no download): the OOD and CLP benchmark here.

  python -m contrastood.main --config=configs/cifar10_shared.py:cpu --workdir=/tmp/c10s            # train + evaluate
  python -m contrastood.main --config=configs/cifar10_shared.py:cpu --workdir=/tmp/c10s --mode=evaluate
  python -m contrastood.main --config=configs/cifar10_shared.py:cpu --workdir=/tmp/c10s --mode=clp

The detector trains on CIFAR-10 classes 0-5 (airplane .. dog), so classes 6-9 (frog, horse, ship,
truck) are a near-OOD class split; Tiny ImageNet (32x32 test set) is near/mid OOD; DTD textures and
Gaussian noise are far OOD. Variants: '' (ResNet-18, a long CPU or a GPU run) and 'cpu' (tiny ResNet,
minutes), parsed by config_lib.parse_arg. The data folder defaults to ../shared/data beside the repository; override the specs with
--config.data.train=... etc. if it lives elsewhere.
"""
import pathlib

from contrastood import config_lib

DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repository


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, cpu=False)
    config = config_lib.base_config()
    train = f"npz:{DATA}/cifar10-train-part1of2.npz+{DATA}/cifar10-train-part2of2.npz"
    test = f"npz:{DATA}/cifar10-test.npz"
    config.data.train = f"{train}#classes=0-5"
    config.data.test = f"{test}#classes=0-5"
    config.data.num_classes = 6
    config.model.name = "resnet18"
    config.model.width = 1
    config.train.batch_size = 512
    config.train.stage1_epochs = 100
    config.train.stage2_epochs = 20
    config.train.warmup_epochs = 5
    config.train.label_smoothing = 0.01
    config.ood.sets = config_lib.ood_sets(
        cifar10_classes_6to9=f"{test}#classes=6-9",
        tinyimagenet32=f"npz:{DATA}/tinyimagenet32-test.npz",
        dtd10=f"npz:{DATA}/dtd10-all.npz",
        gaussian_noise="noise:gaussian:2000",
    )
    # CLP union: CIFAR-10 (10 classes), Tiny ImageNet (unlabelled: 1 class), DTD (10 classes), noise
    # (1 class); the non-CIFAR sets are split into train/test parts by a fixed seed.
    half = lambda spec, a, b: f"{spec}#fraction={a}:{b}&fraction_seed=0"  # noqa: E731
    tin, dtd = f"npz:{DATA}/tinyimagenet32-test.npz", f"npz:{DATA}/dtd10-all.npz"
    config.clp.datasets = (
        f"cifar10={train}|{test}",
        f"tinyimagenet32={half(tin, 0, 0.5)}|{half(tin, 0.5, 1)}",
        f"dtd10={half(dtd, 0, 0.5)}|{half(dtd, 0.5, 1)}",
        f"gaussian_noise={half('noise:gaussian:4000', 0, 0.5)}|{half('noise:gaussian:4000', 0.5, 1)}",
    )
    config.clp.in_classes = "0-5"
    config.clp.num_members = 5
    config.clp.model = "resnet34"
    config.clp.batch_size = 256
    config.clp.epochs = 30
    if args.cpu:
        config_lib.apply_cpu_variant(config)
        config.train.stage1_steps = 100
        config.train.stage2_steps = 100
        config.train.class_weight = 10.0
        config.eval_every_steps = 100
        config.ood.knn_k = 20
        config.clp.num_members = 2
        config.clp.model = "resnet_tiny"
        config.clp.batch_size = 64
        config.clp.steps = 150
        config.clp.learning_rate = 0.1
        config.clp.warmup_steps = 10
    return config
