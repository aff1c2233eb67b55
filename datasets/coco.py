"""COCO 2017 in its official layout.

`train2017/*.jpg`, `val2017/*.jpg`, `annotations/instances_{train,val}2017.json`. Annotations hold
`bbox` as [x, y, w, h], `segmentation` as polygons (lists of flat xy lists) or, for `iscrowd` 1
regions, run-length encodings (uncompressed `counts` lists, or compressed strings).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from core.cli import UserError
from datasets import render
from datasets.base import require_dir, require_file, save_jpeg

LAYOUT = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"


@dataclass
class CocoSplit:
    image_dir: Path
    annotation_file: Path
    images: list  # COCO image dicts, sorted by id
    annotations: dict  # image id -> list of annotation dicts
    categories: list  # COCO category dicts, sorted by id

    def __len__(self):
        return len(self.images)


def read_coco(root, split):
    root = require_dir(Path(root), "COCO", LAYOUT)
    image_dir = require_dir(root / f"{split}2017", f"COCO {split}2017 images", LAYOUT)
    ann_file = require_file(root / "annotations" / f"instances_{split}2017.json", "COCO annotations", LAYOUT)
    try:
        data = json.loads(ann_file.read_text())
        images = sorted(data["images"], key=lambda im: im["id"])
        categories = sorted(data["categories"], key=lambda c: c["id"])
        anns = data["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{ann_file} is not a COCO instances file ({e.__class__.__name__}: {e})")
    by_image = {im["id"]: [] for im in images}
    cat_ids = {c["id"] for c in categories}
    for a in anns:
        if a.get("image_id") not in by_image or a.get("category_id") not in cat_ids:
            raise UserError(f"{ann_file}: annotation {a.get('id')} refers to an unknown image or category")
        by_image[a["image_id"]].append(a)
    return CocoSplit(image_dir, ann_file, images, by_image, categories)


def annotation_mask(ann, height, width) -> np.ndarray:
    """Binary (H, W) mask of a polygon or RLE (compressed or not) segmentation."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = np.asarray(mask, bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


# ---- demo generator ---------------------------------------------------------------------------

# Non-contiguous ids, as in COCO, so that id -> index mapping is exercised.
DEMO_CATEGORIES = [(1, "circle"), (3, "square"), (5, "triangle"), (8, "cross"), (10, "star"), (13, "diamond")]


def write_demo(root, seed=0, sizes=None, width=128, height=128):
    """COCO-format splits; about one image in six holds a crowd region (iscrowd 1, RLE)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    sizes = sizes or {"train": 40, "val": 20}
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in DEMO_CATEGORIES]
    ann_id = 1
    for s_index, (split, n) in enumerate(sizes.items()):
        images, annotations = [], []
        for i in range(n):
            image_id = 100000 * (s_index + 1) + 7 * i + 1
            labels = rng.integers(0, len(categories), size=int(rng.integers(1, 5))).tolist()
            img, objects = render.scene(rng, labels, width, height)
            file_name = f"{image_id:012d}.jpg"
            save_jpeg(img, root / f"{split}2017" / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            crowd_index = 0 if (objects and rng.random() < 1 / 6) else -1
            for k, obj in enumerate(objects):
                cat = categories[obj["cls"]]
                if k == crowd_index:
                    rle = uncompressed_rle(obj["mask"])
                    segmentation, iscrowd = rle, 1
                    bbox = mask_utils.toBbox(mask_utils.frPyObjects(rle, height, width)).tolist()
                    area = float(obj["mask"].sum())
                else:
                    flat = [round(v, 2) for xy in obj["polygon"] for v in xy]
                    segmentation, iscrowd = [flat], 0
                    rle = mask_utils.frPyObjects([flat], height, width)[0]
                    bbox = mask_utils.toBbox(rle).tolist()
                    area = float(mask_utils.area(rle))
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat["id"],
                                    "segmentation": segmentation, "area": area, "bbox": bbox, "iscrowd": iscrowd})
                ann_id += 1
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"info": {"description": "demo shapes in COCO format"}, "licenses": [], "images": images,
             "annotations": annotations, "categories": categories}))
