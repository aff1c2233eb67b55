"""What every dataset reader returns, and the small helpers all readers use."""
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.cli import UserError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        found = "nothing" if not path.exists() else "a file"
        raise UserError(f"{what} not found: expected the directory {path} ({layout}), found {found} there")
    return path


def require_file(path: Path, what: str, layout: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} not found: expected the file {path} ({layout})")
    return path


@dataclass
class ClassificationSplit:
    """One split of a classification dataset: images as files (`paths`) or as an array (`array`)."""

    dataset: str
    split: str
    classes: list
    labels: np.ndarray  # int64, -1 for unlabelled images
    paths: list = None  # absolute paths, one per image
    array: np.ndarray = None  # (N, H, W, 3) uint8, when the format stores pixels (STL-10)
    notes: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.labels)

    def fingerprint(self) -> str:
        """Identifies the exact image list and labels (part of the feature-cache key)."""
        h = hashlib.sha256(f"{self.dataset}|{self.split}|{len(self)}|{','.join(self.classes)}".encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        if self.paths is not None:
            h.update("\n".join(map(str, self.paths)).encode())
        else:
            h.update(np.ascontiguousarray(self.array).data)
        return h.hexdigest()[:20]

    def torch_dataset(self, transform):
        from datasets.decode import ImageSamples

        return ImageSamples(self, transform)


def list_images(folder: Path):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def save_jpeg(img: Image.Image, path: Path, quality=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=quality)
