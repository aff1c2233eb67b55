"""Every reader against its demo generator, and the format details that are easy to get wrong."""
import json
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from core.cli import UserError
from datasets import coco, imagenet, inat18, places205, stl10, voc
from datasets.catalog import IN100_CLASSES, IN100_DEMO_CLASSES


def test_imagenet_tree(demo_root):
    train = imagenet.read_imagenet(demo_root / "imagenet", "train", num_classes=12)
    assert train.classes == sorted(imagenet.DEMO_WNIDS)
    assert len(train) == 12 * 30
    for path, label in zip(train.paths, train.labels):
        assert path.parent.name == train.classes[label]
    val = imagenet.read_imagenet(demo_root / "imagenet", "val")
    assert len(val) == 12 * 10 and np.bincount(val.labels).tolist() == [10] * 12


def test_imagenet100_reads_listed_synsets(demo_root):
    demo_list = open(IN100_DEMO_CLASSES).read().split()
    assert set(demo_list) <= set(open(IN100_CLASSES).read().split())
    sub = imagenet.read_imagenet(demo_root / "imagenet", "val", class_list=IN100_DEMO_CLASSES, num_classes=6)
    assert sub.classes == sorted(demo_list) and len(sub) == 60
    with pytest.raises(UserError, match="lacks 94 of the 100 classes"):
        imagenet.read_imagenet(demo_root / "imagenet", "val", class_list=IN100_CLASSES)


def test_imagenet_bad_trees(demo_root, tmp_path):
    with pytest.raises(UserError, match="expects 1000"):
        imagenet.read_imagenet(demo_root / "imagenet", "train", num_classes=1000)
    with pytest.raises(UserError, match="not found: expected the directory"):
        imagenet.read_imagenet(tmp_path, "train")
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        imagenet.read_imagenet(tmp_path, "train")


def test_simclr_subsets(demo_root, tmp_path):
    sub = imagenet.read_simclr_subset(demo_root / "imagenet", demo_root / "imagenet_subsets" / "1percent.txt")
    assert len(sub) == 24 and np.bincount(sub.labels).tolist() == [2] * 12
    for path, label in zip(sub.paths, sub.labels):
        assert path.is_file() and path.name.startswith(sub.classes[label])
    bad = tmp_path / "1percent.txt"
    bad.write_text("n01440764_99999.JPEG\n")
    with pytest.raises(UserError, match="does not exist"):
        imagenet.read_simclr_subset(demo_root / "imagenet", bad)


def test_stl10_binary_layout_is_column_major(tmp_path):
    # Official format: per image, the red plane then green then blue, each stored column by column.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    stl10.write_images(tmp_path / "train_X.bin", img)
    raw = np.fromfile(tmp_path / "train_X.bin", np.uint8)
    assert raw[0] == img[0, 0, 0, 0] and raw[1] == img[0, 1, 0, 0] and raw[96] == img[0, 0, 1, 0]
    assert raw[96 * 96] == img[0, 0, 0, 1] and raw[3 * 96 * 96] == img[1, 0, 0, 0]
    np.array([1, 10], np.uint8).tofile(tmp_path / "train_y.bin")
    split = stl10.read_stl10(tmp_path, "train")
    assert np.array_equal(split.array, img) and split.labels.tolist() == [0, 9]


