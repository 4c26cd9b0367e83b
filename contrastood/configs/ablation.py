r"""The ablation studies (paper Table 2 and Appendix F, Tables 4-6) as one typed config.

  benchmarks/ablation.py builds one run per (variant or swept value, seed) from this config, e.g.
  get_config("variant=contrastive+ls,seed=1,preset=default,class_weight=100")

Variants (Table 2): supervised (no L_con, no label smoothing), label_smoothing, contrastive,
contrastive+ls. Every variant has the same tiny CIFAR ResNet (or `model`), augmentations, step budget
and scoring; contrastive variants spend the same number of steps on stage 1 first (pre-training comes
on top, as in the paper). Data: CIFAR-10 classes 0-5 in-distribution; Tiny ImageNet and CIFAR-10
classes 6-9 near OOD; DTD and Gaussian noise far OOD, all from `data` (../shared/data, or the
device study's unpacked pack, which has the same file names). Nothing here is tuned on OOD data.

Arguments: variant, seed, preset (smoke | default | full | device), model, width, steps (per stage;
0 = the preset's), train_fraction, class_weight (lambda), temperature (tau), label_smoothing (for
the *+ls variants), batch, data, dtype.
"""
import pathlib

from contrastood import config_lib, errors

VARIANTS = {  # name -> (contrastive, label smoothing on)
    "supervised": (False, False),
    "label_smoothing": (False, True),
    "contrastive": (True, False),
    "contrastive+ls": (True, True),
}
SCORERS = ("gaussian", "msp", "mahalanobis")
DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
PRESET_STEPS = {"smoke": (3, 1), "default": (300, 20), "full": (1500, 75), "device": (0, 0)}


def ood_sets(data: str) -> dict:
    test = f"npz:{data}/cifar10-test.npz"
    return config_lib.ood_sets(
        near_tinyimagenet32=f"npz:{data}/tinyimagenet32-test.npz",
        near_cifar10_6to9=f"{test}#classes=6-9",
        far_dtd10=f"npz:{data}/dtd10-all.npz",
        far_gaussian_noise="noise:gaussian:2000",
    )


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, variant="contrastive+ls", seed=0, preset="default", model="resnet_tiny", width=1,
                             steps=0, train_fraction=1.0, class_weight=10.0, temperature=0.5, label_smoothing=0.1,
                             batch=0, data=str(DATA), dtype="float32")
    if a.variant not in VARIANTS:
        raise errors.ConfigError(f"unknown ablation variant {a.variant!r}; choose from {list(VARIANTS)}")
    if a.preset not in PRESET_STEPS:
        raise errors.ConfigError(f"unknown ablation preset {a.preset!r}; choose from {list(PRESET_STEPS)}")
    if not 0 < a.train_fraction <= 1:
        raise errors.ConfigError(f"train_fraction must be in (0, 1], got {a.train_fraction}")
    contrastive, smoothing = VARIANTS[a.variant]
    c = config_lib.base_config()
    c.seed = a.seed
    c.model.name = a.model
    c.model.width = a.width
    c.model.proj_dim = 64
    c.model.dtype = a.dtype
    c.train.contrastive = contrastive
    c.train.label_smoothing = a.label_smoothing if smoothing else 0.0
    c.train.class_weight = a.class_weight
    c.train.temperature = a.temperature
    c.ood.scorers = SCORERS
    c.ood.plots = False
    c.ood.knn_k = 10
    if a.preset == "smoke":
        c.data.train = "sklearn:digits:train#classes=0-5"
        c.data.test = "sklearn:digits:test#classes=0-5"
        c.data.num_classes = 6
        c.ood.sets = config_lib.ood_sets(near_digits_6to9="sklearn:digits:test#classes=6-9",
                                         far_noise="noise:gaussian:64")
        c.train.batch_size = a.batch or 32
        c.eval_batch_size = 64
    else:
        train = f"npz:{a.data}/cifar10-train-part1of2.npz+{a.data}/cifar10-train-part2of2.npz"
        if a.preset == "device":  # the pack holds classes 0-5 of the training set only, in one file
            train = f"npz:{a.data}/cifar10-train-0to5.npz"
        c.data.train = f"{train}#classes=0-5" if a.preset != "device" else train
        c.data.test = f"npz:{a.data}/cifar10-test.npz#classes=0-5"
        c.data.num_classes = 6
        c.ood.sets = ood_sets(a.data)
        c.train.batch_size = a.batch or 128
        c.eval_batch_size = 512 if a.preset != "device" else 1024
    steps, warmup = PRESET_STEPS[a.preset]
    if a.steps:
        steps, warmup = a.steps, max(1, a.steps // 20)
    if not steps:
        raise errors.ConfigError("the device preset needs steps=N (the device study plans them from its time budget)")
    if a.train_fraction < 1:  # a fixed subset (seed 0) of the training images, the same for every variant
        c.data.train += ("&" if "#" in c.data.train else "#") + f"fraction=0:{a.train_fraction:g}"
    # Same budget of joint/supervised steps for every variant; contrastive variants first spend the
    # same number of steps on stage 1 (as in the paper, pre-training comes on top).
    c.train.stage1_steps = steps if contrastive else 0
    c.train.stage2_steps = steps
    c.train.warmup_steps = warmup
    c.train.learning_rate = 1.0 if contrastive else 0.5
    c.log_every_steps = max(1, steps // 10)
    c.checkpoint_every_steps = max(1, steps // 3)
    c.eval_every_steps = 10**9
    return c
