"""ImageNet (ILSVRC-2012), ImageNet-100 and SimCLR's 1%/10% subsets.

Layout under the ImageNet root: `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG` (validation images
sorted into class folders, as torchvision's and most SSL codebases' loaders expect). Class indices
follow the sorted wnids, as torchvision's ImageFolder does. ImageNet-100 reads the synsets of a class
list (CMC's `imagenet100.txt`, copied to `datasets/imagenet100_classes.txt`) from that tree.
SimCLR's subset files (`1percent.txt`, `10percent.txt`) hold one train file name per line
(`n01440764_10026.JPEG`), found at `train/<wnid>/<name>`.
"""
from pathlib import Path

import numpy as np

from core.cli import UserError
from datasets import render
from datasets.base import ClassificationSplit, list_images, require_dir, require_file, save_jpeg

LAYOUT = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"


def read_imagenet(root, split, class_list=None, num_classes=None, name="imagenet"):
    """Read `root/split/<wnid>/*`; with `class_list` (a file of wnids) only those classes."""
    root = Path(root)
    split_dir = require_dir(root / split, f"ImageNet {split} split", LAYOUT)
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if class_list is not None:
        wanted = [w.strip() for w in Path(class_list).read_text().split() if w.strip()]
        missing = [w for w in wanted if w not in present]
        if missing:
            raise UserError(f"{split_dir} lacks {len(missing)} of the {len(wanted)} classes listed in "
                            f"{class_list} (first: {', '.join(missing[:3])})")
        classes = sorted(wanted)
    else:
        classes = present
    if num_classes is not None and len(classes) != num_classes:
        raise UserError(f"{split_dir} has {len(classes)} class folders, but the protocol expects "
                        f"{num_classes}; point --data-root at the full dataset")
    paths, labels = [], []
    for idx, wnid in enumerate(classes):
        files = list_images(split_dir / wnid)
        if not files:
            raise UserError(f"class folder {split_dir / wnid} holds no images (.JPEG/.jpg/.png)")
        paths += files
        labels += [idx] * len(files)
    return ClassificationSplit(name, split, classes, np.asarray(labels, np.int64), paths=paths)


def read_simclr_subset(root, subset_file, num_classes=None):
    """The labelled train images named in SimCLR's subset file, labelled by their wnid."""
    root = Path(root)
    subset_file = require_file(Path(subset_file), "SimCLR subset list", "one train file name per line")
    full = read_imagenet(root, "train", num_classes=num_classes)
    index = {wnid: i for i, wnid in enumerate(full.classes)}
    paths, labels = [], []
    for line_no, line in enumerate(subset_file.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        wnid = name.split("_")[0]
        path = root / "train" / wnid / name
        if wnid not in index or not path.is_file():
            raise UserError(f"{subset_file}:{line_no} names {name}, but {path} does not exist")
        paths.append(path)
        labels.append(index[wnid])
    if not paths:
        raise UserError(f"{subset_file} lists no images")
    return ClassificationSplit("imagenet", f"train[{subset_file.name}]", full.classes,
                               np.asarray(labels, np.int64), paths=paths)


# ---- demo generator ---------------------------------------------------------------------------

# Six synsets of the ImageNet-100 list (also in imagenet100_demo_classes.txt) and six outside it.
DEMO_WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831",
              "n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]


def write_demo(root, seed=0, n_train=30, n_val=10, size=64):
    """A 12-class ImageNet tree; also SimCLR-style subset files in `root/../imagenet_subsets`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls, wnid in enumerate(DEMO_WNIDS):
            for i in range(n):
                stem = f"{wnid}_{i}" if split == "train" else f"ILSVRC2012_val_{cls * n + i + 1:08d}"
                save_jpeg(render.classification_image(rng, cls, size), root / split / wnid / f"{stem}.JPEG")
    subsets = root.parent / "imagenet_subsets"
    subsets.mkdir(parents=True, exist_ok=True)
    for fname, per_class in (("1percent.txt", 2), ("10percent.txt", 6)):
        names = [f"{wnid}_{i}.JPEG" for wnid in DEMO_WNIDS for i in rng.choice(n_train, per_class, replace=False)]
        (subsets / fname).write_text("\n".join(names) + "\n")
