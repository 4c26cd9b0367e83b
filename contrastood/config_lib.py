"""Configuration: the paper's recipe as defaults, variant arguments, validation, and config.json.

Experiment files in `configs/` (the package `contrastood.configs`) only override what differs.
`validate_config` runs before any data is read or anything compiled, and checks every value against
the registry of the module that owns the name (models, optimizers, samplers, scorers, shrinkage
methods), so a typo costs seconds, not a training run. Every dataset spec of the config is parsed.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

import ml_collections

from contrastood import errors

FROM_EPOCHS = -1  # the sentinel of the *_steps keys: "use the epoch count instead"
# Keys that may change when a workdir is resumed or re-evaluated: they decide what is reported and
# how often, not what is trained.
RUN_CONTROL_KEYS = ("ood.", "clp.", "compare.", "log_every_steps", "checkpoint_every_steps", "eval_every_steps",
                    "keep_checkpoints", "eval_batch_size", "allow_config_change", "train.peak_tflops",
                    "data.num_workers")


class OpenConfigDict(ml_collections.ConfigDict):
    """A ConfigDict that stays open to new keys after config_flags locks the config (ood.sets)."""

    def lock(self):
        return self


def ood_sets(**sets: str) -> OpenConfigDict:
    """A value for config.ood.sets (name -> spec) that stays open to --config.ood.sets.NAME=SPEC."""
    return OpenConfigDict(sets)


def base_config() -> ml_collections.ConfigDict:
    """Winkens et al. 2020 Appendix B: WRN-50x3, batch 2048, 1000 + 100 epochs, LARS, lr 1.0."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.allow_config_change = False  # resume a workdir with a config that changes what is trained

    config.data = ml_collections.ConfigDict()
    config.data.train = ""  # dataset spec string, e.g. tfds:cifar10:train or npz:a.npz+b.npz
    config.data.test = ""
    config.data.num_classes = 10
    config.data.image_size = 32
    config.data.data_dir = ""  # TFDS data_dir; "" = TFDS default / $TFDS_DATA_DIR
    config.data.crop = "auto"  # auto | host | device: where SimCLR's random resized crop is cut (data.pipeline)
    config.data.num_workers = 0  # host decode threads; 0 = one per core (at most 16)
    # Paper Sec. 6: unlabelled images join the contrastive loss (both stages), the class loss ignores them.
    config.data.unlabelled = ""
    config.data.unlabelled_fraction = 0.5  # share of each batch drawn from data.unlabelled
    # Per-channel statistics (in [0, 1]) the model standardises its input with; () = measured on the
    # first 10,000 training images (in a fixed order), so evaluation recomputes the same values.
    config.data.mean = (0.4914, 0.4822, 0.4465)  # CIFAR-10
    config.data.std = (0.2470, 0.2435, 0.2616)

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet50"  # see models.ARCHITECTURES
    config.model.width = 3  # width multiplier: ResNet-50 x3 -> 6144-D features
    config.model.stem = "auto"  # cifar (3x3, stride 1) | imagenet (7x7/2 + max-pool) | auto (by image size)
    config.model.proj_dim = 128
    config.model.proj_hidden_dim = 0  # 0: same as the feature dimension
    config.model.dtype = "float32"  # compute dtype; "bfloat16" = mixed precision, float32 master weights
    # Convolution kernels: auto = on CPU backends where the kernel builds, Winograd for 3x3 stride-1 layers of 64+
    # channels (F(4x4,3x3) in float32; F(2x2,3x3) in bfloat16, on CPUs with bfloat16 hardware) and oneDNN's direct
    # kernels for the rest, else XLA's; winograd | onednn (direct only) | xla force one (see
    # contrastood.onednn_conv). Parameters and checkpoints are the same.
    config.model.conv = "auto"
    # BatchNorm: fused = contrastood.batch_norm's (flax's variables and results, a hand-written gradient with
    # less memory traffic); flax = nn.BatchNorm itself.
    config.model.norm = "fused"

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
    config.train.sampling = "epoch"  # see data.pipeline.SAMPLERS
    config.train.stage1_epochs = 1000.0  # contrastive only
    config.train.stage2_epochs = 100.0  # L_con + class_weight * L_class
    config.train.stage1_steps = FROM_EPOCHS  # >= 0 overrides the epoch count; -1 = use the epochs
    config.train.stage2_steps = FROM_EPOCHS
    config.train.class_weight = 100.0  # lambda
    # Divide L_con + lambda * L_class by (1 + lambda) in stage 2. LARS makes kernel updates independent
    # of the loss scale, but biases and BN parameters (exempt from the trust ratio) would see gradients
    # lambda times larger and diverge at lambda = 100; the normalisation keeps the relative weighting.
    config.train.normalize_loss_weights = True
    config.train.label_smoothing = 0.01
    config.train.temperature = 1.0  # tau; best in the paper's Table 6
    config.train.optimizer = "lars"  # see train.OPTIMIZERS
    config.train.learning_rate = 1.0
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-6  # BN parameters and biases excluded (LARS: also from trust ratio)
    config.train.warmup_epochs = 30.0  # then cosine decay to 0 (see train.schedule)
    config.train.warmup_steps = FROM_EPOCHS  # >= 0 overrides warmup_epochs
    # App. B: "a linear warmup for the first 30 epochs followed by a cosine decay schedule without
    # restarts ... for both stages". per_stage: each stage warms up and decays on its own (our reading);
    # continuous: one warm-up and one cosine over both stages.
    config.train.schedule = "per_stage"
    # Denominator of train/mfu, TFLOP/s per device; 0: data sheet for TPUs/GPUs, a measured matmul on CPUs.
    config.train.peak_tflops = 0.0

    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 5000
    config.keep_checkpoints = 3
    config.eval_batch_size = 1024

    config.ood = ml_collections.ConfigDict()
    config.ood.run_after_training = True
    config.ood.sets = OpenConfigDict()  # name -> dataset spec; --config.ood.sets.NAME=SPEC adds one, =  drops it
    config.ood.scorers = ("all",)  # names from ood.scorers.REGISTRY, or "all"
    config.ood.shrinkage = "ledoit_wolf"  # see ood.scorers.SHRINKAGE_METHODS (per-class covariance)
    config.ood.ridge = 1e-6  # with shrinkage=ridge: ridge * trace(S)/d added to the diagonal
    config.ood.knn_k = 50
    config.ood.odin_temperature = 1000.0  # fixed defaults of Liang et al.; never tuned on OOD data
    config.ood.odin_epsilon = 0.0014
    config.ood.react_percentile = 90.0  # ReAct clips pre-logits at this percentile of the training ones
    config.ood.vim_dim = 0  # ViM principal subspace; 0 = the ViM paper's rule for the feature size
    config.ood.gen_gamma = 0.1  # GEN's exponent and top-M classes (0 = all)
    config.ood.gen_top_m = 0
    config.ood.plots = True
    config.ood.failure_grid_images = 16

    # CLP (paper Sec. 4, App. C): an ensemble of ordinary supervised classifiers on the union of the
    # datasets below (each dataset's labels offset into one label space, an unlabelled one = 1 class).
    config.clp = ml_collections.ConfigDict()
    config.clp.run_after_evaluation = False  # also run it at the end of --mode=train
    config.clp.datasets = ()  # "name=TRAIN_SPEC|TEST_SPEC" each; the first is the in-distribution
    config.clp.in_classes = ""  # union class ids of C_in, e.g. "0-9"; "" = all classes of the first dataset
    config.clp.num_members = 5
    config.clp.model = "resnet34"
    config.clp.width = 1
    config.clp.batch_size = 1024
    config.clp.epochs = 500.0  # on the union, classes sampled uniformly
    config.clp.steps = FROM_EPOCHS  # >= 0 overrides epochs
    config.clp.learning_rate = 0.2  # SGD, momentum 0.9, cosine, weight decay 1e-6 (paper App. C)
    config.clp.warmup_steps = 0
    config.clp.num_bins = 10  # sample-wise CLP bins for AUROC (Fig. 4c)

    # --mode=train also trains the paper's baseline (no contrastive training, no label smoothing; the
    # same network, augmentation and scoring) into WORKDIR/baseline and writes the Table 3 comparison.
    config.compare = ml_collections.ConfigDict()
    config.compare.baseline = False
    config.compare.baseline_steps = 0  # 0: ours' stage-2 steps (Table 2's protocol: pre-training comes on top)
    config.compare.baseline_learning_rate = 0.0  # 0: ours' train.learning_rate
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


