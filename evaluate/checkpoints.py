"""Checkpoint files -> a ResNet backbone, strictly and safely.

A checkpoint file is untrusted: pickles load with `weights_only=True` only, safetensors need no
pickle at all. A *format* knows how one lab's release lays out its weights; it says whether a loaded
object is of its kind and returns the plain torchvision backbone state dict (no `fc`), plus what it
dropped and the input normalisation the weights expect. Formats live in `FORMATS`; a new release
format is one more entry there.
"""
import hashlib
import pickle
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from evaluate.common import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Checkpoint:
    """A backbone state dict (None for a random encoder) and what is known about where it came from."""

    state_dict: dict
    path: str
    sha256: str
    format: str
    part: str = None
    dropped: dict = field(default_factory=dict)  # group -> number of keys dropped
    input_normalization: tuple = None  # (mean, std) the weights expect, when the format says so

    @property
    def cache_id(self) -> str:
        return self.sha256 or self.path


@dataclass
class CheckpointFormat:
    name: str
    describe: str
    detect: Callable  # loaded object -> bool
    extract: Callable  # (loaded object, part) -> (state dict, part taken, dropped keys)


# ---- reading files ----------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_file(path: Path):
    """Load a checkpoint file without executing anything it contains."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (give a file, or --ckpt random)")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {path} is not a readable safetensors file ({e})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the file is judged below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(f"checkpoint {path} needs arbitrary code to load (it pickles objects other than "
                            "tensors and containers); refused for safety, since checkpoints are untrusted files")
        raise UserError(f"checkpoint {path} is not a readable checkpoint (truncated or not a PyTorch file)")
    except Exception:  # an untrusted file can break the unpickler in any way (IndexError, KeyError, ...)
        raise UserError(f"checkpoint {path} is not a readable checkpoint (truncated or not a PyTorch file)")


# ---- formats ----------------------------------------------------------------------------------

RESNET_KEY = re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.\d+\.|fc\.)")


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _is_resnet_state_dict(obj) -> bool:
    return _tensor_dict(obj) and "conv1.weight" in obj and any(k.startswith("layer1.") for k in obj)


def _torchvision_payload(obj):
    if _is_resnet_state_dict(obj):
        return obj, None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and _is_resnet_state_dict(obj.get(key)):
            return obj[key], key
    return None, None


def _extract_torchvision(obj, part):
    sd, where = _torchvision_payload(obj)
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    dropped = Counter("classifier head (fc)" if k.startswith("fc.") else "" for k in sd if k not in backbone)
    return backbone, where, dict(dropped)


FORMATS = [
    CheckpointFormat(
        "torchvision",
        "torchvision / timm ResNet state dict, plain or under 'state_dict' / 'model'",
        detect=lambda obj: _torchvision_payload(obj)[0] is not None,
        extract=_extract_torchvision,
    ),
]
FORMAT_NAMES = [f.name for f in FORMATS]


def _summarise_keys(obj, limit=5) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:limit]
        return ", ".join(map(str, keys)) + (" ..." if len(obj) > limit else "")
    return type(obj).__name__


def load_checkpoint(path, format_name=None, part=None) -> Checkpoint:
    path = Path(path)
    obj = read_file(path)
    if format_name is not None:
        matches = [f for f in FORMATS if f.name == format_name]
        if not matches:
            raise UserError(f"unknown checkpoint format {format_name!r}; known formats: {', '.join(FORMAT_NAMES)}")
        if not matches[0].detect(obj):
            raise UserError(f"checkpoint {path} is not laid out as format {format_name!r} ({matches[0].describe})")
    else:
        matches = [f for f in FORMATS if f.detect(obj)]
        if not matches:
            raise UserError(f"checkpoint {path} is not in a known ResNet format (top-level keys: "
                            f"{_summarise_keys(obj)}); known formats: {', '.join(FORMAT_NAMES)}")
        if len(matches) > 1:
            raise UserError(f"checkpoint {path} could be any of the formats {', '.join(f.name for f in matches)}; "
                            "choose one with --ckpt-format")
    fmt = matches[0]
    state_dict, taken, dropped = fmt.extract(obj, part)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    return Checkpoint(state_dict, str(path.resolve()), sha256_of(path), fmt.name, taken, dropped)


# ---- architectures ----------------------------------------------------------------------------

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
        raise UserError(f"the checkpoint holds no ResNet weights (keys like {_summarise_keys(state_dict)}); "
                        "this suite evaluates ResNet encoders")
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    depth = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    width = state_dict["layer1.0.conv1.weight"].shape[0] if "layer1.0.conv1.weight" in state_dict else None
    name = TORCHVISION_RESNETS.get((block, depth, width))
    if name is None:
        raise UserError(f"cannot tell the ResNet variant of this checkpoint ({block} blocks, {depth} per stage, "
                        f"width {width}); pass --arch with its torchvision or timm name")
    return name


def build_backbone(arch: str) -> nn.Module:
    """A ResNet without its classifier: forward() returns globally pooled last-stage features."""
    import torchvision

    if arch in torchvision.models.list_models(module=torchvision.models) and "resnet" in arch:
        model = torchvision.models.get_model(arch, weights=None)
        model.fc = nn.Identity()
        return model
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


def make_encoder(ckpt_arg: str, arch=None, seed=0, format_name=None, part=None):
    """`--ckpt` (a path or 'random') -> (backbone module in eval mode, Checkpoint, arch name)."""
    if ckpt_arg == "random":
        arch = arch or "resnet50"
        torch.manual_seed(seed)
        model = build_backbone(arch)
        info = Checkpoint(None, "random", None, "random", dropped={})
        info.path = f"random:{arch}:seed{seed}"
    else:
        info = load_checkpoint(ckpt_arg, format_name, part)
        arch = arch or infer_arch(info.state_dict)
        model = build_backbone(arch)
        load_into(model, info.state_dict, arch)
    return model.eval(), info, arch
