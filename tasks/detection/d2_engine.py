"""The Detectron2 engine: our config files (configs/*.yaml), the protocol's values over them, the
checkpoint converted to Detectron2's names and loaded with its matching, DefaultTrainer (PreciseBN,
periodic checkpoints, resume). Only imported when Detectron2 is installed (README: Detection).

Processes: under torchrun (one node or several) every process is one of Detectron2's workers, in the
process group the suite has joined (NCCL on GPUs, Gloo on CPUs), as Detectron2's own `launch` would have
made it; with plain python on a machine with several GPUs, Detectron2's `launch` starts one worker per GPU.
Either way the norm layers are synchronised over the global batch (SyncBN on GPUs; Detectron2's
NaiveSyncBatchNorm on CPUs, where PyTorch's SyncBatchNorm does not run) and rank 0 predicts and scores.

Resumable to the bit: Detectron2's own resume restores the weights, optimizer, scheduler and iteration but
restarts its data stream and random generators, so a resumed run trains on other batches than the
uninterrupted one. Here the training loader is Detectron2's TrainingSampler + aspect-ratio grouping
rebuilt on `core.sampling`'s seeded orders (`ResumableBatches`: batch k is a function of the seed alone, so
a resumed run skips to its iteration), each image's augmentation (resize choice, flip: numpy's generator)
is drawn under a seed of (seed, pass, image), and PyTorch's generator (the RPN and RoI sampling) is seeded
at every iteration from (seed, iteration, rank).
"""
import contextlib
import itertools
import os
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, HookBase, hooks, launch
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from backbones.convert import write_backbone
from core.loading import resolve_workers
from core.progress import progress
from core.sampling import epoch_order
from tasks.detection.metrics import encode_masks

CONFIGS = Path(__file__).resolve().parent / "configs"
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}

if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """MoCo's C4 box head: res5 followed by one more norm layer of the backbone's kind."""

        def _build_res5_block(self, cfg):
            block, channels = super()._build_res5_block(cfg)
            block.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
            return block, channels


def detectron2_weights(encoder, path):
    """The encoder's weights under Detectron2's names, in the .pkl form its checkpointer matches by suffix."""
    write_backbone(encoder.state_dict(), path, "detectron2")
    return path


