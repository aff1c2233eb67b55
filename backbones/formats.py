"""Release formats of self-supervised ResNet checkpoints, each mapped to a torchvision ResNet state dict.

A format says whether a loaded object is laid out its way (`detect`) and extracts the backbone
(`extract` -> state dict, part taken, {group of dropped keys: count}). Layouts follow the public
releases: MoCo v1/v2 and v3, Barlow Twins, VICReg, SwAV / DeepCluster-v2 / SeLa-v2, DINO, solo-learn,
lightly, VISSL, Detectron2, and this suite's own pretraining checkpoints.
"""
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from core.cli import UserError

RESNET_KEY = re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.\d+\.|fc\.)")


@dataclass
class CheckpointFormat:
    name: str
    describe: str
    detect: Callable  # loaded object -> bool
    extract: Callable  # (loaded object, part) -> (state dict, part taken, dropped groups)
    auto: bool = True  # False: only when forced with --ckpt-format (same layout as another format)
    input_normalization: tuple = None  # (mean, std) the weights expect, when it is not ImageNet's
    notes: dict = field(default_factory=dict)


def tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def is_resnet_state_dict(obj) -> bool:
    return tensor_dict(obj) and "conv1.weight" in obj and any(k.startswith("layer1.") for k in obj)


def _get(obj, *path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _group(key: str, depth: int = 1) -> str:
    return ".".join(key.split(".")[:depth])


def take_prefix(state, prefix, drop_inside=("fc.",), depth=2):
    """Keys under `prefix` (prefix removed) minus those starting with `drop_inside`; the rest counted by group."""
    backbone, dropped = {}, Counter()
    for k, v in state.items():
        if k.startswith(prefix) and not k[len(prefix):].startswith(drop_inside):
            backbone[k[len(prefix):]] = v
        else:
            dropped[_group(k, depth)] += 1
    return backbone, dict(sorted(dropped.items()))


def _no_parts(part, name):
    if part is not None:
        raise UserError(f"--ckpt-part {part!r}: a {name} checkpoint holds one network, not parts")


def _prefixed(state, prefix):
    return tensor_dict(state) and f"{prefix}conv1.weight" in state and f"{prefix}layer1.0.conv1.weight" in state


# ---- torchvision / timm --------------------------------------------------------------------------

def _torchvision_payload(obj):
    if is_resnet_state_dict(obj):
        return obj
    for key in ("state_dict", "model"):
        if is_resnet_state_dict(_get(obj, key)):
            return obj[key]
    return None


def _extract_torchvision(obj, part, name="torchvision"):
    _no_parts(part, name)
    backbone, dropped = take_prefix(_torchvision_payload(obj), "", depth=1)
    return backbone, None, {("classifier head (fc)" if g == "fc" else g): n for g, n in dropped.items()}


# ---- MoCo ----------------------------------------------------------------------------------------

def _extract_moco(obj, part):
    _no_parts(part, "MoCo")
    backbone, dropped = take_prefix(obj["state_dict"], "module.encoder_q.")
    return backbone, None, dropped


def _extract_mocov3(obj, part):
    _no_parts(part, "MoCo v3")
    backbone, dropped = take_prefix(obj["state_dict"], "module.base_encoder.")
    return backbone, None, dropped


# ---- Barlow Twins / VICReg full training checkpoints ---------------------------------------------

def _fb_backbone(obj):
    return _prefixed(_get(obj, "model"), "module.backbone.") and any(
        k.startswith("module.projector.") for k in obj["model"])


def _extract_backbone_projector(obj, part):
    _no_parts(part, "Barlow Twins / VICReg")
    backbone, dropped = take_prefix(obj["model"], "module.backbone.")
    return backbone, None, dropped


# ---- SwAV, DeepCluster-v2, SeLa-v2 ---------------------------------------------------------------

def _swav(obj):
    state = _get(obj, "state_dict") if _get(obj, "state_dict") is not None else obj
    return _prefixed(state, "module.") and any(k.startswith(("module.projection_head.", "module.prototypes."))
                                               for k in state)


def _extract_swav(obj, part):
    _no_parts(part, "SwAV")
    state = obj["state_dict"] if "state_dict" in obj and isinstance(obj["state_dict"], dict) else obj
    backbone, dropped = take_prefix(state, "module.", drop_inside=("fc.", "projection_head.", "prototypes."))
    return backbone, None, dropped


# ---- DINO full checkpoint ------------------------------------------------------------------------

def _dino(obj):
    return isinstance(obj, dict) and isinstance(obj.get("teacher"), dict) and isinstance(obj.get("student"), dict)


def _extract_dino(obj, part):
    part = part or "teacher"
    if part not in ("teacher", "student"):
        raise UserError(f"--ckpt-part {part!r}: a DINO checkpoint has the parts teacher and student")
    state = obj[part]
    prefix = "module.backbone." if any(k.startswith("module.backbone.") for k in state) else "backbone."
    backbone, dropped = take_prefix(state, prefix)
    other = "student" if part == "teacher" else "teacher"
    dropped[f"{other} (all {len(obj[other])} keys)"] = len(obj[other])
    return backbone, part, dropped


# ---- Lightning: solo-learn and lightly -----------------------------------------------------------

def _lightning_state(obj):
    return _get(obj, "state_dict") if isinstance(obj, dict) and "pytorch-lightning_version" in obj else None


LIGHTLY_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _lightly(obj):
    state = _lightning_state(obj)
    return tensor_dict(state) and "backbone.0.weight" in state and any(k.startswith("backbone.4.0.") for k in state)


def _extract_lightly(obj, part):
    """lightly's examples: backbone = nn.Sequential(*list(resnet.children())[:-1]) -> indices 0..7."""
    _no_parts(part, "lightly")
    backbone, dropped = {}, Counter()
    for k, v in obj["state_dict"].items():
        head, _, rest = k.partition(".")
        index, _, tail = rest.partition(".")
        if head == "backbone" and index in LIGHTLY_SEQUENTIAL:
            backbone[f"{LIGHTLY_SEQUENTIAL[index]}.{tail}"] = v
        else:
            dropped[_group(k)] += 1
    return backbone, None, dict(sorted(dropped.items()))


def _extract_solo(obj, part):
    _no_parts(part, "solo-learn")
    backbone, dropped = take_prefix(obj["state_dict"], "backbone.", depth=1)
    return backbone, None, dropped


# ---- VISSL ---------------------------------------------------------------------------------------

def _vissl_trunk(obj):
    return _get(obj, "classy_state_dict", "base_model", "model", "trunk")


def _extract_vissl(obj, part):
    _no_parts(part, "VISSL")
    trunk = _vissl_trunk(obj)
    prefix = "_feature_blocks."
    backbone, dropped = take_prefix(trunk, prefix)
    heads = _get(obj, "classy_state_dict", "base_model", "model", "heads") or {}
    if heads:
        dropped["heads"] = len(heads)
    return backbone, None, dropped


# ---- Detectron2 ----------------------------------------------------------------------------------

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
    m = re.match(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(.+)$", key)
    if key.startswith("conv1."):
        return f"stem.conv1.{key[6:]}"
    if key.startswith("bn1."):
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


def _d2_state(obj):
    state = _get(obj, "model") if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(state, dict):
        return None, ""
    for prefix in ("", "backbone.bottom_up.", "backbone."):
        if f"{prefix}stem.conv1.weight" in state:
            return state, prefix
    return None, ""


def _extract_detectron2(obj, part):
    _no_parts(part, "Detectron2")
    state, prefix = _d2_state(obj)
    backbone, dropped = {}, Counter()
    for k, v in state.items():
        name = detectron2_to_torchvision_key(k[len(prefix):]) if k.startswith(prefix) else None
        if name is None:
            dropped[_group(k, 2 if prefix else 1)] += 1
            continue
        backbone[name] = torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
    return backbone, None, dict(sorted(dropped.items()))


# ---- this suite's pretraining checkpoints --------------------------------------------------------

def _extract_suite_pretrain(obj, part):
    """pretrain/train.py's last.pth: the online backbone by default, `--ckpt-part target` for the EMA one."""
    part = part or "online"
    if part not in ("online", "target"):
        raise UserError(f"--ckpt-part {part!r}: a pretraining checkpoint has the parts online and target")
    prefix = "backbone."
    backbone = {k[len(prefix):]: v for k, v in obj[part].items() if k.startswith(prefix)}
    dropped = Counter(f"{name}.{k.split('.')[0]}" for name in ("online", "target") for k in obj[name]
                      if not (name == part and k.startswith(prefix)))
    return backbone, part, dict(sorted(dropped.items()))


FORMATS = [
    CheckpointFormat("torchvision", "torchvision / timm ResNet state dict, plain or under 'state_dict' / 'model' "
                     "(also the plain backbones released by Barlow Twins, VICReg and DINO)",
                     lambda o: _torchvision_payload(o) is not None, _extract_torchvision),
    CheckpointFormat("simclr-converted", "SimCLR v1/v2 weights converted to a torchvision state dict; they expect "
                     "unnormalised [0, 1] input (same layout as torchvision: choose it with --ckpt-format)",
                     lambda o: _torchvision_payload(o) is not None,
                     lambda o, p: _extract_torchvision(o, p, "SimCLR"), auto=False,
                     input_normalization=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),
    CheckpointFormat("moco", "MoCo v1/v2: 'state_dict' with module.encoder_q. (key encoder, queue, fc head dropped)",
                     lambda o: _prefixed(_get(o, "state_dict"), "module.encoder_q."), _extract_moco),
    CheckpointFormat("mocov3", "MoCo v3 ResNet: 'state_dict' with module.base_encoder. (projector in fc, "
                     "predictor and momentum encoder dropped)",
                     lambda o: _prefixed(_get(o, "state_dict"), "module.base_encoder."), _extract_mocov3),
    CheckpointFormat("barlowtwins", "Barlow Twins training checkpoint: 'model' with module.backbone., "
                     "module.projector. and module.bn.",
                     lambda o: _fb_backbone(o) and "module.bn.running_mean" in o["model"], _extract_backbone_projector),
    CheckpointFormat("vicreg", "VICReg training checkpoint: 'model' with module.backbone. and module.projector.",
                     lambda o: _fb_backbone(o) and "module.bn.running_mean" not in o["model"],
                     _extract_backbone_projector),
    CheckpointFormat("swav", "SwAV / DeepCluster-v2 / SeLa-v2: module. prefix, projection_head and prototypes",
                     _swav, _extract_swav),
    CheckpointFormat("dino", "DINO training checkpoint: 'teacher' and 'student' with backbone. and head. "
                     "(teacher by default)", _dino, _extract_dino),
    CheckpointFormat("solo-learn", "solo-learn Lightning checkpoint: 'state_dict' with backbone. "
                     "(momentum branches, projector, predictor, classifier dropped)",
                     lambda o: _prefixed(_lightning_state(o), "backbone."), _extract_solo),
    CheckpointFormat("lightly", "lightly Lightning checkpoint: 'state_dict' with backbone.0-7 "
                     "(nn.Sequential of the ResNet's children)", _lightly, _extract_lightly),
    CheckpointFormat("vissl", "VISSL: classy_state_dict -> base_model -> model -> trunk with _feature_blocks.",
                     lambda o: _prefixed(_vissl_trunk(o), "_feature_blocks."), _extract_vissl),
    CheckpointFormat("detectron2", "Detectron2 backbone (.pkl or .pth): stem., res2-res5 (numpy arrays or tensors)",
                     lambda o: _d2_state(o)[0] is not None, _extract_detectron2,
                     notes={"input": "torchvision-converted weights (MoCo's converter) take RGB input; "
                                     "MSRA/caffe2 weights take BGR 0-255 and are not supported"}),
    CheckpointFormat("ssl-suite-pretrain", "this suite's pretraining checkpoint (pretrain/train.py last.pth): "
                     "online and target networks (online by default)",
                     lambda o: isinstance(o, dict) and o.get("format") == "ssl-suite-pretrain", _extract_suite_pretrain),
]
FORMAT_NAMES = [f.name for f in FORMATS]
