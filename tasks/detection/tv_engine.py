"""The torchvision engine: MoCo's two recipes built from `torchvision.models.detection` parts.

- voc_det: Faster R-CNN, C4: stem-res4 is the feature map (stride 16), RoIAlign (aligned, 14 x 14,
  as Detectron2's ROIAlignV2) pools proposals, res5 plus an extra BatchNorm (MoCo's
  Res5ROIHeadsExtraNorm) and average pooling make the box head.
- coco_instseg: Mask R-CNN, FPN with BatchNorm, the 4conv1fc box head and the mask head with BatchNorm.
Every norm layer is plain BatchNorm, trained (FREEZE_AT 0); the RPN / RoI settings are Detectron2's
defaults for each backbone (values and their sources below). Differences from the Detectron2 engine are
listed in the README.
"""
import copy
import math
from dataclasses import replace

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
from core.progress import progress
from core.sampling import SeededBatches, SeededSamples
from datasets.coco import annotation_mask
from tasks.detection.data import load_image
from tasks.detection.metrics import encode_masks

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
    return BUILDERS[recipe.head](trunk, num_classes, p)


# ---- data ---------------------------------------------------------------------------------------

class Detections(torch.utils.data.Dataset):
    """(image tensor in [0, 1], target) per index, flipped at random (p = 0.5) when `flip`: under
    `core.sampling.SeededSamples` the flip depends only on (seed, pass, image); masks when `with_masks`."""

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
        return image, target


def _collate(batch):
    return tuple(zip(*batch))


def _loader(records, p, with_masks, seed, start, rank=0, world=1):
    """This process's share (ims_per_batch / world images) of each global batch from iteration `start` on:
    passes over the images in seeded orders (`core.sampling`), so a resumed run and a run on any number of
    processes see the same global batches."""
    sampler = SeededBatches(len(records), p.ims_per_batch, seed, start=start, rank=rank, world=world)
    return torch.utils.data.DataLoader(SeededSamples(Detections(records, with_masks, p.flip), seed),
                                       batch_sampler=sampler, collate_fn=_collate, num_workers=p.workers)


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
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def train(model, records, p, recipe, device, seed, state, log, rank=0, world=1):
    """Trains for p.max_iter iterations; `state` (a StateFile) saves every checkpoint_period and resumes.
    Under torchrun each process takes its share of every global batch (DDP averages the gradients; BN is
    synchronised on CUDA) and rank 0 saves; the model returned is the plain module."""
    if p.ims_per_batch % world:
        raise UserError(f"ims_per_batch {p.ims_per_batch} is not divisible by the {world} processes")
    model.to(device).train()
    opt = optimizer(model, p)
    start = 0
    saved = state.load()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start = saved["iteration"]
        log(f"  resumed {state.path.name} at iteration {start}")
    device = torch.device(device)
    amp = device.type == "cuda"
    net = model
    if world > 1:
        if amp:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same parameters, BN over the global batch
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if amp else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    batches = iter(_loader(records, p, recipe.masks, seed, start, rank, world))
    bar = progress(range(start, p.max_iter), f"{recipe.task} train", total=p.max_iter, initial=start, show=rank == 0)
    for it in bar:
        for group in opt.param_groups:
            group["lr"] = p.base_lr * lr_factor(it, p)
        images, targets = _to(*next(batches), device)
        with torch.autocast("cuda", enabled=amp):
            losses = net(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the detection loss became {loss.item()} at iteration {it}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if rank == 0 and ((it + 1) % p.checkpoint_period == 0 or it + 1 == p.max_iter):
            state.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": it + 1})
    model = net.module if world > 1 else net
    if rank == 0:
        # the images Detectron2's PreciseBN averages over on `world` processes, here on one
        precise_bn(model, records, replace(p, precise_bn_iters=p.precise_bn_iters * world), recipe, device, seed,
                   world)
    return model


@torch.no_grad()
def precise_bn(model, records, p, recipe, device, seed, world=1):
    """Detectron2's PreciseBN: BN statistics re-estimated as the plain mean over precise_bn_iters batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or p.precise_bn_iters <= 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    batches = iter(_loader(records, p, recipe.masks, seed + 1, 0, 0, world))
    model.train()
    for _ in range(p.precise_bn_iters):
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
    for start in progress(range(0, len(records), p.test_batch), f"inference ({len(records)} images)"):
        chunk = records[start:start + p.test_batch]
        images = [load_image(r["file_name"]).to(device)
                  for r in chunk]
        for r, o in zip(chunk, model(images)):
            pred = {"boxes": o["boxes"].cpu().numpy(), "scores": o["scores"].cpu().numpy(),
                    "labels": o["labels"].cpu().numpy() - 1}
            if "masks" in o:
                pred["masks"] = encode_masks((o["masks"][:, 0] > 0.5).cpu().numpy())
            out[r["image_id"]] = pred
    model.transform.min_size = tuple(p.train_sizes)
    return out
