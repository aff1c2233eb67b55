"""The torchvision engine: MoCo's two recipes built from `torchvision.models.detection` parts.

- voc_det: Faster R-CNN, C4: stem-res4 is the feature map (stride 16), RoIAlign (aligned, 14 x 14,
  as Detectron2's ROIAlignV2) pools proposals, res5 plus an extra BatchNorm (MoCo's
  Res5ROIHeadsExtraNorm) and average pooling make the box head.
- coco_instseg: Mask R-CNN, FPN with BatchNorm, the 4conv1fc box head and the mask head with BatchNorm.
Every norm layer is BatchNorm, trained (FREEZE_AT 0), over the global batch under torchrun (batchnorm.py);
the RPN / RoI settings are Detectron2's defaults for each backbone (values and their sources below).
Differences from the Detectron2 engine are listed in the README.

Reproducible by construction: the global batches come from `core.sampling` and every random choice of the
detector is drawn per image (tv_random.py), so a run resumed at any checkpoint gives the uninterrupted
run's weights bit for bit on the CPU, and a run on N processes the one-process run's within float
rounding (tests/test_detection.py states the tolerance and why).

Speed: loaders from `core.loading` (workers from the machine's cores, pinned memory and non-blocking
copies on CUDA), the loss read from the device once per log period. cudnn.benchmark is left off, as
Detectron2 leaves it (CUDNN_BENCHMARK False: the input sizes change every iteration, so it would re-tune
for every shape), and channels_last is not used: torchvision's CUDA RoIAlign makes its input contiguous
NCHW (csrc/ops/cuda/roi_align_kernel.cu), so every pooled feature map would be copied back.
"""
import copy
import os

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from core.cli import UserError
from core.loading import loader_options, resolve_workers
from core.progress import progress
from core.sampling import SeededBatches, SeededSamples
from datasets.coco import annotation_mask
from tasks.detection.batchnorm import global_batchnorm
from tasks.detection.data import load_image
from tasks.detection.metrics import encode_masks
from tasks.detection.tv_random import image_seeds, seed_per_image

# Detectron2 defaults (config/defaults.py), as MoCo's configs keep them: RPN.BATCH_SIZE_PER_IMAGE,
# ROI_HEADS.SCORE_THRESH_TEST, NMS_THRESH_TEST, TEST.DETECTIONS_PER_IMAGE, the anchors, mask pooler 14.
HEADS = dict(rpn_batch_size_per_image=256, box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100)
ANCHOR_SIZES, ASPECT_RATIOS = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
MASK_POOLER = 14


class AlignedRoIPool(MultiScaleRoIAlign):
    """RoIAlign with the half-pixel alignment (Detectron2's ROIAlignV2) on the single C4 feature map."""

    def __init__(self, size=14, stride=16):
        super().__init__(["0"], size, 0)
        self.size, self.scale = size, 1.0 / stride

    def forward(self, features, proposals, image_shapes):
        return roi_align(features["0"], proposals, self.size, self.scale, sampling_ratio=0, aligned=True)


