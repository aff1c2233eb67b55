"""Projection heads saved beside a backbone, rebuilt from their weights alone.

A head is an `nn.Sequential` MLP (Linear, BatchNorm1d or LayerNorm, ReLU, ...), saved as a state dict with
numbered keys (`0.weight`, `1.running_mean`, `3.weight`, ...). `head_from_state_dict` rebuilds it: a 2-D
weight is a Linear (with a bias when one is saved), a 1-D weight or running statistics a BatchNorm1d (with
running statistics) or a LayerNorm (without), and an index with no weights a ReLU. `find_projector` reads
the online projector of this suite's pretraining checkpoints (`last.pth`, or the `last.pth` beside an
exported `backbone.pth`): Table 12 measures alignment and uniformity on its L2-normalised outputs.
"""
from pathlib import Path

import torch
import torch.nn as nn

SUITE_FORMAT = "ssl-suite-pretrain"


def head_from_state_dict(state: dict) -> nn.Sequential:
    """The Sequential MLP whose state dict is `state` (strictly loaded); ValueError if it is not one."""
    groups = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name:
            raise ValueError(f"{key} is not a key of an nn.Sequential head")
        groups.setdefault(int(index), {})[name] = value
    if not groups:
        raise ValueError("no head weights")
    layers = []
    for i in range(max(groups) + 1):
        g = groups.get(i)
        if g is None:
            layers.append(nn.ReLU(inplace=True))
        elif g.get("weight") is not None and g["weight"].ndim == 2:
            out_dim, in_dim = g["weight"].shape
            layers.append(nn.Linear(in_dim, out_dim, bias="bias" in g))
        elif "running_mean" in g:
            dim = g["running_mean"].shape[0]
            layers.append(nn.BatchNorm1d(dim, affine="weight" in g))
        elif g.get("weight") is not None and g["weight"].ndim == 1:
            layers.append(nn.LayerNorm(g["weight"].shape[0], elementwise_affine=True))
        else:
            raise ValueError(f"cannot tell the layer of head keys {sorted(g)} at index {i}")
    head = nn.Sequential(*layers)
    head.load_state_dict(state, strict=True)
    return head


def find_projector(checkpoint_path):
    """(projector module in eval mode, where it came from) of a suite pretraining run, or (None, reason)."""
    from backbones.reading import read_file

    path = Path(checkpoint_path)
    if path.name != "last.pth":
        path = path.parent / "last.pth"
    if not path.is_file():
        return None, f"no pretraining checkpoint (last.pth) at {path.parent}"
    obj = read_file(path).obj
    if not (isinstance(obj, dict) and obj.get("format") == SUITE_FORMAT and isinstance(obj.get("online"), dict)):
        return None, f"{path} is not a checkpoint of this suite's pretraining"
    prefix = "projector."
    state = {k[len(prefix):]: v for k, v in obj["online"].items() if k.startswith(prefix)}
    if Path(checkpoint_path).name == "backbone.pth":
        ours = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        online = {k[len("backbone."):]: v for k, v in obj["online"].items() if k.startswith("backbone.")}
        if not all(k in online and torch.equal(online[k], v) for k, v in ours.items()):
            return None, f"{path} is not the run that exported {checkpoint_path} (its weights differ)"
    try:
        return head_from_state_dict(state).eval(), f"{path}: online projector"
    except (ValueError, RuntimeError) as e:
        return None, f"{path} holds no projector this suite can rebuild ({e})"
