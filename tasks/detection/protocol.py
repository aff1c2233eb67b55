"""The two detection recipes: MoCo's detection configs (He et al. 2020, `detection/configs/`), which
the paper follows (§8.4), with the paper's own values where it states them."""
from dataclasses import dataclass

from core.settings import setting

MOCO = ("MoCo's detection recipe (He et al. 2020, detection/configs: Base-RCNN-C4-BN.yaml, "
        "pascal_voc_R_50_C4_24k_moco.yaml), which the paper follows (§8.4)")
D2 = "Detectron2's default config (detectron2/config/defaults.py), which MoCo's recipe keeps"
FPN = ("Detectron2's configs/Base-RCNN-FPN.yaml (MoCo's released configs hold no FPN recipe, only C4; the paper's "
       "COCO schedule of §9 is VICReg's, App. C.3, with LR 0.05)")
VITDET = "Detectron2's projects/ViTDet/configs (Li et al. 2022, mask_rcnn_vitdet_b_100ep), "
COCO_NORM = ("Detectron2's configs/Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml: SyncBN in the backbone, the FPN, the "
             "4conv1fc box head and the mask head (trained, FREEZE_AT 0; per-process BN on one device), as detectors "
             "finetuned from self-supervised weights are trained in MoCo and 'Rethinking ImageNet Pre-training'; "
             "VISSL's sBN_precBN.yaml keeps norms in the backbone only, a documented alternative, not used here")


