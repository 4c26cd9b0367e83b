r"""PyTorch reference of contrastood's train step, to compare speed with PyTorch on the same machine.

  python benchmarks/torch_reference.py                                   # tiny + resnet18, batch 128
  python benchmarks/torch_reference.py --models=resnet18 --modes=fp32_cl,bf16_cl --augment=on --steps=5
  python benchmarks/torch_reference.py --device=cuda --compile --repeats=5 --json=torch.json
  python benchmarks/torch_reference.py --supervised --supervised_augment=simclr   # = train_throughput --supervised

What one step does (the same work as `contrastood.train.make_train_step`, contrastive stage 2):
two SimCLR views of every image made on the device with batched tensor ops (random resized crop
through affine_grid + bilinear grid_sample, horizontal flip, colour jitter with p = 0.8 in a random
order per example, grayscale with p = 0.2, as `contrastood/augment.py`), ONE forward of the 2B views
(BatchNorm statistics over all 2B, like the JAX step), NT-Xent over the 2B projections (Eq. 1),
label-smoothed cross-entropy on the logits of both views, loss = (L_con + lambda L_class) / (1 + lambda),
backward, global gradient norm, and a LARS update (momentum 0.9, weight decay 1e-6, BN parameters and
biases excluded from decay and trust ratio, as `optax.lars` with the masks of `contrastood.train`),
written with torch._foreach_* ops. `--supervised`: one view, cross-entropy only.

Units are those of benchmarks/train_throughput.py: "img/s" counts source images, "passes/s" counts
augmented views through forward + backward (2 per image in the contrastive step, 1 supervised).
Note that train_throughput.py's --supervised uses ONE SimCLR view (config.train.augmentation is
"simclr" there); this script's --supervised defaults to the standard pad-4 crop + flip, so pass
--supervised_augment=simclr for the like-for-like row.

Modes: fp32 (NCHW), fp32_cl (channels_last), bf16_cl (torch.autocast bfloat16 + channels_last; float32
master weights, BN statistics and losses). On a CPU bf16 runs only where the CPU has bf16 hardware
(amx_bf16 or avx512_bf16 in /proc/cpuinfo) unless --force_bf16; on CUDA it always runs. --compile adds
a torch.compile variant of each mode (augmentation, forward + loss, and the LARS update are compiled;
backward runs the AOT-compiled graph); each compiled variant runs in a child process so that
--compile_timeout_s can stop a compilation that takes too long (the limit covers the child's start-up
and warm-up steps, which is where compilation happens).

Deliberate differences from the JAX model that do not change the cost: stride-2 3x3 convolutions pad
(1, 1) like every PyTorch ResNet where XLA's "SAME" pads (0, 1); the crop resample clamps at the image
border (grid_sample padding_mode="border") where contrastood clamps at the crop border; the random
numbers come from torch's generator, not JAX keys. Parameter counts are identical (tested in
tests/test_torch_reference.py), so both sides do the same FLOPs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrastood import cpu_isa  # noqa: E402  (no JAX in it)

# Per-channel CIFAR-10 statistics, as contrastood/models.py (copied: this script must not need JAX).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MODES = ("fp32", "fp32_cl", "bf16_cl")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                      "amx_tile", "amx_bf16", "amx_int8")


# ============================================================================ model


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)
    # = flax variance_scaling(2.0, "fan_out", "normal"), contrastood's conv kernel_init.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _bn(channels: int, zero_init: bool = False, dims: int = 2) -> nn.Module:
    # torch momentum 0.1 == flax momentum 0.9 (running = 0.9 running + 0.1 batch).
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, eps=1e-5, momentum=0.1)
    if zero_init:  # the last BN of every block starts at zero: each block is the identity at init
        nn.init.zeros_(bn.weight)
    return bn


def _dense(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    dense = nn.Linear(in_features, out_features, bias=bias)
    # = flax's default Dense init, lecun_normal: truncated normal (+-2 sd), variance 1 / fan_in.
    std = math.sqrt(1.0 / in_features) / 0.87962566103423978
    nn.init.trunc_normal_(dense.weight, 0.0, std, -2 * std, 2 * std)
    if bias:
        nn.init.zeros_(dense.bias)
    return dense


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, filters: int, stride: int):
        super().__init__()
        self.conv1 = _conv(in_channels, filters, 3, stride)
        self.bn1 = _bn(filters)
        self.conv2 = _conv(filters, filters, 3)
        self.bn2 = _bn(filters, zero_init=True)
        self.proj_conv = self.proj_bn = None
        if stride != 1 or in_channels != filters:
            self.proj_conv = _conv(in_channels, filters, 1, stride)
            self.proj_bn = _bn(filters)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        residual = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return F.relu(y + residual, inplace=True)


class BottleneckBlock(nn.Module):
    """1x1-3x3-1x1 bottleneck with 4x expansion, stride on the 3x3 (ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, filters: int, stride: int):
        super().__init__()
        out = filters * self.expansion
        self.conv1 = _conv(in_channels, filters, 1)
        self.bn1 = _bn(filters)
        self.conv2 = _conv(filters, filters, 3, stride)
        self.bn2 = _bn(filters)
        self.conv3 = _conv(filters, out, 1)
        self.bn3 = _bn(out, zero_init=True)
        self.proj_conv = self.proj_bn = None
        if stride != 1 or in_channels != out:
            self.proj_conv = _conv(in_channels, out, 1, stride)
            self.proj_bn = _bn(out)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        residual = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return F.relu(y + residual, inplace=True)