def _c4(trunk, num_classes, p):
    stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3)
    stem.out_channels = _channels(trunk.layer3)
    width = _channels(trunk.layer4)
    head = nn.Sequential(trunk.layer4, nn.BatchNorm2d(width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return FasterRCNN(stem, None, rpn_anchor_generator=AnchorGenerator((ANCHOR_SIZES,), (ASPECT_RATIOS,)),
                      box_roi_pool=AlignedRoIPool(p.pooler_resolution), box_head=head,
                      box_predictor=FastRCNNPredictor(width, num_classes + 1), **_settings(p))


def _fpn(trunk, num_classes, p):
    channels = [_channels(getattr(trunk, f"layer{i}")) for i in range(1, 5)]
    backbone = BackboneWithFPN(trunk, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels, 256,
                               extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * 5)
    levels = ["0", "1", "2", "3"]
    box_head = FastRCNNConvFCHead((256, p.pooler_resolution, p.pooler_resolution), [256] * 4, [1024],
                                  norm_layer=nn.BatchNorm2d)
    mask_head = MaskRCNNHeads(256, [256] * 4, 1, norm_layer=nn.BatchNorm2d)
    return MaskRCNN(backbone, None, rpn_anchor_generator=anchors,
                    box_roi_pool=MultiScaleRoIAlign(levels, p.pooler_resolution, 0), box_head=box_head,
                    box_predictor=FastRCNNPredictor(1024, num_classes + 1),
                    mask_roi_pool=MultiScaleRoIAlign(levels, MASK_POOLER, 0), mask_head=mask_head,
                    mask_predictor=MaskRCNNPredictor(256, 256, num_classes + 1), **_settings(p))


def _channels(layer):
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def _settings(p):
    return dict(min_size=tuple(p.train_sizes), max_size=p.max_size, image_mean=[m / 255 for m in p.pixel_mean],
                image_std=[s / 255 for s in p.pixel_std], rpn_pre_nms_top_n_train=p.rpn_pre_nms_topk_train,
                rpn_post_nms_top_n_train=p.rpn_post_nms_topk_train, rpn_pre_nms_top_n_test=p.rpn_pre_nms_topk_test,
                rpn_post_nms_top_n_test=p.rpn_post_nms_topk_test, box_batch_size_per_image=p.roi_batch_size_per_image,
                **HEADS)


BUILDERS = {"c4": _c4, "fpn": _fpn}  # recipe.head -> the detector around a torchvision ResNet


def build(recipe, encoder, num_classes, p):
    """The recipe's detector around a copy of the encoder (the run's other tasks keep the original)."""
    trunk = copy.deepcopy(encoder).train()
    return seed_per_image(BUILDERS[recipe.head](trunk, num_classes, p))


# ---- data ---------------------------------------------------------------------------------------

class Detections(torch.utils.data.Dataset):
    """(image tensor in [0, 1], target) per index, flipped at random (p = 0.5) when `flip`, with the image's
    seeds for the detector's random choices (tv_random); under `core.sampling.SeededSamples` both depend only
    on (seed, pass, image). Masks when `with_masks`."""

    def __init__(self, records, with_masks, flip):
        self.records, self.with_masks, self.flip = records, with_masks, flip

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        r = self.records[index]
        image = load_image(r["file_name"])
        anns = [a for a in r["annotations"] if not a["iscrowd"]]  # crowd regions never train (as Detectron2)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([a["category_id"] + 1 for a in anns], dtype=torch.int64)}
        if self.with_masks:
            target["masks"] = torch.from_numpy(np.stack([annotation_mask(a, r["height"], r["width"]) for a in anns])
                                               .astype(np.uint8)).reshape(-1, r["height"], r["width"])
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            target["boxes"] = torch.stack([r["width"] - boxes[:, 2], boxes[:, 1], r["width"] - boxes[:, 0],
                                           boxes[:, 3]], 1)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        target["seeds"] = image_seeds()
        return image, target


class TestImages(torch.utils.data.Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return load_image(self.records[index]["file_name"])


def _collate(batch):
    return tuple(zip(*batch))


def _loader(records, p, with_masks, seed, start, device, rank=0, world=1):
    """This process's share (ims_per_batch / world images) of each global batch from iteration `start` on:
    passes over the images in seeded orders (`core.sampling`), so a resumed run and a run on any number of
    processes see the same global batches. One endless loader per training (its workers live as long)."""
    sampler = SeededBatches(len(records), p.ims_per_batch, seed, start=start, rank=rank, world=world)
    workers = resolve_workers(p.workers, int(os.environ.get("LOCAL_WORLD_SIZE", world)))  # torchrun's count per node
    return torch.utils.data.DataLoader(SeededSamples(Detections(records, with_masks, p.flip), seed),
                                       batch_sampler=sampler, collate_fn=_collate,
                                       **loader_options(device, workers, reused=False))


# ---- training -----------------------------------------------------------------------------------

def lr_factor(it, p):
    """Detectron2's WarmupMultiStepLR: linear warm-up from warmup_factor, then x0.1 at each step."""
    decay = 0.1 ** sum(it >= s for s in p.steps)
    if it < p.warmup_iters:
        alpha = it / p.warmup_iters
        return decay * (p.warmup_factor * (1 - alpha) + alpha)
    return decay


def optimizer(model, p):
    """SGD; norm parameters without weight decay (Detectron2's WEIGHT_DECAY_NORM 0)."""
    norm, other = [], []
    for module in model.modules():
        target = norm if isinstance(module, nn.modules.batchnorm._BatchNorm) else other
        target += [q for q in module.parameters(recurse=False) if q.requires_grad]
    return torch.optim.SGD([{"params": other}, {"params": norm, "weight_decay": 0.0}], lr=p.base_lr,
                           momentum=p.momentum, weight_decay=p.weight_decay)


def _to(images, targets, device):
    """A batch on the device (asynchronous copies from pinned memory on CUDA); the seeds stay Python integers."""
    move = lambda v: v.to(device, non_blocking=True) if torch.is_tensor(v) else v  # noqa: E731
    return [move(i) for i in images], [{k: move(v) for k, v in t.items()} for t in targets]


def train(model, records, p, recipe, device, seed, state, log, rank=0, world=1):
    """Trains for p.max_iter iterations; `state` (a StateFile) saves every checkpoint_period and resumes.
    Under torchrun each process takes its share of every global batch, DDP averages the gradients, every
    BatchNorm normalises over the global batch (batchnorm.py) and rank 0 saves; then every process runs
    precise BN on its share. The model returned is the plain module."""
    if p.ims_per_batch % world:
        raise UserError(f"ims_per_batch {p.ims_per_batch} is not divisible by the {world} processes")
    device = torch.device(device)
    model.to(device).train()
    opt = optimizer(model, p)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start = 0
    saved = state.load()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        start = saved["iteration"]
        log(f"  resumed {state.path.name} at iteration {start}")
    net = model
    if world > 1:
        model = global_batchnorm(model, device)  # the same parameters and buffers, BN over the global batch
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if amp else None)
    batches = iter(_loader(records, p, recipe.masks, seed, start, device, rank, world))
    bar = progress(range(start, p.max_iter), f"{recipe.task} train", total=p.max_iter, initial=start, show=rank == 0)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for it in bar:
        for group in opt.param_groups:
            group["lr"] = p.base_lr * lr_factor(it, p)
        images, targets = _to(*next(batches), device)
        with torch.autocast("cuda", enabled=amp):
            losses = net(images, targets)
        loss = sum(losses.values())
        nonfinite |= ~torch.isfinite(loss.detach())  # read from the device once per log period
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        last = it + 1 == p.max_iter
        if (it + 1) % p.log_period == 0 or last:
            if nonfinite.item():
                raise FloatingPointError(f"the detection loss was not finite between iterations "
                                         f"{it + 2 - p.log_period} and {it + 1}")
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if rank == 0 and ((it + 1) % p.checkpoint_period == 0 or last):
            state.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "iteration": it + 1})
    precise_bn(model, records, p, recipe, device, seed, rank, world)
    return model