def test_stl10_demo_and_bad_files(demo_root, tmp_path):
    root = demo_root / "stl10" / "stl10_binary"
    train, test = stl10.read_stl10(root, "train"), stl10.read_stl10(root, "test")
    assert train.array.shape == (300, 96, 96, 3) and len(test) == 100
    assert np.bincount(train.labels).tolist() == [30] * 10 and train.classes == stl10.CLASS_NAMES
    assert (stl10.read_stl10(root, "unlabeled").labels == -1).all()
    shutil.copy(root / "train_y.bin", tmp_path / "train_y.bin")
    (tmp_path / "train_X.bin").write_bytes((root / "train_X.bin").read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        stl10.read_stl10(tmp_path, "train")


def test_voc_annotations_and_difficult(demo_root):
    devkit = demo_root / "VOCdevkit"
    images = voc.read_voc(devkit, 2007, "test")
    assert len(images) == 60 and len(voc.read_voc(devkit, 2012, "trainval")) == 40
    objects = [o for im in images for o in im.objects]
    assert any(o["difficult"] for o in objects) and not all(o["difficult"] for o in objects)
    for im in images:
        for o in im.objects:
            x0, y0, x1, y1 = o["box"]
            assert 1 <= x0 < x1 <= im.width and 1 <= y0 < y1 <= im.height  # 1-based, inclusive
    # The multi-label targets agree with the per-class lists of the release (1 / 0 difficult only / -1).
    targets = voc.multilabel_targets(images)
    for c, name in enumerate(voc.VOC_CLASSES):
        rows = (devkit / "VOC2007/ImageSets/Main" / f"{name}_test.txt").read_text().split("\n")
        listed = {r.split()[0]: int(r.split()[1]) for r in rows if r.strip()}
        assert [listed[im.image_id] for im in images] == targets[:, c].tolist()
    assert (targets == 0).any()


def test_voc_bad_annotation(demo_root, tmp_path):
    base = tmp_path / "VOC2007"
    shutil.copytree(demo_root / "VOCdevkit" / "VOC2007", base)
    first = (base / "ImageSets/Main/test.txt").read_text().split()[0]
    (base / "Annotations" / f"{first}.xml").write_text("<annotation><object>")
    with pytest.raises(UserError, match="not valid XML"):
        voc.read_voc(tmp_path, 2007, "test")
    (base / "Annotations" / f"{first}.xml").unlink()
    with pytest.raises(UserError, match="VOC annotation not found"):
        voc.read_voc(tmp_path, 2007, "test")


def test_coco_polygons_rle_and_crowd(demo_root):
    split = coco.read_coco(demo_root / "coco", "train")
    assert [c["id"] for c in split.categories] == [cid for cid, _ in coco.DEMO_CATEGORIES]
    anns = [a for v in split.annotations.values() for a in v]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"], dict) for a in crowd)
    assert all(isinstance(a["segmentation"], list) for a in anns if not a["iscrowd"])
    images = {im["id"]: im for im in split.images}
    for a in anns:
        im = images[a["image_id"]]
        m = coco.annotation_mask(a, im["height"], im["width"])
        assert abs(m.sum() - a["area"]) <= 0.02 * a["area"] + 2
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert xs.min() >= np.floor(x) - 1 and xs.max() <= x + w + 1 and ys.min() >= np.floor(y) - 1


def test_uncompressed_rle_matches_pycocotools():
    rng = np.random.default_rng(1)
    for first_on in (False, True):
        m = rng.random((17, 23)) > 0.6
        m[0, 0] = first_on
        rle = coco.uncompressed_rle(m)
        assert rle["size"] == [17, 23] and sum(rle["counts"]) == m.size
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 17, 23))
        assert np.array_equal(decoded.astype(bool), m)


def test_places205(demo_root, tmp_path):
    train = places205.read_places205(demo_root / "places205", "train", num_classes=8)
    assert len(train) == 160 and train.classes == places205.DEMO_CLASSES
    assert all(p.is_file() for p in train.paths)
    with pytest.raises(UserError, match="expects 205"):
        places205.read_places205(demo_root / "places205", "val", num_classes=205)
    with pytest.raises(UserError, match="not found"):
        places205.read_places205(tmp_path, "train")


def test_inat18(demo_root, tmp_path):
    val = inat18.read_inat18(demo_root / "inat2018", "val", num_classes=6)
    data = json.loads((demo_root / "inat2018" / "val2018.json").read_text())
    assert len(val) == len(data["images"]) == 30
    assert val.classes == [name for _, name in inat18.DEMO_CATEGORIES]
    for path, label in zip(val.paths, val.labels):
        assert path.parent.name == str(label)  # train_val2018/<supercategory>/<category id>/
    (tmp_path / "val2018.json").write_text("{}")
    with pytest.raises(UserError, match="not an iNaturalist 2018 annotation file"):
        inat18.read_inat18(tmp_path, "val")


def test_demo_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    stl10.write_demo(a, seed=3, n_train=2, n_test=1, n_unlabeled=1)
    stl10.write_demo(b, seed=3, n_train=2, n_test=1, n_unlabeled=1)
    for name in ("train_X.bin", "train_y.bin", "test_X.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
