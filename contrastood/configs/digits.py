r"""Embedded offline demo: scikit-learn's digits, no download, a few minutes on a 2-core CPU.

  python -m contrastood.main --config=configs/digits.py --workdir=/tmp/contrastood_digits

In-distribution: digits 0-5 (scikit-learn's 8x8 digits resized to 32x32). Near OOD: digits 6-9.
Far OOD: 32x32 patches of scikit-learn's sample photographs, and Gaussian noise. A tiny ResNet is
trained through both stages (contrastive, then contrastive + label-smoothed classification), then
every scorer is evaluated and the report is printed.
"""
from contrastood import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    config = config_lib.base_config()
    config.data.train = "sklearn:digits:train#classes=0-5"
    config.data.test = "sklearn:digits:test#classes=0-5"
    config.data.num_classes = 6

    config.model.name = "resnet_tiny"
    config.model.width = 1
    config.model.proj_dim = 32

    # Digits are not photographs: milder crops and colour distortion keep the classes recognisable. Their
    # 8x8 originals hold nothing a crop cut from them would keep that the 32 px upsampled image does not,
    # so the crop is cut on the device, inside the step, as for CIFAR arrays.
    config.data.crop = "device"
    config.augment.crop_area = (0.3, 1.0)
    config.augment.color_strength = 0.3

    # Budgets and colour strength chosen by in-distribution validation accuracy alone (a held-out 20% of
    # the training digits; benchmarks/select_demo.py, results/demo_selection): ours 300 steps per stage at
    # colour 0.3, the baseline 600 steps, both the largest of their grids within the demo's few minutes.
    config.train.batch_size = 64
    config.train.stage1_steps = 300
    config.train.stage2_steps = 300
    config.train.warmup_steps = 30
    config.train.learning_rate = 0.8
    config.train.class_weight = 10.0
    config.train.label_smoothing = 0.1
    config.train.temperature = 0.5

    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 150
    config.eval_batch_size = 256

    config.ood.sets = config_lib.ood_sets(
        near_digits_6to9="sklearn:digits:test#classes=6-9",
        far_photos="sklearn:photos:500",
        far_gaussian_noise="noise:gaussian:500",
    )
    config.ood.knn_k = 10

    # CLP: a small ensemble on the union digits 0-9 (10 classes) + photo patches + noise (1 class each).
    config.clp.run_after_evaluation = True
    config.clp.datasets = (
        "digits=sklearn:digits:train|sklearn:digits:test",
        "photos=sklearn:photos:1000#fraction=0:0.5|sklearn:photos:1000#fraction=0.5:1",
        "noise=noise:gaussian:1000#fraction=0:0.5|noise:gaussian:1000#fraction=0.5:1",
    )
    config.clp.in_classes = "0-5"  # digits 0-5 are the detector's in-distribution classes
    config.clp.num_members = 3
    config.clp.model = "resnet_tiny"
    config.clp.batch_size = 64
    config.clp.steps = 60
    config.clp.learning_rate = 0.1
    config.clp.warmup_steps = 5
    # Also train the paper's baseline (supervised only, no label smoothing) and compare (Table 3, Figs. 4-6).
    config.compare.baseline = True
    config.compare.baseline_steps = 600
    if args.smoke:  # for the test suite: the same pipeline in seconds
        config.train.stage1_steps = 4
        config.train.stage2_steps = 4
        config.train.warmup_steps = 1
        config.train.batch_size = 32
        config.log_every_steps = 2
        config.checkpoint_every_steps = 4
        config.eval_every_steps = 8
        config.ood.sets = config_lib.ood_sets(near_digits_6to9="sklearn:digits:test#classes=6-9",
                                              far_noise="noise:gaussian:64")
        config.clp.num_members = 2
        config.clp.steps = 3
        config.clp.batch_size = 32
        config.compare.baseline_steps = 4
    return config