@torch.no_grad()
def precise_bn(model, records, p, recipe, device, seed, rank=0, world=1):
    """Detectron2's PreciseBN (engine/hooks.py, run on every process under DDP): BN statistics re-estimated
    with the trained weights as the plain mean, over precise_bn_iters global batches, of each batch's mean
    and unbiased variance. Each process runs its share of every batch; with BN synchronised over the
    processes (batchnorm.py) every process gets the statistics of the global batches, as on one process."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or p.precise_bn_iters <= 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    batches = iter(_loader(records, p, recipe.masks, seed + 1, 0, device, rank, world))
    model.train()
    for k in range(p.precise_bn_iters):
        for m in bns:
            m.momentum = 1.0 / (k + 1)  # the cumulative mean, without reading a counter from the device
        model(*_to(*next(batches), device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


# ---- inference ----------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, records, p, device):
    """{image_id: {"boxes", "scores", "labels" (contiguous), "masks" (RLEs, Mask R-CNN)}} at test size."""
    model.to(device).eval()
    model.transform.min_size = (p.test_size,)
    out = {}
    loader = torch.utils.data.DataLoader(TestImages(records), p.test_batch, collate_fn=list,
                                         **loader_options(device, resolve_workers(p.workers), reused=False))
    for start, images in zip(progress(range(0, len(records), p.test_batch), f"inference ({len(records)} images)"),
                             loader):
        chunk = records[start:start + p.test_batch]
        for r, o in zip(chunk, model([i.to(device, non_blocking=True) for i in images])):
            pred = {"boxes": o["boxes"].cpu().numpy(), "scores": o["scores"].cpu().numpy(),
                    "labels": o["labels"].cpu().numpy() - 1}
            if "masks" in o:
                pred["masks"] = encode_masks((o["masks"][:, 0] > 0.5).cpu().numpy())
            out[r["image_id"]] = pred
    model.transform.min_size = tuple(p.train_sizes)
    return out
