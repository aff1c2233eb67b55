"""The Detectron2 engine: our config files (configs/*.yaml), the protocol's values over them, the
checkpoint converted to Detectron2's names and loaded with its matching, DefaultTrainer (PreciseBN,
periodic checkpoints, resume) and, with several GPUs, Detectron2's launcher. Only imported when
Detectron2 is installed (README: Detection).
"""
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, hooks, launch
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.utils import comm

from backbones.convert import write_backbone
from core.loading import resolve_workers
from core.progress import progress
from tasks.detection.metrics import encode_masks

CONFIGS = Path(__file__).resolve().parent / "configs"
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}

if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """MoCo's C4 box head: res5 followed by one more norm layer of the backbone's kind."""

        def _build_res5_block(self, cfg):
            block, channels = super()._build_res5_block(cfg)
            block.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
            return block, channels


def detectron2_weights(encoder, path):
    """The encoder's weights under Detectron2's names, in the .pkl form its checkpointer matches by suffix."""
    write_backbone(encoder.state_dict(), path, "detectron2")
    return path


def make_config(recipe, p, arch, device, seed, output_dir, weights, train_name, test_name, num_classes, world):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / recipe.d2_config))
    m, s = cfg.MODEL, cfg.SOLVER
    # launched workers each take the GPU of their local rank ("cuda"); one process takes the device asked for
    device = torch.device(device)
    m.DEVICE = "cuda" if device.type == "cuda" and world > 1 else str(device)
    m.WEIGHTS = str(weights)
    m.RESNETS.DEPTH = DEPTHS[arch]
    if DEPTHS[arch] < 50:
        m.RESNETS.RES2_OUT_CHANNELS = 64  # Detectron2's BasicBlock ResNets
    norm = "SyncBN" if world > 1 else "BN"  # synchronised BN across GPUs, plain BN on one device
    m.RESNETS.NORM = norm
    for node in recipe.d2_head_norms:
        m[node].NORM = norm
    m.PIXEL_MEAN, m.PIXEL_STD = list(p.pixel_mean), list(p.pixel_std)
    m.ROI_HEADS.NUM_CLASSES = num_classes
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = p.roi_batch_size_per_image
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = p.pooler_resolution
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = p.rpn_pre_nms_topk_train, p.rpn_post_nms_topk_train
    m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = p.rpn_pre_nms_topk_test, p.rpn_post_nms_topk_test
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST = tuple(p.train_sizes), p.test_size
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = p.max_size
    cfg.INPUT.RANDOM_FLIP = "horizontal" if p.flip else "none"
    s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER = p.ims_per_batch, p.base_lr, p.max_iter
    s.STEPS, s.WARMUP_ITERS, s.WARMUP_FACTOR = tuple(p.steps), p.warmup_iters, p.warmup_factor
    s.MOMENTUM, s.WEIGHT_DECAY, s.CHECKPOINT_PERIOD = p.momentum, p.weight_decay, p.checkpoint_period
    cfg.TEST.PRECISE_BN.ENABLED = p.precise_bn_iters > 0
    cfg.TEST.PRECISE_BN.NUM_ITER = max(p.precise_bn_iters, 1)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), (test_name,)
    cfg.DATALOADER.NUM_WORKERS = resolve_workers(p.workers, world)
    cfg.SEED, cfg.OUTPUT_DIR = seed, str(output_dir)
    cfg.freeze()
    return cfg


class Trainer(DefaultTrainer):
    """DefaultTrainer without its evaluation hook: the task scores the predictions itself."""

    def build_hooks(self):
        return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]


def _register(name, records, classes):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    from detectron2.structures import BoxMode

    d2_records = [{**r, "annotations": [{**a, "bbox_mode": BoxMode.XYXY_ABS} for a in r["annotations"]]}
                  for r in records]
    DatasetCatalog.register(name, lambda: d2_records)
    MetadataCatalog.get(name).set(thing_classes=list(classes))


def _train_worker(cfg, train, test, classes, resume):
    _register(cfg.DATASETS.TRAIN[0], train, classes)
    _register(cfg.DATASETS.TEST[0], test, classes)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    if comm.is_main_process():
        trainer.checkpointer.save("model_final_with_precise_bn")
    return trainer.model


def train_and_predict(ctx, p, recipe, train, test, classes, seed, output_dir):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    every_gpu = ctx.device.type == "cuda" and ctx.device_asked in (None, "auto", "cuda")  # not cuda:N
    world = torch.cuda.device_count() if every_gpu else 1
    weights = detectron2_weights(ctx.model, output_dir / "init_weights.pkl")
    names = (f"ssl_suite_{recipe.task}_train", f"ssl_suite_{recipe.task}_test")
    cfg = make_config(recipe, p, ctx.arch, ctx.device, seed, output_dir, weights, *names, len(classes), world)
    if world > 1:
        launch(_train_worker, world, args=(cfg, train, test, classes, ctx.resume))
        _register(names[1], test, classes)
        model = build_model(cfg)
        DetectionCheckpointer(model).load(str(output_dir / "model_final_with_precise_bn.pth"))
    else:
        model = _train_worker(cfg, train, test, classes, ctx.resume)
    return predict(model, cfg, test)


@torch.no_grad()
def predict(model, cfg, test):
    """Our prediction form (see metrics.py) from the model's Instances, in original image coordinates."""
    model.eval()
    out = {}
    for inputs in progress(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]), "inference"):
        for x, o in zip(inputs, model(inputs)):
            inst = o["instances"].to("cpu")
            pred = {"boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
                    "labels": inst.pred_classes.numpy()}
            if inst.has("pred_masks"):
                pred["masks"] = encode_masks(inst.pred_masks.numpy())
            out[x["image_id"]] = pred
    return out
