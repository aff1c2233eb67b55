"""Naming schemes: the ways a ResNet's tensors are named in released files, each translated to torchvision's.

A scheme has an `anchor`, a pattern that the first convolution of any residual block matches wherever it sits
in a file (what comes before the match is the prefix of that ResNet), and `to_torchvision`, which renames the
tensors under a prefix. `to_torchvision` returns (backbone under torchvision names, keys that are not part of
the backbone (heads, classifiers), keys inside the backbone's namespace that the scheme cannot place).
Whether the renamed tensors form a ResNet exactly is `backbones.resnet.analyse`'s business.
"""
import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Scheme:
    name: str
    source: str  # who names weights this way
    anchor: re.Pattern  # group 1 starts where the scheme's own names start
    to_torchvision: Callable  # {key under the prefix: tensor} -> (backbone, not_backbone, unplaced)


def _split(state, rename):
    """Rename with `rename(key) -> torchvision key | None (not backbone) | False (backbone, unplaceable)`."""
    backbone, other, unplaced = {}, [], []
    for k, v in state.items():
        name = rename(k)
        if name is None:
            other.append(k)
        elif name is False:
            unplaced.append(k)
        else:
            backbone[name] = v
    return backbone, other, unplaced


# ---- torchvision / timm: conv1 (or timm's conv1.0/.3/.6 deep stem), bn1, layer1-4, fc ---------------------

def _torchvision(state):
    return _split(state, lambda k: k if re.match(r"(conv1|bn1|layer[1-4])\.", k) else None)


# ---- Detectron2: stem.conv1(.norm), res2-res5, shortcut ---------------------------------------------------

D2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(.+)$")


def detectron2_to_torchvision_key(key):
    """stem.conv1(.norm) -> conv1 / bn1; resN.i.convj(.norm) -> layer(N-1).i.convj / bnj; shortcut -> downsample."""
    if key.startswith("stem.conv1."):
        rest = key[len("stem.conv1."):]
        return f"bn1.{rest[len('norm.'):]}" if rest.startswith("norm.") else f"conv1.{rest}"
    m = D2_BLOCK.match(key)
    if not m:
        return None
    stage, block, conv, norm, leaf = m.groups()
    base = f"layer{int(stage) - 1}.{block}."
    if conv == "shortcut":
        return base + (f"downsample.1.{leaf}" if norm else f"downsample.0.{leaf}")
    return base + (f"bn{conv[-1]}.{leaf}" if norm else f"{conv}.{leaf}")