def make_config(recipe, p, arch, device, seed, output_dir, weights, train_name, test_name, num_classes, world,
                launched=False):
    """Our config file with the protocol's values, for `world` processes (`launched`: started by Detectron2's
    launch on this machine's GPUs rather than by torchrun)."""
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / recipe.d2_config))
    m, s = cfg.MODEL, cfg.SOLVER
    # workers started by Detectron2's launch each take the GPU of their local rank ("cuda"); one process, or a
    # torchrun process, takes its own device (core.distributed.resolve_device)
    device = torch.device(device)
    m.DEVICE = "cuda" if launched else str(device)
    m.WEIGHTS = str(weights)
    m.RESNETS.DEPTH = DEPTHS[arch]
    if DEPTHS[arch] < 50:
        m.RESNETS.RES2_OUT_CHANNELS = 64  # Detectron2's BasicBlock ResNets
    # BN over the global batch with several processes: PyTorch's SyncBatchNorm on GPUs, Detectron2's
    # NaiveSyncBatchNorm on CPUs (SyncBatchNorm runs on CUDA only); plain BN in one process
    norm = "BN" if world == 1 else "SyncBN" if device.type == "cuda" else "naiveSyncBN"
    m.RESNETS.NORM = norm
    for node in recipe.d2_head_norms:
        m[node].NORM = norm
    m.PIXEL_MEAN, m.PIXEL_STD = list(p.pixel_mean), list(p.pixel_std)
    m.ROI_HEADS.NUM_CLASSES = num_classes
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = p.roi_batch_size_per_image
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = p.pooler_resolution
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = p.rpn_pre_nms_topk_train, p.rpn_post_nms_topk_train
    m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = p.rpn_pre_nms_topk_test, p.rpn_post_nms_topk_test
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST = tuple(p.train_sizes), p.test_size
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = p.max_size
    cfg.INPUT.RANDOM_FLIP = "horizontal" if p.flip else "none"
    s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER = p.ims_per_batch, p.base_lr, p.max_iter
    s.STEPS, s.WARMUP_ITERS, s.WARMUP_FACTOR = tuple(p.steps), p.warmup_iters, p.warmup_factor
    s.MOMENTUM, s.WEIGHT_DECAY, s.CHECKPOINT_PERIOD = p.momentum, p.weight_decay, p.checkpoint_period
    cfg.TEST.PRECISE_BN.ENABLED = p.precise_bn_iters > 0
    cfg.TEST.PRECISE_BN.NUM_ITER = max(p.precise_bn_iters, 1)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), (test_name,)
    cfg.DATALOADER.NUM_WORKERS = resolve_workers(p.workers, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    cfg.SEED, cfg.OUTPUT_DIR = seed, str(output_dir)
    cfg.freeze()
    return cfg


class ResumableBatches(torch.utils.data.Sampler):
    """Detectron2's TrainingSampler followed by its AspectRatioGroupedDataset, as lists of (pass, image) keys:
    the endless stream of images in `core.sampling.epoch_order`s, this process taking every world-th (as
    TrainingSampler does), each image put in the bucket of its orientation (width > height or not) and a
    full bucket of `batch` images made a batch. `start` (set after a resume) skips the first batches
    without loading an image."""

    def __init__(self, records, batch, seed, rank=0, world=1):
        self.landscape = [r["width"] > r["height"] for r in records]
        self.batch, self.seed, self.rank, self.world, self.start = batch, seed, rank, world, 0

    def _stream(self):
        for epoch in itertools.count():
            for i in epoch_order(len(self.landscape), self.seed, epoch).tolist():
                yield epoch, i

    def __iter__(self):
        buckets, made = ([], []), 0
        for key in itertools.islice(self._stream(), self.rank, None, self.world):
            bucket = buckets[self.landscape[key[1]]]
            bucket.append(key)
            if len(bucket) == self.batch:
                if made >= self.start:
                    yield list(bucket)
                made += 1
                bucket.clear()


class SeededMapping(torch.utils.data.Dataset):
    """Detectron2's DatasetMapper on the image of a (pass, image) key, its random augmentation drawn from
    numpy's generator seeded by (seed, pass, image) (the caller's generator state is put back)."""

    def __init__(self, records, mapper, seed):
        self.records, self.mapper, self.seed = records, mapper, seed

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        epoch, i = key
        state = np.random.get_state()
        np.random.seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + i) % 2 ** 32)
        try:
            return self.mapper(self.records[i])
        finally:
            np.random.set_state(state)


def _batch_as_list(batch):
    return batch


class SeedEachIteration(HookBase):
    """PyTorch's generator (Detectron2's RPN / RoI sampling) seeded before every step from (seed, iteration,
    rank), so that a resumed run draws what the uninterrupted one drew."""

    def __init__(self, seed):
        self.seed = seed

    def before_step(self):
        torch.manual_seed((self.seed * 1_000_003 + self.trainer.iter) * 1_009 + comm.get_rank())


class Trainer(DefaultTrainer):
    """DefaultTrainer with a resumable training loader and seeded steps, without its evaluation hook (the
    task scores the predictions itself)."""

    @classmethod
    def build_train_loader(cls, cfg):
        records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
        world = comm.get_world_size()
        batches = ResumableBatches(records, cfg.SOLVER.IMS_PER_BATCH // world, cfg.SEED, comm.get_rank(), world)
        return torch.utils.data.DataLoader(SeededMapping(records, DatasetMapper(cfg, True), cfg.SEED),
                                           batch_sampler=batches, collate_fn=_batch_as_list,
                                           num_workers=cfg.DATALOADER.NUM_WORKERS,
                                           # its own generator: starting the loader draws nothing from the
                                           # global one, whatever the iteration it starts at
                                           generator=torch.Generator().manual_seed(cfg.SEED))

    def build_hooks(self):
        return [SeedEachIteration(self.cfg.SEED)] + [h for h in super().build_hooks()
                                                      if not isinstance(h, hooks.EvalHook)]

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume)
        self._trainer.data_loader.batch_sampler.start = self.start_iter


