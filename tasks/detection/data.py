"""VOC and COCO as one list of image records, in Detectron2's dataset-dict form, for both engines.

A record: {"file_name", "image_id", "height", "width", "annotations": [{"bbox": [x0, y0, x1, y1] (0-based,
absolute, continuous), "category_id" (contiguous index), "iscrowd", "difficult" (VOC), "segmentation" (COCO)}]}.
VOC boxes become 0-based as in Detectron2's loader (xmin - 1, ymin - 1). Cleaning, counted in the record:
boxes reaching outside the image are clipped; boxes with no area left are dropped; training skips images
with no (non-crowd) object, as Detectron2 does; test images without objects stay (their detections are
false positives).
"""
from collections import Counter

import numpy as np
import torch

from core.cli import UserError
from datasets.catalog import SUBDIRS
from datasets.coco import read_coco
from datasets.decode import UNREADABLE, load_rgb
from datasets.voc import VOC_CLASSES, read_voc


def _clean(box, width, height, counts):
    x0, y0, x1, y1 = box
    clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
               min(max(y1, 0.0), height)]
    if clipped != list(box):
        counts["boxes_clipped"] += 1
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        counts["degenerate_boxes_dropped"] += 1
        return None
    return clipped


def voc_records(data_root, sets, counts):
    """`sets`: ("2007/trainval", ...); VOC's `difficult` objects stay (Detectron2 trains on them too)."""
    out = []
    for name in sets:
        year, split = name.split("/")
        for img in read_voc(data_root / SUBDIRS["voc"], int(year), split):
            anns = []
            for obj in img.objects:
                x0, y0, x1, y1 = obj["box"]
                box = _clean((x0 - 1.0, y0 - 1.0, x1, y1), img.width, img.height, counts)
                if box is not None:
                    anns.append({"bbox": box, "category_id": obj["label"], "iscrowd": 0,
                                 "difficult": obj["difficult"]})
            out.append({"file_name": str(img.path), "image_id": f"{year}_{img.image_id}", "height": img.height,
                        "width": img.width, "annotations": anns})
    return out


def coco_records(data_root, split, counts):
    """Records of COCO `split` and the reader's split (for the category ids and the annotation file)."""
    coco = read_coco(data_root / SUBDIRS["coco"], split)
    index = {c["id"]: i for i, c in enumerate(coco.categories)}
    out = []
    for im in coco.images:
        anns = []
        for a in coco.annotations[im["id"]]:
            x, y, w, h = a["bbox"]
            box = _clean((x, y, x + w, y + h), im["width"], im["height"], counts)
            if box is not None:
                anns.append({"bbox": box, "category_id": index[a["category_id"]], "iscrowd": a.get("iscrowd", 0),
                             "segmentation": a["segmentation"]})
        out.append({"file_name": str(coco.image_dir / im["file_name"]), "image_id": im["id"],
                    "height": im["height"], "width": im["width"], "annotations": anns})
    return out, coco


def for_training(records, counts):
    """Images with at least one non-crowd object (Detectron2's filter_empty_annotations)."""
    kept = [r for r in records if any(not a["iscrowd"] for a in r["annotations"])]
    counts["train_images_without_objects_skipped"] += len(records) - len(kept)
    if not kept:
        raise UserError("no training image has an object; check the annotation files")
    return kept


def load_image(path):
    """An image file as a float tensor (3, H, W) in [0, 1]; an unreadable one stops the run with its path."""
    try:
        img = load_rgb(None, path)
    except UNREADABLE as e:
        raise UserError(f"cannot read image {path} ({e.__class__.__name__})") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def voc_task_data(p, data_root, counts):
    """VOC07+12 trainval and VOC07 test (a VocDetProtocol's sets): (train, test, class names, None)."""
    train = voc_records(data_root, p.train_sets, counts)
    return train, voc_records(data_root, [p.test_set], counts), list(VOC_CLASSES), None


def coco_task_data(p, data_root, counts):
    """COCO train and val (a CocoInstsegProtocol's splits): (train, test, class names, the test split)."""
    train, _ = coco_records(data_root, p.train_set, counts)
    test, coco = coco_records(data_root, p.test_set, counts)
    return train, test, [c["name"] for c in coco.categories], coco


def load_task_data(recipe, p, data_root):
    """(train records, test records, class names, counts, COCO test split or None) of a recipe's data."""
    counts = Counter()
    train, test, classes, coco = recipe.load(p, data_root, counts)
    counts["test_images_without_objects"] = sum(not r["annotations"] for r in test)
    train = for_training(train, counts)
    return train, test, classes, counts, coco
