r"""The paper's CLP ensemble (Sec. 4, App. C) for a CIFAR-10 detector, sized for a TPU slice.

  python -m contrastood.main --config=configs/clp_cifar10.py --workdir=gs://BUCKET/c10 --mode=clp

Union of CIFAR-10, CIFAR-100, SVHN, Places365 (resized to 32x32) and Gaussian noise: 10 + 100 + 10
+ 365 + 1 = 486 classes. 5 ResNet-34 members, SGD momentum 0.9, cosine learning rate from 0.2,
weight decay 1e-6, 500 epochs, batch 1024, every class equally likely in a batch. Point --workdir at
the detector's workdir (trained with configs/cifar10.py, whose settings this config shares) to add
the AUROC-vs-CLP analysis; the members train under WORKDIR/clp/member_K and resume like any run.
"""
from contrastood.configs import cifar10


def get_config(arg: str | None = None):
    config = cifar10.get_config(arg)
    config.clp.datasets = (
        "cifar10=tfds:cifar10:train|tfds:cifar10:test",
        "cifar100=tfds:cifar100:train|tfds:cifar100:test",
        "svhn=tfds:svhn_cropped:train|tfds:svhn_cropped:test",
        "places365=tfds:places365_small:train|tfds:places365_small:validation",
        "gaussian_noise=noise:gaussian:20000#fraction=0:0.5|noise:gaussian:20000#fraction=0.5:1",
    )
    config.clp.in_classes = "0-9"
    config.clp.num_members = 5
    config.clp.model = "resnet34"
    config.clp.batch_size = 1024
    config.clp.epochs = 500
    config.clp.learning_rate = 0.2
    return config
