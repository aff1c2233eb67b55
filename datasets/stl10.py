"""STL-10 in its official binary release (`stl10_binary/`).

`<split>_X.bin`: uint8 images, 3 x 96 x 96 each, stored column-major (so each channel plane is
transposed); `<split>_y.bin`: uint8 labels 1..10; `class_names.txt`: one name per line. Splits:
train (5,000), test (8,000), unlabeled (100,000, no labels).
"""
from pathlib import Path

import numpy as np

from core.cli import UserError
from datasets import render
from datasets.base import ClassificationSplit, require_dir, require_file

LAYOUT = "stl10_binary/{train,test,unlabeled}_X.bin, {train,test}_y.bin, class_names.txt"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
CLASS_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _read_images(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % IMAGE_BYTES:
        raise UserError(f"{path} holds {raw.size} bytes, not a whole number of 96x96x3 STL-10 images; "
                        "the file is truncated or not from the STL-10 binary release")
    # Column-major 3 x 96 x 96 -> (N, 3, W, H) in C order -> (N, H, W, 3).
    return raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 3, 2, 1).copy()


def read_stl10(root, split):
    root = require_dir(Path(root), "STL-10", LAYOUT)
    if split not in ("train", "test", "unlabeled"):
        raise UserError(f"STL-10 has no split {split!r} (train, test, unlabeled)")
    images = _read_images(require_file(root / f"{split}_X.bin", f"STL-10 {split} images", LAYOUT))
    names_file = root / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else list(CLASS_NAMES)
    if split == "unlabeled":
        labels = np.full(len(images), -1, np.int64)
    else:
        raw = np.fromfile(require_file(root / f"{split}_y.bin", f"STL-10 {split} labels", LAYOUT), np.uint8)
        if len(raw) != len(images):
            raise UserError(f"{root / f'{split}_y.bin'} has {len(raw)} labels for {len(images)} images")
        if raw.min() < 1 or raw.max() > len(classes):
            raise UserError(f"{root / f'{split}_y.bin'} has labels outside 1..{len(classes)}")
        labels = raw.astype(np.int64) - 1
    return ClassificationSplit("stl10", split, classes, labels, array=images)


def write_images(path: Path, images: np.ndarray):
    """Inverse of `_read_images`: (N, H, W, 3) uint8 -> column-major binary file."""
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())


def write_demo(root, seed=0, n_train=30, n_test=10, n_unlabeled=50):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        images = np.stack([np.asarray(render.classification_image(rng, c, SIDE)) for c in labels])
        write_images(root / f"{split}_X.bin", images)
        (labels + 1).astype(np.uint8).tofile(root / f"{split}_y.bin")
    unl = np.stack([np.asarray(render.classification_image(rng, int(rng.integers(10)), SIDE))
                    for _ in range(n_unlabeled)])
    write_images(root / "unlabeled_X.bin", unl)
    (root / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
