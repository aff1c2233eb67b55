"""A classifier trained with SGD on an encoder, frozen or finetuned, with training augmentation: the engine
of the SGD linear probes (`linear_sgd.py`) and of semi-supervised finetuning (`semisup.py`).

Frozen (`encoder_lr` 0): the encoder stays in eval() mode under no_grad and only the head learns; the test
set is scored on centre-crop features from the shared feature cache. Finetuned (`encoder_lr` > 0): a copy
of the encoder trains in train() mode with its own learning rate, and the test set is scored on that copy.
Each training image gets a random resized crop and a flip. The head, the finetuned encoder, the optimiser
and the per-epoch history are saved after every epoch, so `evaluate/run.py --resume` continues an
interrupted run.

Under torchrun each process takes its part of every global batch (DDP averages the gradients; the loss is
the mean over the global batch); batches and augmentations depend only on the seed, the epoch and the
image (`core.sampling`), so one process and several train on the same data. Rank 0 saves the state and
scores the test set.
"""
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

from backbones.features import autocast_dtype, encoder_autocast, extract_features
from core import distributed
from core.cli import UserError
from core.loading import loader_options, resolve_workers
from core.progress import progress
from core.resume import StateFile
from core.sampling import SeededBatches, SeededSamples
from datasets.decode import collate_readable, unreadable_error
from datasets.views import INTERPOLATION, EvalTransform
from tasks.metrics import topk_accuracy

SCHEDULES = ("step", "cosine", "constant")
POSTFIX_EVERY = 50  # training steps between two reads of the loss for the progress bar (a host sync each)


def global_count(n: int, device, world: int):
    """The images of this step over all processes: an int on one process, else a device tensor (summed by an
    all-reduce, not read to the host)."""
    if world == 1:
        return n
    t = torch.tensor(float(n), device=device)
    torch.distributed.all_reduce(t)
    return t


def learning_rate(p, epoch: int, step: int, steps_per_epoch: int) -> float:
    """step: divided by 10 at 1/3 and 2/3 of the epochs; cosine: per step, to 0; constant."""
    if p.schedule == "step":  # "divided by 10 twice at equally spaced intervals"
        return p.lr * 0.1 ** sum(epoch >= p.epochs * k / 3 for k in (1, 2))
    if p.schedule == "constant":
        return p.lr
    if p.schedule == "cosine":
        progress_ = (epoch * steps_per_epoch + step) / (p.epochs * steps_per_epoch)
        return p.lr * 0.5 * (1 + math.cos(math.pi * progress_))
    raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, not {p.schedule!r}")


class FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d without affine parameters on frozen features, its batch statistics taken over the global
    batch under torchrun (the features carry no gradient, so the statistics need none): one process and N
    processes normalise alike."""

    def __init__(self, dim, eps):
        super().__init__(dim, eps=eps, affine=False)

    def forward(self, x):
        if not (self.training and distributed.initialized()):
            return super().forward(x)
        x = x.detach()
        stats = torch.stack([x.sum(0), (x * x).sum(0), torch.full_like(x[0], len(x))])
        torch.distributed.all_reduce(stats)
        n = stats[2, 0]
        mean, var = stats[0] / n, stats[1] / n - (stats[0] / n) ** 2
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps)


def make_head(dim: int, p) -> nn.Module:
    """Linear, after a BatchNorm without affine parameters when p.head_batchnorm (VISSL's eval_mlp, MAE's
    linear probe): it standardises the frozen features, so that one LR suits any encoder's feature scale."""
    linear = nn.Linear(dim, p.num_classes)
    nn.init.normal_(linear.weight, std=p.init_std)
    nn.init.zeros_(linear.bias)
    if not p.head_batchnorm:
        return linear
    if p.encoder_lr > 0:
        raise UserError("head_batchnorm standardises frozen features; it cannot be combined with encoder_lr > 0")
    return nn.Sequential(FeatureBatchNorm(dim, p.head_batchnorm_eps), linear)