@dataclass(frozen=True)
class DetectionProtocol:
    engine: str = setting("auto", "auto: Detectron2 when it imports, else torchvision (README: engine differences)")
    arch: str = setting("resnet50", "paper §8.4: ResNet-50 backbone")
    ims_per_batch: int = setting(16, MOCO + ": IMS_PER_BATCH 16")
    momentum: float = setting(0.9, D2 + ": SOLVER.MOMENTUM")
    weight_decay: float = setting(1e-4, D2 + ": SOLVER.WEIGHT_DECAY")
    warmup_factor: float = setting(0.001, D2 + ": SOLVER.WARMUP_FACTOR (linear warm-up)")
    max_size: int = setting(1333, D2 + ": INPUT.MAX_SIZE_TRAIN / MAX_SIZE_TEST")
    flip: bool = setting(True, D2 + ": horizontal flip in training")
    pixel_mean: tuple[float, ...] = setting((123.675, 116.28, 103.53), MOCO + ": RGB input, torchvision's mean (0-255)")
    pixel_std: tuple[float, ...] = setting((58.395, 57.12, 57.375), MOCO + ": torchvision's std (0-255)")
    precise_bn_iters: int = setting(200, MOCO + ": TEST.PRECISE_BN.ENABLED; D2 NUM_ITER 200")
    roi_batch_size_per_image: int = setting(512, D2 + ": ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    checkpoint_period: int = setting(5000, D2 + ": SOLVER.CHECKPOINT_PERIOD")
    test_batch: int = setting(1, "runtime setting of inference; does not change results")
    workers: int = setting(-1, "runtime setting (data-loading processes per training process; -1: the node's cores "
                              "shared among its processes, at most 8, core/loading.py); does not change results")
    log_period: int = setting(20, D2 + ": DefaultTrainer's PeriodicWriter period 20 (the torchvision engine reads "
                                   "the loss from the device once per period)")
    trials: int = setting(1, "seeds run; MoCo reports VOC as the mean of 5 (--set trials=5), mean and std recorded")


@dataclass(frozen=True)
class VocDetProtocol(DetectionProtocol):
    train_sets: tuple[str, ...] = setting(("2007/trainval", "2012/trainval"), "paper §8.4: VOC07+12 trainval")
    test_set: str = setting("2007/test", "paper §8.4: VOC2007 test")
    base_lr: float = setting(0.02, "paper §8.4: initial LR 0.02")
    max_iter: int = setting(24000, MOCO + ": pascal_voc_R_50_C4_24k")
    steps: tuple[int, ...] = setting((18000, 22000), MOCO + ": SOLVER.STEPS")
    warmup_iters: int = setting(100, MOCO + ": SOLVER.WARMUP_ITERS")
    train_sizes: tuple[int, ...] = setting(tuple(range(480, 801, 32)), MOCO + ": MIN_SIZE_TRAIN 480-800 step 32")
    test_size: int = setting(800, MOCO + ": MIN_SIZE_TEST")
    pooler_resolution: int = setting(14, "Base-RCNN-C4: ROI_BOX_HEAD.POOLER_RESOLUTION 14")
    rpn_pre_nms_topk_train: int = setting(12000, D2 + ": RPN.PRE_NMS_TOPK_TRAIN (C4)")
    rpn_post_nms_topk_train: int = setting(2000, D2 + ": RPN.POST_NMS_TOPK_TRAIN (C4)")
    rpn_pre_nms_topk_test: int = setting(6000, MOCO + ": RPN.PRE_NMS_TOPK_TEST 6000")
    rpn_post_nms_topk_test: int = setting(1000, MOCO + ": RPN.POST_NMS_TOPK_TEST 1000")


@dataclass(frozen=True)
class CocoInstsegProtocol(DetectionProtocol):
    train_set: str = setting("train", "paper §8.4: COCO train2017")
    test_set: str = setting("val", "paper §8.4: COCO val2017")
    base_lr: float = setting(0.05, "paper §9: LR 0.05")
    max_iter: int = setting(90000, "paper §9: 90k iterations")
    steps: tuple[int, ...] = setting((60000, 80000), "paper §9: divided by 10 at 60k and 80k")
    warmup_iters: int = setting(50, "paper §9: 50 warm-up iterations")
    train_sizes: tuple[int, ...] = setting(tuple(range(640, 801, 32)), FPN + ": INPUT.MIN_SIZE_TRAIN 640-800")
    test_size: int = setting(800, D2 + ": MIN_SIZE_TEST 800")
    pooler_resolution: int = setting(7, FPN + ": ROI_BOX_HEAD.POOLER_RESOLUTION 7 (mask head: 14)")
    rpn_pre_nms_topk_train: int = setting(2000, FPN + ": RPN.PRE_NMS_TOPK_TRAIN (per level)")
    rpn_post_nms_topk_train: int = setting(1000, FPN + ": RPN.POST_NMS_TOPK_TRAIN")
    rpn_pre_nms_topk_test: int = setting(1000, FPN + ": RPN.PRE_NMS_TOPK_TEST (per level)")
    rpn_post_nms_topk_test: int = setting(1000, FPN + ": RPN.POST_NMS_TOPK_TEST")
    norm: str = setting("syncbn-backbone-fpn-heads", COCO_NORM, choices=("syncbn-backbone-fpn-heads",))
    # A ViT checkpoint: ViTDet's Mask R-CNN (Detectron2 engine), its own recipe
    vitdet_image_size: int = setting(1024, VITDET + "coco_loader_lsj.py: large-scale jitter to 1024 x 1024 "
                                           "(ResizeScale 0.1-2.0, FixedSizeCrop), test ResizeShortestEdge 1024")
    vitdet_ims_per_batch: int = setting(64, VITDET + "coco_loader_lsj.py: total_batch_size 64")
    vitdet_base_lr: float = setting(1e-4, VITDET + "common/optim.py AdamW: lr 1e-4, betas (0.9, 0.999)")
    vitdet_weight_decay: float = setting(0.1, VITDET + "common/optim.py AdamW: weight_decay 0.1 (0 for norms and "
                                              "pos_embed)")
    vitdet_layer_decay: float = setting(0.7, VITDET + "mask_rcnn_vitdet_b_100ep.py: get_vit_lr_decay_rate 0.7 "
                                             "(ViT-L 0.8, ViT-H 0.9 in their configs)")
    vitdet_drop_path: float = setting(0.1, VITDET + "common/models/mask_rcnn_vitdet.py: drop_path_rate 0.1 (ViT-B; "
                                           "L 0.4, H 0.5)")
    vitdet_max_iter: int = setting(184375, VITDET + "mask_rcnn_vitdet_b_100ep.py: 100 epochs = 184375 iterations")
    vitdet_steps: tuple[int, ...] = setting((163889, 177546), VITDET + "mask_rcnn_vitdet_b_100ep.py: milestones")
    vitdet_warmup_iters: int = setting(250, VITDET + "mask_rcnn_vitdet_b_100ep.py: warmup_length 250 iterations, "
                                            "factor 0.001")


# Demo: the generated 160 x 120 VOC and 128 x 128 COCO shapes (1-4 objects each), any ResNet, and a
# schedule two CPU cores finish in about a minute: 40 iterations (the whole path: training, precise BN,
# inference on every test image, scoring), fewer proposals and RoIs per image (the C4 box head runs res5 on
# every RoI), 7 x 7 RoIs. The longer demo that shows learning is `--set max_iter=1000 --set steps=750,900`
# (README: Detection).
DEMO = {"arch": "any", "ims_per_batch": 2, "max_size": 320, "precise_bn_iters": 5, "checkpoint_period": 20,
        "workers": 0, "roi_batch_size_per_image": 32, "pooler_resolution": 7, "rpn_pre_nms_topk_train": 600,
        "rpn_post_nms_topk_train": 100, "rpn_pre_nms_topk_test": 300, "rpn_post_nms_topk_test": 50}
VOC_DEMO = {**DEMO, "max_iter": 40, "steps": (30, 36), "warmup_iters": 10, "base_lr": 0.02,
            "train_sizes": (96, 112, 128, 144, 160), "test_size": 128}
COCO_DEMO = {**DEMO, "max_iter": 40, "steps": (30, 36), "warmup_iters": 10, "base_lr": 0.02,
             "train_sizes": (96, 112, 128), "test_size": 128,
             # a ViT: the same schedule, 128 x 128 large-scale jitter
             "vitdet_image_size": 128, "vitdet_ims_per_batch": 2, "vitdet_max_iter": 40, "vitdet_steps": (30, 36),
             "vitdet_warmup_iters": 10}
