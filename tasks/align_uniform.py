"""Alignment and uniformity of frozen features (Wang & Isola 2020; the paper's Table 12).

Two augmented views of every image of the evaluation split (the pretraining augmentations of Table 9),
pooled backbone features, L2-normalised. Alignment = mean ||f(x) - f(x')||² over the pairs;
uniformity = log mean exp(-2 ||f(x_i) - f(x_j)||²) over pairs of images, averaged over the two views.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrain.augment import IMAGENET_MEAN, IMAGENET_STD, ViewAugment, augment_view
from pretrain.data import DecodedImages
from tasks.frozen import DATASET_PRESETS, DEMO_PRESETS, read_classification
from tasks.metrics import alignment, uniformity
from tasks.protocol import param


@dataclass(frozen=True)
class AlignUniformProtocol:
    dataset: str = param("imagenet100", "Table 12 reports ImageNet-100 encoders")
    split: str = param("val", "the dataset's validation split (issue: 'on a dataset's val split')")
    num_classes: int = param(100, "the dataset's class count; a tree with another count is refused")
    class_list: str = param(DATASET_PRESETS["imagenet100"]["class_list"], "CMC's 100 synsets")
    decode_size: int = param(256, "images decoded to the 256 px centre square, as pretraining decodes them")
    crop_size: int = param(224, "Table 9 random resized crop at the pretraining size")
    alpha: float = param(2.0, "Wang & Isola (2020), alignment exponent α = 2")
    t: float = param(2.0, "Wang & Isola (2020), uniformity temperature t = 2")
    batch_size: int = param(128, "runtime setting; does not change results")
    max_images: int = param(10000, "uniformity is O(n²): at most this many images (the first n of the split)")


DEMO = {"dataset": "imagenet100", "num_classes": DEMO_PRESETS["imagenet100"]["num_classes"],
        "class_list": DEMO_PRESETS["imagenet100"]["class_list"], "decode_size": 64, "crop_size": 48}


@torch.inference_mode()
def run(ctx, p: AlignUniformProtocol):
    from tasks.frozen import FrozenFeatureProtocol

    split = read_classification(ctx.data_root, FrozenFeatureProtocol(
        dataset=p.dataset, num_classes=p.num_classes, class_list=p.class_list), p.split)
    images = DecodedImages([split], p.decode_size)
    n = min(len(images), p.max_images)
    aug = ViewAugment(crop_size=p.crop_size)
    mean, std = ctx.checkpoint.input_normalization or (IMAGENET_MEAN, IMAGENET_STD)
    g = torch.Generator().manual_seed(ctx.seed)
    model = ctx.model.to(ctx.device).eval()
    views = ([], [])
    for start in tqdm(range(0, n, p.batch_size), desc="align/uniform", leave=False):
        batch = images.batch(range(start, min(n, start + p.batch_size)))
        for v in views:
            x = augment_view(batch, aug, g, mean, std).to(ctx.device)
            v.append(F.normalize(model(x).float().flatten(1), dim=1).cpu())
    x, y = torch.cat(views[0]), torch.cat(views[1])
    metrics = {"alignment": alignment(x, y, p.alpha), "uniformity": (uniformity(x, p.t) + uniformity(y, p.t)) / 2}
    return metrics, {"test_size": n, "feature_dim": x.shape[1]}