def clp_member_config(config: ml_collections.ConfigDict, member: int, num_classes: int,
                      train_name: str) -> ml_collections.ConfigDict:
    """A CLP ensemble member: a plain supervised classifier on the union (paper App. C: SGD with
    momentum 0.9 and a cosine from clp.learning_rate, weight decay 1e-6, every class equally likely in a
    batch, standard augmentation). Members differ only in their seed (their initialisation)."""
    c = base_config()
    c.seed = config.seed + 1000 * (member + 1)
    c.data.train = train_name  # names the union, which is passed in as a Source
    c.data.test = ""
    c.data.num_classes = num_classes
    c.data.image_size = config.data.image_size
    c.data.data_dir = config.data.data_dir
    c.data.num_workers = config.data.num_workers
    c.data.mean, c.data.std = tuple(config.data.mean), tuple(config.data.std)
    c.model.name = config.clp.model
    c.model.width = config.clp.width
    c.model.stem = config.model.stem
    c.model.dtype = config.model.dtype
    c.model.conv = config.model.get("conv", "auto")
    c.model.norm = config.model.get("norm", "fused")
    t = c.train
    t.contrastive = False
    t.augmentation = "standard"
    t.sampling = "uniform_class"
    t.optimizer = "sgd"
    t.learning_rate = config.clp.learning_rate
    t.momentum = 0.9
    t.weight_decay = 1e-6
    t.label_smoothing = 0.0
    t.batch_size = config.clp.batch_size
    t.stage2_epochs = config.clp.epochs
    t.stage2_steps = config.clp.steps
    t.warmup_steps = config.clp.warmup_steps
    c.log_every_steps = config.log_every_steps
    c.checkpoint_every_steps = config.checkpoint_every_steps
    c.eval_every_steps = 10**9
    c.eval_batch_size = config.eval_batch_size
    c.ood.scorers = ("msp",)
    c.ood.run_after_training = False
    return c


