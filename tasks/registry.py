"""Every task `evaluate/run.py` knows: what it measures, on which data, by whose protocol."""
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from tasks import align_uniform, knn, linear, linear_sgd, semisup, voc07_svm
from tasks.detection import protocol as detection
from tasks.detection import run as detection_run
from tasks.frozen import DATASET_PRESETS, DEMO_PRESETS


@dataclass(frozen=True)
class Task:
    name: str
    measures: str
    needs: str  # dataset folders under --data-root
    source: str
    protocol: object  # the published protocol (a dataclass instance)
    demo: dict  # overrides for --demo (scaled-down data, same code path)
    run: Callable  # run(ctx, protocol) -> tasks.context.TaskOutput
    distributed: Callable = lambda protocol: True  # whether the task runs under torchrun
    presets: dict = field(default_factory=dict)  # published protocols for --set protocol=NAME: {name: {key: (value, source)}}
    requires: tuple = ("frozen",)  # what it needs of the encoder's family (backbones.families.NEEDS)


def _knn(name, ds, needs, demo_extra=None):
    return Task(name, "kNN top-1/top-5 of frozen features (npid: weighted cosine, k = 5, 20, 200; wmse: Euclidean "
                "majority vote, k = 5)", needs, "paper §8.3, NPID; Table 1: W-MSE's eval/knn.py",
                knn.KnnProtocol(**DATASET_PRESETS[ds]), {**DEMO_PRESETS[ds], **(demo_extra or {})}, knn.run,
                presets=knn.PRESETS)


def _linear(name, ds, needs):
    return Task(name, "linear classifier on frozen features, top-1/top-5", needs,
                "paper §8.1; fast: CLIP-style L-BFGS; sgd: BYOL's; wmse: W-MSE's (Table 1)",
                linear.LinearProtocol(**DATASET_PRESETS[ds]), {**DEMO_PRESETS[ds], **linear.DEMO}, linear.run)


def _sgd(name, ds, needs, epochs):
    # Demo: 3 epochs at batch 32 on the small demo trees (the schedule's steps fall after epochs 1 and 2).
    return Task(name, "linear classifier trained with SGD on a frozen encoder, top-1/top-5", needs,
                "paper §8.4 (paper); Barlow Twins App. C.1 (barlowtwins)",
                linear_sgd.LinearSgdProtocol(**DATASET_PRESETS[ds], epochs=epochs),
                {**DEMO_PRESETS[ds], "epochs": 3, "train_batch_size": 32}, partial(linear_sgd.run, task_name=name),
                presets=linear_sgd.presets(ds))


def _semisup(name, measures, subset, protocol, requires):
    # Demo: 2 epochs at batch 32 on the demo subsets (24 and 72 images of the 12-class demo tree); a ViT's
    # warm-up (MAE: 5 epochs) shortened to 1 so that the 2 demo epochs reach the peak LR.
    return Task(name, measures, f"imagenet/, imagenet_subsets/{subset}", "paper §8.2; SimCLR App. B.5", protocol,
                {**DEMO_PRESETS["imagenet"], "epochs": 2, "train_batch_size": 32, "vit_warmup_epochs": 1.0},
                partial(semisup.run, task_name=name), requires=requires)


TASKS = {t.name: t for t in [
    _linear("linear_in1k", "imagenet", "imagenet/"),
    _linear("linear_in100", "imagenet100", "imagenet/ (the 100 CMC synsets)"),
    _linear("linear_stl10", "stl10", "stl10/stl10_binary/"),
    _semisup("semisup_1pct", "classifier on the frozen encoder from SimCLR's 1% subset, top-1/top-5",
             "1percent.txt", semisup.SemisupProtocol(), ("frozen",)),
    _semisup("semisup_10pct", "encoder and classifier finetuned on SimCLR's 10% subset, top-1/top-5",
             "10percent.txt", semisup.SemisupProtocol(metric_prefix="semisup10", train_subset="10percent.txt",
                                                      epochs=30, lr=0.25, encoder_lr=2.5e-4), ("finetune",)),
    _knn("knn_in1k", "imagenet", "imagenet/"),
    # The demo ImageNet-100 train split has 180 images, fewer than 200 neighbours.
    _knn("knn_in100", "imagenet100", "imagenet/ (the 100 CMC synsets)", {"k": (5, 20, 100)}),
    _knn("knn_stl10", "stl10", "stl10/stl10_binary/"),
    Task("voc07_svm", "per-class linear SVMs on frozen features, VOC07 mAP", "VOCdevkit/VOC2007",
         "paper §8.4; Goyal et al. 2019", voc07_svm.Voc07SvmProtocol(), voc07_svm.DEMO, voc07_svm.run),
    _sgd("linear_places205", "places205", "places205/", epochs=28),
    _sgd("linear_inat18", "inat18", "inat2018/", epochs=84),
    Task("voc_det", "Faster R-CNN R50-C4 finetuning, AP50/AP75/AP on VOC07 test", "VOCdevkit/VOC2007, VOC2012",
         "paper §8.4; MoCo's detection recipe", detection.VocDetProtocol(), detection.VOC_DEMO,
         partial(detection_run.run, task_name="voc_det"), requires=("detection_c4",)),
    Task("align_uniform", "alignment and uniformity of features of two augmented views (Table 12)",
         "imagenet/ (the 100 CMC synsets)", "Wang & Isola 2020; paper Table 12",
         align_uniform.AlignUniformProtocol(), align_uniform.DEMO, align_uniform.run, lambda p: False),
    Task("coco_instseg", "Mask R-CNN R50-FPN finetuning, box and mask AP on val2017", "coco/",
         "paper §8.4, §9", detection.CocoInstsegProtocol(), detection.COCO_DEMO,
         partial(detection_run.run, task_name="coco_instseg"), requires=("detection_fpn",)),
]}