class ContrastiveResNet(nn.Module):
    """contrastood.models.ContrastiveResNet in PyTorch: CIFAR ResNet f, class head g, projection head h.

    `forward(images)` takes NHWC images like the flax model (uint8 0..255 or float in [0, 1]);
    `forward_nchw(x)` takes float NCHW in [0, 1] (what the augmentation produces). Both normalise
    by the CIFAR mean/std inside the model and return float32 pre_logits / logits / proj.
    """

    def __init__(self, stage_sizes, block, num_classes: int, base_filters: int = 64, width: int = 1,
                 proj_dim: int = 128, proj_hidden_dim: int | None = None):
        super().__init__()
        filters = base_filters * width
        self.stem_conv = _conv(3, filters, 3)
        self.stem_bn = _bn(filters)
        blocks, channels = [], filters
        for i, num_blocks in enumerate(stage_sizes):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, filters * 2**i, stride))
                channels = filters * 2**i * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = channels
        self.class_head = _dense(channels, num_classes)
        hidden = proj_hidden_dim or channels
        self.proj_dense1 = _dense(channels, hidden, bias=False)
        self.proj_bn1 = _bn(hidden, dims=1)
        self.proj_dense2 = _dense(hidden, proj_dim)
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.contiguous_format

    def set_memory_format(self, memory_format: torch.memory_format) -> "ContrastiveResNet":
        self.to(memory_format=memory_format)
        self.memory_format = memory_format
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)
        x = x.float() / 255.0 if images.dtype == torch.uint8 else x.float()
        return self.forward_nchw(x)

    def forward_nchw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.contiguous(memory_format=self.memory_format)
        x = (x - self.mean) / self.std
        x = F.relu(self.stem_bn(self.stem_conv(x)), inplace=True)
        x = self.blocks(x)
        pre_logits = torch.mean(x, dim=(2, 3), dtype=torch.float32)  # global average pool: f(x)
        logits = self.class_head(pre_logits)
        h = F.relu(self.proj_bn1(self.proj_dense1(pre_logits)), inplace=True)
        proj = self.proj_dense2(h)
        return {"pre_logits": pre_logits, "logits": logits.float(), "proj": proj.float()}


# name -> (stage sizes, block, base filters), as contrastood.models.ARCHITECTURES
ARCHITECTURES = {
    "resnet_tiny": ((1, 1, 1), BasicBlock, 16),
    "resnet18": ((2, 2, 2, 2), BasicBlock, 64),
    "resnet34": ((3, 4, 6, 3), BasicBlock, 64),
    "resnet50": ((3, 4, 6, 3), BottleneckBlock, 64),
}


def create_model(name: str, width: int = 1, num_classes: int = 10, proj_dim: int = 128,
                 proj_hidden_dim: int | None = None) -> ContrastiveResNet:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}")
    stage_sizes, block, base_filters = ARCHITECTURES[name]
    return ContrastiveResNet(stage_sizes, block, num_classes, base_filters, int(width), int(proj_dim),
                             proj_hidden_dim or None)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics are buffers, like flax's batch_stats)."""
    return sum(p.numel() for p in model.parameters())


# ============================================================================ augmentation

