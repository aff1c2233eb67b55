"""Dataset readers for the real on-disk formats, and the demo generators that write those formats.

`--data-root DIR` holds one folder per dataset (symbolic links are fine):

| folder under DIR     | dataset                         | layout inside                                  |
| imagenet/            | ImageNet, ImageNet-100          | train/<wnid>/*.JPEG, val/<wnid>/*.JPEG         |
| imagenet_subsets/    | SimCLR 1% / 10% lists           | 1percent.txt, 10percent.txt                    |
| stl10/stl10_binary/  | STL-10                          | official binary files                          |
| VOCdevkit/           | PASCAL VOC 2007, 2012           | VOC2007/, VOC2012/ as in the devkit            |
| coco/                | COCO 2017                       | train2017/, val2017/, annotations/             |
| places205/           | Places205                       | data/vision/torralba/deeplearning/images256/,  |
|                      |                                 | trainvalsplit_places205/                       |
| inat2018/            | iNaturalist 2018                | train2018.json, val2018.json, train_val2018/   |
"""
import shutil
import tempfile
from pathlib import Path

from evaluate.common import cache_dir

SUBDIRS = {
    "imagenet": "imagenet",
    "imagenet_subsets": "imagenet_subsets",
    "stl10": "stl10/stl10_binary",
    "voc": "VOCdevkit",
    "coco": "coco",
    "places205": "places205",
    "inat18": "inat2018",
}

# Bump when a generator changes, so that cached demo data is made anew.
DEMO_VERSION = 2


def demo_root() -> Path:
    return cache_dir() / f"demo-v{DEMO_VERSION}"


def ensure_demo(seed: int = 0) -> Path:
    """Generate every demo dataset once (deterministic by seed) and return the demo data root."""
    from tasks.datasets import coco, imagenet, inat18, places205, stl10, voc

    root = demo_root() / f"seed{seed}"
    if (root / "COMPLETE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".building-"))
    try:
        print(f"generating demo datasets in {root} (once) ...", flush=True)
        imagenet.write_demo(tmp / SUBDIRS["imagenet"], seed)
        stl10.write_demo(tmp / SUBDIRS["stl10"], seed)
        voc.write_demo(tmp / SUBDIRS["voc"], seed)
        coco.write_demo(tmp / SUBDIRS["coco"], seed)
        places205.write_demo(tmp / SUBDIRS["places205"], seed)
        inat18.write_demo(tmp / SUBDIRS["inat18"], seed)
        (tmp / "COMPLETE").write_text(f"demo datasets, generator version {DEMO_VERSION}, seed {seed}\n")
        try:
            tmp.rename(root)
        except OSError:  # another process finished first
            if not (root / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
