"""The one frozen-feature extractor: every task that reads pooled features gets them here.

Features are cached on disk under a key made of the checkpoint's sha256 (or random seed), the
architecture, the exact image list and labels, and the transform (never the process count), so that
kNN, SVM and linear probes on the same images extract once. Under torchrun each process extracts a
contiguous shard of the split and writes it beside the cache; rank 0 joins the shards in dataset order.
"""
import hashlib

import torch
import torch.nn as nn

from core import distributed
from core.cli import UserError
from core.files import atomic_torch_save, cache_dir
from core.progress import progress
from datasets.decode import collate_readable, unreadable_error
from datasets.views import EvalTransform


class PooledTrunk(nn.Module):
    """The last stage's feature map average-pooled with a fixed window and flattened: Goyal et al.'s res5
    features (AvgPool2d(6, stride 1) on a 224 px input: 2 x 2 x 2048 = 8,192 values for a ResNet-50)."""

    def __init__(self, backbone: nn.Module, kernel: int, stride: int):
        super().__init__()
        if hasattr(backbone, "vit"):  # a ViT's tokens are no feature map to average as if they were one
            raise UserError("the res5 average-pooled feature map is a ResNet's; a ViT gives its CLS token "
                            "(backbones.families.tap_model), e.g. --set feature=pool")
        self.backbone, self.kernel, self.stride = backbone, kernel, stride

    def trunk(self, x):
        m = self.backbone
        if hasattr(m, "forward_features"):  # timm
            return m.forward_features(x)
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def forward(self, x):
        return nn.functional.avg_pool2d(self.trunk(x), self.kernel, self.stride).flatten(1)


def autocast_dtype(device) -> torch.dtype:
    """The one mixed-precision policy of encoders on a GPU (frozen features and finetuning alike): bfloat16
    where the GPU has it (the range of float32, no loss scaling), float16 elsewhere; CPUs run float32."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def encoder_autocast(device):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=autocast_dtype(device), enabled=device.type == "cuda")


def feature_cache_key(checkpoint_id: str, arch: str, split_fingerprint: str, transform: EvalTransform,
                      layer: str = "pool") -> str:
    text = f"{checkpoint_id}|{arch}|{split_fingerprint}|{transform.describe()}" + ("" if layer == "pool" else
                                                                                  f"|{layer}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _extract(model, dataset, indices, device, batch_size, num_workers, skip_bad_images, desc, show, split):
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, collate_fn=collate_readable,
                                         pin_memory=device.type == "cuda")
    chunks, kept, bad = [], [], []
    for images, index, bad_index in progress(loader, desc, unit="batch", show=show):
        if bad_index and not skip_bad_images:  # the dataset yields each image's index in the whole split
            raise unreadable_error(split, bad_index[0], "fix or remove it, or pass --set skip_bad_images=true")
        bad += bad_index
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.to(memory_format=torch.channels_last)
        with torch.inference_mode(), encoder_autocast(device):
            out = model(images)
        chunks.append(out.float().flatten(1).cpu())
        kept.append(index)
    features = torch.cat(chunks) if chunks else None  # outside inference mode: a tensor autograd may read
    return features, (torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)), bad


def extract_features(model, checkpoint_id, arch, split, transform: EvalTransform, device="cpu",
                     batch_size=128, num_workers=2, skip_bad_images=False, use_cache=True, log=print,
                     rank=0, world=1, layer="pool"):
    """Features of every image in `split`: returns (features float32 (N, D), labels, info); under torchrun
    only rank 0 gets them (the others get None, None, info).

    `model(images)` gives the features (`layer` names them in the cache key when they are not the pooled
    output). `info['index']` holds the positions in `split` of the rows (all of them unless images were
    skipped). Unreadable images stop the run with their path, unless `skip_bad_images`; then they are
    left out and counted in `info['skipped_images']`.
    """
    key = feature_cache_key(checkpoint_id, arch, split.fingerprint(), transform, layer)
    folder = cache_dir() / "features"
    path = folder / f"{key}.pt"
    desc = f"features {split.dataset}/{split.split}"
    if use_cache and path.is_file():
        info = {"cache": "hit", "cache_key": key}
        if rank != 0:
            return None, None, info
        cached = torch.load(path, map_location="cpu", weights_only=True)
        log(f"  features of {split.dataset}/{split.split} read from cache ({path.name})")
        return cached["features"], cached["labels"], {**info, "index": cached["index"],
                                                      "skipped_images": int(cached["skipped"])}
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dataset = split.torch_dataset(transform.build())
    shard = torch.arange(len(split)).tensor_split(world)[rank].tolist()
    features, index, bad = _extract(model, dataset, shard, device, batch_size, num_workers, skip_bad_images,
                                    desc + (f" [shard {rank + 1}/{world}]" if world > 1 else ""), True, split)
    if world > 1:
        # Each shard goes through a file beside the cache (large banks do not fit a collective's buffers).
        part = folder / f"{key}.part{rank}of{world}.pt"
        atomic_torch_save({"features": features, "index": index, "bad": bad}, part)
        distributed.barrier()
        if rank != 0:
            distributed.barrier()  # wait until rank 0 has read every part
            return None, None, {"cache": "miss", "cache_key": key}
        parts = [torch.load(folder / f"{key}.part{r}of{world}.pt", map_location="cpu", weights_only=True)
                 for r in range(world)]
        distributed.barrier()
        for r in range(world):
            (folder / f"{key}.part{r}of{world}.pt").unlink(missing_ok=True)
        features = torch.cat([q["features"] for q in parts if q["features"] is not None]) \
            if any(q["features"] is not None for q in parts) else None
        index = torch.cat([q["index"] for q in parts])
        bad = [i for q in parts for i in q["bad"]]
    if features is None:
        raise UserError(f"no image of {split.dataset}/{split.split} could be read")
    labels = torch.as_tensor(split.labels)[index]
    if use_cache:
        atomic_torch_save({"features": features, "labels": labels, "index": index, "skipped": len(bad)}, path)
    log(f"  extracted {tuple(features.shape)} features of {split.dataset}/{split.split}"
        + (f" on {world} processes" if world > 1 else "") + (f", skipped {len(bad)} unreadable images" if bad else ""))
    return features, labels, {"cache": "miss", "cache_key": key, "index": index, "skipped_images": len(bad)}
