"""CIFAR-style ResNets with a classification head g and a projection head h.

The encoder f follows the CIFAR variant used by SimCLR and Winkens et al.: a 3x3 stem with stride 1
and no max-pool (32x32 inputs would be destroyed by the ImageNet stem), then residual stages whose
widths scale with a width multiplier (ResNet-50 x3 gives the paper's 6144-D features). Larger images
(64 px and up, by default) get the ImageNet stem instead: 7x7 stride 2, then a 3x3 stride-2 max-pool.
The model returns every representation the rest of the system needs by name, so training, feature
extraction and scoring never reach into module internals.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastood import batch_norm, onednn_conv

# Per-channel statistics of the CIFAR-10 training set (in [0, 1]): the default input standardisation.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
STEMS = ("auto", "cifar", "imagenet")

ModuleDef = Any


def _norm(norm, x, residual=None, relu: bool = True):
    """relu(residual + norm(x)) (without the parts left out), in one pass where `norm` is batch_norm.BatchNorm."""
    if isinstance(norm, batch_norm.BatchNorm):
        return norm(x, residual, relu=relu)
    y = norm(x) if residual is None else residual + norm(x)
    return batch_norm.relu(y) if relu else y


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
        y = _norm(self.norm(), y)
        y = self.conv(self.filters, (3, 3))(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), (self.strides, self.strides), name="proj_conv")(residual)
            residual = _norm(self.norm(name="proj_bn"), residual, relu=False)
        # Zero-init the last BN scale so every block starts as the identity (Goyal et al. 2017).
        return _norm(self.norm(scale_init=nn.initializers.zeros), y, residual)


class BottleneckBlock(nn.Module):
    """1x1-3x3-1x1 bottleneck with 4x expansion (ResNet-50)."""

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = _norm(self.norm(), self.conv(self.filters, (1, 1))(x))
        y = _norm(self.norm(), self.conv(self.filters, (3, 3), (self.strides, self.strides))(y))
        y = self.conv(self.filters * 4, (1, 1))(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), (self.strides, self.strides), name="proj_conv")(residual)
            residual = _norm(self.norm(name="proj_bn"), residual, relu=False)
        return _norm(self.norm(scale_init=nn.initializers.zeros), y, residual)


class ContrastiveResNet(nn.Module):
    """Encoder f with heads g (linear -> logits) and h (2-layer MLP with BN -> projection).

    Inputs are float images in [0, 1], NHWC. `dtype` is the compute dtype (bfloat16 for mixed
    precision); parameters and BatchNorm statistics always stay float32, and every output is cast
    back to float32 so losses and OOD statistics are computed in full precision.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    base_filters: int = 64
    width_multiplier: int = 1
    proj_dim: int = 128
    proj_hidden_dim: int | None = None  # None: same as the feature dimension (SimCLR).
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    stem: str = "cifar"  # cifar | imagenet
    mean: Sequence[float] = CIFAR_MEAN  # input standardisation, per channel, for images in [0, 1]
    std: Sequence[float] = CIFAR_STD
    conv_impl: str = "xla"  # xla | onednn | winograd (onednn_conv.resolve): kernels only, the parameters are the same
    norm_impl: str = "fused"  # fused (batch_norm.BatchNorm) | flax (nn.BatchNorm): the same variables

    @nn.compact
    def __call__(self, images, train: bool = False):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected float images [B, H, W, 3], got shape {images.shape}")
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME",
                                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                 conv_general_dilated=(
                                     None if self.conv_impl == "xla" else
                                     functools.partial(onednn_conv.conv_general_dilated,
                                                       winograd=self.conv_impl == "winograd")))
        if self.norm_impl not in batch_norm.IMPLS:
            raise ValueError(f"unknown model.norm {self.norm_impl!r}; choose one of {batch_norm.IMPLS}")
        norm = functools.partial(batch_norm.BatchNorm if self.norm_impl == "fused" else nn.BatchNorm,
                                 use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                                 dtype=self.dtype)
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)

        filters = self.base_filters * self.width_multiplier
        if self.stem == "imagenet":
            x = conv(filters, (7, 7), (2, 2), name="stem_conv")(x)
            x = _norm(norm(name="stem_bn"), x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        else:
            x = conv(filters, (3, 3), name="stem_conv")(x)
            x = _norm(norm(name="stem_bn"), x)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block_cls(filters * 2**i, strides, conv=conv, norm=norm, name=f"stage{i + 1}_block{j + 1}")(x)
        pre_logits = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)  # global average pool: the features f(x)

        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="class_head")(pre_logits)

        hidden = self.proj_hidden_dim or pre_logits.shape[-1]
        h = nn.Dense(hidden, use_bias=False, dtype=self.dtype, name="proj_dense1")(pre_logits)
        h = _norm(norm(name="proj_bn1"), h)
        h = nn.Dense(self.proj_dim, dtype=self.dtype, name="proj_dense2")(h)
        return {
            "pre_logits": pre_logits,
            "proj": h.astype(jnp.float32),
            "logits": logits.astype(jnp.float32),
        }


