"""Encoder families: what differs between a ResNet and a Vision Transformer once the weights are loaded.

A family says which input it expects (`eval_transform`), which feature taps it offers (`tap_model`), which tap
and head its releasing project's linear evaluation reads (`linear_protocol`), and which task needs it meets
(`supports`). Finding and loading the weights is `backbones.checkpoints` (ResNets) and `backbones.vit_layouts`
(ViTs); `backbones.checkpoints.make_encoder` dispatches by the structure of the weights. A new family is one
module beside `backbones/vit.py` and one entry in each function here.
"""
from core.cli import UserError

FAMILIES = ("resnet", "vit")
NEEDS = ("frozen", "finetune", "detection_c4", "detection_fpn")

# The ViT evaluation input: Resize(256, bicubic), CenterCrop(224), ImageNet mean/std on every dataset
# (dino eval_knn.py / eval_linear.py; dinov2 data/transforms.py make_classification_eval_transform; mae
# main_linprobe.py transform_val).
VIT_RESIZE, VIT_CROP, VIT_INTERPOLATION = 256, 224, "bicubic"
VIT_TRANSFORM_SOURCE = ("Resize(256, bicubic), CenterCrop(224), ImageNet mean/std (DINO eval_knn.py / "
                        "eval_linear.py, DINOv2 make_classification_eval_transform, MAE main_linprobe.py)")

UNSUPPORTED = {
    ("vit", "detection_c4"): "Faster R-CNN C4 is a ResNet recipe (its res5 head is the ResNet's last stage); a "
                             "ViT is evaluated on detection with ViTDet (coco_instseg), not on VOC C4",
}


def family(info) -> str:
    return getattr(info, "family", "resnet")


def eval_transform(info, task_transform=None, demo=False):
    """The input the family expects. ResNet: the task's own transform (None if none given). ViT: Resize(256,
    bicubic) and CenterCrop(224) with ImageNet mean/std (or the checkpoint's --set normalize); under --demo
    the same ratio at the task's smaller crop (demo images are 64 px)."""
    if family(info) != "vit":
        return task_transform
    from datasets.views import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

    mean, std = info.input_normalization or (IMAGENET_MEAN, IMAGENET_STD)
    crop = VIT_CROP
    if demo and task_transform is not None and (task_transform.crop or task_transform.square):
        crop = task_transform.crop or task_transform.square
    resize = round(crop * VIT_RESIZE / VIT_CROP)
    return EvalTransform(resize, crop, tuple(mean), tuple(std), VIT_INTERPOLATION)


def tap_model(model, tap: str):
    """A module whose forward returns the (N, D) features of `tap` (ResNet: 'avgpool'; ViT: backbones.vit.TAPS)."""
    if hasattr(model, "vit"):
        from backbones.vit import Tap

        return Tap(model, tap)
    if tap != "avgpool":
        raise UserError(f"a ResNet offers the feature tap 'avgpool', not {tap!r}")
    return model


def linear_protocol(info) -> list:
    """[(tap, head)] the releasing project's linear evaluation uses; head 'linear' or 'bn_linear'."""
    if family(info) != "vit":
        return [("avgpool", "linear")]
    release = getattr(info, "release", None)
    width = (info.vit or {}).get("width")
    if release in ("dino", "ibot"):
        # dino eval_linear.py: n_last_blocks 4, avgpool_patchtokens False for ViT-S (the default); README:
        # --n_last_blocks 1 --avgpool_patchtokens true for ViT-B; iBOT's evaluation follows DINO's
        return [("cls_last4", "linear")] if width is not None and width < 768 else [("cls+patchmean", "linear")]
    if release == "mae":
        # mae main_linprobe.py: global_pool False (the CLS token), BatchNorm1d(affine=False, eps=1e-6), Linear
        return [("cls", "bn_linear")]
    if release == "mocov3":
        return [("cls", "linear")]  # moco-v3 main_lincls.py: the CLS token through the final norm
    if release == "dinov2":
        # dinov2 eval/linear.py: n_last_blocks {1, 4} x avgpool {False, True}, with the learning rates
        return [("cls", "linear"), ("cls+patchmean", "linear"), ("cls_last4", "linear"),
                ("cls_last4+patchmean", "linear")]
    return [("cls", "linear")]


def supports(info, need: str):
    """None when the family meets a task need (NEEDS), else one sentence why not."""
    if need not in NEEDS:
        raise ValueError(f"unknown task need {need!r}")
    if family(info) == "resnet" and need.startswith("detection") and getattr(info, "resnet", None) is not None \
            and (info.stem != "torchvision" or not info.maxpool):
        # both detection recipes (MoCo's C4, Detectron2's FPN) build on torchvision's stem: 7x7 conv and max-pool
        return ("the detector is built on torchvision's ResNet stem (7x7 convolution and max-pool), and this "
                f"checkpoint's stem is {info.notes.get('stem', info.stem)}")
    return UNSUPPORTED.get((family(info), need))


def unsupported(info, needs) -> str:
    """The first reason among `needs`, or None."""
    for need in needs:
        why = supports(info, need)
        if why is not None:
            return why
    return None


def rebuild_with_drop_path(model, rate: float):
    """The encoder with stochastic depth `rate` (ViT: timm's linear rule over blocks); ResNets have none."""
    if not hasattr(model, "vit"):
        if rate:
            raise UserError("drop path applies to ViTs; this is a ResNet")
        return model
    from backbones.vit import rebuild_with_drop_path as vit_drop_path

    return vit_drop_path(model, rate)
