"""What every frozen-feature classification task shares: which images, which transform, which features (the
encoder family's input and feature taps: `backbones.families`)."""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch.nn as nn

from backbones import families
from backbones.features import extract_features
from core.cli import UserError
from core.settings import setting
from datasets.catalog import IN100_CLASSES, IN100_DEMO_CLASSES, read_classification
from datasets.views import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

TRANSFORM_SOURCE = ("ImageNet: resize 256 / centre crop 224, bilinear, ImageNet mean/std (torchvision's reference "
                    "evaluation; NPID's kNN test transform, lemniscate.pytorch main.py; W-MSE reads ImageNet-100 "
                    "pre-resized the same way, htdt/self-supervised README); STL-10: resize 70 / centre crop 64, "
                    "bicubic, STL-10 mean/std (W-MSE's test_transform, datasets/stl10.py; the paper's Table 1 "
                    "follows W-MSE's STL-10 setting)")

# The values of `FrozenFeatureProtocol` that depend on the dataset; sources in the field metadata below.
DATASET_PRESETS = {
    "imagenet": dict(dataset="imagenet", train_split="train", test_split="val", num_classes=1000,
                     metric_prefix="in1k"),
    "imagenet100": dict(dataset="imagenet100", train_split="train", test_split="val", num_classes=100,
                        class_list=IN100_CLASSES, metric_prefix="in100"),
    "stl10": dict(dataset="stl10", train_split="train", test_split="test", num_classes=10, resize=70, crop=64,
                  interpolation="bicubic", mean=(0.43, 0.42, 0.39), std=(0.27, 0.26, 0.27), metric_prefix="stl10"),
    "places205": dict(dataset="places205", train_split="train", test_split="val", num_classes=205,
                      metric_prefix="places205"),
    "inat18": dict(dataset="inat18", train_split="train", test_split="val", num_classes=8142, metric_prefix="inat18"),
}
# Demo datasets (datasets/*.py write_demo) are smaller; ImageNet demo images are 64 px.
DEMO_PRESETS = {
    "imagenet": dict(num_classes=12, resize=64, crop=64),
    "imagenet100": dict(num_classes=6, class_list=IN100_DEMO_CLASSES, resize=64, crop=64),
    "stl10": dict(),
    "places205": dict(num_classes=8, resize=64, crop=64),
    "inat18": dict(num_classes=6, resize=64, crop=64),
}


@dataclass(frozen=True)
class FrozenFeatureProtocol:
    dataset: str = setting("imagenet", "the task's dataset")
    train_split: str = setting("train", "official train split (STL-10: the 5,000 labelled train images)")
    test_split: str = setting("val", "official validation/test split, as the paper reports (§8.1, §8.3)")
    num_classes: int = setting(1000, "the dataset's class count; a tree with another count is refused")
    class_list: Optional[str] = setting(None, "ImageNet-100: CMC's 100 synsets (datasets/imagenet100_classes.txt)")
    metric_prefix: str = setting("in1k", "metric names of results/paper/paper_tables.csv")
    resize: int = setting(256, TRANSFORM_SOURCE)
    crop: int = setting(224, TRANSFORM_SOURCE)
    interpolation: str = setting("bilinear", TRANSFORM_SOURCE)
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, TRANSFORM_SOURCE)
    std: tuple[float, ...] = setting(IMAGENET_STD, TRANSFORM_SOURCE)
    batch_size: int = setting(128, "runtime setting of feature extraction; does not change the features")
    workers: int = setting(2, "runtime setting (data-loading processes); does not change results")
    skip_bad_images: bool = setting(False, "suite policy: an unreadable image stops the run unless this is set")
    save_features: bool = setting(False, "suite option: write the features the classifier saw beside the record "
                                         "(<record>.features.npz: train_x, train_y, test_x, test_y)")


def read_splits(ctx, p: FrozenFeatureProtocol, check=None):
    """Both splits, checked (and `check(splits)`) before any extraction or training."""
    splits = {name: read_classification(ctx.data_root, p.dataset, getattr(p, f"{name}_split"), p.num_classes,
                                        p.class_list) for name in ("train", "test")}
    for name, data in splits.items():
        if len(np.unique(data.labels)) < 2:
            raise UserError(f"the {name} split of {p.dataset} holds fewer than two classes")
    if check is not None:
        check(splits)
    return splits


