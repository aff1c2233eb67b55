"""PASCAL VOC 2007 / 2012 in the official devkit layout.

`VOCdevkit/VOC<year>/JPEGImages/<id>.jpg`, `Annotations/<id>.xml` (objects with `name`,
`difficult`, `truncated` and a 1-based inclusive `bndbox`), and `ImageSets/Main/<split>.txt` (one id
per line) with the per-class lists `<class>_<split>.txt` (`<id> 1|0|-1`; 0 = only difficult objects).
"""
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.cli import UserError
from datasets import render
from datasets.base import ClassificationSplit, require_dir, require_file, save_jpeg

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
LAYOUT = "VOCdevkit/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}"


@dataclass
class VocImage:
    image_id: str
    path: Path
    width: int
    height: int
    objects: list = field(default_factory=list)  # dicts: name, label, box (xmin, ymin, xmax, ymax), difficult, truncated


def _text(node, tag, xml_path):
    child = node.find(tag)
    if child is None or child.text is None:
        raise UserError(f"{xml_path} has no <{tag}>; it is not a VOC annotation file")
    return child.text.strip()


def parse_annotation(xml_path: Path, image_path: Path, image_id: str) -> VocImage:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{xml_path} is not valid XML ({e})")
    size = root.find("size")
    if size is None:
        raise UserError(f"{xml_path} has no <size>; it is not a VOC annotation file")
    img = VocImage(image_id, image_path, int(_text(size, "width", xml_path)), int(_text(size, "height", xml_path)))
    for obj in root.findall("object"):
        name = _text(obj, "name", xml_path)
        if name not in VOC_CLASSES:
            raise UserError(f"{xml_path} has an object of unknown class {name!r}")
        bb = obj.find("bndbox")
        if bb is None:
            raise UserError(f"{xml_path} has an object without <bndbox>")
        difficult = obj.find("difficult")
        truncated = obj.find("truncated")
        img.objects.append({
            "name": name, "label": VOC_CLASSES.index(name),
            "box": tuple(float(_text(bb, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax")),
            "difficult": difficult is not None and difficult.text is not None and int(difficult.text) == 1,
            "truncated": truncated is not None and truncated.text is not None and int(truncated.text) == 1,
        })
    return img


def read_voc(devkit, year, split):
    """All images of VOC<year> `split` with their objects, in the order of the split file."""
    base = require_dir(Path(devkit) / f"VOC{year}", f"VOC{year}", LAYOUT)
    split_file = require_file(base / "ImageSets" / "Main" / f"{split}.txt", f"VOC{year} {split} list", LAYOUT)
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"{split_file} lists no images")
    out = []
    for image_id in ids:
        xml_path = require_file(base / "Annotations" / f"{image_id}.xml", "VOC annotation", LAYOUT)
        image_path = require_file(base / "JPEGImages" / f"{image_id}.jpg", "VOC image", LAYOUT)
        out.append(parse_annotation(xml_path, image_path, image_id))
    return out


def multilabel_targets(images) -> np.ndarray:
    """(N, 20) int8: 1 a non-difficult object of the class is present, 0 only difficult ones, -1 absent."""
    t = np.full((len(images), len(VOC_CLASSES)), -1, np.int8)
    for i, img in enumerate(images):
        for obj in img.objects:
            if obj["difficult"]:
                t[i, obj["label"]] = max(t[i, obj["label"]], 0)
            else:
                t[i, obj["label"]] = 1
    return t


def read_voc_classification(devkit, year, split) -> ClassificationSplit:
    """The split as whole images with multi-label targets in `notes['targets']` (for VOC07 SVM)."""
    images = read_voc(devkit, year, split)
    split_data = ClassificationSplit(f"voc{year}", split, list(VOC_CLASSES),
                                     np.full(len(images), -1, np.int64), paths=[im.path for im in images])
    split_data.notes["targets"] = multilabel_targets(images)
    return split_data


# ---- demo generator ---------------------------------------------------------------------------

def _annotation_xml(year, image_id, width, height, objects):
    lines = ["<annotation>", f"  <folder>VOC{year}</folder>", f"  <filename>{image_id}.jpg</filename>",
             "  <source><database>The VOC Demo Database</database></source>",
             f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
             "  <segmented>0</segmented>"]
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        lines += ["  <object>", f"    <name>{VOC_CLASSES[obj['cls']]}</name>", "    <pose>Unspecified</pose>",
                  "    <truncated>0</truncated>", f"    <difficult>{int(obj['difficult'])}</difficult>",
                  # VOC boxes are 1-based and inclusive.
                  f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>",
                  "  </object>"]
    return "\n".join(lines + ["</annotation>"]) + "\n"


def write_demo(devkit, seed=0, sizes=None, width=160, height=120):
    """VOC2007 trainval/test and VOC2012 trainval with 1-3 shapes per image; ~15% of objects difficult."""
    devkit = Path(devkit)
    rng = np.random.default_rng(seed)
    sizes = sizes or {(2007, "trainval"): 60, (2007, "test"): 60, (2012, "trainval"): 40}
    for (year, split), n in sizes.items():
        base = devkit / f"VOC{year}"
        main = base / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        ids, per_image = [], []
        for i in range(n):
            image_id = f"{year}_{split[:2]}{i:05d}" if year == 2012 else f"{(0 if split == 'trainval' else 5000) + i:06d}"
            classes = rng.integers(0, len(VOC_CLASSES), size=int(rng.integers(1, 4))).tolist()
            img, objects = render.scene(rng, classes, width, height)
            for obj in objects:
                obj["difficult"] = bool(rng.random() < 0.15)
            save_jpeg(img, base / "JPEGImages" / f"{image_id}.jpg")
            (base / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(year, image_id, width, height, objects))
            ids.append(image_id)
            per_image.append(objects)
        (main / f"{split}.txt").write_text("\n".join(ids) + "\n")
        if split == "trainval":  # the official release also has the train / val halves
            (main / "train.txt").write_text("\n".join(ids[::2]) + "\n")
            (main / "val.txt").write_text("\n".join(ids[1::2]) + "\n")
        for c, name in enumerate(VOC_CLASSES):
            rows = []
            for image_id, objects in zip(ids, per_image):
                flags = [o["difficult"] for o in objects if o["cls"] == c]
                rows.append(f"{image_id} {-1 if not flags else (0 if all(flags) else 1):2d}")
            (main / f"{name}_{split}.txt").write_text("\n".join(rows) + "\n")