def torchvision_to_detectron2_key(key):
    """The inverse, for torchvision-stem ResNets only (None for any other name, e.g. timm's deep stem)."""
    m = re.match(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.([a-z_]+)$", key)
    if re.fullmatch(r"conv1\.weight", key):
        return "stem.conv1.weight"
    if re.fullmatch(r"bn1\.[a-z_]+", key):
        return f"stem.conv1.norm.{key[4:]}"
    if not m:
        return None
    layer, block, mod, leaf = m.groups()
    base = f"res{int(layer) + 1}.{block}."
    if mod.startswith("conv"):
        return f"{base}{mod}.{leaf}"
    if mod.startswith("bn"):
        return f"{base}conv{mod[-1]}.norm.{leaf}"
    return f"{base}shortcut.{leaf}" if mod == "downsample.0" else f"{base}shortcut.norm.{leaf}"


def _detectron2(state):
    def rename(k):
        if not re.match(r"(stem|res[2-5])\.", k) or k.startswith("stem.fc."):
            # MoCo's convert-pretrain-to-detectron2.py prefixes every key without "layer" with "stem.", so a
            # MoCo v2 file's MLP head is stem.fc.0 / stem.fc.2: a projection head, which Detectron2 ignores too
            return None
        return detectron2_to_torchvision_key(k) or False

    return _split(state, rename)


# ---- lightly: nn.Sequential(*list(resnet.children())[:-1]) -> 0 conv1, 1 bn1, (2 relu, 3 maxpool), 4-7 layers

LIGHTLY_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _lightly(state):
    def rename(k):
        head, _, rest = k.partition(".")
        return f"{LIGHTLY_SEQUENTIAL[head]}.{rest}" if head in LIGHTLY_SEQUENTIAL else None

    return _split(state, rename)


# ---- SimCLR v2 converted (Separius/SimCLRv2-Pytorch resnet.py): net.0 stem, net.1-4 Blocks ---------------
# BatchNormRelu is Sequential(BatchNorm2d, ReLU), so every norm sits at `.0`; BottleneckBlock.net is
# conv1x1, BN, conv3x3 (stride), BN, conv1x1, BN; Projection is `shortcut` (1x1, stride) and `bn`.

SIMCLR_V2_BLOCK = {"0": "conv1", "1.0": "bn1", "2": "conv2", "3.0": "bn2", "4": "conv3", "5.0": "bn3"}
SIMCLR_V2_STEM = {"0": "conv1", "1.0": "bn1"}  # sk0: 7x7 convolution, BatchNormRelu, max-pool


def _simclr_v2(state):
    def rename(k):
        if not k.startswith("net."):
            return None
        m = re.match(r"net\.0\.(\d+(?:\.0)?)\.([a-z_]+)$", k)
        if m:
            return f"{SIMCLR_V2_STEM[m.group(1)]}.{m.group(2)}" if m.group(1) in SIMCLR_V2_STEM else False
        m = re.match(r"net\.([1-4])\.blocks\.(\d+)\.(.+)\.([a-z_]+)$", k)
        if not m:
            return False
        stage, block, inner, leaf = m.groups()
        base = f"layer{stage}.{block}."
        if inner.startswith("net.") and inner[4:] in SIMCLR_V2_BLOCK:
            return base + f"{SIMCLR_V2_BLOCK[inner[4:]]}.{leaf}"
        if inner == "projection.shortcut":
            return base + f"downsample.0.{leaf}"
        if inner == "projection.bn.0":
            return base + f"downsample.1.{leaf}"
        return False  # e.g. selective-kernel convolutions (sk1), which no plain ResNet has

    return _split(state, rename)


# ---- OBoW (valeoai/obow feature_extractor.py): _feature_blocks = [Sequential(Conv, bn, relu, maxpool),
#      layer1, layer2, layer3, layer4, pooling]; VISSL's trunk keeps torchvision names under _feature_blocks.

def _obow(state):
    def rename(k):
        if k.startswith("0.Conv."):
            return "conv1." + k[len("0.Conv."):]
        if k.startswith("0.bn."):
            return "bn1." + k[len("0.bn."):]
        head, _, rest = k.partition(".")
        return f"layer{head}.{rest}" if head in ("1", "2", "3", "4") else None

    return _split(state, rename)


SCHEMES = [
    Scheme("torchvision", "torchvision and timm ResNets (and every codebase that builds on them)",
           re.compile(r"(?:^|\.)(layer[1-4]\.\d+\.conv1\.weight)$"), _torchvision),
    Scheme("detectron2", "Detectron2's ResNet (stem, res2-res5; MoCo's and this suite's conversions)",
           re.compile(r"(?:^|\.)(res[2-5]\.\d+\.conv1\.weight)$"), _detectron2),
    Scheme("lightly-sequential", "lightly's nn.Sequential(*list(resnet.children())[:-1])",
           re.compile(r"(?:^|\.)([4-7]\.\d+\.conv1\.weight)$"), _lightly),
    Scheme("simclr-v2", "SimCLR v2 converted to PyTorch (Separius/SimCLRv2-Pytorch, net.0 / net.N.blocks)",
           re.compile(r"(?:^|\.)(net\.[1-4]\.blocks\.\d+\.net\.0\.weight)$"), _simclr_v2),
    Scheme("obow", "OBoW's feature extractor (_feature_blocks.0.Conv, _feature_blocks.1-4)",
           re.compile(r"(?:^|\.)([1-4]\.\d+\.conv1\.weight)$"), _obow),
]
