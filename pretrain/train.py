#!/usr/bin/env python
"""Self-supervised pretraining of a ResNet: MSBReg (paper §3, §7) and the methods it is compared with
(BYOL and its variants, SimCLR v1/v2, MoCo v2, Barlow Twins, W-MSE, DrLIM, CPC), one trainer for all.

    python pretrain/train.py --config demo
    python pretrain/train.py --config demo_simclr
    python pretrain/train.py --config in100_r18_k4 data_root=/data batch_size=256
    torchrun --nproc_per_node 8 pretrain/train.py --config imagenet_r50_k4 data_root=/data
    python pretrain/train.py --config demo --resume          # continue runs/demo/last.pth

Writes `<out_dir>/last.pth` (everything needed to resume; atomically, every `save_every_steps` and
at the end), `backbone.pth` (the online ResNet in torchvision format, no `fc`: `evaluate/run.py
--ckpt` takes it as it is), `backbone_epoch{N:04d}.pth` (the same export after N epochs, every
`save_every_epochs` epochs when set), `config.yaml`, `log.jsonl` and TensorBoard events under `tb/`.
Exit codes: 0 done (or stopped by `stop_after_steps`); 2 a mistake in the command or config; 1 a
bug, or a loss that became NaN/Inf (the last good checkpoint is kept).
"""
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from core.cli import ArgumentParser, UserError, run_cli  # noqa: E402
from core.distributed import resolve_device, setup_distributed, shutdown  # noqa: E402
from core.files import atomic_torch_save, atomic_write_text  # noqa: E402
from core.loading import loader_options, resolve_workers  # noqa: E402
from core.progress import progress  # noqa: E402
from core.resume import StateFile  # noqa: E402
from core.sampling import SeededBatches, SeededSamples  # noqa: E402
from datasets.decode import SquareImages, collate_readable  # noqa: E402
from datasets.views import augment_view  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.data import pretrain_images  # noqa: E402
from pretrain.methods import build_method  # noqa: E402
from pretrain.model import ema_update  # noqa: E402
from pretrain.optim import build_optimizer, max_learning_rate, schedule  # noqa: E402

CHECKPOINT_FORMAT = "ssl-suite-pretrain"
# Keys that may change when a run is resumed; every other key must match the stopped run's config.
# sync_bn among them: its value in force follows the process count, which a resumed run may change.
RUNTIME_KEYS = {"workers", "sync_bn", "save_every_steps", "save_every_epochs", "log_every_steps", "stop_after_steps", "device", "out_dir"}


class Diverged(Exception):
    pass


@torch.no_grad()
def collapse_monitors(z):
    """Std of L2-normalised embeddings (≈ 1/sqrt(d) when spread, 0 when collapsed) and effective rank."""
    zn = torch.nn.functional.normalize(z.float(), dim=-1)
    std = zn.std(0).mean().item()
    sv = torch.linalg.svdvals(zn - zn.mean(0))
    p = sv / sv.sum().clamp_min(1e-12)
    erank = math.exp(-(p * (p + 1e-12).log()).sum().item())
    return std, erank


def cut_views(cfg, batch, augs, g):
    """The views of a decoded uint8 batch, one tensor per ViewAugment (multi-crop views differ in size)."""
    views = [augment_view(batch, a, g) for a in augs]
    if views[0].is_cuda and cfg.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def compute_losses(method, model, views, g, shared):
    """One micro-batch: the online network once (through DDP when wrapped), then the method's loss.
    Returns (total, {term: tensor}, embeddings for the collapse monitors); nothing is read to the host."""
    total, terms, monitor = method.loss(model(views), views, g, shared)
    return total, {**terms, "loss": total}, monitor


