"""A linear classifier trained with SGD on the encoder, frozen or finetuned, with training augmentation.

Frozen (`encoder_lr` 0): the encoder stays in eval() mode under no_grad and only the linear layer
learns; the test set is scored on centre-crop features from the shared feature cache. Finetuned
(`encoder_lr` > 0): a copy of the encoder trains in train() mode with its own learning rate, and the
test set is scored on the finetuned copy. Each batch gets a random resized crop and a flip. The
classifier, the finetuned encoder and the optimiser are saved after every epoch, so
`evaluate/run.py --resume` continues an interrupted run.

Under torchrun each process takes a part of every global batch (DDP averages the gradients; the loss
is the mean over the global batch); batches and augmentations depend only on the seed, the epoch and
the image, so one process and several train on the same data. Rank 0 saves the state and scores the
test set.

Used by `linear_places205`, `linear_inat18` (paper §8.4), `protocol=sgd` of the other linear tasks,
and `semisup_1pct` / `semisup_10pct` (paper §8.2).
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm import tqdm

from evaluate.common import UserError, atomic_torch_save, epoch_order
from evaluate.features import INTERPOLATION, EvalTransform, collate_readable, extract_features
from tasks.datasets import SUBDIRS
from tasks.datasets.imagenet import read_simclr_subset
from tasks.frozen import FrozenFeatureProtocol, input_normalization, read_splits
from tasks.metrics import topk_accuracy
from tasks.protocol import param

PAPER_84 = "paper §8.4: SGD momentum 0.9, weight decay 1e-4, batch 256, LR 0.2 divided by 10 twice at equal intervals"


@dataclass(frozen=True)
class LinearSgdProtocol(FrozenFeatureProtocol):
    epochs: int = param(28, "paper §8.4: 28 epochs (Places205), 84 (iNat18)")
    lr: float = param(0.2, PAPER_84)
    momentum: float = param(0.9, PAPER_84)
    weight_decay: float = param(1e-4, PAPER_84)
    train_batch_size: int = param(256, PAPER_84)
    schedule: str = param("step", "step: divided by 10 at 1/3 and 2/3 of training (paper §8.4); cosine: per step")
    train_crop_scale_min: float = param(0.08, "torchvision's RandomResizedCrop default (scale 0.08-1)")
    init_std: float = param(0.01, "MoCo's linear classification: weights N(0, 0.01), bias 0")
    nesterov: bool = param(False, "paper §8.4 states plain momentum")
    encoder_lr: float = param(0.0, "0: frozen encoder (linear evaluation)")
    train_subset: str = param("", "'' for the whole train split, or a SimCLR subset file under imagenet_subsets/")
    metric_infix: str = param("_linear", "metric names of shared/reference/paper_tables.csv (<prefix>_linear_top1)")


SEMISUP = "paper §8.2: SGD with Nesterov momentum 0.9, batch 1024"
SIMCLR_B5 = ("not stated by the paper; SimCLR's semi-supervised protocol, whose 1%/10% lists the paper uses "
             "(Chen et al. 2020, App. B.5): 60 epochs for 1%, 30 for 10%, no weight decay, no warm-up")
SIMCLR_SCHEDULE = ("not stated by the paper; SimCLR's fine-tuning (App. B.5: no warm-up) runs its one LR schedule, "
                   "cosine decay per step (google-research/simclr, tf2/run.py WarmUpAndCosineDecay)")


@dataclass(frozen=True)
class SemisupProtocol(LinearSgdProtocol):
    """Semi-supervised ImageNet (paper §8.2): the 1% task's values by default."""

    num_classes: int = param(1000, "ImageNet")
    metric_prefix: str = param("semisup1", "metric names of shared/reference/paper_tables.csv (semisup1_top1)")
    metric_infix: str = param("", "metric names of shared/reference/paper_tables.csv (semisup1_top1)")
    train_subset: str = param("1percent.txt", "SimCLR's subset lists: 1percent.txt (12,811 images), "
                                              "10percent.txt (128,116)")
    epochs: int = param(60, SIMCLR_B5)
    lr: float = param(2.0, "paper §8.2: classifier LR 2.0 (1%), 0.25 (10%)")
    encoder_lr: float = param(0.0, "paper §8.2: encoder frozen (1%), encoder LR 2.5e-4 (10%)")
    momentum: float = param(0.9, SEMISUP)
    nesterov: bool = param(True, SEMISUP)
    weight_decay: float = param(0.0, SIMCLR_B5)
    train_batch_size: int = param(1024, SEMISUP)
    schedule: str = param("cosine", SIMCLR_SCHEDULE)


