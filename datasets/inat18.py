"""iNaturalist 2018 in its official release.

`train2018.json` and `val2018.json` (COCO-style: `images` with `id` and `file_name`, `annotations`
with `image_id` and `category_id`, `categories` with `id` 0..8141 and `name`), and the image tree
`train_val2018/<supercategory>/<category id>/*.jpg` that `file_name` points into.
"""
import json
from pathlib import Path

import numpy as np

from core.cli import UserError
from datasets import render
from datasets.base import ClassificationSplit, require_dir, require_file, save_jpeg

LAYOUT = "train2018.json, val2018.json and train_val2018/<supercategory>/<category id>/*.jpg"


def read_inat18(root, split, num_classes=None):
    root = require_dir(Path(root), "iNaturalist 2018", LAYOUT)
    ann_file = require_file(root / f"{split}2018.json", f"iNaturalist 2018 {split} annotations", LAYOUT)
    try:
        data = json.loads(ann_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        label_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        images = data["images"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{ann_file} is not an iNaturalist 2018 annotation file ({e.__class__.__name__}: {e})")
    ids = [c["id"] for c in categories]
    if ids != list(range(len(ids))):
        raise UserError(f"{ann_file}: category ids are not 0..{len(ids) - 1}")
    if num_classes is not None and len(ids) != num_classes:
        raise UserError(f"{ann_file} has {len(ids)} categories, but the protocol expects {num_classes}")
    paths, labels = [], []
    for img in images:
        if img["id"] not in label_of:
            raise UserError(f"{ann_file}: image {img['id']} has no annotation")
        paths.append(root / img["file_name"])
        labels.append(label_of[img["id"]])
    missing = [p for p in paths[:: max(1, len(paths) // 1000)] if not p.is_file()]
    if missing:
        raise UserError(f"{ann_file} names images that do not exist under {root} (first: {missing[0]})")
    return ClassificationSplit("inat18", split, [c["name"] for c in categories],
                               np.asarray(labels, np.int64), paths=paths)


DEMO_CATEGORIES = [("Plantae", "Quercus agrifolia"), ("Plantae", "Bellis perennis"), ("Aves", "Pica pica"),
                   ("Aves", "Ardea alba"), ("Insecta", "Apis mellifera"), ("Fungi", "Amanita muscaria")]


def write_demo(root, seed=0, n_train=20, n_val=5, size=64):
    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [{"id": i, "name": name, "supercategory": sup} for i, (sup, name) in enumerate(DEMO_CATEGORIES)]
    next_id = 0
    for split, n in (("train", n_train), ("val", n_val)):
        images, annotations = [], []
        for cat in categories:
            for _ in range(n):
                rel = f"train_val2018/{cat['supercategory']}/{cat['id']}/{rng.bytes(16).hex()}.jpg"
                save_jpeg(render.classification_image(rng, cat["id"], size), root / rel)
                images.append({"id": next_id, "file_name": rel, "width": size, "height": size})
                annotations.append({"id": next_id, "image_id": next_id, "category_id": cat["id"]})
                next_id += 1
        (root / f"{split}2018.json").write_text(json.dumps(
            {"info": {"year": 2018}, "images": images, "annotations": annotations, "categories": categories}))