class Probe(nn.Module):
    """Encoder, pooled features, head: the network that finetuning trains (and DDP wraps)."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, images):
        with encoder_autocast(images.device):
            return self.encoder(images).float().flatten(1)

    def forward(self, images):
        return self.head(self.features(images))


def train_transform(p, mean, std):
    return T.Compose([T.RandomResizedCrop(p.crop, scale=(p.train_crop_scale_min, 1.0),
                                          interpolation=INTERPOLATION[p.interpolation]),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def train_and_score(ctx, p, train, test, mean, std, task_name):
    """Train the head (and the encoder when p.encoder_lr > 0) on `train`, score `test`: (top-1/5, info)."""
    device, rank, world = torch.device(ctx.device), ctx.rank, ctx.world
    samples = SeededSamples(train.torch_dataset(train_transform(p, mean, std)), ctx.seed)
    finetune = p.encoder_lr > 0
    # Finetuning trains a copy, so that the run's other tasks still see the checkpoint's encoder.
    model = (copy.deepcopy(ctx.model) if finetune else ctx.model).to(device).eval()
    with torch.no_grad():
        dim = model(torch.zeros(2, 3, p.crop, p.crop, device=device)).flatten(1).shape[1]
    torch.manual_seed(ctx.seed)
    head = make_head(dim, p).to(device)
    probe = Probe(model, head)
    groups = [{"params": head.parameters(), "lr": p.lr, "base_lr": p.lr}]
    if finetune:
        groups.append({"params": model.parameters(), "lr": p.encoder_lr, "base_lr": p.encoder_lr})
    opt = torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, nesterov=p.nesterov)
    scaler = torch.amp.GradScaler("cuda", enabled=finetune and device.type == "cuda"
                                  and autocast_dtype(device) == torch.float16)
    labels = torch.as_tensor(train.labels)
    state = StateFile(ctx.state_path(task_name), ctx.resume, repr(p), device=device,
                      log=ctx.log if rank == 0 else (lambda *a: None))
    start, history = 0, []
    saved = state.load()
    if saved is not None:
        head.load_state_dict(saved["head"])
        if finetune:
            model.load_state_dict(saved["encoder"])
        opt.load_state_dict(saved["optimizer"])
        start, history = saved["epoch"], saved["history"]
        ctx.log(f"  resumed {state.loaded_from.name} after epoch {start}")
    info = {}
    if world > 1:
        # Finetuning normalises over the global batch where the hardware allows (SyncBatchNorm needs CUDA).
        if finetune and device.type == "cuda":
            probe.encoder = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        info["batch_norm"] = ("synchronised over the processes" if finetune and device.type == "cuda"
                              else "per process" if finetune else "frozen (eval mode)")
        # Frozen: only the head learns, so only it is shared.
        net = nn.parallel.DistributedDataParallel(probe if finetune else head,
                                                  device_ids=[device] if device.type == "cuda" else None)
    else:
        net = probe if finetune else head
    skipped = 0
    model.train(finetune)
    head.train()
    cuda = device.type == "cuda"
    if cuda:  # fixed input sizes: let cuDNN pick its fastest kernels; NHWC convolutions on tensor cores
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    # One loader over every remaining epoch (its workers live through them all); batches depend only on
    # (seed, epoch, step), so a resumed run sees the batches an uninterrupted one does.
    sampler = SeededBatches(len(train), p.train_batch_size, ctx.seed, rank=rank, world=world, drop_last=False)
    steps_per_epoch = sampler.steps_per_epoch
    sampler.start, sampler.stop = start * steps_per_epoch, p.epochs * steps_per_epoch
    workers = resolve_workers(p.workers, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    batches = iter(torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate_readable,
                                               **loader_options(device, workers, reused=False)))
    for epoch in range(start, p.epochs):
        # summed on the device, read once per epoch (and for the progress bar every POSTFIX_EVERY steps)
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = progress(range(steps_per_epoch), f"{task_name} epoch {epoch + 1}/{p.epochs}", unit="batch",
                       show=rank == 0)
        for step in bar:
            images, index, bad = next(batches)
            if bad and not p.skip_bad_images:
                raise unreadable_error(train, bad[0], "fix or remove it, or pass --set skip_bad_images=true")
            skipped += len(bad)
            if images is None and world == 1:
                continue
            if images is None:
                raise UserError(f"every image of a batch part was unreadable (first: {bad[0]} of "
                                f"{train.dataset}/{train.split}); remove the unreadable images, or run without torchrun")
            lr = learning_rate(p, epoch, step, steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr / p.lr
            images = images.to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            target = labels[index].to(device, non_blocking=True)
            if finetune:
                logits = net(images)
            else:
                with torch.no_grad():
                    feats = probe.features(images)
                logits = net(feats)
            # The mean over the global batch: DDP averages the processes' gradients, hence the factor world.
            n_global = global_count(len(index), device, world)
            loss = F.cross_entropy(logits.float(), target, reduction="sum") * (world / n_global)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * n_global / world
            correct += (logits.detach().argmax(1) == target).sum()
            seen += len(index)
            if rank == 0 and (step + 1) % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item() / world:.3f}")
        if seen:
            seen_global = distributed.all_sum(seen, device)
            history.append({"epoch": epoch + 1, "lr": learning_rate(p, epoch, 0, steps_per_epoch),
                            "train_loss": loss_sum.item() / max(1, seen_global),
                            "train_top1": 100.0 * distributed.all_sum(int(correct), device) / max(1, seen_global)})
        if rank == 0:
            state.save({"head": head.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "encoder": model.state_dict() if finetune else None, "history": history})
    if cuda:
        model.to(memory_format=torch.contiguous_format)  # the shared frozen encoder as the other tasks expect it
    skipped = distributed.all_sum(skipped, device)
    if rank != 0:
        return None, {}
    transform = EvalTransform(p.resize, p.crop, mean, std, p.interpolation)
    model.eval()
    head.eval()
    xte, yte, extra = extract_features(model, ctx.checkpoint.cache_id, ctx.arch, test, transform,
                                       device=ctx.device, batch_size=p.batch_size, num_workers=p.workers,
                                       skip_bad_images=p.skip_bad_images, use_cache=not finetune, log=ctx.log)
    with torch.no_grad():
        acc = topk_accuracy(head(xte.to(device)).cpu(), yte, (1, 5))
    info.update(train_size=len(train), test_size=len(yte), feature_dim=dim, test_transform=transform.describe(),
                processes=world, train_skipped_images=skipped // max(1, p.epochs - start),
                test_skipped_images=extra["skipped_images"], classifier_state=str(state.path), history=history)
    return acc, info