def input_normalization(ctx, p: FrozenFeatureProtocol, info: dict):
    """The protocol's mean/std, unless the checkpoint (its release, or --set normalize) says otherwise."""
    if ctx.checkpoint.input_normalization is not None:
        mean, std = ctx.checkpoint.input_normalization
        info["input_normalization"] = f"mean {mean}, std {std}, from the checkpoint: {ctx.checkpoint.normalization}"
        return tuple(mean), tuple(std)
    return tuple(p.mean), tuple(p.std)


def train_test_features(ctx, p: FrozenFeatureProtocol, check=None, tap=None, splits=None):
    """Read both splits (unless given), check them before any extraction, return their features at `tap` (None:
    the family's default: ResNet 'avgpool', ViT 'cls') through the family's input transform. Under torchrun every
    process extracts its shard and rank 0 alone gets the features (the others get (None, None) pairs)."""
    splits = splits or read_splits(ctx, p, check)
    tap = tap or default_tap(ctx)
    out, info = {}, {"feature_cache": {}, "tap": tap}
    mean, std = input_normalization(ctx, p, info)
    transform = family_transform(ctx, EvalTransform(p.resize, p.crop, mean, std, p.interpolation))
    info["transform"] = transform.describe()
    model, layer = tap_module(ctx, tap), ("pool" if tap == "avgpool" else tap)
    for name, data in splits.items():
        feats, labels, extra = extract_features(
            model, ctx.checkpoint.cache_id, ctx.arch, data, transform, device=ctx.device,
            batch_size=p.batch_size, num_workers=p.workers, skip_bad_images=p.skip_bad_images, log=ctx.log,
            rank=ctx.rank, world=ctx.world, layer=layer)
        out[name] = (feats, labels)
        info["feature_cache"][name] = extra["cache"]
        info["precision"] = extra["precision"]
        if feats is None:
            continue
        info[f"{name}_size"] = len(labels)
        if extra["skipped_images"]:
            info[f"{name}_skipped_images"] = extra["skipped_images"]
    if ctx.rank != 0:
        return (None, None), (None, None), info
    info["feature_dim"] = out["train"][0].shape[1]
    info["processes"] = ctx.world
    return out["train"], out["test"], info


# ---- encoder families -------------------------------------------------------------------------------------
# backbones.families (the family contract) says which input a family expects, which taps it offers and which
# tap its releasing project's linear evaluation reads.


def is_vit(ctx) -> bool:
    return getattr(ctx.checkpoint, "family", "resnet") == "vit"


def default_tap(ctx) -> str:
    """ResNet: the global average pool; ViT: the CLS token after the final norm (DINO / DINOv2 kNN feature)."""
    return "cls" if is_vit(ctx) else "avgpool"


def family_transform(ctx, task_transform: EvalTransform) -> EvalTransform:
    """The task's transform for a ResNet; a ViT's own input (Resize(256, bicubic), CenterCrop(224), ImageNet
    mean/std on every dataset; under --demo the task's smaller crop at the same ratio)."""
    if not is_vit(ctx):
        return task_transform
    return families.eval_transform(ctx.checkpoint, task_transform, ctx.demo)


def tap_module(ctx, tap: str) -> nn.Module:
    """A module whose forward gives the (N, D) features of `tap`."""
    return families.tap_model(ctx.model, tap)


def linear_taps(ctx) -> list:
    """[(tap, head)] of the releasing project's linear evaluation; head 'linear' or 'bn_linear'."""
    return families.linear_protocol(ctx.checkpoint)


class TapCheckpoint:
    """The run's checkpoint seen through one tap: the cache id names the tap, so that a task that caches the
    encoder's output (classifier_training's test features) never reads another tap's features."""

    def __init__(self, checkpoint, tap):
        self._checkpoint, self._tap = checkpoint, tap

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)

    @property
    def cache_id(self):
        return f"{self._checkpoint.cache_id}|tap={self._tap}"


def features_artifact(train_x, train_y, test_x, test_y):
    """The `features.npz` artifact (written beside the record): the features and labels the classifier saw."""
    def write(path):
        with open(path, "wb") as f:
            np.savez(f, train_x=np.asarray(train_x), train_y=np.asarray(train_y), test_x=np.asarray(test_x),
                     test_y=np.asarray(test_y))
    return {"features.npz": write}
