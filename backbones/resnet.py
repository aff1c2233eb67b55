"""ResNet architectures: what a set of weights is (`analyse`: block, depths, widths, stem, from the shapes
alone), building a backbone by name, and loading weights strictly.

Names: torchvision's (`resnet18` ... `resnet152`, `wide_resnet50_2`, `wide_resnet101_2`); `resnet50x2`,
`resnet50x4`, ... for ResNets widened throughout, stem included (SimCLR v1/v2, VICReg's `resnet50x2`,
PyContrast's and VISSL's wide models); timm's deep-stem ResNets (`resnet50d`: three 3x3 stem convolutions and
average-pool downsampling; `resnet50c` without the latter).
"""
import re
from dataclasses import dataclass

from core.cli import UserError


def summarise_keys(obj, limit=5) -> str:
    if not isinstance(obj, dict):
        return type(obj).__name__
    keys = list(obj)[:limit]
    return ", ".join(map(str, keys)) + (" ..." if len(obj) > limit else "")


TORCHVISION_RESNETS = {
    # (block type, blocks per stage, width of layer1's first conv) -> torchvision name
    ("basic", (2, 2, 2, 2), 64): "resnet18",
    ("basic", (3, 4, 6, 3), 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 128): "wide_resnet101_2",
}
DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
          ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152, ("bottleneck", (3, 24, 36, 3)): 200}
LAYERS = {depth: blocks for (_, blocks), depth in DEPTHS.items()}
# timm's deep-stem ResNets (timm/models/resnet.py: stem_type='deep', stem_width=32; 'd' adds avg_down=True)
TIMM_DEEP = {"resnet18d", "resnet34d", "resnet50d", "resnet101d", "resnet152d", "resnet200d", "resnet50c",
             "resnet101c", "resnet152c"}
WIDENED = re.compile(r"resnet(50|101|152)x([2-9])")
STEMS = ("torchvision", "3x3", "deep")
STEM_NAMES = {"torchvision": "7x7 stride-2 convolution and max-pool (torchvision)",
              "3x3": "3x3 stride-1 convolution (small-image ResNet)",
              "deep": "three 3x3 convolutions and max-pool (timm deep stem)"}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class ResNetSpec:
    """What a ResNet's weights say about it."""

    block: str  # 'basic' or 'bottleneck'
    depths: tuple  # blocks per stage
    width: int  # planes of layer1 (64; 64*w for ResNets widened throughout)
    inner: int  # inner width of layer1's bottleneck (= width; 2*width for wide_resnet*_2)
    stem: str  # one of STEMS
    stem_width: int  # channels the stem puts out
    avg_down: bool  # timm's downsample: average pool, 1x1 convolution, norm

    @property
    def arch(self):
        """The architecture's name (module docstring), or None when no supported builder makes it."""
        depth = DEPTHS.get((self.block, self.depths))
        if depth is None:
            return None
        if self.stem == "deep":
            name = f"resnet{depth}{'d' if self.avg_down else 'c'}"
            return name if (self.width, self.inner, self.stem_width) == (64, 64, 64) and name in TIMM_DEEP else None
        if self.avg_down:
            return None
        if self.width == self.stem_width == 64:
            return TORCHVISION_RESNETS.get((self.block, self.depths, self.inner))
        if self.width == self.stem_width == self.inner and self.width % 64 == 0 and self.block == "bottleneck" \
                and depth != 200:
            return f"resnet{depth}x{self.width // 64}"
        return None

    def describe(self) -> str:
        depth = DEPTHS.get((self.block, self.depths))
        blocks = f"{self.block} blocks {'-'.join(map(str, self.depths))}" + (f" (depth {depth})" if depth else "")
        return f"{blocks}, widths {self.stem_width}/{self.width}/{self.inner}, {self.stem} stem" + \
            (", average-pool downsampling" if self.avg_down else "")

    def shapes(self) -> dict:
        """Every tensor of this ResNet's backbone (torchvision names, no fc) -> its shape."""
        out = {}

        def conv(name, o, i, k):
            out[f"{name}.weight"] = (o, i, k, k)

        def bn(name, c):
            out.update({f"{name}.{s}": () if s == "num_batches_tracked" else (c,) for s in BN})

        if self.stem == "deep":
            half = self.stem_width // 2
            conv("conv1.0", half, 3, 3), bn("conv1.1", half), conv("conv1.3", half, half, 3), bn("conv1.4", half)
            conv("conv1.6", self.stem_width, half, 3)
        else:
            conv("conv1", self.stem_width, 3, 7 if self.stem == "torchvision" else 3)
        bn("bn1", self.stem_width)
        expansion = 4 if self.block == "bottleneck" else 1
        inplanes = self.stem_width
        for s, n in enumerate(self.depths):
            planes, inner = self.width * 2 ** s, self.inner * 2 ** s
            for b in range(n):
                p = f"layer{s + 1}.{b}"
                if self.block == "basic":
                    conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                    conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                else:
                    conv(f"{p}.conv1", inner, inplanes, 1), bn(f"{p}.bn1", inner)
                    conv(f"{p}.conv2", inner, inner, 3), bn(f"{p}.bn2", inner)
                    conv(f"{p}.conv3", planes * 4, inner, 1), bn(f"{p}.bn3", planes * 4)
                if b == 0 and (s > 0 or inplanes != planes * expansion):
                    first = 1 if self.avg_down else 0  # timm: downsample.0 is a pooling layer without weights
                    conv(f"{p}.downsample.{first}", planes * expansion, inplanes, 1)
                    bn(f"{p}.downsample.{first + 1}", planes * expansion)
                inplanes = planes * expansion
        return out