class StepTerms:
    """The loss terms of the steps since the last read, summed on the device (no host sync per step), and
    the first step whose loss was not finite, with its terms. `read()` syncs once: at log and save steps."""

    def __init__(self, device):
        self.device, self.names = device, None
        self.first_bad = torch.full((), math.inf, device=device, dtype=torch.float64)
        self.reset()

    def reset(self):
        self.sum, self.steps = None, 0

    def add(self, step: int, terms: dict, weight: float):
        values = torch.stack([v.detach().float() for v in terms.values()])
        if self.names is None:
            self.names, self.bad_values = list(terms), torch.zeros_like(values)
        newly_bad = ~torch.isfinite(values[-1]) & torch.isinf(self.first_bad)  # "loss" is the last term
        self.bad_values = torch.where(newly_bad, values, self.bad_values)
        self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.sum = values * weight if self.sum is None else self.sum + values * weight

    def end_step(self):
        self.steps += 1

    def check_finite(self, world: int, where: str):
        """Raise Diverged (on every process alike) if a step's loss since the start was NaN/Inf."""
        first = self.first_bad.clone()
        if world > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        first = first.item()
        if math.isfinite(first):
            values = dict(zip(self.names, self.bad_values.tolist()))
            raise Diverged(f"the loss became {values['loss']} at step {int(first)} "
                           f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); "
                           f"the last good checkpoint is {where}")

    def read(self) -> dict:
        """The mean of each term over the steps since the last read."""
        means = (self.sum / max(1, self.steps)).tolist()
        self.reset()
        return dict(zip(self.names, means))


def checkpoint_state(cfg, step, method, opt, scaler, last_metrics):
    """last.pth: the online network, the target / key encoder (with MoCo's queue; empty for methods without
    one), the optimiser, the step, the RNG state and the config (which names the method)."""
    target = method.target.state_dict() if method.target is not None else {}
    return {"format": CHECKPOINT_FORMAT, "version": 2, "method": cfg.method, "config": dataclasses.asdict(cfg),
            "step": step, "online": method.online.state_dict(), "target": target, "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state()}, "metrics": last_metrics}


def export_backbone(online, path):
    sd = {k: v.detach().cpu() for k, v in online.backbone.state_dict().items() if not k.startswith("fc.")}
    atomic_torch_save(sd, path)


def resumable_settings(cfg) -> dict:
    """The config values a resumed run must share with the stopped one (all but the runtime keys)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in RUNTIME_KEYS}


def describe_config_change(saved, current) -> str:
    changed = sorted(k for k in set(saved or {}) | set(current) if (saved or {}).get(k) != current.get(k))
    return (f"holds a run whose config differs from this one in {', '.join(changed)}; resume with the stopped "
            "run's config, or start a new run in another out_dir")


def batch_norm_sync(cfg, world: int, device) -> tuple:
    """(synchronise BatchNorm over the processes?, the sentence saying so) for the config's sync_bn
    (auto / true / false; see pretrain/config.py) on `world` processes using `device`."""
    from pretrain.methods import method_class

    if world == 1:
        return False, "per process (one process)"
    if cfg.sync_bn == "false":
        return False, f"per process (sync_bn=false, {world} processes)"
    if torch.device(device).type != "cuda":
        if cfg.sync_bn == "true":
            raise UserError("sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only); "
                            "use sync_bn=auto or false on the CPU")
        return False, f"per process (SyncBatchNorm needs CUDA; {world} CPU processes)"
    if cfg.sync_bn == "auto" and not method_class(cfg.method).sync_bn_by_default:
        return False, f"per process ({cfg.method} keeps its own BatchNorm statistics)"
    return True, f"synchronised over {world} processes"


def setup_device(cfg):
    return setup_distributed(resolve_device(cfg.device, option="device="))


@dataclasses.dataclass
class Schedule:
    """The run's length and learning rate: steps per epoch, the total, where this invocation stops."""
    steps_per_epoch: int
    total: int
    stop_at: int
    max_lr: float
    lr_at: object  # step -> LR


@dataclasses.dataclass
class Training:
    """What the steps of a run share: the method and its optimiser, the DDP view of the online network."""
    method: object
    model: object  # method.online, or its DistributedDataParallel wrapper
    opt: object
    scaler: object  # GradScaler for fp16, else None
    amp_dtype: object  # the autocast dtype, or None
    augs: list
    pairs: object  # the EMA's (target, online) tensor lists, or None
    batch_norm: str  # how BatchNorm statistics are taken (the start line says it)


def plan_schedule(cfg, images, world) -> Schedule:
    """Sizes and the LR schedule, with a sentence for each that cannot work."""
    if cfg.batch_size % (world * cfg.accumulate):
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by {world} devices x {cfg.accumulate} "
                        "accumulation steps")
    steps_per_epoch = len(images) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch_size {cfg.batch_size} exceeds the {len(images)} training images")
    total = cfg.epochs * steps_per_epoch
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    max_lr = max_learning_rate(cfg.base_lr, cfg.batch_size, cfg.views, cfg.lr_scaling)
    lr_at, warmup = schedule(cfg, steps_per_epoch, total, max_lr)
    if warmup >= total:
        raise UserError(f"the warm-up ({warmup} steps) leaves nothing of the {total} steps")
    stop_at = min(total, cfg.stop_after_steps) if cfg.stop_after_steps else total
    return Schedule(steps_per_epoch, total, stop_at, max_lr, lr_at)


