"""Checkpoint files -> a ResNet backbone, strictly and safely.

A checkpoint file is untrusted: pickles load with `weights_only=True` only, safetensors need no
pickle at all. A *format* knows how one lab's release lays out its weights; it says whether a loaded
object is of its kind and returns the plain torchvision backbone state dict (no `fc`), plus what it
dropped and the input normalisation the weights expect. Formats live in `FORMATS`; a new release
format is one more entry there.
"""
import argparse
import io
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backbones.formats import FORMAT_NAMES, FORMATS
from backbones.resnet import build_backbone, infer_arch, infer_stem, load_into, summarise_keys
from core.cli import UserError
from core.files import sha256_of


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
    notes: dict = field(default_factory=dict)
    pretraining: dict = None  # this suite's pretraining settings, when the checkpoint carries them
    stem: str = "torchvision"  # backbones.resnet.STEMS
    maxpool: bool = True

    @property
    def cache_id(self) -> str:
        return self.sha256 or self.path

    def describe(self) -> dict:
        """The record's `checkpoint` section."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "part": self.part,
                "dropped": self.dropped, "input_normalization": self.input_normalization, "notes": self.notes,
                "pretraining": self.pretraining, "stem": self.stem, "maxpool": self.maxpool}


# Plain-data classes that some releases pickle beside their tensors (DINO saves its argparse
# arguments); unpickling them only sets attributes, it runs no code of the file's choosing.
SAFE_GLOBALS = [argparse.Namespace]

# The globals a Detectron2 .pkl (a plain pickle of numpy arrays) needs, and nothing else.
PLAIN_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in PLAIN_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_plain_pickle(path: Path):
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "is not allowed" in str(e):
            raise UserError(f"checkpoint {path} needs code beyond numpy arrays and plain containers to load "
                            f"({str(e).split()[1]}); refused for safety, since checkpoints are untrusted files")
        raise UserError(f"checkpoint {path} is not a readable pickle (truncated or not a checkpoint)")
    except Exception:  # noqa: BLE001 - any failure of an untrusted file is the file's fault
        raise UserError(f"checkpoint {path} is not a readable pickle (truncated or not a checkpoint)")
    return _numpy_to_torch(obj)


def _numpy_to_torch(obj):
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj


# ---- reading files ----------------------------------------------------------------------------

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
    if path.suffix == ".pkl":
        return _load_plain_pickle(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_GLOBALS):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the file is judged below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            needed = re.search(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)", str(e))
            what = f" ({needed.group(1)})" if needed else ""
            raise UserError(f"checkpoint {path} needs code beyond tensors and plain containers to load{what}; "
                            "refused for safety, since checkpoints are untrusted files (if you trust it, re-save "
                            "its state dict alone with torch.save)")
        raise UserError(f"checkpoint {path} is not a readable checkpoint (truncated or not a PyTorch file)")
    except Exception:  # an untrusted file can break the unpickler in any way (IndexError, KeyError, ...)
        raise UserError(f"checkpoint {path} is not a readable checkpoint (truncated or not a PyTorch file)")


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
        matches = [f for f in FORMATS if f.auto and f.detect(obj)]
        if not matches:
            raise UserError(f"checkpoint {path} is not in a known ResNet format (top-level keys: "
                            f"{summarise_keys(obj)}); known formats: {', '.join(FORMAT_NAMES)}")
        if len(matches) > 1:
            raise UserError(f"checkpoint {path} could be any of the formats {', '.join(f.name for f in matches)}; "
                            "choose one with --ckpt-format")
    fmt = matches[0]
    state_dict, taken, dropped = fmt.extract(obj, part)
    if not state_dict:
        raise UserError(f"checkpoint {path} (format {fmt.name}) holds no backbone weights")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    return Checkpoint(state_dict, str(path.resolve()), sha256_of(path), fmt.name, taken, dropped,
                      fmt.input_normalization, dict(fmt.notes), pretraining_settings(path, obj))


def pretraining_settings(path: Path, obj) -> dict:
    """This suite's pretraining config, from last.pth itself or the config.yaml beside an exported backbone.

    The result tables use it to place a checkpoint in the paper's rows (method, K, λ_s, λ_b, ...).
    """
    import yaml

    config = obj.get("config") if isinstance(obj, dict) and obj.get("format") == "ssl-suite-pretrain" else None
    sidecar = path.parent / "config.yaml"
    if config is None and sidecar.is_file() and (path.parent / "last.pth").is_file():
        try:
            config = yaml.safe_load(sidecar.read_text())
        except yaml.YAMLError:
            config = None
    if not isinstance(config, dict) or "loss" not in config:
        return None
    keys = ("dataset", "arch", "views", "loss", "lambda_s", "lambda_b", "head_norm", "batch_size", "epochs",
            "max_steps", "svl_normalize", "method", "stem", "view_forward")
    return {k: config.get(k) for k in keys}


def make_encoder(ckpt_arg: str, arch=None, seed=0, format_name=None, part=None):
    """`--ckpt` (a path or 'random') -> (backbone module in eval mode, Checkpoint, arch name)."""
    if ckpt_arg == "random":
        if format_name or part:
            raise UserError("--ckpt random has no file: drop --ckpt-format and --ckpt-part")
        arch = arch or "resnet50"
        torch.manual_seed(seed)
        model = build_backbone(arch)
        info = Checkpoint(None, "random", None, "random", dropped={})
        info.path = f"random:{arch}:seed{seed}"
    else:
        info = load_checkpoint(ckpt_arg, format_name, part)
        arch = arch or infer_arch(info.state_dict)
        info.stem = infer_stem(info.state_dict)
        model = build_backbone(arch, info.stem, info.maxpool)
        load_into(model, info.state_dict, arch)
    return model.eval(), info, arch