def _listed(keys, what, limit=4):
    return f"{len(keys)} {what} ({', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''})"


def shape_problems(actual: dict, expected: dict) -> list:
    """What keeps `actual` ({key: shape}) from being `expected` exactly: missing, unexpected and wrong-shape
    keys (BatchNorm's step counters may be missing)."""
    missing = [k for k in expected if k not in actual and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in actual if k not in expected]
    wrong = [f"{k} {actual[k]} vs {expected[k]}" for k in expected if k in actual and actual[k] != expected[k]]
    return [_listed(keys, what, limit) for keys, what, limit in
            ((missing, "missing", 4), (unexpected, "unexpected", 4), (wrong, "of the wrong shape", 3)) if keys]


def analyse(tv: dict):
    """(spec or None, problems) for tensors under torchvision names (backbone keys only): the spec the shapes
    describe, and what keeps them from being that ResNet exactly (missing, unexpected, wrong-shape keys)."""
    if "conv1.0.weight" in tv:
        stem = "deep"
        stem_conv = tv["conv1.0.weight"]
    elif "conv1.weight" in tv:
        stem_conv = tv["conv1.weight"]
        k = stem_conv.shape[-1] if stem_conv.ndim == 4 else None
        stem = {7: "torchvision", 3: "3x3"}.get(k)
        if stem is None:
            return None, [f"its stem convolution conv1 has shape {tuple(stem_conv.shape)}, not 7x7 or 3x3"]
    else:
        return None, ["no stem convolution (conv1)"]
    if "layer1.0.conv3.weight" in tv:
        block, planes = "bottleneck", tv["layer1.0.conv3.weight"].shape[0] // 4
    elif "layer1.0.conv2.weight" in tv:
        block, planes = "basic", tv["layer1.0.conv2.weight"].shape[0]
    else:
        return None, ["no first block (layer1.0)"]
    depths = []
    for s in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in tv if k.startswith(f"layer{s}.") and k.split(".")[1].isdigit()}
        if not blocks:
            return None, [f"no layer{s}"]
        depths.append(max(blocks) + 1)
    inner = tv["layer1.0.conv1.weight"].shape[0] if "layer1.0.conv1.weight" in tv else planes
    stem_width = tv["bn1.weight"].shape[0] if "bn1.weight" in tv else \
        (tv.get("conv1.6.weight", stem_conv)).shape[0]
    avg_down = any(re.match(r"layer\d\.0\.downsample\.2\.", k) for k in tv)
    spec = ResNetSpec(block, tuple(depths), planes, inner, stem, stem_width, avg_down)
    problems = shape_problems({k: tuple(v.shape) for k, v in tv.items()}, spec.shapes())
    if not problems and spec.arch is None:
        problems.append(f"no supported architecture has {spec.describe()}")
    return spec, problems


