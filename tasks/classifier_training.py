"""A classifier trained with SGD on an encoder, frozen or finetuned, with training augmentation: the engine
of the SGD linear probes (`linear_sgd.py`) and of semi-supervised finetuning (`semisup.py`).

How the encoder takes part is one strategy object (`strategy_for`), the only place the two differ:
`FrozenEncoder` (`encoder_lr` 0): the encoder stays in eval() mode under no_grad and only the head learns;
the test set is scored on centre-crop features from the shared feature cache. `FinetunedEncoder`
(`encoder_lr` > 0): a copy of the encoder trains in train() mode with its own learning rate, and the test
set is scored on that copy.
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


class FrozenEncoder:
    """Linear evaluation: the run's encoder in eval() mode under no_grad, only the head learns (and only the head
    is shared by DDP); the test set is scored on features from the shared feature cache."""
    name = "frozen"
    encoder_trains = False

    def encoder(self, ctx, device):
        return ctx.model.to(device).eval()

    def param_groups(self, p, head, encoder):
        return [{"params": head.parameters(), "lr": p.lr, "base_lr": p.lr}]

    def optimizer(self, p, groups):
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay,
                               nesterov=p.nesterov)

    def scaler(self, device):
        return torch.amp.GradScaler("cuda", enabled=False)  # the head trains in float32

    def encoder_state(self, encoder):
        return None

    def load_encoder(self, encoder, saved):
        pass

    def distribute(self, probe, device, world):
        """(the module the optimiser's gradients flow through, how BatchNorm is run)"""
        if world == 1:
            return probe.head, None
        return nn.parallel.DistributedDataParallel(probe.head, device_ids=[device] if device.type == "cuda"
                                                   else None), "frozen (eval mode)"

    def logits(self, net, probe, images):
        with torch.no_grad():
            feats = probe.features(images)
        return net(feats)

    def learning_rate(self, p, epoch, step, steps_per_epoch):
        """The head's LR at this step."""
        return learning_rate(p, epoch, step, steps_per_epoch)

    def apply_lr(self, opt, p, lr):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr / p.lr

    def describe(self):
        """What the record's data section says of the recipe, beyond the protocol's values (None: nothing)."""
        return None


class FinetunedEncoder(FrozenEncoder):
    """Finetuning: a copy of the encoder (the run's other tasks still see the checkpoint's) trains in train()
    mode at its own learning rate, BatchNorm synchronised over CUDA processes; the test set is scored on the
    copy, without the feature cache."""
    name = "finetuned"
    encoder_trains = True

    def encoder(self, ctx, device):
        return copy.deepcopy(ctx.model).to(device).eval()

    def param_groups(self, p, head, encoder):
        return super().param_groups(p, head, encoder) + [
            {"params": encoder.parameters(), "lr": p.encoder_lr, "base_lr": p.encoder_lr}]

    def scaler(self, device):
        return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and autocast_dtype(device) == torch.float16)

    def encoder_state(self, encoder):
        return encoder.state_dict()

    def load_encoder(self, encoder, saved):
        encoder.load_state_dict(saved["encoder"])

    def distribute(self, probe, device, world):
        if world == 1:
            return probe, None
        cuda = device.type == "cuda"
        if cuda:  # normalise over the global batch where the hardware allows (SyncBatchNorm needs CUDA)
            probe.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(probe.encoder)
        net = nn.parallel.DistributedDataParallel(probe, device_ids=[device] if cuda else None)
        return net, "synchronised over the processes" if cuda else "per process"

    def logits(self, net, probe, images):
        return net(images)


def strategy_for(ctx, p):
    """How the encoder takes part: frozen (encoder_lr 0), finetuned with SGD, or, for a ViT, finetuned with
    AdamW and layer-wise LR decay (tasks/semisup_vit.py)."""
    if p.encoder_lr <= 0:
        return FrozenEncoder()
    if getattr(ctx.checkpoint, "family", "resnet") == "vit":
        from tasks.semisup_vit import ViTFinetunedEncoder

        return ViTFinetunedEncoder(p)
    return FinetunedEncoder()


