"""The one frozen-feature extractor: every task that reads pooled features gets them here.

Features are cached on disk under a key made of everything they depend on (`feature_cache_key`: the
checkpoint's sha256 or random seed, the architecture, the exact image list and labels, the transform, the
tap and the precision; never the process count), so that kNN, SVM and linear probes on the same images
extract once. An unreadable cache file (truncated, empty) is reported, removed and extracted again. Under
torchrun rank 0 alone decides whether the cache holds a split and tells the others; on a miss each process
extracts a contiguous shard of the split and writes it beside the cache, rank 0 joins the shards in dataset
order and writes the cache entry (atomically) before it releases the others.
"""
import contextlib
import hashlib
import os
import secrets

import torch
import torch.nn as nn

from core import distributed
from core.cli import UserError
from core.files import atomic_torch_save, cache_dir
from core.loading import loader_options, resolve_workers
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
        fmap = self.trunk(x)
        if min(fmap.shape[-2:]) < self.kernel:
            raise UserError(f"the {x.shape[-1]} px input gives a last-stage map of {fmap.shape[-2]} x {fmap.shape[-1]}, "
                            f"smaller than the {self.kernel} x {self.kernel} average pool of the res5 features; use "
                            f"larger images (--set square=) or a smaller pool_kernel")
        return nn.functional.avg_pool2d(fmap, self.kernel, self.stride).flatten(1)


def autocast_dtype(device) -> torch.dtype:
    """The one mixed-precision policy of encoders (frozen features and finetuning alike): on a CUDA device
    bfloat16 where the GPU has it (the range of float32, no loss scaling), float16 on older GPUs; on the CPU
    float32 (no autocast)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(dtype) -> str:
    """'float32', 'bfloat16' or 'float16': how records and cache keys name a precision."""
    return str(dtype).removeprefix("torch.")


def resolve_precision(precision, device) -> torch.dtype:
    """A precision given by name or dtype (None: the policy of `autocast_dtype` for `device`)."""
    if precision is None:
        return autocast_dtype(device)
    dtype = getattr(torch, precision, None) if isinstance(precision, str) else precision
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"precision must be float32, bfloat16 or float16, not {precision!r}")
    return dtype


def encoder_autocast(device, dtype=None):
    """Autocast in `dtype` (default: `autocast_dtype(device)`); float32 runs without autocast."""
    device = torch.device(device)
    dtype = autocast_dtype(device) if dtype is None else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def feature_cache_key(checkpoint_id: str, arch: str, split_fingerprint: str, transform: EvalTransform,
                      layer: str = "pool", precision: str = "float32") -> str:
    """Everything the features depend on: the encoder (checkpoint file, network taken, stem), its architecture,
    the exact images and labels, the transform (resize, crop or square, interpolation, resolution, mean/std),
    the tap, and the precision they were computed in; never the process count, batch size or workers."""
    text = f"{checkpoint_id}|{arch}|{split_fingerprint}|{transform.describe()}|{layer}|{precision}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cache_problem(cached) -> str:
    """Why a loaded cache entry cannot be used (None when it can)."""
    if not isinstance(cached, dict) or not {"features", "labels", "index", "skipped"} <= set(cached):
        return "not a feature-cache entry"
    features, labels, index = cached["features"], cached["labels"], cached["index"]
    if not all(isinstance(t, torch.Tensor) for t in (features, labels, index)) or features.dim() != 2 \
            or not len(features) == len(labels) == len(index):
        return "its tensors do not fit together"
    return None


def read_cache(path, log=print):
    """The feature-cache entry at `path`, or None when there is none. An entry that cannot be read (truncated or
    empty: a job killed while writing it on a network filesystem; or not a feature cache) is reported in one
    line and removed, so that the caller extracts again."""
    identity = None
    try:
        with open(path, "rb") as f:
            identity = os.fstat(f.fileno())
            cached = torch.load(f, map_location="cpu", weights_only=True)
        problem = _cache_problem(cached)
    except FileNotFoundError:
        return None
    except Exception as error:  # torch.load: RuntimeError (zip reader), EOFError, UnpicklingError, ...
        problem = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:120]}"
    if problem is None:
        return cached
    log(f"  warning: the feature cache {path} is unreadable ({problem}); removed, extracting the features again")
    try:
        # only the file that was read: another job may have replaced it with a good one meanwhile
        if identity is None or os.stat(path).st_ino == identity.st_ino:
            os.unlink(path)
    except OSError:
        pass
    return None


def _extract(model, dataset, indices, device, batch_size, num_workers, skip_bad_images, desc, show, split,
             dtype):
    # one pass over the split: workers that outlive it would only hold memory (reused=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate_readable,
                                         **loader_options(device, num_workers, reused=False))
    chunks, kept, bad = [], [], []
    for images, index, bad_index in progress(loader, desc, unit="batch", show=show):
        if bad_index and not skip_bad_images:  # the dataset yields each image's index in the whole split
            raise unreadable_error(split, bad_index[0], "fix or remove it, or pass --set skip_bad_images=true")
        bad += bad_index
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), encoder_autocast(device, dtype):
            out = model(images)
        # kept in the precision they were computed in (half the memory of float32 under bf16/fp16 autocast)
        chunks.append(out.flatten(1).to(dtype).cpu())
        kept.append(index)
    features = torch.cat(chunks) if chunks else None  # outside inference mode: a tensor autograd may read
    return features, (torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)), bad


def _cache_decision(path, use_cache, rank, world, log):
    """(cache entry or None, job token). Rank 0 alone looks at the cache and tells the others whether it holds
    the split: ranks that looked for themselves could see the file appear, disappear or break between their
    looks, take different branches and wait in different collectives (a hang). The token names this job's
    shard files, so that two jobs extracting the same split into one cache folder never read each other's."""
    cached = read_cache(path, log) if use_cache and rank == 0 else None
    if world == 1:
        return cached, None
    hit, job = distributed.broadcast_object((cached is not None, secrets.token_hex(6)) if rank == 0 else None)
    return (cached if rank == 0 else ({} if hit else None)), job