def build_training(cfg, device, world, max_lr) -> Training:
    """The method's networks on the device (SyncBatchNorm, channels_last as configured), the optimiser and
    the mixed-precision settings. `cfg.sync_bn` is set to the value in force."""
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, world)
    sync_bn, batch_norm = batch_norm_sync(cfg, world, device)
    cfg.sync_bn = "true" if sync_bn else "false"  # the value in force, as config.yaml and last.pth record it
    if sync_bn:
        method.online = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.online)
        if method.target is not None:
            method.target = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.target)
    method.to(device)
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, method.online.named_parameters(), max_lr)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return Training(method, method.online, opt, scaler, amp_dtype, method.augments(), None, batch_norm)


def restore(training, state_file, log) -> tuple:
    """(first step, last logged metrics) of a resumed run, its networks and optimiser loaded; (0, {}) else."""
    state = state_file.load()
    if state_file.resume and state is None and not state_file.found:
        raise UserError(f"--resume: no checkpoint at {state_file.path}")
    if state is None:
        return 0, {}
    method = training.method
    method.online.load_state_dict(state["online"])
    if method.target is not None:
        method.target.load_state_dict(state["target"])
    training.opt.load_state_dict(state["optimizer"])
    if training.scaler is not None and state["scaler"]:
        training.scaler.load_state_dict(state["scaler"])
    log(f"resumed {state_file.loaded_from} at step {state['step']}")
    return state["step"], state["metrics"]


def wrap_for_processes(training, device, world):
    """DDP around the online network on several processes; the EMA pairs of the networks as trained."""
    cuda = device.type == "cuda"
    if world > 1:
        training.model = torch.nn.parallel.DistributedDataParallel(training.method.online,
                                                                   device_ids=[device] if cuda else None)
    training.pairs = training.method.ema_pairs()


def open_outputs(cfg, name, out, images, plan, training, device, world, log):
    """The run folder, its config.yaml, the TensorBoard writer and the start line (rank 0)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    from torch.utils.tensorboard import SummaryWriter

    log(f"{name}: {cfg.method}, {len(images)} images, {plan.steps_per_epoch} steps/epoch, {plan.total} steps, "
        f"{len(training.augs)} views, max LR {plan.max_lr:g}, device {device}, {world} process(es), "
        f"BatchNorm {training.batch_norm} -> {out}")
    return SummaryWriter(out / "tb")


def micro_batches(cfg, images, plan, start, device, rank, world):
    """The decoded uint8 micro-batches of steps start..total-1 of this process, from one loader for the whole
    run (its workers and pinned memory kept throughout)."""
    workers = resolve_workers(cfg.workers, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    sampler = SeededBatches(len(images), cfg.batch_size, cfg.seed, start, plan.total, rank, world, cfg.accumulate)
    loader = torch.utils.data.DataLoader(SeededSamples(images, cfg.seed), batch_sampler=sampler,
                                         collate_fn=collate_readable, **loader_options(device, workers, reused=False))
    return iter(loader)


def train_step(cfg, training, step, total, lr, batches, images, step_terms, device, rank, world):
    """One optimiser step over cfg.accumulate micro-batches (gradients summed, DDP's all-reduce on the last
    one only), then the EMA update. Returns (τ or None, the last micro-batch's embeddings for the monitors)."""
    opt, model, method = training.opt, training.model, training.method
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    # Randomness of a step: this process's (augmentation, noise) and one shared by all processes (W-MSE's
    # sub-batches), both from (seed, step) only, so that a resumed run repeats an uninterrupted one.
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    shared = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_033 + step + 7)
    for micro in range(cfg.accumulate):
        batch, _, unreadable = next(batches)
        if unreadable:
            raise UserError(f"cannot read image {images.describe(unreadable[0])}; fix or remove it")
        views = cut_views(cfg, batch.to(device, non_blocking=True), training.augs, g)
        sync = nullcontext() if (world == 1 or micro == cfg.accumulate - 1) else model.no_sync()
        amp = training.amp_dtype
        with sync, torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            total_loss, terms, monitor = compute_losses(method, model, views, g, shared)
            loss = total_loss / cfg.accumulate
            (training.scaler.scale(loss) if training.scaler is not None else loss).backward()
        step_terms.add(step, terms, 1.0 / cfg.accumulate)
    step_terms.end_step()
    if training.scaler is not None:
        training.scaler.step(opt)
        training.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    tau = None
    if training.pairs is not None:
        tau = method.tau(step, total)
        ema_update(training.pairs, tau)
    return tau, monitor


