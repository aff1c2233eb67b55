"""ViTDet: Mask R-CNN on COCO for a ViT checkpoint, through Detectron2's own ViTDet model.

The model is Detectron2's `common/models/mask_rcnn_vitdet.py` (ViT + SimpleFeaturePyramid at scales 4, 2,
1, 1/2 with LayerNorm, a 2-conv RPN head, the 4conv1fc box head and the mask head with LayerNorm), its ViT
given the checkpoint's architecture and weights (vitdet_weights.py): window attention of 14 in every block
but each quarter's last (ViT-B: global attention in blocks 2, 5, 8, 11), relative position biases from zero,
drop path `vitdet_drop_path`. The recipe is mask_rcnn_vitdet_b_100ep's (values and sources in
protocol.CocoInstsegProtocol, vitdet_*): large-scale jitter, AdamW with layer-wise lr decay
(`get_vit_lr_decay_rate`), no weight decay on norms and pos_embed, warm-up then x0.1 at each milestone,
mixed precision on CUDA (train.amp.enabled). Training is resumable to the bit as in d2_engine.py.
"""
from functools import partial
from pathlib import Path

import detectron2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils.env import seed_all_rng
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from core.loading import resolve_workers
from datasets.coco import annotation_mask
from tasks.detection.d2_engine import ResumableBatches, SeededMapping, SeedEachIteration, _batch_as_list, \
    d2_records, predict
from tasks.detection.vitdet_weights import load_into, vit_arch

WINDOW = 14  # mask_rcnn_vitdet.py: window_size 14
# Detectron2's own model config (read from the installed package, as model_zoo.get_config reads it)
MODEL_CONFIG = Path(detectron2.__file__).parent / "model_zoo" / "configs" / "common" / "models" / "mask_rcnn_vitdet.py"


def global_blocks(depth):
    """The blocks with global attention: the last of each quarter (ViT-B 2, 5, 8, 11; L 5, 11, 17, 23)."""
    return [i for i in range(depth) if (i + 1) % (depth // 4) == 0]


def build_model(vit, p, num_classes, device):
    model = LazyConfig.load(str(MODEL_CONFIG)).model
    arch = vit_arch(vit)
    eps = arch.pop("norm_eps")
    net = model.backbone.net
    for key, value in arch.items():
        setattr(net, key, value)
    net.norm_layer = partial(nn.LayerNorm, eps=eps)
    net.img_size = p.vitdet_image_size
    net.drop_path_rate = p.vitdet_drop_path
    net.window_size = WINDOW
    net.window_block_indexes = [i for i in range(arch["depth"]) if i not in global_blocks(arch["depth"])]
    model.backbone.square_pad = p.vitdet_image_size
    model.roi_heads.num_classes = num_classes
    model.roi_heads.batch_size_per_image = p.roi_batch_size_per_image
    model.proposal_generator.pre_nms_topk = (p.rpn_pre_nms_topk_train, p.rpn_pre_nms_topk_test)
    model.proposal_generator.post_nms_topk = (p.rpn_post_nms_topk_train, p.rpn_post_nms_topk_test)
    model.pixel_mean, model.pixel_std = list(p.pixel_mean), list(p.pixel_std)
    model = instantiate(model)
    load_into(model.backbone.net, vit)
    return model.to(device)


def optimizer(model, p, depth):
    params = get_default_optimizer_params(
        model, base_lr=p.vitdet_base_lr, weight_decay_norm=0.0,
        lr_factor_func=partial(get_vit_lr_decay_rate, num_layers=depth, lr_decay_rate=p.vitdet_layer_decay),
        overrides={"pos_embed": {"weight_decay": 0.0}})
    return torch.optim.AdamW(params, lr=p.vitdet_base_lr, betas=(0.9, 0.999), weight_decay=p.vitdet_weight_decay)


def lr_schedule(opt, p):
    scheduler = WarmupParamScheduler(
        MultiStepParamScheduler([0.1 ** k for k in range(len(p.vitdet_steps) + 1)], milestones=list(p.vitdet_steps),
                                num_updates=p.vitdet_max_iter),
        warmup_factor=p.warmup_factor, warmup_length=p.vitdet_warmup_iters / p.vitdet_max_iter)
    return LRMultiplier(opt, scheduler, p.vitdet_max_iter)


def train_mapper(p):
    size = p.vitdet_image_size
    return DatasetMapper(is_train=True, image_format="RGB", use_instance_mask=True, recompute_boxes=True,
                         instance_mask_format="bitmask",
                         augmentations=[T.RandomFlip(horizontal=True),
                                        T.ResizeScale(min_scale=0.1, max_scale=2.0, target_height=size,
                                                      target_width=size),
                                        T.FixedSizeCrop(crop_size=(size, size), pad=False)])


def test_mapper(p):
    return DatasetMapper(is_train=False, image_format="RGB",
                         augmentations=[T.ResizeShortestEdge(p.vitdet_image_size, max_size=p.vitdet_image_size)])


def with_rle_masks(records):
    """The records with each polygon as its RLE, so that the large-scale-jitter crop cuts masks as images
    (Detectron2 crops polygons with shapely, which the suite does not need; the crop of the mask is the same)."""
    from pycocotools import mask as mask_utils

    out = []
    for r in records:
        anns = [{**a, "segmentation": mask_utils.encode(np.asfortranarray(annotation_mask(a, r["height"], r["width"])))}
                for a in r["annotations"]]
        out.append({**r, "annotations": anns})
    return out


def train_and_predict(ctx, p, recipe, train, test, classes, seed, output_dir):
    """One process (the ViTDet recipe on several GPUs is Detectron2's lazyconfig_train_net; not run here)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vit = ctx.model.vit
    seed_all_rng(seed)
    model = build_model(vit, p, len(classes), ctx.device)
    opt = optimizer(model, p, len(vit.blocks))
    records = with_rle_masks(d2_records(train))
    batches = ResumableBatches(records, p.vitdet_ims_per_batch, seed)
    loader = torch.utils.data.DataLoader(SeededMapping(records, train_mapper(p), seed), batch_sampler=batches,
                                         collate_fn=_batch_as_list, num_workers=resolve_workers(p.workers),
                                         generator=torch.Generator().manual_seed(seed))
    trainer = (AMPTrainer if ctx.device.type == "cuda" else SimpleTrainer)(model, loader, opt)
    checkpointer = DetectionCheckpointer(model, str(output_dir), trainer=trainer)
    trainer.register_hooks([SeedEachIteration(seed), hooks.IterationTimer(),
                            hooks.LRScheduler(scheduler=lr_schedule(opt, p)),
                            hooks.PeriodicCheckpointer(checkpointer, p.checkpoint_period)])
    start = 0
    if ctx.resume and checkpointer.has_checkpoint():
        checkpointer.resume_or_load("", resume=True)
        start = trainer.iter + 1
        ctx.log(f"  resumed {output_dir.name} at iteration {start}")
    batches.start = start
    trainer.train(start, p.vitdet_max_iter)
    test_loader = build_detection_test_loader(d2_records(test), mapper=test_mapper(p))
    return predict(model, test_loader)
