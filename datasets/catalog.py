"""Which folder under `--data-root` holds which dataset, reading any classification dataset by name, and the
generated demo datasets.

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

from core.cli import UserError
from core.files import cache_dir

HERE = Path(__file__).resolve().parent
SUBDIRS = {
    "imagenet": "imagenet",
    "imagenet_subsets": "imagenet_subsets",
    "stl10": "stl10/stl10_binary",
    "voc": "VOCdevkit",
    "coco": "coco",
    "places205": "places205",
    "inat18": "inat2018",
}
CLASSIFICATION = ("imagenet", "imagenet100", "stl10", "places205", "inat18")
# CMC's ImageNet-100 synsets (Tian et al. 2019, `imagenet100.txt`), and the six of them the demo tree holds.
IN100_CLASSES = str(HERE / "imagenet100_classes.txt")
IN100_DEMO_CLASSES = str(HERE / "imagenet100_demo_classes.txt")

# Bump when a generator changes, so that cached demo data is made anew.
DEMO_VERSION = 2


def read_classification(data_root, dataset: str, split: str, num_classes=None, class_list=None):
    """One split of a classification dataset under the suite's `--data-root` layout.

    STL-10 takes `train+unlabeled`-style joined splits only through `read_classification_splits`."""
    from datasets.imagenet import read_imagenet
    from datasets.inat18 import read_inat18
    from datasets.places205 import read_places205
    from datasets.stl10 import read_stl10

    data_root = Path(data_root)
    if dataset == "imagenet":
        return read_imagenet(data_root / SUBDIRS["imagenet"], split, num_classes=num_classes)
    if dataset == "imagenet100":
        return read_imagenet(data_root / SUBDIRS["imagenet"], split, class_list=class_list or IN100_CLASSES,
                             num_classes=num_classes, name="imagenet100")
    if dataset == "stl10":
        data = read_stl10(data_root / SUBDIRS["stl10"], split)
        if num_classes is not None and len(data.classes) != num_classes:
            raise UserError(f"STL-10 at {data_root / SUBDIRS['stl10']} has {len(data.classes)} classes, "
                            f"the protocol expects {num_classes}")
        return data
    if dataset == "places205":
        return read_places205(data_root / SUBDIRS["places205"], split, num_classes=num_classes)
    if dataset == "inat18":
        return read_inat18(data_root / SUBDIRS["inat18"], split, num_classes=num_classes)
    raise UserError(f"dataset {dataset!r} is not a classification dataset ({', '.join(CLASSIFICATION)})")


def read_classification_splits(data_root, dataset: str, splits: str, **kwargs):
    """Several splits joined with '+' (STL-10's train+unlabeled for pretraining), as a list of splits."""
    return [read_classification(data_root, dataset, s, **kwargs) for s in splits.split("+")]


def resolve_data_root(data_root) -> Path:
    """'demo' is the generated demo datasets; anything else must be a directory."""
    if str(data_root) == "demo":
        return ensure_demo()
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise UserError(f"data root {root} is not a directory (the suite's --data-root layout, or 'demo')")
    return root.resolve()


def demo_root() -> Path:
    return cache_dir() / f"demo-v{DEMO_VERSION}"


def ensure_demo(seed: int = 0) -> Path:
    """Generate every demo dataset once (deterministic by seed) and return the demo data root."""
    from datasets import coco, imagenet, inat18, places205, stl10, voc

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