def log_step(out, writer, done, plan, lr, tau, terms_mean, monitor):
    """The metrics of a logged step: log.jsonl, TensorBoard; returned for the checkpoint."""
    std, erank = collapse_monitors(monitor)
    metrics = {"step": done, "epoch": done / plan.steps_per_epoch, "lr": lr,
               **({"tau": tau} if tau is not None else {}),
               **terms_mean, "embedding_std": std, "effective_rank": erank, "time": time.time()}
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    for k, v in metrics.items():
        if k not in ("step", "time"):
            writer.add_scalar(k, v, done)
    return metrics


def train(cfg, name, resume=False, log=print):
    device, rank, world = setup_device(cfg)
    out = Path(cfg.out_dir.format(name=name))
    images = SquareImages(pretrain_images(cfg), cfg.decode_size)
    plan = plan_schedule(cfg, images, world)
    training = build_training(cfg, device, world, plan.max_lr)
    quiet = log if rank == 0 else (lambda *a: None)
    state_file = StateFile(out / "last.pth", resume, resumable_settings(cfg), describe_config_change, device, log=quiet)
    start, last_metrics = restore(training, state_file, quiet)
    wrap_for_processes(training, device, world)
    writer = open_outputs(cfg, name, out, images, plan, training, device, world, log) if rank == 0 else None
    batches = micro_batches(cfg, images, plan, start, device, rank, world)
    bar = progress(range(start, plan.stop_at), name, total=plan.total, initial=start, unit="step", show=rank == 0)
    step_terms = StepTerms(device)
    for step in bar:
        lr = plan.lr_at(step)
        tau, monitor = train_step(cfg, training, step, plan.total, lr, batches, images, step_terms, device, rank,
                                  world)
        done = step + 1
        log_now = done % cfg.log_every_steps == 0 or done == plan.stop_at
        export_now = cfg.save_every_epochs and done % (cfg.save_every_epochs * plan.steps_per_epoch) == 0
        save_now = done % cfg.save_every_steps == 0 or done == plan.stop_at
        if log_now or export_now or save_now:  # the one host sync of these steps; a NaN is never saved
            step_terms.check_finite(world, out / "last.pth")
        if log_now:
            terms_mean = step_terms.read() if rank == 0 else step_terms.reset()
        if rank != 0:
            continue
        if log_now:
            last_metrics = log_step(out, writer, done, plan, lr, tau, terms_mean, monitor)
            bar.set_postfix(loss=f"{terms_mean['loss']:.4f}", std=f"{last_metrics['embedding_std']:.3f}")
        if export_now:
            export_backbone(training.method.online, out / f"backbone_epoch{done // plan.steps_per_epoch:04d}.pth")
        if save_now:
            state_file.save(checkpoint_state(cfg, done, training.method, training.opt, training.scaler, last_metrics))
    bar.close()
    if rank == 0:
        finish(out, writer, plan, training, log)
    shutdown()
    return out


def finish(out, writer, plan, training, log):
    """The final backbone export (when the schedule is done) and the closing line."""
    writer.close()
    if plan.stop_at == plan.total:
        export_backbone(training.method.online, out / "backbone.pth")
        log(f"done: {out / 'backbone.pth'} (evaluate it with evaluate/run.py --ckpt {out / 'backbone.pth'})")
    else:
        log(f"stopped at step {plan.stop_at} of {plan.total}; continue with --resume")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a name in pretrain/configs/ or a YAML path")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pth (from the previous "
                        "state last.pth.prev when last.pth is unreadable, from the start when neither reads)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg, name = load_config(args.config, args.overrides)
    train(cfg, name, resume=args.resume)
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv, failures=(Diverged,))


if __name__ == "__main__":
    sys.exit(cli())