def extract_features(model, checkpoint_id, arch, split, transform: EvalTransform, device="cpu",
                     batch_size=128, num_workers=2, skip_bad_images=False, use_cache=True, log=print,
                     rank=0, world=1, layer="pool", precision=None, as_float32=True):
    """Features of every image in `split`: returns (features (N, D), labels, info); under torchrun only rank 0
    gets them (the others get None, None, info).

    `model(images)` gives the features (`layer` names the tap in the cache key when they are not the pooled
    output). They are computed under autocast in `precision` (None: `autocast_dtype(device)`; float32 runs
    without autocast), cached in that dtype, and returned in float32 unless `as_float32=False`.
    `info['index']` holds the positions in `split` of the rows (all of them unless images were skipped),
    `info['precision']` the precision's name. Unreadable images stop the run with their path, unless
    `skip_bad_images`; then they are left out and counted in `info['skipped_images']`.
    """
    device = torch.device(device)
    dtype = resolve_precision(precision, device)
    key = feature_cache_key(checkpoint_id, arch, split.fingerprint(), transform, layer, precision_name(dtype))
    folder = cache_dir() / "features"
    path = folder / f"{key}.pt"
    desc = f"features {split.dataset}/{split.split}"
    info = {"cache_key": key, "precision": precision_name(dtype)}
    cached, job = _cache_decision(path, use_cache, rank, world, log)
    if cached is not None:
        info["cache"] = "hit"
        if rank != 0:
            return None, None, info
        log(f"  features of {split.dataset}/{split.split} read from cache ({path.name})")
        features = cached["features"].float() if as_float32 else cached["features"]
        return features, cached["labels"], {**info, "index": cached["index"], "skipped_images": int(cached["skipped"])}
    info["cache"] = "miss"
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dataset = split.torch_dataset(transform.build())
    shard = torch.arange(len(split)).tensor_split(world)[rank].tolist()
    features, index, bad = _extract(model, dataset, shard, device, batch_size, resolve_workers(num_workers, world),
                                    skip_bad_images, desc + (f" [shard {rank + 1}/{world}]" if world > 1 else ""),
                                    True, split, dtype)
    if world > 1:
        # Each shard goes through a file beside the cache (large banks do not fit a collective's buffers).
        parts = [folder / f"{key}.{job}.part{r}of{world}.pt" for r in range(world)]
        atomic_torch_save({"features": features, "index": index, "bad": bad}, parts[rank])
        distributed.barrier()  # every shard written
        if rank != 0:
            distributed.barrier()  # rank 0 has joined the shards and written the cache entry
            return None, None, info
        shards = [torch.load(q, map_location="cpu", weights_only=True) for q in parts]
        features = torch.cat([q["features"] for q in shards if q["features"] is not None]) \
            if any(q["features"] is not None for q in shards) else None
        index = torch.cat([q["index"] for q in shards])
        bad = [i for q in shards for i in q["bad"]]
    try:
        if features is None:
            raise UserError(f"no image of {split.dataset}/{split.split} could be read")
        labels = torch.as_tensor(split.labels)[index]
        if use_cache:  # atomically, and before the others are released: no process reads half a file
            atomic_torch_save({"features": features, "labels": labels, "index": index, "skipped": len(bad)}, path)
    finally:
        if world > 1:
            for q in parts:
                q.unlink(missing_ok=True)
            distributed.barrier()
    log(f"  extracted {tuple(features.shape)} features of {split.dataset}/{split.split}"
        + (f" on {world} processes" if world > 1 else "") + (f", skipped {len(bad)} unreadable images" if bad else ""))
    return (features.float() if as_float32 else features), labels, {**info, "index": index,
                                                                    "skipped_images": len(bad)}
