"""The one frozen-feature extractor: every task that reads pooled features gets them here.

Features are cached on disk under a key made of the checkpoint's sha256 (or random seed), the
architecture, the exact image list and labels, and the transform, so that kNN, SVM and fast linear
probes on the same images extract once.
"""
import hashlib
from dataclasses import dataclass

import torch
from torchvision import transforms as T
from tqdm import tqdm

from evaluate.common import UserError, atomic_torch_save, cache_dir

INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side, centre-crop, normalise: the test-time transform of every frozen-feature task."""

    resize: int
    crop: int
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"

    def build(self):
        if self.interpolation not in INTERPOLATION:
            raise UserError(f"interpolation must be one of {', '.join(INTERPOLATION)}, not {self.interpolation!r}")
        return T.Compose([T.Resize(self.resize, INTERPOLATION[self.interpolation]), T.CenterCrop(self.crop),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])

    def describe(self) -> str:
        return (f"resize{self.resize}-{self.interpolation}-crop{self.crop}-mean{','.join(map(str, self.mean))}"
                f"-std{','.join(map(str, self.std))}")


def collate_readable(batch):
    """Stack the images that could be read; return (images or None, their indices, indices of unreadable ones)."""
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad


def feature_cache_key(checkpoint_id: str, arch: str, split_fingerprint: str, transform: EvalTransform) -> str:
    text = f"{checkpoint_id}|{arch}|{split_fingerprint}|{transform.describe()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def extract_features(model, checkpoint_id, arch, split, transform: EvalTransform, device="cpu",
                     batch_size=128, num_workers=2, skip_bad_images=False, use_cache=True, log=print):
    """Pooled features of every image in `split`: returns (features float32 (N, D), labels, info).

    `info['index']` holds the positions in `split` of the rows (all of them unless images were skipped).

    Unreadable images stop the run with their path, unless `skip_bad_images`; then they are left out
    and counted in `info['skipped_images']`.
    """
    key = feature_cache_key(checkpoint_id, arch, split.fingerprint(), transform)
    path = cache_dir() / "features" / f"{key}.pt"
    if use_cache and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        log(f"  features of {split.dataset}/{split.split} read from cache ({path.name})")
        return cached["features"], cached["labels"], {"cache": "hit", "cache_key": key, "index": cached["index"],
                                                      "skipped_images": int(cached["skipped"])}
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(split.torch_dataset(transform.build()), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, collate_fn=collate_readable,
                                         pin_memory=device.type == "cuda")
    chunks, kept, bad = [], [], []
    for images, index, bad_index in tqdm(loader, desc=f"features {split.dataset}/{split.split}", unit="batch",
                                         leave=False):
        if bad_index and not skip_bad_images:
            path_or_index = split.paths[bad_index[0]] if split.paths is not None else f"image {bad_index[0]}"
            raise UserError(f"cannot read image {path_or_index} of {split.dataset}/{split.split}; "
                            "fix or remove it, or pass --set skip_bad_images=true")
        bad += bad_index
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.to(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out = model(images)
        chunks.append(out.float().flatten(1).cpu())
        kept.append(index)
    if not chunks:
        raise UserError(f"no image of {split.dataset}/{split.split} could be read")
    features = torch.cat(chunks)  # outside inference mode: a normal tensor that autograd may read
    index = torch.cat(kept)
    labels = torch.as_tensor(split.labels)[index]
    if use_cache:
        atomic_torch_save({"features": features, "labels": labels, "index": index, "skipped": len(bad)}, path)
    log(f"  extracted {tuple(features.shape)} features of {split.dataset}/{split.split}"
        + (f", skipped {len(bad)} unreadable images" if bad else ""))
    return features, labels, {"cache": "miss", "cache_key": key, "index": index, "skipped_images": len(bad)}