def learning_rate(p: LinearSgdProtocol, epoch: int, step: int, steps_per_epoch: int) -> float:
    if p.schedule == "step":  # "divided by 10 twice at equally spaced intervals"
        return p.lr * 0.1 ** sum(epoch >= p.epochs * k / 3 for k in (1, 2))
    if p.schedule == "constant":
        return p.lr
    if p.schedule == "cosine":
        progress = (epoch * steps_per_epoch + step) / (p.epochs * steps_per_epoch)
        return p.lr * 0.5 * (1 + math.cos(math.pi * progress))
    raise UserError(f"schedule must be step, cosine or constant, not {p.schedule!r}")


def state_path(ctx, task_name, seed=None, suffix=".pt"):
    """Where a training task keeps its resumable state: one file (or folder) per task, checkpoint and seed."""
    ident = (ctx.checkpoint.sha256 or ctx.checkpoint.path.replace(":", "-"))[:16]
    seed = ctx.seed if seed is None else seed
    return ctx.out_dir / "state" / f"{task_name}__{ident}__seed{seed}{'__demo' if ctx.demo else ''}{suffix}"


class EpochBatches(torch.utils.data.Sampler):
    """This process's share of each batch of one epoch, as (epoch, index) pairs.

    The epoch's order depends only on (seed, epoch) and each global batch is split into `world` near-equal
    parts, so a resumed run, and a run on any number of processes, trains on the same global batches. A last
    batch smaller than `world` is dropped (every process must take part in every step)."""

    def __init__(self, n, batch, epoch, seed, rank=0, world=1):
        order = epoch_order(n, seed, epoch)
        self.parts = [b.tensor_split(world)[rank] for b in order.split(batch) if len(b) >= world]
        self.epoch = epoch

    def __len__(self):
        return len(self.parts)

    def __iter__(self):
        for part in self.parts:
            yield [(self.epoch, int(i)) for i in part]


class SeededSamples(torch.utils.data.Dataset):
    """Training images whose random augmentation is drawn from a generator seeded by (seed, epoch, index):
    the same crops and flips whatever the process count, the loader workers or an interruption."""

    def __init__(self, samples, seed):
        self.samples, self.seed = samples, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + i) % (2 ** 63))
            return self.samples[i]


class Probe(nn.Module):
    """Encoder, pooled features, linear layer: the network that finetuning trains (and DDP wraps)."""

    def __init__(self, encoder, head, amp):
        super().__init__()
        self.encoder, self.head, self.amp = encoder, head, amp

    def features(self, images):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.encoder(images).float().flatten(1)

    def forward(self, images):
        return self.head(self.features(images))


def all_sum(value: int, world: int, device) -> int:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def run(ctx, p: LinearSgdProtocol, task_name="linear_sgd"):
    splits = read_splits(ctx, p)
    if p.train_subset:
        subset = ctx.data_root / SUBDIRS["imagenet_subsets"] / p.train_subset
        splits["train"] = read_simclr_subset(ctx.data_root / SUBDIRS["imagenet"], subset, num_classes=p.num_classes)
    info = {"train_subset": p.train_subset} if p.train_subset else {}
    mean, std = input_normalization(ctx, p, info)
    train_tf = T.Compose([T.RandomResizedCrop(p.crop, scale=(p.train_crop_scale_min, 1.0),
                                              interpolation=INTERPOLATION[p.interpolation]),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    train = splits["train"]
    samples = SeededSamples(train.torch_dataset(train_tf), ctx.seed)
    device, rank, world = torch.device(ctx.device), ctx.rank, ctx.world
    finetune = p.encoder_lr > 0
    # Finetuning trains a copy, so that the run's other tasks still see the checkpoint's encoder.
    model = (copy.deepcopy(ctx.model) if finetune else ctx.model).to(device).eval()
    with torch.no_grad():
        dim = model(torch.zeros(2, 3, p.crop, p.crop, device=device)).flatten(1).shape[1]
    torch.manual_seed(ctx.seed)
    head = nn.Linear(dim, p.num_classes).to(device)
    nn.init.normal_(head.weight, std=p.init_std)
    nn.init.zeros_(head.bias)
    probe = Probe(model, head, amp=device.type == "cuda")
    groups = [{"params": head.parameters(), "lr": p.lr, "base_lr": p.lr}]
    if finetune:
        groups.append({"params": model.parameters(), "lr": p.encoder_lr, "base_lr": p.encoder_lr})
    opt = torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, nesterov=p.nesterov)
    labels = torch.as_tensor(train.labels)
    start, path = 0, state_path(ctx, task_name)
    if ctx.resume and path.is_file():
        state = torch.load(path, map_location=device, weights_only=True)
        if state["protocol"] != repr(p):
            raise UserError(f"--resume: {path} was written with another protocol; remove it or drop --resume")
        head.load_state_dict(state["head"])
        if finetune:
            model.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"]
        ctx.log(f"  resumed {path.name} after epoch {start}")
    if world > 1:
        # Finetuning normalises over the global batch where the hardware allows (SyncBatchNorm needs CUDA).
        if finetune and device.type == "cuda":
            probe.encoder = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        info["batch_norm"] = ("synchronised over the processes" if finetune and device.type == "cuda"
                              else "per process" if finetune else "frozen (eval mode)")
        # Frozen: only the linear layer learns, so only it is shared.
        net = nn.parallel.DistributedDataParallel(probe if finetune else head,
                                                  device_ids=[device] if device.type == "cuda" else None)
    else:
        net = probe if finetune else head
    skipped = 0
    model.train(finetune)
    for epoch in range(start, p.epochs):
        loader = torch.utils.data.DataLoader(
            samples, batch_sampler=EpochBatches(len(train), p.train_batch_size, epoch, ctx.seed, rank, world),
            num_workers=p.workers, collate_fn=collate_readable, pin_memory=device.type == "cuda")
        bar = tqdm(loader, desc=f"{task_name} epoch {epoch + 1}/{p.epochs}", leave=False, disable=rank != 0)
        for step, (images, index, bad) in enumerate(bar):
            first_bad = (train.paths[bad[0]] if train.paths else f"#{bad[0]}") if bad else None
            if bad and not p.skip_bad_images:
                raise UserError(f"cannot read image {first_bad}; fix or remove it, or pass --set skip_bad_images=true")
            skipped += len(bad)
            if images is None and world == 1:
                continue
            if images is None:
                raise UserError(f"every image of a batch part was unreadable (first {first_bad}); "
                                "remove the unreadable images, or run without torchrun")
            scale = learning_rate(p, epoch, step, len(loader)) / p.lr
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
            images = images.to(device, non_blocking=True)
            if finetune:
                logits = net(images)
            else:
                with torch.no_grad():
                    feats = probe.features(images)
                logits = net(feats)
            # The mean over the global batch: DDP averages the processes' gradients, hence the factor world.
            n_global = all_sum(len(index), world, device)
            loss = F.cross_entropy(logits, labels[index].to(device), reduction="sum") * (world / n_global)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item() / world:.3f}")
        if rank == 0:
            atomic_torch_save({"head": head.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                               "encoder": model.state_dict() if finetune else None, "protocol": repr(p)}, path)
    skipped = all_sum(skipped, world, device)
    if rank != 0:
        return {}, {}  # rank 0 scores the test set and writes the record
    transform = EvalTransform(p.resize, p.crop, mean, std, p.interpolation)
    model.eval()
    xte, yte, extra = extract_features(model, ctx.checkpoint.cache_id, ctx.arch, splits["test"], transform,
                                       device=ctx.device, batch_size=p.batch_size, num_workers=p.workers,
                                       skip_bad_images=p.skip_bad_images, use_cache=not finetune, log=ctx.log)
    with torch.no_grad():
        acc = topk_accuracy(head(xte.to(device)).cpu(), yte, (1, 5))
    info.update(train_size=len(train), test_size=len(yte), feature_dim=dim, test_transform=transform.describe(),
                processes=world, train_skipped_images=skipped // max(1, p.epochs - start),
                test_skipped_images=extra["skipped_images"], classifier_state=str(path))
    return {f"{p.metric_prefix}{p.metric_infix}_top1": acc[1], f"{p.metric_prefix}{p.metric_infix}_top5": acc[5]}, info
