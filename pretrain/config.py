"""Pretraining configuration: the schema (types and defaults) and the loader for `configs/*.yaml`.

Each YAML file states its values with their sources in comments. A file may name one `base:`
config it starts from (one level only, so that the value in force is always in one of two files);
`key=value` arguments on the command line override both. The run folder keeps the resolved config.
"""
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from evaluate.common import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class PretrainConfig:
    # data
    dataset: str = "imagenet"  # imagenet | imagenet100 | stl10
    data_root: str = "demo"  # the suite's --data-root layout; 'demo' = the generated demo datasets
    split: str = "train"  # stl10 also takes train+unlabeled
    class_list: Optional[str] = None  # ImageNet-100 synset list (default: the CMC list)
    decode_size: int = 256  # images are decoded once to this square (short-side resize + centre crop)
    # networks
    arch: str = "resnet18"
    proj_hidden: int = 512
    proj_out: int = 128
    pred_hidden: int = 512
    head_norm: str = "batchnorm"  # batchnorm | layernorm (Table 13)
    # method
    views: int = 4  # K
    loss: str = "msbreg"  # msbreg | byol
    lambda_s: float = 0.004
    lambda_b: float = 0.5
    svl_normalize: bool = True  # singular value loss on p̂ (text) or raw p (Eq. 5)
    tau_base: float = 0.99
    # augmentation (Table 9); a list of length K sets a value per view
    crop_size: int = 224
    crop_scale_min: float = 0.08
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: typing.Any = 1.0
    blur_sigma: typing.Any = (0.1, 2.0)  # pixels of the crop; BYOL / SimCLR at 224 px
    solarize_p: typing.Any = 0.2
    # optimisation
    epochs: int = 320
    batch_size: int = 512  # global, across devices and accumulation steps
    base_lr: float = 0.4
    warmup_epochs: int = 10
    weight_decay: float = 1e-5
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    accumulate: int = 1
    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # none | bf16 | fp16 (GPU only; CPU runs in fp32)
    channels_last: bool = True  # GPU only
    sync_bn: bool = False
    workers: int = 4
    out_dir: str = "runs/{name}"
    save_every_steps: int = 500
    log_every_steps: int = 10
    stop_after_steps: int = 0  # stop (as if interrupted) after this many steps; 0 = run to the end
    max_steps: int = 0  # cap the schedule's total steps (demo, benchmarks); 0 = epochs x steps per epoch


def config_keys():
    return [f.name for f in dataclasses.fields(PretrainConfig)]


def _parse_value(key, text):
    kind = {f.name: f.type for f in dataclasses.fields(PretrainConfig)}[key]
    value = yaml.safe_load(text)
    if kind is float and isinstance(value, int):
        value = float(value)
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        raise UserError(f"{key}={text}: expected {kind.__name__}")
    return value


def load_config(name_or_path: str, overrides=()):
    """Resolve a config (name in pretrain/configs or a path), its `base:`, and key=value overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"no config {name_or_path!r} (known: {known})")
    values = yaml.safe_load(path.read_text()) or {}
    base = values.pop("base", None)
    if base is not None:
        base_values = yaml.safe_load((CONFIG_DIR / f"{base}.yaml").read_text()) or {}
        if "base" in base_values:
            raise UserError(f"config {base} has a base of its own; only one level of `base:` is allowed")
        values = {**base_values, **values}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} is not key=value")
        values[key] = _parse_value(key, text) if key in config_keys() else text
    unknown = sorted(set(values) - set(config_keys()))
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(config_keys())}")
    cfg = PretrainConfig(**values)
    return cfg, path.stem
