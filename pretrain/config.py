"""Pretraining configuration: the schema (every key with its default, its source and the values it may
take) and the loader of `configs/*.yaml`.

Each YAML file states its values with their sources in comments. A file may name one `base:` config it
starts from (one level only, so that the value in force is always in one of two files); `key=value`
arguments on the command line override both, through the suite's one override parser
(`core.settings`). The run folder keeps the resolved config.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from core.cli import UserError
from core.settings import keys, load_yaml_values, split_assignments, with_overrides
from core.settings import setting as s

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PAPER = "paper §7.1-7.3"
TABLE9 = "paper Table 9"
PerView = Union[float, tuple[float, ...]]  # one value for every view, or a list of length K


@dataclass
class PretrainConfig:
    # data
    dataset: str = s("imagenet", "the dataset to pretrain on", choices=("imagenet", "imagenet100", "stl10"))
    data_root: str = s("demo", "the suite's --data-root layout; 'demo' = the generated demo datasets")
    split: str = s("train", "the split(s) to read; STL-10 also takes train+unlabeled")
    class_list: Optional[str] = s(None, "ImageNet-100 synset list (default: CMC's list, datasets/imagenet100_classes.txt)")
    decode_size: int = s(256, "images are decoded once to this square (short-side resize + centre crop)")
    # networks
    arch: str = s("resnet18", PAPER + ": ResNet-18 for ImageNet-100 and STL-10, ResNet-50 for ImageNet")
    proj_hidden: int = s(512, PAPER + ": projector hidden width (ImageNet-100 / STL-10)")
    proj_out: int = s(128, PAPER + ": projector output width (ImageNet-100 / STL-10)")
    pred_hidden: int = s(512, PAPER + ": predictor hidden width (ImageNet-100 / STL-10)")
    head_norm: str = s("batchnorm", PAPER + ": BYOL's heads with BatchNorm; Table 13 swaps in LayerNorm",
                       choices=("batchnorm", "layernorm"))
    # method
    views: int = s(4, "K, the number of augmented views of each image (paper §3)")
    loss: str = s("msbreg", "msbreg: L_c + λ_s L_s + λ_b L_b (paper §3); byol: BYOL's loss, K = 2",
                  choices=("msbreg", "byol"))
    lambda_s: float = s(0.004, "paper Table 11 best")
    lambda_b: float = s(0.5, "paper Table 11 best")
    svl_normalize: bool = s(True, "singular value loss on p̂ (the text) or raw p (Eq. 5)")
    tau_base: float = s(0.99, "not stated by the paper: W-MSE's BYOL setting (0.99); BYOL §3.2 uses 0.996 on ImageNet")
    # augmentation (Table 9); a list of length K sets a value per view
    crop_size: int = s(224, TABLE9 + ": random resized crop")
    crop_scale_min: float = s(0.08, "torchvision's RandomResizedCrop default (BYOL)")
    flip_p: float = s(0.5, TABLE9)
    jitter_p: float = s(0.8, TABLE9)
    brightness: float = s(0.4, TABLE9)
    contrast: float = s(0.4, TABLE9)
    saturation: float = s(0.2, TABLE9)
    hue: float = s(0.1, TABLE9)
    gray_p: float = s(0.2, TABLE9)
    blur_p: PerView = s(1.0, TABLE9)
    blur_sigma: tuple[float, ...] = s((0.1, 2.0), "pixels of the crop; BYOL / SimCLR at 224 px")
    solarize_p: PerView = s(0.2, TABLE9)
    # optimisation
    epochs: int = s(320, "paper §7.1: 320 (ImageNet-100, STL-10), 300 (ImageNet)")
    batch_size: int = s(512, "paper §7.1; global, across devices and accumulation steps")
    base_lr: float = s(0.4, "paper §7.1: 0.4 (ImageNet-100), 0.5 (STL-10), 0.15 (ImageNet)")
    warmup_epochs: int = s(10, "paper §7.1")
    weight_decay: float = s(1e-5, "paper §7.1")
    momentum: float = s(0.9, "BYOL's LARS")
    trust_coefficient: float = s(1e-3, "BYOL's LARS")
    accumulate: int = s(1, "micro-batches per step (gradient accumulation)")
    # runtime
    seed: int = s(0, "runtime")
    device: str = s("auto", "runtime: auto (CUDA when there is one), cpu or cuda", choices=("auto", "cpu", "cuda"))
    amp: str = s("bf16", "runtime: mixed precision on GPU (CPU runs in fp32)", choices=("none", "bf16", "fp16"))
    channels_last: bool = s(True, "runtime (GPU only)")
    sync_bn: bool = s(False, "runtime: SyncBatchNorm under torchrun")
    workers: int = s(4, "runtime: data-loading processes")
    out_dir: str = s("runs/{name}", "runtime: the run folder ({name} = the config's name)")
    save_every_steps: int = s(500, "runtime")
    log_every_steps: int = s(10, "runtime")
    stop_after_steps: int = s(0, "runtime: stop (as if interrupted) after this many steps; 0 = run to the end")
    max_steps: int = s(0, "cap the schedule's total steps (demo, benchmarks); 0 = epochs x steps per epoch")


def config_keys():
    return keys(PretrainConfig)


def load_config(name_or_path: str, overrides=()):
    """Resolve a config (name in pretrain/configs or a path), its `base:`, and key=value overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"no config {name_or_path!r} (known: {known})")
    cfg = with_overrides(PretrainConfig(), load_yaml_values(path, CONFIG_DIR), "config")
    cfg = with_overrides(cfg, split_assignments(overrides, "override"), "config")
    return cfg, path.stem
