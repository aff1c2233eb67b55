"""One recipe per detection task: which detector it finetunes, on which data, scored how. The task (`run.py`)
and both engines read these fields; nothing downstream branches on a task's name.

- VOC_C4 (`voc_det`): Faster R-CNN with a ResNet C4 backbone on VOC07+12 trainval, VOC07 test AP
  (MoCo's detection recipe, paper §8.4).
- COCO_FPN (`coco_instseg`): Mask R-CNN with a ResNet FPN backbone on COCO train2017, box and mask AP on
  val2017 (paper §8.4, §9); for a ViT checkpoint, ViTDet's Mask R-CNN (vitdet.py, Detectron2 engine).
The protocols (hyperparameters with their sources) are in `protocol.py`; a recipe says what is built.
"""
import json
from dataclasses import dataclass
from typing import Callable

from tasks.detection.data import coco_task_data, voc_task_data
from tasks.detection.metrics import coco_metrics, coco_results, voc_detection_metrics
from tasks.detection.protocol import COCO_DEMO, VOC_DEMO, CocoInstsegProtocol, VocDetProtocol


def _score_voc(predictions, test, classes, coco, seed):
    metrics, extra = voc_detection_metrics(predictions, test, classes)
    return metrics, extra, {}


def _score_coco(predictions, test, classes, coco, seed):
    results = coco_results(predictions, [c["id"] for c in coco.categories])
    return coco_metrics(results, coco.annotation_file), {}, {f"coco_results_seed{seed}.json": json.dumps(results)}


@dataclass(frozen=True)
class Recipe:
    task: str  # the task's name: state files, messages
    detector: str  # what is finetuned, in words
    head: str  # "c4": stem-res4 is the feature map, res5 the box head; "fpn": FPN over res2-res5, 4conv1fc box head
    masks: bool  # Mask R-CNN: instance masks are trained and predicted
    need: str  # the encoder-family need (backbones.families.supports) this detector has
    classes: int  # the full dataset's class count (the configs' NUM_CLASSES); a run takes its data's
    d2_config: str  # Detectron2 engine: the config file under configs/
    d2_head_norms: tuple  # Detectron2 config nodes whose NORM is the backbone's (BN on one device, SyncBN on several)
    d2_min_depth: int  # Detectron2 engine: the shallowest ResNet its head accepts
    metric_prefix: str  # the record's metric names: prefix + ap50, ...
    load: Callable  # (protocol, data_root, counts) -> (train records, test records, class names, COCO split or None)
    score: Callable  # (predictions, test records, classes, COCO split, seed) -> (metrics, extra info, artifacts)
    vit_refusal: str  # why a ViT checkpoint cannot run this recipe, or "" (it runs ViTDet, vitdet.py)
    protocol: object  # the published protocol (protocol.py)
    demo: dict  # its --demo overrides


VOC_C4 = Recipe(
    task="voc_det", detector="Faster R-CNN, ResNet C4", head="c4", masks=False, need="detection_c4", classes=20,
    d2_config="voc_det_R_50_C4.yaml", d2_head_norms=(),
    # Detectron2's C4 box head is res5 built as a bottleneck stage: ResNet-50 or deeper
    d2_min_depth=50, metric_prefix="voc_det_", load=voc_task_data, score=_score_voc,
    vit_refusal=("Faster R-CNN C4 is a ResNet recipe (its box head is the ResNet's res5 stage, MoCo's detection "
                 "configs); a ViT is evaluated on detection by coco_instseg, with ViTDet"),
    protocol=VocDetProtocol(),
    demo=VOC_DEMO)

COCO_FPN = Recipe(
    task="coco_instseg", detector="Mask R-CNN, ResNet FPN", head="fpn", masks=True, need="detection_fpn", classes=80,
    d2_config="coco_instseg_R_50_FPN.yaml", d2_head_norms=("FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"),
    d2_min_depth=18, metric_prefix="coco_", load=coco_task_data, score=_score_coco, vit_refusal="",
    protocol=CocoInstsegProtocol(),
    demo=COCO_DEMO)

RECIPES = {r.task: r for r in (VOC_C4, COCO_FPN)}
