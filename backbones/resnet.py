"""ResNet architectures: building a backbone by name, telling the variant from a state dict's shapes, and
loading weights strictly."""
import torch.nn as nn

from backbones.formats import RESNET_KEY
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


def infer_arch(state_dict) -> str:
    if not any(RESNET_KEY.match(k) for k in state_dict):
        raise UserError(f"the checkpoint holds no ResNet weights (keys like {summarise_keys(state_dict)}); "
                        "this suite evaluates ResNet encoders")
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    depth = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    width = state_dict["layer1.0.conv1.weight"].shape[0] if "layer1.0.conv1.weight" in state_dict else None
    name = TORCHVISION_RESNETS.get((block, depth, width))
    if name is None:
        raise UserError(f"cannot tell the ResNet variant of this checkpoint ({block} blocks, {depth} per stage, "
                        f"width {width}); pass --arch with its torchvision or timm name")
    return name


STEMS = ("torchvision", "3x3")


def small_image_stem(model: nn.Module, maxpool: bool = True, padding: int = 1) -> nn.Module:
    """conv1 replaced by a 3x3 stride-1 convolution without bias, as the ResNets of W-MSE (`get_model`: every
    dataset but ImageNet; max-pool kept for STL-10, removed for CIFAR) and solo-learn's CIFAR models
    (padding 2, max-pool removed)."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=padding, bias=False)
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


def infer_stem(state_dict) -> str:
    """'3x3' when conv1 is a 3x3 convolution (a small-image ResNet), else 'torchvision' (7x7, or timm's deep stem,
    whose architecture name says it)."""
    w = state_dict.get("conv1.weight")
    return "3x3" if w is not None and w.ndim == 4 and tuple(w.shape[-2:]) == (3, 3) else "torchvision"


def build_backbone(arch: str, stem: str = "torchvision", maxpool: bool = True, stem_padding: int = 1) -> nn.Module:
    """A ResNet without its classifier: forward() returns globally pooled last-stage features.

    stem '3x3' (torchvision ResNets only): the small-image stem of `small_image_stem`."""
    import torchvision

    if stem not in STEMS:
        raise UserError(f"stem must be one of {', '.join(STEMS)}, not {stem!r}")
    if arch in torchvision.models.list_models(module=torchvision.models) and "resnet" in arch:
        model = torchvision.models.get_model(arch, weights=None)
        model.fc = nn.Identity()
        if stem == "3x3":
            small_image_stem(model, maxpool, stem_padding)
        elif not maxpool:
            model.maxpool = nn.Identity()
        return model
    if stem != "torchvision" or not maxpool:
        raise UserError(f"stem {stem!r} without max-pool applies to torchvision ResNets, not {arch!r}")
    import timm

    if arch not in timm.list_models() or not arch.split(".")[0].startswith(("resnet", "wide_resnet", "seresnet")):
        raise UserError(f"unknown architecture {arch!r}: give a torchvision ResNet (resnet18, resnet50, ...) "
                        "or a timm ResNet name")
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    return model


def load_into(model: nn.Module, state_dict: dict, arch: str) -> None:
    """Strict loading: every backbone weight must be present with its shape (BN step counters aside)."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape ({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")
        raise UserError(f"the checkpoint does not fit {arch}: {', '.join(parts)} keys; check --arch")
    model.load_state_dict({k: state_dict.get(k, v) for k, v in expected.items()}, strict=True)




class PooledTrunk(nn.Module):
    """The last stage's feature map average-pooled with a fixed window and flattened: Goyal et al.'s res5
    features (AvgPool2d(6, stride 1) on a 224 px input: 2 x 2 x 2048 = 8,192 values for a ResNet-50)."""

    def __init__(self, backbone: nn.Module, kernel: int, stride: int):
        super().__init__()
        self.backbone, self.kernel, self.stride = backbone, kernel, stride

    def trunk(self, x):
        m = self.backbone
        if hasattr(m, "forward_features"):  # timm
            return m.forward_features(x)
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def forward(self, x):
        return nn.functional.avg_pool2d(self.trunk(x), self.kernel, self.stride).flatten(1)