def infer_arch(state_dict) -> str:
    """The architecture of a torchvision-named backbone state dict (fc ignored)."""
    spec, problems = analyse({k: v for k, v in state_dict.items() if not k.startswith("fc.")})
    if spec is None:
        raise UserError(f"the weights are not a ResNet ({problems[0]}; keys like {summarise_keys(state_dict)}); "
                        "this suite evaluates ResNet encoders")
    if problems:
        raise UserError(f"cannot tell the ResNet variant of these weights ({'; '.join(problems)}); "
                        "pass --arch with its torchvision or timm name")
    return spec.arch


def infer_stem(state_dict) -> str:
    """'deep' (timm), '3x3' (a small-image ResNet) or 'torchvision' (7x7), from conv1's shape."""
    if "conv1.0.weight" in state_dict:
        return "deep"
    w = state_dict.get("conv1.weight")
    return "3x3" if w is not None and w.ndim == 4 and tuple(w.shape[-2:]) == (3, 3) else "torchvision"


def small_image_stem(model, maxpool: bool = True, padding: int = 1):
    """conv1 replaced by a 3x3 stride-1 convolution without bias, as the ResNets of W-MSE (`get_model`: every
    dataset but ImageNet, padding 1; max-pool kept for STL-10, removed for CIFAR) and solo-learn's CIFAR models
    (`BaseMethod.__init__`: padding 2, max-pool removed)."""
    import torch.nn as nn

    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=padding, bias=False)
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


def _widened(depth: int, w: int):
    """torchvision's ResNet with every width, the stem's included, multiplied by w (SimCLR's resnet50x2 ...)."""
    import torch.nn as nn
    from torchvision.models.resnet import Bottleneck, ResNet

    layers = LAYERS[depth]
    model = ResNet(Bottleneck, list(layers))
    model.inplanes = 64 * w
    model.conv1 = nn.Conv2d(3, 64 * w, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(64 * w)
    for s, n in enumerate(layers):
        setattr(model, f"layer{s + 1}", model._make_layer(Bottleneck, 64 * w * 2 ** s, n, stride=1 if s == 0 else 2))
    return model


def is_torchvision_arch(arch: str) -> bool:
    return arch in TORCHVISION_RESNETS.values() or WIDENED.fullmatch(arch) is not None


def build_backbone(arch: str, stem: str = "torchvision", maxpool: bool = True, stem_padding: int = 1):
    """A ResNet without its classifier: forward() returns globally pooled last-stage features.

    stem '3x3' (torchvision-style ResNets): the small-image stem of `small_image_stem`; stem 'deep' goes with
    timm's deep-stem architectures; maxpool False removes the stem's max-pool."""
    import torch.nn as nn

    if stem not in STEMS:
        raise UserError(f"stem must be one of {', '.join(STEMS)}, not {stem!r}")
    widened = WIDENED.fullmatch(arch)
    if arch in TORCHVISION_RESNETS.values() or widened:
        if stem == "deep":
            raise UserError(f"a deep stem goes with timm's ResNets (resnet50d, ...), not {arch}")
        import torchvision

        model = _widened(int(widened.group(1)), int(widened.group(2))) if widened else \
            torchvision.models.get_model(arch, weights=None)
        model.fc = nn.Identity()
        if stem == "3x3":
            small_image_stem(model, maxpool, stem_padding)
    else:
        import timm

        if arch not in timm.list_models() or not arch.split(".")[0].startswith(("resnet", "wide_resnet", "seresnet")):
            raise UserError(f"unknown architecture {arch!r}: give a torchvision ResNet (resnet18, resnet50, ...), "
                            "resnet50x2-style widened ResNet or a timm ResNet name")
        if stem == "3x3":
            raise UserError(f"timm's {arch} has its own stem, not a 3x3 small-image one")
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


def load_into(model, state_dict: dict, arch: str) -> None:
    """Strict loading: every backbone weight must be present with its shape (BN step counters aside)."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    parts = shape_problems({k: tuple(v.shape) for k, v in state_dict.items()},
                           {k: tuple(v.shape) for k, v in expected.items()})
    if parts:
        raise UserError(f"the checkpoint does not fit {arch}: {', '.join(parts)} keys; check --arch")
    model.load_state_dict({k: state_dict.get(k, v) for k, v in expected.items()}, strict=True)