def dist_url(environ=os.environ) -> str:
    """Where Detectron2's launched processes meet: torchrun's (or a job script's) MASTER_ADDR:MASTER_PORT when
    both are set, else Detectron2's "auto" (a free port on this machine, so that two jobs on one node do not
    collide on a default port)."""
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    return f"tcp://{addr}:{port}" if addr and port else "auto"


def d2_records(records):
    """Our records (data.py) in Detectron2's dataset-dict form: boxes declared as absolute x0 y0 x1 y1."""
    from detectron2.structures import BoxMode

    return [{**r, "annotations": [{**a, "bbox_mode": BoxMode.XYXY_ABS} for a in r["annotations"]]} for r in records]


def _register(name, records, classes):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    converted = d2_records(records)
    DatasetCatalog.register(name, lambda: converted)
    MetadataCatalog.get(name).set(thing_classes=list(classes))


def _train_worker(cfg, train, test, classes, resume):
    _register(cfg.DATASETS.TRAIN[0], train, classes)
    _register(cfg.DATASETS.TEST[0], test, classes)
    seed_all_rng(cfg.SEED + comm.get_rank())  # as Detectron2's default_setup: the heads' initialisation from the seed
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    if comm.is_main_process():
        trainer.checkpointer.save("model_final_with_precise_bn")
    return trainer.model


def join_torchrun():
    """Make this torchrun process one of Detectron2's workers: the process group is the suite's (joined by
    core.distributed), and Detectron2's per-machine group (its `get_local_rank`, which DefaultTrainer's DDP
    uses) is made once, as its `launch` makes it (comm.create_local_process_group, a collective)."""
    if comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", comm.get_world_size())))


@contextlib.contextmanager
def cpu_ddp(device):
    """On CPUs, DefaultTrainer's DistributedDataParallel without `device_ids`: Detectron2's create_ddp_model
    passes [local rank], which DDP refuses for a module on the CPU. Nothing changes on GPUs."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if torch.device(device).type == "cpu":
        defaults.create_ddp_model = lambda model, **kwargs: original(model, **{"device_ids": None, **kwargs})
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def train_and_predict(ctx, p, recipe, train, test, classes, seed, output_dir):
    """Train from ctx.model and predict on `test` (rank 0; the other torchrun processes return None)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = output_dir / "init_weights.pkl"
    names = (f"ssl_suite_{recipe.task}_train", f"ssl_suite_{recipe.task}_test")
    if ctx.world > 1:  # torchrun: this process is one worker
        if ctx.rank == 0:
            detectron2_weights(ctx.model, weights)
        join_torchrun()
        comm.synchronize()  # the weights are written before any worker reads them
        cfg = make_config(recipe, p, ctx.arch, ctx.device, seed, output_dir, weights, *names, len(classes),
                          ctx.world)
        with cpu_ddp(ctx.device):
            model = _train_worker(cfg, train, test, classes, ctx.resume)
        comm.synchronize()
        if ctx.rank != 0:
            return None
        model = getattr(model, "module", model)
        return predict(model, build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]))
    every_gpu = ctx.device.type == "cuda" and ctx.device_asked in (None, "auto", "cuda")  # not cuda:N
    world = torch.cuda.device_count() if every_gpu else 1
    detectron2_weights(ctx.model, weights)
    cfg = make_config(recipe, p, ctx.arch, ctx.device, seed, output_dir, weights, *names, len(classes), world,
                      launched=world > 1)
    if world > 1:
        launch(_train_worker, world, dist_url=dist_url(), args=(cfg, train, test, classes, ctx.resume))
        _register(names[1], test, classes)
        model = build_model(cfg)
        DetectionCheckpointer(model).load(str(output_dir / "model_final_with_precise_bn.pth"))
    else:
        model = _train_worker(cfg, train, test, classes, ctx.resume)
    return predict(model, build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]))


@torch.no_grad()
def predict(model, loader):
    """Our prediction form (see metrics.py) from the model's Instances, in original image coordinates."""
    model.eval()
    out = {}
    for inputs in progress(loader, "inference"):
        for x, o in zip(inputs, model(inputs)):
            inst = o["instances"].to("cpu")
            pred = {"boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
                    "labels": inst.pred_classes.numpy()}
            if inst.has("pred_masks"):
                pred["masks"] = encode_masks(inst.pred_masks.numpy())
            out[x["image_id"]] = pred
    return out
