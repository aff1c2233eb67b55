"""The one image decoder, and the datasets built on it.

`load_rgb` opens any image the readers point at (a file path, or a row of an array-backed format such as
STL-10) as an RGB PIL image. An image that cannot be read comes out of the datasets as None with its index,
so that the main process names it in one sentence (`collate_readable`, `unreadable_error`) instead of a
worker's traceback.
"""
import numpy as np
import torch
from PIL import Image

from core.cli import UserError

UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for a truncated or foreign file


def load_rgb(split, i) -> Image.Image:
    """Image `i` of a ClassificationSplit, or a path when `split` is None."""
    if split is None:
        with Image.open(i) as im:
            return im.convert("RGB")
    if split.paths is not None:
        with Image.open(split.paths[i]) as im:
            return im.convert("RGB")
    return Image.fromarray(split.array[i])


def describe(split, i) -> str:
    return str(split.paths[i]) if split.paths is not None else f"image {i} of {split.dataset}/{split.split}"


def unreadable_error(split, i, hint="fix or remove it") -> UserError:
    return UserError(f"cannot read image {describe(split, i)}; {hint}")


class ImageSamples(torch.utils.data.Dataset):
    """(transform(image) or None, index) for every image of a split (torchvision transforms)."""

    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            img = load_rgb(self.split, i)
        except UNREADABLE:
            return None, i
        return self.transform(img), i


class SquareImages(torch.utils.data.Dataset):
    """(uint8 (3, S, S) tensor or None, index): the short side resized to S and the centre square kept, the
    form in which pretraining and the alignment task decode an image once and cut its views on the
    accelerator (`datasets.views.make_views`). Items from several splits are numbered one after the other."""

    def __init__(self, splits, size):
        from torchvision.transforms import functional as TF

        self.items = [(s, i) for s in splits for i in range(len(s))]
        self.transform = lambda img: TF.center_crop(TF.resize(img, size), size)

    def __len__(self):
        return len(self.items)

    def describe(self, index) -> str:
        return describe(*self.items[index])

    def __getitem__(self, index):
        split, i = self.items[index]
        try:
            img = self.transform(load_rgb(split, i))
        except UNREADABLE:
            return None, index
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), index

    def batch(self, indices):
        """Decode `indices` in this process; an unreadable image stops the run with its path."""
        images, _, bad = collate_readable([self[i] for i in indices])
        if bad:
            raise UserError(f"cannot read image {self.describe(bad[0])}; fix or remove it")
        return images


def collate_readable(batch):
    """Stack the images that could be read; return (images or None, their indices, indices of unreadable ones)."""
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad
