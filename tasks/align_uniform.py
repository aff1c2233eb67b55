"""Alignment and uniformity (Wang & Isola 2020; the paper's Table 12).

Two augmented views of every image of the evaluation split (the pretraining augmentations of Table 9),
embedded and L2-normalised. Alignment = mean ||f(x) - f(x')||² over the pairs; uniformity = log mean
exp(-2 ||f(x_i) - f(x_j)||²) over pairs of images, averaged over the two views.

The embedding (`space`): Wang & Isola define both on the unit sphere of the encoder's output embedding
(SsnL/align_uniform: the 128-d L2-normalised output), and Table 12's uniformity of -3.8 is only possible
there: any set of points has uniformity >= -4 (1 - mean pairwise cosine), and pooled post-ReLU backbone
features have large positive cosines; uniform points on the 128-d sphere give -3.94. So `projector` (the
default) embeds with the L2-normalised outputs of the run's online projector, which this suite's
pretraining checkpoints carry (`backbones.heads.find_projector`); a checkpoint without one falls back to
the pooled backbone features, and the record says which space was used.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backbones.features import encoder_autocast
from backbones.heads import find_projector
from core.cli import UserError
from core.loading import loader_options, resolve_workers
from core.progress import progress
from core.settings import setting
from datasets.catalog import IN100_CLASSES, IN100_DEMO_CLASSES, read_classification
from datasets.decode import SquareImages, collate_readable
from datasets.views import IMAGENET_MEAN, IMAGENET_STD, ViewAugment, augment_view
from tasks.context import TaskOutput
from tasks.metrics import alignment, uniformity


@dataclass(frozen=True)
class AlignUniformProtocol:
    dataset: str = setting("imagenet100", "Table 12 reports ImageNet-100 encoders")
    split: str = setting("val", "the dataset's validation split: held-out images, as Wang & Isola measure on validation sets")
    num_classes: int = setting(100, "the dataset's class count; a tree with another count is refused")
    class_list: str = setting(IN100_CLASSES, "CMC's 100 synsets (datasets/imagenet100_classes.txt)")
    decode_size: int = setting(256, "images decoded to the 256 px centre square, as pretraining decodes them")
    crop_size: int = setting(224, "Table 9 random resized crop at the pretraining size")
    alpha: float = setting(2.0, "Wang & Isola (2020), alignment exponent α = 2")
    t: float = setting(2.0, "Wang & Isola (2020), uniformity temperature t = 2")
    batch_size: int = setting(128, "runtime setting; does not change results")
    workers: int = setting(2, "runtime setting (image-decoding processes; 'auto' or -1: the machine's cores, "
                              "core.loading); does not change results")
    max_images: int = setting(10000, "uniformity is O(n²): at most this many images (the first n of the split)")
    space: str = setting("projector", "Wang & Isola: the L2-normalised output embedding (SsnL/align_uniform "
                                      "examples/stl10); backbone: pooled backbone features",
                         choices=("projector", "backbone"))


DEMO = {"dataset": "imagenet100", "num_classes": 6, "class_list": IN100_DEMO_CLASSES, "decode_size": 64,
        "crop_size": 48}


@torch.inference_mode()
def run(ctx, p: AlignUniformProtocol) -> TaskOutput:
    split = read_classification(ctx.data_root, p.dataset, p.split, p.num_classes, p.class_list)
    images = SquareImages([split], p.decode_size)
    n = min(len(images), p.max_images)
    aug = ViewAugment(crop_size=p.crop_size)
    mean, std = ctx.checkpoint.input_normalization or (IMAGENET_MEAN, IMAGENET_STD)
    g = torch.Generator().manual_seed(ctx.seed)
    model, space, info = ctx.model, "backbone", {}
    if p.space == "projector":
        projector, where = find_projector(ctx.checkpoint.path) if ctx.checkpoint.sha256 else (None, "no file")
        info["embedding_source"] = where
        if projector is not None:
            model, space = torch.nn.Sequential(ctx.model, projector), "projector"
        else:
            ctx.log(f"  no projector ({where}): alignment and uniformity of the pooled backbone features")
    model = model.to(ctx.device).eval()
    # images decoded in loader processes, in order; the views are cut here from one generator, as before
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(n)), batch_size=p.batch_size,
                                         shuffle=False, collate_fn=collate_readable,
                                         **loader_options(ctx.device, resolve_workers(p.workers, ctx.world),
                                                          reused=False))
    views = ([], [])
    for batch, _, bad in progress(loader, "align/uniform", unit="batch"):
        if bad:
            raise UserError(f"cannot read image {images.describe(bad[0])}; fix or remove it")
        for v in views:
            x = augment_view(batch, aug, g, mean, std).to(ctx.device, non_blocking=True)
            with encoder_autocast(ctx.device):
                v.append(F.normalize(model(x).float().flatten(1), dim=1).cpu())
    x, y = torch.cat(views[0]), torch.cat(views[1])
    metrics = {"alignment": alignment(x, y, p.alpha), "uniformity": (uniformity(x, p.t) + uniformity(y, p.t)) / 2}
    info.update(test_size=n, feature_dim=x.shape[1], space=space)
    return TaskOutput(metrics, info, probe={"probe": f"align_uniform:{space}"})