class EpochTotals:
    """Loss and accuracy of an epoch, summed on the device and read once at its end."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def add(self, loss, n_global, world, logits, target):
        self.loss += loss.detach() * n_global / world
        self.correct += (logits.detach().argmax(1) == target).sum()
        self.seen += len(target)

    def history_entry(self, epoch, lr, device):
        seen = distributed.all_sum(self.seen, device)
        return {"epoch": epoch + 1, "lr": lr, "train_loss": self.loss.item() / max(1, seen),
                "train_top1": 100.0 * distributed.all_sum(int(self.correct), device) / max(1, seen)}


def probe_batches(ctx, p, samples, n, start, device):
    """This process's batches of epochs start..p.epochs-1 from one loader (its workers live through them all);
    batches depend only on (seed, epoch, step), so a resumed run sees the batches an uninterrupted one does.
    Returns (iterator, steps per epoch)."""
    sampler = SeededBatches(n, p.train_batch_size, ctx.seed, rank=ctx.rank, world=ctx.world, drop_last=False)
    steps_per_epoch = sampler.steps_per_epoch
    sampler.start, sampler.stop = start * steps_per_epoch, p.epochs * steps_per_epoch
    workers = resolve_workers(p.workers, int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world)))
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate_readable,
                                         **loader_options(device, workers, reused=False))
    return iter(loader), steps_per_epoch


def step_batch(p, train, batch, world):
    """(images, index, unreadable count) of a loader batch, images None for a batch to skip; a sentence for an
    unreadable image the protocol does not skip."""
    images, index, bad = batch
    if bad and not p.skip_bad_images:
        raise unreadable_error(train, bad[0], "fix or remove it, or pass --set skip_bad_images=true")
    if images is None and world > 1:
        raise UserError(f"every image of a batch part was unreadable (first: {bad[0]} of "
                        f"{train.dataset}/{train.split}); remove the unreadable images, or run without torchrun")
    return images, index, len(bad)


def train_and_score(ctx, p, train, test, mean, std, task_name):
    """Train the head (and the encoder when p.encoder_lr > 0) on `train`, score `test`: (top-1/5, info)."""
    device, rank, world = torch.device(ctx.device), ctx.rank, ctx.world
    strategy = strategy_for(ctx, p)
    samples = SeededSamples(train.torch_dataset(train_transform(p, mean, std)), ctx.seed)
    model = strategy.encoder(ctx, device)
    with torch.no_grad():
        dim = model(torch.zeros(2, 3, p.crop, p.crop, device=device)).flatten(1).shape[1]
    torch.manual_seed(ctx.seed)
    probe = Probe(model, make_head(dim, p).to(device))
    opt = strategy.optimizer(p, strategy.param_groups(p, probe.head, model))
    scaler = strategy.scaler(device)
    state = StateFile(ctx.state_path(task_name), ctx.resume, repr(p), device=device,
                      log=ctx.log if rank == 0 else (lambda *a: None))
    start, history = restore_probe(ctx, state, strategy, probe, opt)
    info = {}
    net, batch_norm = strategy.distribute(probe, device, world)
    if batch_norm is not None:
        info["batch_norm"] = batch_norm
    if strategy.describe() is not None:
        info["encoder_training"] = strategy.describe()
    cuda = device.type == "cuda"
    if cuda:  # fixed input sizes: let cuDNN pick its fastest kernels; NHWC convolutions on tensor cores
        torch.backends.cudnn.benchmark = True
        probe.encoder.to(memory_format=torch.channels_last)
    probe.encoder.train(strategy.encoder_trains)
    probe.head.train()
    labels = torch.as_tensor(train.labels)
    batches, steps_per_epoch = probe_batches(ctx, p, samples, len(train), start, device)
    skipped = 0
    for epoch in range(start, p.epochs):
        totals = EpochTotals(device)
        bar = progress(range(steps_per_epoch), f"{task_name} epoch {epoch + 1}/{p.epochs}", unit="batch",
                       show=rank == 0)
        for step in bar:
            images, index, bad = step_batch(p, train, next(batches), world)
            skipped += bad
            if images is None:
                continue
            strategy.apply_lr(opt, p, strategy.learning_rate(p, epoch, step, steps_per_epoch))
            images = images.to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            target = labels[index].to(device, non_blocking=True)
            logits = strategy.logits(net, probe, images)
            # The mean over the global batch: DDP averages the processes' gradients, hence the factor world.
            n_global = global_count(len(index), device, world)
            loss = F.cross_entropy(logits.float(), target, reduction="sum") * (world / n_global)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            totals.add(loss, n_global, world, logits, target)
            if rank == 0 and (step + 1) % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item() / world:.3f}")
        if totals.seen:
            history.append(totals.history_entry(epoch, strategy.learning_rate(p, epoch, 0, steps_per_epoch), device))
        if rank == 0:
            state.save({"head": probe.head.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "encoder": strategy.encoder_state(probe.encoder), "history": history})
    if cuda:
        probe.encoder.to(memory_format=torch.contiguous_format)  # the shared encoder as the other tasks expect it
    skipped = distributed.all_sum(skipped, device)
    if rank != 0:
        return None, {}
    acc, extra = score_test(ctx, p, strategy, probe, test, mean, std, device)
    info.update(train_size=len(train), feature_dim=dim, processes=world,
                train_skipped_images=skipped // max(1, p.epochs - start), classifier_state=str(state.path),
                history=history, **extra)
    return acc, info


def restore_probe(ctx, state, strategy, probe, opt):
    """(first epoch, history) of a resumed run, with the head, the encoder if it trains and the optimiser loaded."""
    saved = state.load()
    if saved is None:
        return 0, []
    probe.head.load_state_dict(saved["head"])
    strategy.load_encoder(probe.encoder, saved)
    opt.load_state_dict(saved["optimizer"])
    ctx.log(f"  resumed {state.loaded_from.name} after epoch {saved['epoch']}")
    return saved["epoch"], saved["history"]


def score_test(ctx, p, strategy, probe, test, mean, std, device):
    """Top-1/5 of the trained probe on centre crops of `test` (cached features when the encoder is frozen)."""
    transform = EvalTransform(p.resize, p.crop, mean, std, p.interpolation)
    probe.eval()
    xte, yte, extra = extract_features(probe.encoder, ctx.checkpoint.cache_id, ctx.arch, test, transform,
                                       device=ctx.device, batch_size=p.batch_size, num_workers=p.workers,
                                       skip_bad_images=p.skip_bad_images, use_cache=not strategy.encoder_trains,
                                       log=ctx.log)
    with torch.no_grad():
        acc = topk_accuracy(probe.head(xte.to(device)).cpu(), yte, (1, 5))
    return acc, {"test_size": len(yte), "test_transform": transform.describe(),
                 "test_skipped_images": extra["skipped_images"]}