# name -> (stage sizes, block, base filters)
ARCHITECTURES = {
    "resnet_tiny": ((1, 1, 1), BasicBlock, 16),  # 16-32-64 one block per stage: tests and CPU demos
    "resnet18": ((2, 2, 2, 2), BasicBlock, 64),
    "resnet34": ((3, 4, 6, 3), BasicBlock, 64),
    "resnet50": ((3, 4, 6, 3), BottleneckBlock, 64),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


STEM_MIN_IMAGENET = 64  # model.stem="auto": images this large get the ImageNet stem


def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' -> 'imagenet' for images of STEM_MIN_IMAGENET px and more, else 'cifar'."""
    if stem not in STEMS:
        raise ValueError(f"unknown model.stem {stem!r}; choose one of {STEMS}")
    if stem == "auto":
        return "imagenet" if image_size >= STEM_MIN_IMAGENET else "cifar"
    return stem


def create_model(model_config, num_classes: int, *, image_size: int = 32, mean: Sequence[float] = CIFAR_MEAN,
                 std: Sequence[float] = CIFAR_STD) -> ContrastiveResNet:
    """Builds the model named in `config.model` (name, width, stem, proj_dim, proj_hidden_dim, dtype, conv, norm)."""
    name = model_config.name
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model.name {name!r}; choose one of {sorted(ARCHITECTURES)}")
    if model_config.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {model_config.dtype!r}; choose one of {sorted(DTYPES)}")
    stage_sizes, block_cls, base_filters = ARCHITECTURES[name]
    return ContrastiveResNet(
        stage_sizes=stage_sizes,
        block_cls=block_cls,
        num_classes=num_classes,
        base_filters=base_filters,
        width_multiplier=int(model_config.width),
        proj_dim=int(model_config.proj_dim),
        proj_hidden_dim=model_config.get("proj_hidden_dim") or None,
        dtype=DTYPES[model_config.dtype],
        stem=resolve_stem(model_config.get("stem", "cifar"), image_size),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        conv_impl=onednn_conv.resolve(model_config.get("conv", "auto"), jax.default_backend()),
        norm_impl=model_config.get("norm", "fused"),
    )


def from_config(config, *, num_classes: int | None = None, train_source=None) -> ContrastiveResNet:
    """The model a full config describes; data.mean/std = () are measured on `train_source`."""
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    if not mean:
        if train_source is None:
            raise ValueError("data.mean=() needs the training data to measure the input statistics")
        from contrastood.data import pipeline

        mean, std = pipeline.channel_statistics(train_source, config.data.image_size)
    return create_model(config.model, config.data.num_classes if num_classes is None else num_classes,
                        image_size=config.data.image_size, mean=mean, std=std)


def feature_dim(model: ContrastiveResNet) -> int:
    """Dimension of `pre_logits` (e.g. 6144 for ResNet-50 x3)."""
    last = model.base_filters * model.width_multiplier * 2 ** (len(model.stage_sizes) - 1)
    return last * model.block_cls.expansion