# Slots of the per-example uniform draw, as contrastood/augment.py.
_CROP_ATTEMPTS = 10
_CROP_UNIFORMS = 2 * _CROP_ATTEMPTS + 2
_FLIP, _COLOR_APPLY, _GRAY_APPLY = range(_CROP_UNIFORMS, _CROP_UNIFORMS + 3)
_JITTER_START = _CROP_UNIFORMS + 3
_NUM_UNIFORMS = _JITTER_START + 8
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)


def _lerp(u, low, high):
    return low + u * (high - low)


def _wrap(x, period: float):
    return x - period * torch.floor(x / period)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> HSV with hue in [0, 1] (tf.image convention), channel dim 1."""
    red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    value = rgb.amax(dim=1)
    chroma = value - rgb.amin(dim=1)
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == red, _wrap((green - blue) / safe_chroma, 6.0),
                      torch.where(value == green, (blue - red) / safe_chroma + 2.0,
                                  (red - green) / safe_chroma + 4.0))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = _wrap(n + 6.0 * hue, 6.0)
    return value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hsv(image: torch.Tensor, saturation_factor: torch.Tensor, hue_delta: torch.Tensor) -> torch.Tensor:
    """tf.image.adjust_saturation + adjust_hue in one HSV round trip; per-example [N] factors."""
    hsv = rgb_to_hsv(image)
    hue = _wrap(hsv[:, 0] + hue_delta.view(-1, 1, 1), 1.0)
    saturation = torch.clamp(hsv[:, 1] * saturation_factor.view(-1, 1, 1), 0.0, 1.0)
    return hsv_to_rgb(torch.stack([hue, saturation, hsv[:, 2]], dim=1))


def adjust_contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = image.mean(dim=(2, 3), keepdim=True)
    return (image - mean) * factor.view(-1, 1, 1, 1) + mean


def to_grayscale(image: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GRAYSCALE_WEIGHTS, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    return (image * weights).sum(dim=1, keepdim=True).expand_as(image)


def _crop_theta(u: torch.Tensor, height: int, width: int, area_range, aspect_range, flip: torch.Tensor):
    """Affine grids' theta [N, 2, 3] of SimCLR's random resized crop (first of 10 proposals that fits,
    else the whole image; integer box), mirrored horizontally where `flip`."""
    area = _lerp(u[:, :_CROP_ATTEMPTS], *area_range) * (height * width)
    aspect = torch.exp(_lerp(u[:, _CROP_ATTEMPTS:2 * _CROP_ATTEMPTS],
                             math.log(aspect_range[0]), math.log(aspect_range[1])))
    crop_h = torch.round(torch.sqrt(area / aspect))
    crop_w = torch.round(torch.sqrt(area * aspect))
    fits = (crop_h >= 1) & (crop_h <= height) & (crop_w >= 1) & (crop_w <= width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first True
    any_fit = fits.any(dim=1)
    crop_h = torch.where(any_fit, crop_h.gather(1, first).squeeze(1), torch.full_like(any_fit, height, dtype=u.dtype))
    crop_w = torch.where(any_fit, crop_w.gather(1, first).squeeze(1), torch.full_like(any_fit, width, dtype=u.dtype))
    top = torch.minimum(torch.floor(u[:, 2 * _CROP_ATTEMPTS] * (height - crop_h + 1)), height - crop_h)
    left = torch.minimum(torch.floor(u[:, 2 * _CROP_ATTEMPTS + 1] * (width - crop_w + 1)), width - crop_w)
    # Output pixel centre x_out (normalised, align_corners=False) samples the source at
    # x_src = (w / W) x_out + (2 left + w) / W - 1, i.e. pixel left + (i + 0.5) w / W - 0.5.
    sign = torch.where(flip, -torch.ones_like(crop_w), torch.ones_like(crop_w))
    zeros = torch.zeros_like(crop_w)
    row_x = torch.stack([sign * crop_w / width, zeros, (2 * left + crop_w) / width - 1], dim=-1)
    row_y = torch.stack([zeros, crop_h / height, (2 * top + crop_h) / height - 1], dim=-1)
    return torch.stack([row_x, row_y], dim=1)


def simclr_augment(x: torch.Tensor, crop_area=(0.08, 1.0), crop_aspect=(3 / 4, 4 / 3), flip: bool = True,
                   color_strength: float = 0.5, color_prob: float = 0.8, grayscale_prob: float = 0.2,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One SimCLR view of every image of a float [N, 3, H, W] batch in [0, 1], all in batched ops:
    crop + resize (bilinear) + flip, colour jitter (random order, clip after each op), grayscale."""
    n, _, height, width = x.shape
    u = torch.rand(n, _NUM_UNIFORMS, device=x.device, generator=generator)
    do_flip = u[:, _FLIP] < 0.5 if flip else torch.zeros(n, dtype=torch.bool, device=x.device)
    theta = _crop_theta(u, height, width, crop_area, crop_aspect, do_flip)
    grid = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
    image = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if color_prob > 0 and color_strength > 0:
        j = u[:, _JITTER_START:]
        max_delta = 0.8 * color_strength
        brightness = _lerp(j[:, 0], -max_delta, max_delta).view(-1, 1, 1, 1)  # SimCLR v1: additive
        contrast = _lerp(j[:, 1], 1.0 - max_delta, 1.0 + max_delta)
        saturation = _lerp(j[:, 2], 1.0 - max_delta, 1.0 + max_delta)
        hue = _lerp(j[:, 3], -0.2 * color_strength, 0.2 * color_strength)
        order = torch.argsort(j[:, 4:8], dim=1)
        ones, zeros = torch.ones_like(saturation), torch.zeros_like(hue)
        jittered = image
        for step in range(4):  # every candidate is computed and one selected, like the vmapped JAX code
            op = order[:, step]
            hsv = adjust_hsv(jittered, torch.where(op == _SATURATION, saturation, ones),
                             torch.where(op == _HUE, hue, zeros))
            op4 = op.view(-1, 1, 1, 1)
            jittered = torch.where(op4 == _BRIGHTNESS, jittered + brightness,
                                   torch.where(op4 == _CONTRAST, adjust_contrast(jittered, contrast), hsv))
            jittered = torch.clamp(jittered, 0.0, 1.0)
        image = torch.where((u[:, _COLOR_APPLY] < color_prob).view(-1, 1, 1, 1), jittered, image)
    if grayscale_prob > 0:
        image = torch.where((u[:, _GRAY_APPLY] < grayscale_prob).view(-1, 1, 1, 1), to_grayscale(image), image)
    return torch.clamp(image, 0.0, 1.0)


