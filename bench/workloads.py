"""The benchmark's workloads, all with random data generated here.

Each model's result must not depend on how the batch is split, so that a
data-parallel step can be checked against the bare module on the same batch:
no BatchNorm (its statistics would be per replica, as in nn.DataParallel) --
the CNN uses GroupNorm -- and no dropout (replicas draw different random
numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

import dpfast
from torch import nn
from torch.nn import functional as F

SIZES = ("tiny", "small", "base", "large")
NUM_CLASSES = 10


@dataclass
class Workload:
    name: str
    size: str
    description: str
    config: Dict[str, int]
    default_batch_size: int
    build_module: Callable[[], nn.Module]
    make_inputs: Callable[[int, torch.Generator], torch.Tensor]

    def build(self, seed: int) -> nn.Module:
        """The same initial weights for every system: built under a fixed seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build_module()

    def make_batch(self, batch_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs and class targets on the CPU; the same seed gives the same batch."""
        generator = torch.Generator().manual_seed(seed)
        inputs = self.make_inputs(batch_size, generator)
        targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        return inputs, targets

    @staticmethod
    def loss(outputs, targets: torch.Tensor) -> torch.Tensor:
        # A mean over the whole batch: the same number however the batch was split. Outputs left
        # on the replicas (DataParallel(..., gather=False)) get it next to each replica's output.
        if isinstance(outputs, dpfast.ReplicaOutputs):
            return dpfast.ParallelCriterion(nn.CrossEntropyLoss())(outputs, targets)
        return F.cross_entropy(outputs, targets)


# -- MLP: many small matmuls, so per-step overheads dominate ----------------------------------------

MLP_SIZES = {"tiny": dict(width=64, depth=2), "small": dict(width=512, depth=4), "base": dict(width=2048, depth=8),
             "large": dict(width=4096, depth=8)}


def mlp(size: str) -> Workload:
    cfg = MLP_SIZES[size]

    def build():
        layers = []
        for _ in range(cfg["depth"]):
            layers += [nn.Linear(cfg["width"], cfg["width"]), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(cfg["width"], NUM_CLASSES))

    return Workload("mlp", size, f"MLP, {cfg['depth']} hidden layers of {cfg['width']}", cfg,
                    {"tiny": 32, "small": 256, "base": 1024, "large": 1024}[size], build,
                    lambda batch, g: torch.randn(batch, cfg["width"], generator=g))


# -- ResNet-style CNN ------------------------------------------------------------------------------

CNN_SIZES = {
    "tiny": dict(image=16, channels=8, stages=2, blocks_per_stage=1),
    "small": dict(image=32, channels=32, stages=3, blocks_per_stage=1),
    "base": dict(image=64, channels=64, stages=4, blocks_per_stage=2),
    "large": dict(image=64, channels=80, stages=4, blocks_per_stage=3),  # about ResNet-50's 100 MB
}


def _norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _norm(out_channels)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), _norm(out_channels))
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    def __init__(self, channels: int, stages: int, blocks_per_stage: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, 1, 1, bias=False), _norm(channels), nn.ReLU())
        blocks, width = [], channels
        for stage in range(stages):
            out = channels * 2 ** stage
            for block in range(blocks_per_stage):
                blocks.append(ResidualBlock(width, out, stride=2 if stage > 0 and block == 0 else 1))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def cnn(size: str) -> Workload:
    cfg = CNN_SIZES[size]
    return Workload("cnn", size,
                    f"ResNet-style CNN, {cfg['stages']}x{cfg['blocks_per_stage']} blocks from {cfg['channels']} "
                    f"channels, {cfg['image']}x{cfg['image']} images", cfg,
                    {"tiny": 16, "small": 64, "base": 128, "large": 128}[size],
                    lambda: ResNetStyle(cfg["channels"], cfg["stages"], cfg["blocks_per_stage"]),
                    lambda batch, g: torch.randn(batch, 3, cfg["image"], cfg["image"], generator=g))


# -- plain CNN: a few wide convolutions ------------------------------------------------------------
# Few, large ops and few parameters for its arithmetic: a compute-bound step on a CPU, where the
# ResNet-style CNN's norm layers and the MLP's weights make per-op and memory costs dominate.
# Not in the benchmark's default list; tools/cpu_overhead.py takes it (vgg:SIZE:BATCH).

VGG_SIZES = {"tiny": dict(image=32, channels=16), "small": dict(image=32, channels=32),
             "base": dict(image=64, channels=64), "large": dict(image=64, channels=128)}


def vgg(size: str) -> Workload:
    cfg = VGG_SIZES[size]
    c = cfg["channels"]

    def build():
        return nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, 2, 1), nn.ReLU(),
                             nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4 * c, NUM_CLASSES))

    return Workload("vgg", size, f"plain CNN, 3 convolutions from {c} channels, {cfg['image']}x{cfg['image']} images",
                    cfg, {"tiny": 8, "small": 8, "base": 16, "large": 16}[size], build,
                    lambda batch, g: torch.randn(batch, 3, cfg["image"], cfg["image"], generator=g))


# -- transformer encoder ---------------------------------------------------------------------------

TRANSFORMER_SIZES = {
    "tiny": dict(vocab=128, seq=16, d_model=32, heads=2, layers=1),
    "small": dict(vocab=1024, seq=64, d_model=128, heads=4, layers=2),
    "base": dict(vocab=8192, seq=128, d_model=512, heads=8, layers=6),
    "large": dict(vocab=8192, seq=128, d_model=768, heads=12, layers=12),  # BERT-base's encoder
}


class TransformerClassifier(nn.Module):
    def __init__(self, vocab: int, seq: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, tokens):
        x = self.encoder(self.embed(tokens) + self.position)
        return self.head(self.norm(x).mean(dim=1))


def transformer(size: str) -> Workload:
    cfg = TRANSFORMER_SIZES[size]
    return Workload("transformer", size,
                    f"transformer encoder, {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads, "
                    f"sequence {cfg['seq']}", cfg,
                    {"tiny": 16, "small": 64, "base": 64, "large": 64}[size],
                    lambda: TransformerClassifier(**cfg),
                    lambda batch, g: torch.randint(0, cfg["vocab"], (batch, cfg["seq"]), generator=g))


WORKLOADS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def make_workload(name: str, size: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"--workloads: expected names from {sorted(WORKLOADS)}, but got {name!r}")
    if size not in SIZES:
        raise ValueError(f"--size: expected one of {SIZES}, but got {size!r}")
    return WORKLOADS[name](size)
