"""Shared configuration: the paper's recipe as defaults, the CPU variant, and validation.

Experiment files in `configs/` only override what differs (dataset, label smoothing, OOD sets).
`validate_config` runs before anything is compiled, so a typo or an impossible value costs the
user seconds, not a compilation.
"""
from __future__ import annotations

import math

import ml_collections

# gaussian: the paper's Eq. 2 (per-class covariance, with log-det); gaussian_no_logdet: its ablation
# without the log-det term; mahalanobis: the tied-covariance ablation (= Lee et al. 2018).
SCORERS = ("gaussian", "gaussian_no_logdet", "mahalanobis", "msp", "odin", "energy", "knn")


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Winkens et al. 2020 Appendix B: WRN-50x3, batch 2048, 1000 + 100 epochs, LARS, lr 1.0."""
    if arg not in (None, "", "cpu"):
        raise ValueError(f"unknown config variant {arg!r}; use no suffix (paper recipe) or ':cpu'")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.train = ""  # dataset spec string, e.g. tfds:cifar10:train or npz:a.npz+b.npz
    config.data.test = ""
    config.data.num_classes = 10
    config.data.image_size = 32
    config.data.data_dir = ""  # TFDS data_dir; "" = TFDS default / $TFDS_DATA_DIR

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet50"  # resnet_tiny | resnet18 | resnet34 | resnet50
    config.model.width = 3  # width multiplier: ResNet-50 x3 -> 6144-D features
    config.model.proj_dim = 128
    config.model.proj_hidden_dim = 0  # 0: same as the feature dimension
    config.model.dtype = "float32"  # compute dtype; "bfloat16" = mixed precision, float32 master weights

    config.augment = ml_collections.ConfigDict()
    config.augment.crop_area = (0.08, 1.0)
    config.augment.crop_aspect = (3 / 4, 4 / 3)
    config.augment.flip = True
    config.augment.color_strength = 0.5
    config.augment.color_prob = 0.8
    config.augment.grayscale_prob = 0.2

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 2048  # global batch, split over all devices of all hosts
    config.train.contrastive = True  # False: supervised-only baseline (no stage 1, no L_con)
    config.train.augmentation = "simclr"  # simclr | standard (pad-crop + flip, for plain classifiers)
    config.train.sampling = "epoch"  # epoch | uniform_class (every class equally likely; CLP ensembles)
    config.train.stage1_epochs = 1000.0  # contrastive only
    config.train.stage2_epochs = 100.0  # L_con + class_weight * L_class
    config.train.stage1_steps = -1  # > = 0 overrides the epoch count
    config.train.stage2_steps = -1
    config.train.class_weight = 100.0  # lambda
    # Divide L_con + lambda * L_class by (1 + lambda) in stage 2. LARS makes kernel updates independent
    # of the loss scale, but biases and BN parameters (exempt from the trust ratio) would see gradients
    # lambda times larger and diverge at lambda = 100; the normalisation keeps the relative weighting.
    config.train.normalize_loss_weights = True
    config.train.label_smoothing = 0.01
    config.train.temperature = 1.0  # tau; best in the paper's Table 6
    config.train.optimizer = "lars"  # lars | sgd
    config.train.learning_rate = 1.0
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-6  # BN parameters and biases excluded (LARS: also from trust ratio)
    config.train.warmup_epochs = 30.0  # per stage, then cosine decay to 0 over the stage
    config.train.warmup_steps = -1  # >= 0 overrides warmup_epochs
    # Denominator of train/mfu, TFLOP/s per device; 0: data sheet for TPUs/GPUs, a measured matmul on CPUs.
    config.train.peak_tflops = 0.0

    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 5000
    config.keep_checkpoints = 3
    config.eval_batch_size = 1024

    config.ood = ml_collections.ConfigDict()
    config.ood.run_after_training = True
    config.ood.sets = {}  # name -> dataset spec
    config.ood.scorers = list(SCORERS)
    config.ood.shrinkage = "ledoit_wolf"  # ledoit_wolf | ridge | none (per-class covariance)
    config.ood.ridge = 1e-6  # with shrinkage=ridge: ridge * trace(S)/d added to the diagonal
    config.ood.knn_k = 50
    config.ood.odin_temperature = 1000.0  # fixed defaults of Liang et al.; never tuned on OOD data
    config.ood.odin_epsilon = 0.0014
    config.ood.plots = True
    config.ood.failure_grid_images = 16

    # CLP (paper Sec. 4, App. C): an ensemble of ordinary supervised classifiers on the union of the
    # datasets below (each dataset's labels offset into one label space, an unlabelled one = 1 class).
    config.clp = ml_collections.ConfigDict()
    config.clp.run_after_evaluation = False  # also run it at the end of --mode=train
    config.clp.datasets = []  # list of "name=TRAIN_SPEC|TEST_SPEC"; the first is the in-distribution
    config.clp.in_classes = ""  # union class ids of C_in, e.g. "0-9"; "" = all classes of the first dataset
    config.clp.num_members = 5
    config.clp.model = "resnet34"
    config.clp.width = 1
    config.clp.batch_size = 1024
    config.clp.epochs = 500.0  # on the union, classes sampled uniformly
    config.clp.steps = -1  # >= 0 overrides epochs
    config.clp.learning_rate = 0.2  # SGD, momentum 0.9, cosine, weight decay 1e-6 (paper App. C)
    config.clp.warmup_steps = 0
    config.clp.num_bins = 10  # sample-wise CLP bins for AUROC (Fig. 4c)
    return config


def apply_cpu_variant(config: ml_collections.ConfigDict) -> None:
    """A run that finishes in minutes on a 2-core CPU: tiny ResNet, small batch, few steps."""
    config.model.name = "resnet_tiny"
    config.model.width = 1
    config.model.proj_dim = 32
    config.train.batch_size = 64
    config.train.stage1_steps = 40
    config.train.stage2_steps = 40
    config.train.warmup_steps = 5
    config.train.learning_rate = 0.5
    config.log_every_steps = 10
    config.checkpoint_every_steps = 20
    config.eval_every_steps = 40
    config.eval_batch_size = 256


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Fails fast, with the override that fixes it, before any data is read or anything compiled."""
    from contrastood import augment, models  # local: keeps config files importable without JAX

    _check(config.model.name in models.ARCHITECTURES,
           f"model.name={config.model.name!r} is unknown; set --config.model.name to one of {sorted(models.ARCHITECTURES)}")
    _check(config.model.dtype in models.DTYPES,
           f"model.dtype={config.model.dtype!r} is unknown; set --config.model.dtype to one of {sorted(models.DTYPES)}")
    _check(int(config.model.width) >= 1, "model.width must be an integer >= 1")
    _check(int(config.model.proj_dim) >= 1, "model.proj_dim must be >= 1")
    _check(config.data.num_classes >= 2, "data.num_classes must be >= 2")
    _check(config.data.image_size >= 8, "data.image_size must be >= 8")
    _check(bool(config.data.train), "data.train is empty; set --config.data.train=SPEC (e.g. npz:/path/train.npz)")
    t = config.train
    _check(t.batch_size > 0, "train.batch_size must be > 0")
    if num_devices is not None:
        _check(t.batch_size % num_devices == 0,
               f"train.batch_size={t.batch_size} is not divisible by the {num_devices} devices; set "
               f"--config.train.batch_size to a multiple of {num_devices}")
        _check(config.eval_batch_size % num_devices == 0,
               f"eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} devices; set "
               f"--config.eval_batch_size to a multiple of {num_devices}")
    _check(t.temperature > 0, f"train.temperature must be > 0, got {t.temperature}")
    _check(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _check(t.class_weight >= 0, f"train.class_weight (lambda) must be >= 0, got {t.class_weight}")
    _check(t.optimizer in ("lars", "sgd"), f"train.optimizer={t.optimizer!r}; use 'lars' or 'sgd'")
    _check(t.augmentation in ("simclr", "standard"), f"train.augmentation={t.augmentation!r}; use 'simclr' or 'standard'")
    _check(t.sampling in ("epoch", "uniform_class"), f"train.sampling={t.sampling!r}; use 'epoch' or 'uniform_class'")
    _check(not (t.contrastive and t.augmentation == "standard"),
           "contrastive training needs the SimCLR augmentations; set --config.train.augmentation=simclr")
    _check(t.learning_rate > 0, "train.learning_rate must be > 0")
    _check(t.weight_decay >= 0 and 0 <= t.momentum < 1, "train.weight_decay must be >= 0 and train.momentum in [0, 1)")
    _check(t.stage1_epochs >= 0 and t.stage2_epochs >= 0, "stage epochs must be >= 0")
    _check(config.log_every_steps > 0 and config.checkpoint_every_steps > 0 and config.eval_every_steps > 0,
           "log/checkpoint/eval intervals must be > 0")
    _check(config.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    augment.AugmentConfig.from_mapping(config.augment)  # raises on unknown keys / bad ranges
    unknown = sorted(set(config.ood.scorers) - set(SCORERS))
    _check(not unknown, f"unknown ood.scorers {unknown}; valid: {list(SCORERS)}")
    _check(config.ood.shrinkage in ("ledoit_wolf", "ridge", "none"),
           f"ood.shrinkage={config.ood.shrinkage!r}; use ledoit_wolf, ridge or none")
    _check(config.ood.knn_k >= 1, "ood.knn_k must be >= 1")


def stage_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int, int]:
    """(stage1_steps, stage2_steps, warmup_steps) from epochs, unless given as steps."""
    t = config.train
    steps_per_epoch = max(1, math.ceil(num_train_examples / t.batch_size))

    def steps(epochs, override):
        return int(override) if override >= 0 else int(round(epochs * steps_per_epoch))

    stage1 = steps(t.stage1_epochs, t.stage1_steps) if t.contrastive else 0
    stage2 = steps(t.stage2_epochs, t.stage2_steps)
    warmup = steps(t.warmup_epochs, t.warmup_steps)
    if stage1 + stage2 <= 0:
        raise ValueError("the run has no training steps; set --config.train.stage2_steps (or epochs) > 0")
    return stage1, stage2, warmup