def to_float_nchw(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 255.0


def two_views(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[2B, 3, H, W]: rows i and B + i are two independent SimCLR views of image i."""
    x = to_float_nchw(images_uint8)
    return simclr_augment(torch.cat([x, x]), generator=generator)


def standard_augment(images_uint8: torch.Tensor, pad: int = 4,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """CIFAR augmentation (zero-pad by `pad`, random crop, flip p = 0.5) as one gather: [B, 3, H, W]."""
    batch, height, width, _ = images_uint8.shape
    x = F.pad(images_uint8.float() / 255.0, (0, 0, pad, pad, pad, pad))
    u = torch.rand(batch, 3, device=x.device, generator=generator)
    top = torch.floor(u[:, 0] * (2 * pad + 1)).long().clamp_max(2 * pad)
    left = torch.floor(u[:, 1] * (2 * pad + 1)).long().clamp_max(2 * pad)
    rows = top[:, None] + torch.arange(height, device=x.device)
    cols = left[:, None] + torch.arange(width, device=x.device)
    cols = torch.where((u[:, 2] < 0.5)[:, None], cols.flip(1), cols)
    out = x[torch.arange(batch, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


# ============================================================================ losses


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float):
    """contrastood.losses.nt_xent (Eq. 1) in float32: mean over the 2N anchors of
    -log exp(sim(z_i, z_pos) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau). -> (loss, accuracy)."""
    with torch.autocast(device_type=z1.device.type, enabled=False):
        n = z1.shape[0]
        z = torch.cat([z1, z2]).float()
        z = z / torch.clamp(torch.linalg.vector_norm(z, dim=-1, keepdim=True), min=1e-12)
        sim = (z @ z.T) / temperature
        idx = torch.arange(2 * n, device=z.device)
        positive = (idx + n) % (2 * n)
        logits = sim.masked_fill(idx[:, None] == idx[None, :], float("-inf"))
        log_prob = logits[idx, positive] - torch.logsumexp(logits, dim=-1)
        loss = -log_prob.mean()
        accuracy = (logits.argmax(dim=-1) == positive).float().mean()
    return loss, accuracy


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float):
    """Cross-entropy against (1 - eps) one_hot + eps / k (= optax.smooth_labels). -> (loss, accuracy)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy


# ============================================================================ LARS


def lars_update(decay_params, decay_grads, decay_bufs, other_params, other_grads, other_bufs, *,
                lr: float, momentum: float, weight_decay: float, trust_coefficient: float, eps: float) -> None:
    """In-place optax.lars step (add_decayed_weights -> trust ratio -> -lr -> trace, no Nesterov):
    kernels (ndim > 1) get weight decay and the trust ratio, BN parameters and biases neither."""
    if decay_params:
        updates = torch._foreach_add(decay_grads, decay_params, alpha=weight_decay)
        param_norm = torch.stack(torch._foreach_norm(decay_params))
        update_norm = torch.stack(torch._foreach_norm(updates))
        ratio = trust_coefficient * param_norm / (update_norm + eps)
        ratio = torch.where((param_norm == 0) | (update_norm == 0), torch.ones_like(ratio), ratio)
        torch._foreach_mul_(updates, list((-lr * ratio).unbind(0)))
        torch._foreach_mul_(decay_bufs, momentum)
        torch._foreach_add_(decay_bufs, updates)
        torch._foreach_add_(decay_params, decay_bufs)
    if other_params:
        torch._foreach_mul_(other_bufs, momentum)
        torch._foreach_add_(other_bufs, other_grads, alpha=-lr)
        torch._foreach_add_(other_params, other_bufs)


class LARS:
    """Holds the momentum buffers; `step()` applies `lars_update` to the current .grad of each param."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, eps: float = 0.0, update_fn=lars_update):
        params = [p for p in params if p.requires_grad]
        self.decay_params = [p for p in params if p.ndim > 1]
        self.other_params = [p for p in params if p.ndim <= 1]
        self.decay_bufs = [torch.zeros_like(p) for p in self.decay_params]
        self.other_bufs = [torch.zeros_like(p) for p in self.other_params]
        self.hparams = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                            trust_coefficient=trust_coefficient, eps=eps)
        self.update_fn = update_fn

    @torch.no_grad()
    def step(self) -> None:
        self.update_fn(self.decay_params, [p.grad for p in self.decay_params], self.decay_bufs,
                       self.other_params, [p.grad for p in self.other_params], self.other_bufs, **self.hparams)

    def zero_grad(self) -> None:
        for p in self.decay_params + self.other_params:
            p.grad = None


# ============================================================================ the step


class TrainStep:
    """One training step of contrastood on a uint8 batch already on the device.

    `step(images, labels, views=None)`: with `views` (pre-made, float NCHW) the augmentation is
    skipped (--augment=off). Returns a dict of 0-d tensors (never synchronises by itself).
    """

    def __init__(self, model: ContrastiveResNet, *, contrastive: bool = True, supervised_augment: str = "standard",
                 bf16: bool = False, lr: float = 0.5, momentum: float = 0.9, weight_decay: float = 1e-6,
                 temperature: float = 1.0, class_weight: float = 100.0, label_smoothing: float = 0.01,
                 compile: bool = False, compile_mode: str = "default"):
        self.model = model.train()
        self.contrastive = contrastive
        self.supervised_augment = supervised_augment
        self.bf16 = bf16
        self.temperature = temperature
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.device_type = next(model.parameters()).device.type
        update_fn, views_fn, loss_fn = lars_update, self._make_views, self._loss
        if compile:
            kwargs = dict(mode=None if compile_mode == "default" else compile_mode, dynamic=False)
            update_fn = torch.compile(lars_update, **kwargs)
            views_fn = torch.compile(self._make_views, **kwargs)
            loss_fn = torch.compile(self._loss, **kwargs)
        self.optimizer = LARS(model.parameters(), lr, momentum, weight_decay, update_fn=update_fn)
        self.views_fn, self.loss_fn = views_fn, loss_fn
        self._zero_grads: dict[int, torch.Tensor] = {}

    @property
    def views_per_image(self) -> int:
        return 2 if self.contrastive else 1

    def _make_views(self, images_uint8):
        if self.contrastive:
            return two_views(images_uint8)
        if self.supervised_augment == "standard":
            return standard_augment(images_uint8)
        return simclr_augment(to_float_nchw(images_uint8))

    def make_views(self, images_uint8: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.views_fn(images_uint8)

    def _loss(self, views, labels):
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.model.forward_nchw(views)
        metrics = {}
        if self.contrastive:
            z1, z2 = outputs["proj"].chunk(2)
            con_loss, con_acc = nt_xent(z1, z2, self.temperature)
            class_loss, accuracy = smoothed_cross_entropy(outputs["logits"], torch.cat([labels, labels]),
                                                          self.label_smoothing)
            loss = (con_loss + self.class_weight * class_loss) / (1.0 + self.class_weight)
            metrics.update(contrastive_loss=con_loss.detach(), contrastive_accuracy=con_acc)
        else:
            class_loss, accuracy = smoothed_cross_entropy(outputs["logits"], labels, self.label_smoothing)
            loss = class_loss
        metrics.update(class_loss=class_loss.detach(), accuracy=accuracy)
        return loss, metrics

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, views: torch.Tensor | None = None) -> dict:
        if views is None:
            views = self.make_views(images)
        loss, metrics = self.loss_fn(views, labels)
        loss.backward()
        with torch.no_grad():
            params = self.optimizer.decay_params + self.optimizer.other_params
            for p in params:  # unused in the loss (the projection head when --supervised): zero, as jax.grad
                if p.grad is None:
                    p.grad = self._zero_grads.setdefault(id(p), torch.zeros_like(p))
            grads = [p.grad for p in params]
            metrics["grad_norm"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.optimizer.step()
        self.optimizer.zero_grad()
        metrics["loss"] = loss.detach()
        return metrics


# ============================================================================ machine description


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo, less those above an ONEDNN_MAX_CPU_ISA cap
    (contrastood.cpu_isa; PyTorch's oneDNN obeys it); (platform.processor(), {}) without it."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = cpu_isa.allowed(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def cpu_has_bf16(flags: set[str]) -> bool:
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_meta(device: torch.device, threads: int) -> dict:
    cpu_name, flags = cpu_info()
    meta = dict(torch_version=torch.__version__, python=platform.python_version(), device=device.type,
                cpu_model=cpu_name, cpu_flags=[f for f in REPORTED_CPU_FLAGS if f in flags],
                cpu_bf16_hardware=cpu_has_bf16(flags), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                isa_cap=cpu_isa.cap(),
                threads=threads, cpu_count=os.cpu_count(), mkldnn=torch.backends.mkldnn.is_available(),
                loadavg_1m_at_start=_loadavg())
    if device.type == "cuda":
        meta.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                    conv_fp32_precision=_get_precision("conv"), matmul_fp32_precision=_get_precision("matmul"))
    else:
        meta.update(device_name=cpu_name)
    return meta


def _loadavg() -> float | None:
    """1-minute load average when the run starts: other work on the CPUs skews CPU timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _get_precision(kind: str) -> str:
    try:
        return (torch.backends.cudnn.conv if kind == "conv" else torch.backends.cuda.matmul).fp32_precision
    except AttributeError:  # torch < 2.9
        return "tf32" if (torch.backends.cudnn.allow_tf32 if kind == "conv"
                          else torch.backends.cuda.matmul.allow_tf32) else "ieee"


def _set_tf32(enabled: bool) -> None:
    value = "tf32" if enabled else "ieee"
    try:
        torch.backends.cudnn.conv.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value
    except AttributeError:  # torch < 2.9
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


# ============================================================================ benchmark


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_row(args, model_name: str, mode: str, augment: bool, compiled: bool, device: torch.device) -> dict:
    """Builds the model and step for one configuration, warms up, times; returns the row dict."""
    torch.manual_seed(args.seed)
    model = create_model(model_name, args.width, args.num_classes, args.proj_dim).to(device)
    model.set_memory_format(torch.channels_last if mode.endswith("_cl") else torch.contiguous_format)
    step = TrainStep(model, contrastive=not args.supervised, supervised_augment=args.supervised_augment,
                     bf16=mode.startswith("bf16"), lr=args.learning_rate, temperature=args.temperature,
                     class_weight=args.class_weight, label_smoothing=args.label_smoothing,
                     compile=compiled, compile_mode=args.compile_mode)
    rng = np.random.default_rng(args.seed)
    images = torch.from_numpy(rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8)).to(device)
    labels = torch.from_numpy(rng.integers(0, args.num_classes, args.batch_size)).long().to(device)
    views = None if augment else step.make_views(images)  # --augment=off: fed the same pre-made views
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        metrics = step(images, labels, views)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if compiled:
        print(f"@@COMPILED {warmup_s:.3f}", flush=True)
    if not all(bool(torch.isfinite(v)) for v in metrics.values()):
        raise FloatingPointError(f"non-finite metrics after warm-up: { {k: float(v) for k, v in metrics.items()} }")
    block_s, cpu_use = [], []
    for _ in range(args.repeats):
        _sync(device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            metrics = step(images, labels, views)
        _sync(device)
        wall = time.perf_counter() - t0
        block_s.append(wall / args.steps)
        # CPU seconds of this process per wall second per thread: well under 1 on a CPU run means
        # the threads were waiting for cores that other work held, and the timing is skewed.
        cpu_use.append((time.process_time() - cpu0) / (wall * args.threads))
    step_s = statistics.median(block_s)
    views_per_image = step.views_per_image
    return dict(model=model_name, width=args.width, batch=args.batch_size, mode=mode,
                dtype="bfloat16" if mode.startswith("bf16") else "float32",
                memory_format="channels_last" if mode.endswith("_cl") else "NCHW", compiled=compiled,
                augment="on" if augment else "off", supervised=bool(args.supervised),
                augmentation=("simclr" if not args.supervised else args.supervised_augment),
                views=views_per_image, params=count_parameters(model), step_s=step_s, best_step_s=min(block_s),
                block_step_s=block_s, warmup_s=warmup_s, warmup_steps=args.warmup, steps=args.steps,
                repeats=args.repeats, cpu_use=statistics.median(cpu_use), img_s=args.batch_size / step_s,
                passes_s=views_per_image * args.batch_size / step_s, loss=float(metrics["loss"]))


def _run_compiled_child(args, model_name: str, mode: str, augment: bool) -> dict:
    """Runs one compiled configuration in a child process (its own session, so a compilation past
    --compile_timeout_s is stopped together with inductor's worker processes)."""
    spec = json.dumps(dict(args=vars(args), model=model_name, mode=mode, augment=augment))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_child", spec],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    stderr_tail: list[str] = []

    def read_stdout():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def read_stderr():
        for line in proc.stderr:
            stderr_tail.append(line)
            del stderr_tail[:-40]

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + args.compile_timeout_s
    compiled, result = False, None
    try:
        while True:
            timeout = None if compiled else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                break
            if line.startswith("@@COMPILED"):
                compiled = True
            elif line.startswith("@@RESULT "):
                result = json.loads(line[len("@@RESULT "):])
    except TimeoutError:
        return dict(skipped=f"compilation (start-up + {args.warmup} warm-up steps) exceeded "
                            f"--compile_timeout_s={args.compile_timeout_s:g}")
    finally:  # on a timeout or an interrupt: stop the child's own process group (start_new_session)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for reader in readers:
        reader.join(timeout=5)
    if result is not None and proc.returncode == 0:
        return result
    tail = "".join(stderr_tail).strip().splitlines()
    reason = next((l for l in reversed(tail) if l.strip()), f"exit status {proc.returncode}")
    stage = "the timed steps" if compiled else "compilation"
    return dict(skipped=f"{stage} failed (exit {proc.returncode}): {reason[:300]}")


def _child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    args = argparse.Namespace(**spec["args"])
    device = _setup(args)
    row = benchmark_row(args, spec["model"], spec["mode"], spec["augment"], True, device)
    print("@@RESULT " + json.dumps(row), flush=True)


def _setup(args) -> torch.device:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
        if args.tf32 != "default":
            _set_tf32(args.tf32 == "on")
    return device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet_tiny,resnet18", help=f"comma-separated: {','.join(ARCHITECTURES)}")
    parser.add_argument("--batch_size", "--batch", type=int, default=128, help="source images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 3 CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed blocks of --steps; step s is their median, best s their minimum "
                             "(default: 1 CPU, 5 CUDA)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {','.join(MODES)}")
    parser.add_argument("--augment", default="both", choices=["on", "off", "both"],
                        help="off: the step is fed pre-made views (shows the augmentation's share)")
    parser.add_argument("--supervised", action="store_true", help="one view, class loss only")
    parser.add_argument("--supervised_augment", default="standard", choices=["standard", "simclr"],
                        help="--supervised views: pad-4 crop + flip, or one SimCLR view (= train_throughput.py)")
    parser.add_argument("--width", type=int, default=1, help="width multiplier")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--proj_dim", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="tau of NT-Xent")
    parser.add_argument("--class_weight", type=float, default=100.0, help="lambda")
    parser.add_argument("--label_smoothing", type=float, default=0.01)
    parser.add_argument("--learning_rate", type=float, default=0.5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable cores)")
    parser.add_argument("--force_bf16", action="store_true", help="run bf16_cl on a CPU without bf16 hardware")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants of every mode")
    parser.add_argument("--compile_mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    parser.add_argument("--compile_timeout_s", type=float, default=300.0,
                        help="per compiled variant: start-up + warm-up (compilation) limit, then skipped")
    parser.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                        help="CUDA float32 convs/matmuls in TF32 (default: PyTorch's, conv tf32, matmul ieee)")
    parser.add_argument("--cudnn_benchmark", type=int, default=1, choices=[0, 1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the rows and the machine description here")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        return args
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device={args.device} but torch {torch.__version__} sees no CUDA device")
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.repeats = (5 if cuda else 1) if args.repeats is None else args.repeats
    args.threads = args.threads or default_threads()
    for name in args.models.split(","):
        if name not in ARCHITECTURES:
            parser.error(f"unknown model {name!r}; choose from {','.join(ARCHITECTURES)}")
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {','.join(MODES)}")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or args.batch_size < 2:
        parser.error("--warmup, --steps and --repeats must be >= 1 and --batch_size >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._child:
        _child_main(args._child)
        return
    device = _setup(args)
    meta = machine_meta(device, args.threads)
    print(f"torch {meta['torch_version']} on {device.type} ({meta['device_name']}); CPU {meta['cpu_model']!r}, "
          f"flags {' '.join(meta['cpu_flags']) or '-'}, torch CPU capability {meta['cpu_capability']}, "
          f"{args.threads} threads of {meta['cpu_count']} CPUs, load average {meta['loadavg_1m_at_start'] or float('nan'):.2f}")
    modes = args.modes.split(",")
    if device.type == "cpu" and "bf16_cl" in modes and not meta["cpu_bf16_hardware"]:
        if args.force_bf16:
            print("bf16_cl: this CPU has no bf16 hardware (no amx_bf16/avx512_bf16); running anyway (--force_bf16)")
        else:
            print("bf16_cl: skipped, this CPU has no bf16 hardware (no amx_bf16 or avx512_bf16 in "
                  "/proc/cpuinfo); autocast would emulate bfloat16. --force_bf16 runs it anyway")
            modes.remove("bf16_cl")
    augments = {"on": [True], "off": [False], "both": [True, False]}[args.augment]
    step_kind = ("supervised, 1 view, " + args.supervised_augment + " augmentation" if args.supervised
                 else "contrastive + supervised, 2 SimCLR views")
    print(f"step: {step_kind}; warm-up {args.warmup}, {args.repeats} x {args.steps} timed steps "
          f"(step s = median of repeats, best s = min; CPU use = process CPU time / (wall x threads))")
    header = (f"{'model':<12} {'width':>5} {'batch':>5} {'mode':<16} {'augment':<7} {'views':>5} {'step s':>8} "
              f"{'best s':>8} {'img/s':>8} {'passes/s':>8} {'warm-up s':>9} {'CPU use':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for model_name in args.models.split(","):
        for mode in modes:
            for compiled in ([False, True] if args.compile else [False]):
                for augment in augments:
                    label = mode + ("+compile" if compiled else "")
                    if compiled:
                        row = _run_compiled_child(args, model_name, mode, augment)
                    else:
                        try:
                            row = benchmark_row(args, model_name, mode, augment, False, device)
                        except (RuntimeError, FloatingPointError) as error:  # e.g. out of memory
                            row = dict(skipped=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    base = dict(model=model_name, width=args.width, batch=args.batch_size, mode=mode,
                                compiled=compiled, augment="on" if augment else "off")
                    row = {**base, **row, "mode_label": label}
                    rows.append(row)
                    prefix = (f"{model_name:<12} {args.width:>5} {args.batch_size:>5} {label:<16} "
                              f"{row['augment']:<7}")
                    if "skipped" in row:
                        print(f"{prefix} skipped: {row['skipped']}", flush=True)
                    else:
                        print(f"{prefix} {row['views']:>5} {row['step_s']:>8.4f} {row['best_step_s']:>8.4f} "
                              f"{row['img_s']:>8.1f} {row['passes_s']:>8.1f} {row['warmup_s']:>9.1f} "
                              f"{row['cpu_use']:>7.0%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, args={k: v for k, v in vars(args).items() if k != "_child"}, results=rows),
                      f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
