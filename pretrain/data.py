"""Images for pretraining, decoded once per step into a uint8 batch; the K views come from augment.py."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from evaluate.common import REPO_ROOT, UserError
from evaluate.features import collate_readable
from tasks.datasets import SUBDIRS, ensure_demo
from tasks.datasets.imagenet import read_imagenet
from tasks.datasets.stl10 import read_stl10


def pretrain_images(cfg):
    """The ClassificationSplit(s) to pretrain on; labels are never used."""
    root = ensure_demo() if cfg.data_root == "demo" else Path(cfg.data_root)
    if not root.is_dir():
        raise UserError(f"data_root {root} is not a directory (the suite's --data-root layout, or 'demo')")
    if cfg.dataset == "imagenet":
        return [read_imagenet(root / SUBDIRS["imagenet"], cfg.split)]
    if cfg.dataset == "imagenet100":
        class_list = cfg.class_list or REPO_ROOT / "tasks/datasets/imagenet100_classes.txt"
        return [read_imagenet(root / SUBDIRS["imagenet"], cfg.split, class_list=class_list, name="imagenet100")]
    if cfg.dataset == "stl10":
        return [read_stl10(root / SUBDIRS["stl10"], s) for s in cfg.split.split("+")]
    raise UserError(f"dataset {cfg.dataset!r} is not one of imagenet, imagenet100, stl10")


class DecodedImages(torch.utils.data.Dataset):
    """(image, index): a uint8 (3, S, S) tensor (short side resized to S, centre square kept), or None
    for an image that cannot be read, so that the main process names it (`evaluate.features.collate_readable`)."""

    def __init__(self, splits, size):
        self.items = [(s, i) for s in splits for i in range(len(s))]
        self.size = size

    def __len__(self):
        return len(self.items)

    def describe(self, index) -> str:
        split, i = self.items[index]
        return str(split.paths[i]) if split.paths is not None else f"image {i} of {split.dataset}/{split.split}"

    def __getitem__(self, index):
        split, i = self.items[index]
        try:
            if split.paths is not None:
                with Image.open(split.paths[i]) as im:
                    img = im.convert("RGB")
            else:
                img = Image.fromarray(split.array[i])
        except (OSError, ValueError, SyntaxError):
            return None, index
        img = TF.center_crop(TF.resize(img, self.size), self.size)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), index

    def batch(self, indices):
        """Decode `indices` in this process; an unreadable image stops the run with its path."""
        images, _, bad = collate_readable([self[i] for i in indices])
        if bad:
            raise UserError(f"cannot read image {self.describe(bad[0])}; fix or remove it")
        return images
