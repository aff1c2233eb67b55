"""Pretraining configuration: the schema (every key with its default, its source and the values it may
take), the loader of `configs/*.yaml`, and the check that every key given is one the method uses.

Each YAML file states its values with their sources in comments. A file may name one `base:` config it
starts from (one level only, so that the value in force is always in one of two files); `key=value`
arguments on the command line override both, through the suite's one override parser
(`core.settings`). The run folder keeps the resolved config.

Keys come in two kinds: the common ones (data, augmentation, optimiser, schedule, runtime), which every
method reads, and the keys of one method (its loss weights, heads, temperature, queue, ...), listed by
the method's module in `pretrain/methods/`. A key that the chosen method does not read, set in a YAML
file or on the command line, is an error naming the method: a value is never silently ignored.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from backbones.resnet import STEMS
from core.cli import UserError
from core.settings import keys, load_yaml_values, split_assignments, with_overrides
from core.settings import setting as s

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PAPER = "paper §7.1-7.3"
TABLE9 = "paper Table 9"
PerView = Union[float, tuple[float, ...]]  # one value for every view, or a list of length K
METHODS = ("msbreg", "byol", "byol_multicrop", "byol_uniformity", "simclr", "simclrv2", "mocov2", "barlowtwins",
           "wmse", "drlim", "cpc")


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
    stem: str = s("torchvision", "torchvision's 7x7 stride-2 conv1 + max-pool; '3x3': W-MSE's encoder for every "
                  "dataset but ImageNet (htdt/self-supervised model.py get_model: conv1 a 3x3 stride-1 conv, max-pool "
                  "kept for STL-10)", choices=STEMS)
    proj_hidden: int = s(512, PAPER + ": projector hidden width (ImageNet-100 / STL-10)")
    proj_out: int = s(128, PAPER + ": projector output width (ImageNet-100 / STL-10)")
    pred_hidden: int = s(512, PAPER + ": predictor hidden width (ImageNet-100 / STL-10)")
    head_norm: str = s("batchnorm", PAPER + ": BYOL's heads with BatchNorm; Table 13 swaps in LayerNorm",
                       choices=("batchnorm", "layernorm"))
    view_forward: str = s("per_view", "BYOL (deepmind-research byol) and W-MSE (htdt methods/byol.py, w_mse.py) run "
                          "each view through the encoder separately, so BatchNorm statistics are per view; one_pass "
                          "puts all views of one size in one batch (SimCLR's code)", choices=("per_view", "one_pass"))
    # method
    method: str = s("msbreg", "the pretraining method (pretrain/methods/)", choices=METHODS)
    loss: str = s("msbreg", "the name of `method` before the comparison methods were added; kept as an alias "
                  "(a config or command may say loss=byol); always equal to method", choices=METHODS)
    views: int = s(4, "K, the number of augmented views of each image (paper §3; 2 for the two-view methods)")
    lambda_s: float = s(0.004, "paper Table 11 best")
    lambda_b: float = s(0.5, "paper Table 11 best")
    svl_normalize: bool = s(True, "singular value loss on p̂ (the text) or raw p (Eq. 5)")
    tau_base: float = s(0.99, "not stated by the paper: W-MSE's BYOL setting (0.99); BYOL §3.2 uses 0.996 on ImageNet")
    temperature: float = s(0.1, "SimCLR's ImageNet temperature (google-research/simclr run.py --temperature 0.1)")
    queue_size: int = s(65536, "MoCo's queue of negatives (moco/builder.py K = 65536)")
    bn_splits: int = s(8, "MoCo trains on 8 GPUs of 32 images, its key encoder's BN statistics per GPU after a "
                          "batch shuffle (shuffle BN); emulated by splitting the batch into this many parts")
    lambd: float = s(0.0051, "Barlow Twins' off-diagonal weight (barlowtwins main.py --lambd 0.0051)")
    w_size: int = s(256, "W-MSE's whitening sub-batch (README commands: --w_size 256)")
    w_iter: int = s(1, "W-MSE's whitening repetitions per step (cfg.py default 1; STL-10 W-MSE 2: 4)")
    w_eps: float = s(0.0, "W-MSE's covariance shrinkage (cfg.py --w_eps 0)")
    margin: float = s(1.0, "DrLIM's margin m: the paper's value could not be checked; D is the distance of "
                           "unnormalised embeddings, so m only sets their scale (the last linear layer can rescale D)")
    uniformity_weight: float = s(1.0, "Wang & Isola's uniformity weight (align_uniform STL-10 example --unif_w 1)")
    uniformity_t: float = s(2.0, "Wang & Isola's uniformity temperature (align_uniform --unif_t 2)")
    small_crops: int = s(6, "multi-crop: small crops per image (SwAV README: --nmb_crops 2 6)")
    small_crop_size: int = s(96, "multi-crop: small crop size (SwAV README: --size_crops 224 96)")
    small_crop_scale: tuple[float, ...] = s((0.05, 0.14), "multi-crop: small crop area range (SwAV README "
                                             "--min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14)")
    cpc_grid: int = s(7, "CPC: patches per side, overlapping by half (CPC v1: 7 x 7 patches of 64 px from 256 px)")
    cpc_pred_steps: int = s(5, "CPC: rows predicted below each context row (CPC v1/v2: up to 5)")
    cpc_skip: int = s(1, "CPC: rows skipped before the first predicted one, as patches overlap by half "
                         "(rschwarz15/CPCV2-PyTorch InfoNCE_Loss skip_step=1)")
    cpc_context_layers: int = s(4, "CPC: masked convolution layers of the context network "
                                   "(rschwarz15/CPCV2-PyTorch PixelCNN_GIM: 4 layers)")
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
    optimizer: str = s("lars", PAPER + ": LARS (as BYOL)", choices=("lars", "sgd", "adam"))
    epochs: int = s(320, "paper §7.1: 320 (ImageNet-100, STL-10), 300 (ImageNet)")
    batch_size: int = s(512, "paper §7.1; global, across devices and accumulation steps")
    base_lr: float = s(0.4, "paper §7.1: 0.4 (ImageNet-100), 0.5 (STL-10), 0.15 (ImageNet)")
    lr_scaling: str = s("linear_k", "paper §7.1: max LR = base_lr x batch/256 x K (linear_k); linear: x batch/256 "
                        "(BYOL, SimCLR v1, Barlow Twins); sqrt: x sqrt(batch) (SimCLR v2); none: base_lr (MoCo, W-MSE)",
                        choices=("linear_k", "linear", "sqrt", "none"))
    lr_schedule: str = s("cosine", PAPER + ": linear warm-up, then cosine decay (BYOL); step: W-MSE's drops",
                         choices=("cosine", "step"))
    lr_final_ratio: float = s(0.0, "cosine: the final LR as a fraction of the max (Barlow Twins: 0.001)")
    lr_drops: tuple[int, ...] = s((50, 25), "step: the LR is multiplied by lr_drop_gamma this many epochs before "
                                  "the end (W-MSE cfg.py --drop 50 25)")
    lr_drop_gamma: float = s(0.2, "step: W-MSE cfg.py --drop_gamma 0.2")
    warmup_epochs: int = s(10, "paper §7.1")
    warmup_steps: int = s(0, "warm-up length in steps, instead of warmup_epochs when > 0 (W-MSE: 500 iterations)")
    weight_decay: float = s(1e-5, "paper §7.1")
    exclude_bias_norm: bool = s(True, "paper §7.1: biases and norm parameters get no weight decay (nor LARS "
                                "adaptation), as BYOL; MoCo and W-MSE decay every parameter")
    excluded_lr_ratio: float = s(1.0, "LR of biases and norm parameters relative to the weights' (Barlow Twins: "
                                 "0.0048 / 0.2)")
    momentum: float = s(0.9, "BYOL's LARS")
    trust_coefficient: float = s(1e-3, "BYOL's LARS")
    accumulate: int = s(1, "micro-batches per step (gradient accumulation)")
    # runtime
    seed: int = s(0, "runtime")
    device: str = s("auto", "runtime: auto (CUDA when there is one), cpu, cuda or cuda:N (under torchrun: each process "
                             "takes the GPU of its LOCAL_RANK)")
    amp: str = s("bf16", "runtime: mixed precision on GPU (CPU runs in fp32)", choices=("none", "bf16", "fp16"))
    channels_last: bool = s(True, "runtime (GPU only)")
    sync_bn: str = s("auto", "runtime: SyncBatchNorm under torchrun. auto: on with more than one process on CUDA, as "
                     "BYOL's and the paper's batch statistics are over the global batch (BYOL §3.3: 'batch statistics "
                     "... aggregated over all devices'), off on one process, on CPU (PyTorch's SyncBatchNorm needs CUDA) "
                     "and for MoCo v2 (its shuffle BN keeps statistics per part); the run's config.yaml and last.pth "
                     "record the value in force", choices=("auto", "true", "false"))
    workers: int = s(-1, "runtime: data-loading processes per training process; -1 = the cores of the node shared "
                         "among its processes, one kept for each, at most 8 (core.loading.resolve_workers)")
    out_dir: str = s("runs/{name}", "runtime: the run folder ({name} = the config's name)")
    save_every_steps: int = s(500, "runtime")
    save_every_epochs: int = s(0, "runtime: also export the backbone as <out_dir>/backbone_epoch{N:04d}.pth (N = epochs "
                               "completed) every this many epochs, for evaluating along training; 0 = off")
    log_every_steps: int = s(10, "runtime")
    stop_after_steps: int = s(0, "runtime: stop (as if interrupted) after this many steps; 0 = run to the end")
    max_steps: int = s(0, "cap the schedule's total steps (demo, benchmarks); 0 = epochs x steps per epoch")


# Keys every method reads; a method's own keys are listed in its module (pretrain/methods/<name>.py).
DATA_KEYS = ("dataset", "data_root", "split", "class_list", "decode_size")
AUGMENT_KEYS = ("crop_size", "crop_scale_min", "flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue",
                "gray_p", "blur_p", "blur_sigma", "solarize_p")
OPTIM_KEYS = ("optimizer", "epochs", "batch_size", "base_lr", "lr_scaling", "lr_schedule", "warmup_epochs",
              "warmup_steps", "weight_decay", "exclude_bias_norm", "excluded_lr_ratio", "accumulate")
RUNTIME_KEYS = ("seed", "device", "amp", "channels_last", "sync_bn", "workers", "out_dir", "save_every_steps",
                "save_every_epochs", "log_every_steps", "stop_after_steps", "max_steps")
COMMON_KEYS = DATA_KEYS + ("arch", "stem", "method", "loss") + AUGMENT_KEYS + OPTIM_KEYS + RUNTIME_KEYS
OPTIMIZER_KEYS = {"lars": ("momentum", "trust_coefficient"), "sgd": ("momentum",), "adam": ()}
SCHEDULE_KEYS = {"cosine": ("lr_final_ratio",), "step": ("lr_drops", "lr_drop_gamma")}


def config_keys():
    return keys(PretrainConfig)


def used_keys(cfg) -> set:
    """The keys the configured method, optimiser and LR schedule read."""
    from pretrain.methods import method_class

    return (set(COMMON_KEYS) | set(method_class(cfg.method).keys) | set(OPTIMIZER_KEYS[cfg.optimizer])
            | set(SCHEDULE_KEYS[cfg.lr_schedule]))


def check_keys(cfg, explicit) -> None:
    """One sentence for the first key given (in YAML or on the command line) that nothing reads."""
    used = used_keys(cfg)
    for key in (k for k in keys(PretrainConfig) if k in explicit and k not in used):
        if key in {k for ks in OPTIMIZER_KEYS.values() for k in ks}:
            why = f"optimizer {cfg.optimizer}"
        elif key in {k for ks in SCHEDULE_KEYS.values() for k in ks}:
            why = f"lr_schedule {cfg.lr_schedule}"
        else:
            from pretrain.methods import method_class

            own = ", ".join(method_class(cfg.method).keys) or "none"
            why = f"method {cfg.method} (whose own keys are: {own})"
        raise UserError(f"config key {key} is not used by {why}; remove it from the config or the command line")
    if "warmup_steps" in explicit and "warmup_epochs" in explicit and cfg.warmup_steps:
        raise UserError("give the warm-up once: warmup_steps or warmup_epochs, not both")


def _method_alias(values: dict, where: str) -> dict:
    """`loss` is the old name of `method`: move it over (one of them, or both with the same value)."""
    values = dict(values)
    if "loss" in values:
        old = values.pop("loss")
        if "method" in values and values["method"] != old:
            raise UserError(f"{where} gives method {values['method']} and loss {old}; loss is the old name of "
                            "method, give one")
        values["method"] = old
    return values


def load_config(name_or_path: str, overrides=()):
    """Resolve a config (name in pretrain/configs or a path), its `base:`, and key=value overrides.

    Returns (config, name). Views not given default to the method's own count (2 for the two-view methods,
    1 for CPC); every key given must be read by the method (see `check_keys`)."""
    from pretrain.methods import method_class

    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_")))
        raise UserError(f"no config {name_or_path!r} (known: {known})")
    from_yaml = _method_alias(load_yaml_values(path, CONFIG_DIR), f"config {path.name}")
    from_cli = _method_alias(split_assignments(overrides, "override"), "the command line")
    cfg = with_overrides(PretrainConfig(), from_yaml, "config")
    cfg = with_overrides(cfg, from_cli, "config")
    explicit = set(from_yaml) | set(from_cli)
    cls = method_class(cfg.method)
    cfg.loss = cfg.method
    if "views" not in explicit and cls.fixed_views:
        cfg.views = cls.fixed_views
    check_keys(cfg, explicit)
    cls.check(cfg)
    return cfg, path.stem

