"""Detection metrics: VOC's (as Detectron2's PascalVOCDetectionEvaluator) and COCO's (pycocotools).

Predictions, for both: {image_id: {"boxes": (N, 4) 0-based continuous x0 y0 x1 y1, "scores": (N,),
"labels": (N,) contiguous class indices, optional "masks": list of COCO RLEs}}.
"""
import json

import numpy as np

VOC_IOUS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2))  # Detectron2's VOC "AP": mean over 0.50:0.95


def ap_11_point(recall, precision):
    """VOC2007's AP: the mean over recall 0, 0.1, ..., 1 of the best precision at that recall or more."""
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 11)]))


def iou_matrix(a, b):
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def voc_class_ap(detections, ground_truth, iou):
    """detections: [(image_id, score, box)]; ground_truth: {image_id: (boxes, difficult)} of one class.

    A detection whose best overlap (> iou) is a `difficult` object counts neither way; a second
    detection of an object is a false positive. NaN when the class has no non-difficult object."""
    npos = sum(int((~d).sum()) for _, d in ground_truth.values())
    if npos == 0:
        return float("nan")
    taken = {k: np.zeros(len(d), bool) for k, (_, d) in ground_truth.items()}
    tp, fp = [], []
    for image_id, _, box in sorted(detections, key=lambda t: -t[1]):
        boxes, difficult = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
        overlaps = iou_matrix([box], boxes)[0] if len(boxes) else np.zeros(0)
        j = int(overlaps.argmax()) if len(overlaps) else -1
        if j >= 0 and overlaps[j] > iou:
            if difficult[j]:
                continue
            hit = not taken[image_id][j]
            taken[image_id][j] = True
        else:
            hit = False
        tp.append(hit)
        fp.append(not hit)
    tp, fp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    return ap_11_point(recall, precision) if len(tp) else 0.0


def voc_detection_metrics(predictions, records, classes):
    """AP50, AP75 and AP (the mean over IoU 0.50:0.95) in %, each the mean of the per-class 11-point APs;
    classes without a non-difficult test object are left out of the means (and listed)."""
    per_class = {}
    for c, name in enumerate(classes):
        gt = {}
        for r in records:
            objs = [a for a in r["annotations"] if a["category_id"] == c]
            if objs:
                gt[r["image_id"]] = (np.array([a["bbox"] for a in objs], float),
                                     np.array([a.get("difficult", False) for a in objs], bool))
        dets = [(k, float(s), b) for k, pred in predictions.items()
                for b, s, lab in zip(pred["boxes"], pred["scores"], pred["labels"]) if lab == c]
        per_class[name] = [voc_class_ap(dets, gt, t) for t in VOC_IOUS]
    scored = {n: v for n, v in per_class.items() if not np.isnan(v[0])}
    table = np.array(list(scored.values())) * 100
    metrics = {"ap50": float(table[:, 0].mean()), "ap75": float(table[:, VOC_IOUS.index(0.75)].mean()),
               "ap": float(table.mean())}
    info = {"ap50_by_class": {n: 100 * v[0] for n, v in scored.items()},
            "classes_without_test_objects": sorted(set(per_class) - set(scored))}
    return metrics, info


def encode_masks(binary):
    """COCO compressed RLEs (JSON-ready) of (N, H, W) binary masks."""
    from pycocotools import mask as mask_utils

    out = []
    for mask in np.asarray(binary, np.uint8):
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out


def coco_results(predictions, category_ids):
    """The COCO results list (boxes as [x, y, w, h]; masks as compressed RLEs)."""
    out = []
    for image_id, pred in predictions.items():
        masks = pred.get("masks")
        for k, (b, s, lab) in enumerate(zip(pred["boxes"], pred["scores"], pred["labels"])):
            row = {"image_id": image_id, "category_id": category_ids[int(lab)], "score": float(s),
                   "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            if masks is not None:
                row["segmentation"] = masks[k]
            out.append(row)
    return out


def coco_metrics(results, annotation_file, iou_types=("bbox", "segm")):
    """pycocotools' COCOeval on a results list: ap_box, ap_box50, ap_box75 (and ap_mask...), in %."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(annotation_file))
    metrics = {}
    for iou_type in iou_types:
        name = "ap_box" if iou_type == "bbox" else "ap_mask"
        if not results:
            metrics.update({name: 0.0, name + "50": 0.0, name + "75": 0.0})
            continue
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats = [max(float(v), 0.0) * 100 for v in ev.stats[:3]]  # -1 (no object) reads as 0
        metrics.update({name: stats[0], name + "50": stats[1], name + "75": stats[2]})
    return metrics