def baseline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's baseline for a config: supervised only, no label smoothing, everything else the same."""
    b = config.copy_and_resolve_references()
    b.train.contrastive = False
    b.train.label_smoothing = 0.0
    b.train.stage1_steps = 0
    if config.compare.baseline_steps:
        b.train.stage2_steps = int(config.compare.baseline_steps)
    if config.compare.baseline_learning_rate:
        b.train.learning_rate = float(config.compare.baseline_learning_rate)
    b.clp.run_after_evaluation = False
    b.compare.baseline = False
    return b


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """A config file's variant argument, typed by its defaults (as big_vision's parse_arg).

    `configs/cifar10.py:cpu,width=2` calls get_config("cpu,width=2"); with defaults cpu=False,
    width=1 that is {cpu: True, width: 2}. A bare word sets a bool to True; key=value is converted to
    the default's type. Unknown words are a ConfigError that lists the valid ones.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise errors.ConfigError(f"unknown config variant argument {key!r}; valid: {', '.join(sorted(defaults))} "
                                     "(e.g. configs/cifar10.py:cpu or configs/cifar10.py:cpu,width=2)")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise errors.ConfigError(f"config variant argument {key!r} needs a value: {key}=VALUE")
            result[key] = True
            continue
        value = value.strip()
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                result[key] = value.lower() in ("true", "1")
            else:
                result[key] = type(default)(value)
        except ValueError:
            raise errors.ConfigError(f"config variant argument {key}={value!r} is not a {type(default).__name__}") from None
    return result


# ---------------------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise errors.ConfigError(message)


def as_names(value) -> tuple[str, ...]:
    """A tuple option from config or CLI ('a,b' and ('a', 'b') alike) as a tuple of names."""
    if isinstance(value, str):
        value = (value,)
    names = []
    for item in value:
        names.extend(part.strip() for part in str(item).split(",") if part.strip())
    return tuple(names)


def _check_steps(value, key: str) -> None:
    _check(int(value) == value and (value >= 0 or value == FROM_EPOCHS),
           f"{key}={value}: use an integer >= 0, or {FROM_EPOCHS} to take the count from the epochs")


def _check_spec(spec: str, key: str) -> None:
    from contrastood.data import specs

    try:
        specs.parse_spec(spec)
    except errors.DataError as error:
        raise errors.ConfigError(f"{key}: {error}") from None


def parse_clp_datasets(entries) -> list[tuple[str, str, str]]:
    """`clp.datasets` entries 'name=TRAIN_SPEC|TEST_SPEC' -> [(name, train_spec, test_spec)]."""
    out = []
    for entry in as_entries(entries):
        name, sep, both = entry.partition("=")
        train_spec, bar, test_spec = both.partition("|")
        if not sep or not bar or not name or not train_spec or not test_spec:
            raise errors.ConfigError(
                f"clp.datasets entry {entry!r} is not 'name=TRAIN_SPEC|TEST_SPEC', e.g. "
                "'noise=noise:gaussian:2000#fraction=0:0.5|noise:gaussian:2000#fraction=0.5:1'")
        out.append((name.strip(), train_spec.strip(), test_spec.strip()))
    names = [n for n, _, _ in out]
    _check(len(set(names)) == len(names), f"clp.datasets names must be unique, got {names}")
    return out


def as_entries(value) -> tuple[str, ...]:
    """Entries of a tuple option whose items may contain commas (specs): one item per entry."""
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None, *,
                    data_given: bool = False) -> None:
    """Fails fast, with the override that fixes it, before any data is read or anything compiled.

    `data_given`: the caller passes the training data as a Source (the CLP ensemble's union), so
    data.train only names it and is not parsed as a spec.
    """
    from contrastood import augment, batch_norm, models, onednn_conv, train  # local: keeps config files importable without JAX
    from contrastood.data import pipeline
    from contrastood.ood import scorers

    _check(config.model.name in models.ARCHITECTURES,
           f"model.name={config.model.name!r} is unknown; set --config.model.name to one of {sorted(models.ARCHITECTURES)}")
    _check(config.model.dtype in models.DTYPES,
           f"model.dtype={config.model.dtype!r} is unknown; set --config.model.dtype to one of {sorted(models.DTYPES)}")
    _check(config.model.get("conv", "auto") in onednn_conv.IMPLS,
           f"model.conv={config.model.get('conv')!r} is unknown; set --config.model.conv to one of {onednn_conv.IMPLS}")
    _check(config.model.get("norm", "fused") in batch_norm.IMPLS,
           f"model.norm={config.model.get('norm')!r} is unknown; set --config.model.norm to one of {batch_norm.IMPLS}")
    _check(config.model.stem in models.STEMS,
           f"model.stem={config.model.stem!r} is unknown; set --config.model.stem to one of {models.STEMS}")
    _check(int(config.model.width) >= 1, "model.width must be an integer >= 1")
    _check(int(config.model.proj_dim) >= 1, "model.proj_dim must be >= 1")
    d = config.data
    _check(d.num_classes >= 2, "data.num_classes must be >= 2")
    _check(d.image_size >= 8, "data.image_size must be >= 8")
    _check(bool(d.train), "data.train is empty; set --config.data.train=SPEC (e.g. npz:/path/train.npz)")
    _check(d.crop in ("auto", "host", "device"), f"data.crop={d.crop!r}; use auto, host or device")
    _check(d.num_workers >= 0, "data.num_workers must be >= 0 (0 = one per core)")
    _check(0 < d.unlabelled_fraction < 1, f"data.unlabelled_fraction must be in (0, 1), got {d.unlabelled_fraction}")
    _check(len(d.mean) == len(d.std) and len(d.mean) in (0, 3) and all(s > 0 for s in d.std),
           "data.mean and data.std must be 3 values each (std > 0), or both () to measure them on the training data")
    for key in ("test", "unlabelled") if data_given else ("train", "test", "unlabelled"):
        if d[key]:
            _check_spec(d[key], f"data.{key}")
    t = config.train
    _check(t.batch_size > 0, "train.batch_size must be > 0")
    if num_devices is not None:
        _check(t.batch_size % num_devices == 0,
               f"train.batch_size={t.batch_size} is not divisible by the {num_devices} devices; set "
               f"--config.train.batch_size to a multiple of {num_devices}")
        _check(config.eval_batch_size % num_devices == 0,
               f"eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} devices; set "
               f"--config.eval_batch_size to a multiple of {num_devices}")
        _check(config.clp.batch_size % num_devices == 0 or not config.clp.datasets,
               f"clp.batch_size={config.clp.batch_size} is not divisible by the {num_devices} devices; set "
               f"--config.clp.batch_size to a multiple of {num_devices}")
    _check(t.temperature > 0, f"train.temperature must be > 0, got {t.temperature}")
    _check(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _check(t.class_weight >= 0, f"train.class_weight (lambda) must be >= 0, got {t.class_weight}")
    _check(t.optimizer in train.OPTIMIZERS, f"train.optimizer={t.optimizer!r}; use one of {train.OPTIMIZERS}")
    _check(t.schedule in train.SCHEDULES, f"train.schedule={t.schedule!r}; use one of {train.SCHEDULES}")
    _check(t.augmentation in augment.AUGMENTATIONS,
           f"train.augmentation={t.augmentation!r}; use one of {augment.AUGMENTATIONS}")
    _check(t.sampling in pipeline.SAMPLERS, f"train.sampling={t.sampling!r}; use one of {pipeline.SAMPLERS}")
    _check(not (t.contrastive and t.augmentation == "standard"),
           "contrastive training needs the SimCLR augmentations; set --config.train.augmentation=simclr")
    _check(not (d.unlabelled and not t.contrastive),
           "data.unlabelled images only enter the contrastive loss; set --config.train.contrastive=True or drop them")
    _check(t.learning_rate > 0, "train.learning_rate must be > 0")
    _check(t.weight_decay >= 0 and 0 <= t.momentum < 1, "train.weight_decay must be >= 0 and train.momentum in [0, 1)")
    _check(t.stage1_epochs >= 0 and t.stage2_epochs >= 0 and t.warmup_epochs >= 0, "epoch counts must be >= 0")
    for key in ("stage1_steps", "stage2_steps", "warmup_steps"):
        _check_steps(t[key], f"train.{key}")
    _check_steps(config.clp.steps, "clp.steps")
    _check(config.log_every_steps > 0 and config.checkpoint_every_steps > 0 and config.eval_every_steps > 0,
           "log/checkpoint/eval intervals must be > 0")
    _check(config.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    try:
        augment.AugmentConfig.from_mapping(config.augment)  # raises on unknown keys / bad ranges
    except ValueError as error:
        raise errors.ConfigError(f"augment: {error}") from None
    o = config.ood
    try:
        names = scorers.resolve(o.scorers)
    except ValueError as error:
        raise errors.ConfigError(f"ood.scorers: {error}") from None
    _check(not config.compare.baseline or "gaussian" in names,
           "compare.baseline compares the Gaussian score (Eq. 2), but ood.scorers leaves it out; add gaussian to "
           "--config.ood.scorers or set --config.compare.baseline=False")
    _check(o.shrinkage in scorers.SHRINKAGE_METHODS,
           f"ood.shrinkage={o.shrinkage!r}; use one of {scorers.SHRINKAGE_METHODS}")
    _check(o.knn_k >= 1, "ood.knn_k must be >= 1")
    _check(0 < o.react_percentile <= 100, "ood.react_percentile must be in (0, 100]")
    _check(o.vim_dim >= 0 and o.gen_top_m >= 0 and o.gen_gamma > 0, "ood.vim_dim, ood.gen_top_m >= 0, ood.gen_gamma > 0")
    for name, spec in o.sets.items():
        _check(bool(spec), f"ood.sets.{name} is empty; give it a spec or drop it")
        _check_spec(spec, f"ood.sets.{name}")
    if config.clp.datasets:
        entries = parse_clp_datasets(config.clp.datasets)
        _check(len(entries) >= 2, "clp.datasets needs the in-distribution dataset and at least one other")
        for name, train_spec, test_spec in entries:
            _check_spec(train_spec, f"clp.datasets[{name}] (train part)")
            _check_spec(test_spec, f"clp.datasets[{name}] (test part)")
        _check(config.clp.num_members >= 1, "clp.num_members must be >= 1")
        if config.clp.in_classes:
            from contrastood.data import specs

            try:
                specs.parse_classes(config.clp.in_classes, what="clp.in_classes")
            except errors.DataError as error:
                raise errors.ConfigError(str(error)) from None
        _check(config.clp.model in models.ARCHITECTURES,
               f"clp.model={config.clp.model!r} is unknown; use one of {sorted(models.ARCHITECTURES)}")


def stage_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int, int]:
    """(stage1_steps, stage2_steps, warmup_steps) from epochs, unless given as steps (>= 0)."""
    t = config.train
    steps_per_epoch = max(1, math.ceil(num_train_examples / t.batch_size))

    def steps(epochs, override):
        return int(override) if override >= 0 else int(round(epochs * steps_per_epoch))

    stage1 = steps(t.stage1_epochs, t.stage1_steps) if t.contrastive else 0
    stage2 = steps(t.stage2_epochs, t.stage2_steps)
    warmup = steps(t.warmup_epochs, t.warmup_steps)
    if stage1 + stage2 <= 0:
        raise errors.ConfigError("the run has no training steps; set --config.train.stage2_steps (or epochs) > 0")
    return stage1, stage2, warmup


def warmup_key(config: ml_collections.ConfigDict) -> str:
    """The key that sets the warm-up of this config (steps override epochs)."""
    return "train.warmup_steps" if config.train.warmup_steps >= 0 else "train.warmup_epochs"


# ------------------------------------------------------------------------------------ config.json


def to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(previous: dict, current: dict, *, shared_keys_only: bool = False) -> dict[str, tuple]:
    """Dotted key -> (previous, current) for every value that differs between two config dicts.

    With `shared_keys_only`, keys present on one side only (options added to the framework later,
    whose defaults keep the old behaviour) are not changes.
    """
    before, after = flatten(previous), flatten(current)
    keys = before.keys() & after.keys() if shared_keys_only else before.keys() | after.keys()
    return {k: (before.get(k), after.get(k)) for k in sorted(keys) if before.get(k) != after.get(k)}


def hparams(config: ml_collections.ConfigDict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(to_dict(config)).items()}


def changes_against_workdir(config: ml_collections.ConfigDict, workdir) -> dict[str, tuple]:
    """Training-relevant differences between `config` and the workdir's config.json ({} if none)."""
    from contrastood import workdir as workdir_lib

    path = workdir_lib.as_path(workdir) / "config.json"
    try:
        previous = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    changes = config_changes(previous, to_dict(config), shared_keys_only=True)
    return {k: v for k, v in changes.items() if not k.startswith(RUN_CONTROL_KEYS)}


def check_resumed_config(config: ml_collections.ConfigDict, workdir) -> None:
    """Resuming with a config that changes what is trained is an error unless
    --config.allow_config_change=True (then a warning). Checked before anything is restored or written."""
    import jax

    if jax.process_index() > 0:  # process 0 alone reads config.json: others could read it half-written
        return
    changes = changes_against_workdir(config, workdir)
    if changes:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:10])
        if not config.allow_config_change:
            raise errors.ConfigError(
                f"the workdir {workdir} holds a run started with another config ({listed}); use another --workdir, "
                "or resume it anyway with --config.allow_config_change=True")
        logging.warning("resuming %s with a changed config (allowed by allow_config_change): %s", workdir, listed)


def write_config(config: ml_collections.ConfigDict, workdir) -> None:
    """Writes config.json (process 0, atomically), once the checkpoints it describes are known to fit it."""
    import jax

    from contrastood import workdir as workdir_lib

    if jax.process_index() > 0:
        return
    workdir_lib.atomic_write_text(workdir_lib.as_path(workdir) / "config.json",
                                  json.dumps(to_dict(config), indent=2, sort_keys=True))
