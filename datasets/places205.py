"""Places205 in its official release.

Images under `data/vision/torralba/deeplearning/images256/<letter>/<category>/*.jpg`; the split lists
`trainvalsplit_places205/{train,val}_places205.csv` hold `<relative path> <label>` per line (space
separated, labels 0..204). The class name is the path between the letter and the file name.
"""
from pathlib import Path

import numpy as np

from core.cli import UserError
from datasets import render
from datasets.base import ClassificationSplit, require_dir, require_file, save_jpeg

IMAGES = Path("data/vision/torralba/deeplearning/images256")
LISTS = Path("trainvalsplit_places205")
LAYOUT = f"{IMAGES}/<letter>/<category>/*.jpg and {LISTS}/{{train,val}}_places205.csv"


def read_places205(root, split, num_classes=None):
    root = require_dir(Path(root), "Places205", LAYOUT)
    image_root = require_dir(root / IMAGES, "Places205 images", LAYOUT)
    listing = require_file(root / LISTS / f"{split}_places205.csv", f"Places205 {split} list", LAYOUT)
    paths, labels, names = [], [], {}
    for line_no, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{listing}:{line_no} is not '<relative path> <label>': {line[:80]!r}")
        rel, label = parts[0], int(parts[1])
        names.setdefault(label, "/".join(Path(rel).parts[1:-1]))
        paths.append(image_root / rel)
        labels.append(label)
    if not paths:
        raise UserError(f"{listing} lists no images")
    n = max(names) + 1
    if num_classes is not None and n != num_classes:
        raise UserError(f"{listing} has labels 0..{n - 1}, but the protocol expects {num_classes} classes")
    missing = [p for p in paths[:: max(1, len(paths) // 1000)] if not p.is_file()]
    if missing:
        raise UserError(f"{listing} names images that do not exist under {image_root} (first: {missing[0]})")
    classes = [names.get(i, f"class_{i}") for i in range(n)]
    return ClassificationSplit("places205", split, classes, np.asarray(labels, np.int64), paths=paths)


DEMO_CLASSES = ["abbey", "airport_terminal", "bedroom", "canyon", "field/cultivated", "harbor", "kitchen", "volcano"]


def write_demo(root, seed=0, n_train=20, n_val=5, size=64):
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / LISTS).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for label, name in enumerate(DEMO_CLASSES):
            for i in range(n):
                rel = f"{name[0]}/{name}/{split}{i:08d}.jpg"
                save_jpeg(render.classification_image(rng, label, size), root / IMAGES / rel)
                lines.append(f"{rel} {label}")
        (root / LISTS / f"{split}_places205.csv").write_text("\n".join(lines) + "\n")
