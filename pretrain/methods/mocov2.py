"""MoCo v2 (He et al. 2020; Chen et al. 2020c; facebookresearch/moco builder.py, main_moco.py): a query
encoder, a momentum key encoder and a queue of negative keys.

MoCo shuffles the key batch across GPUs so that the key encoder's BatchNorm statistics come from other
images than the query's (shuffle BN, DDP only). Here the batch is split into `bn_splits` parts (MoCo's 8
GPUs), each encoded alone so that it has its own BN statistics, for the queries as they come and for the
keys after a random permutation of the batch (undone afterwards): the single-process counterpart of
shuffle BN (as lightly's SplitBatchNorm and MoCo's CIFAR-10 notebook). Under torchrun each process splits its
own part of the batch into bn_splits / processes parts; the key batch is not exchanged between processes.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.cli import UserError
from core.distributed import gather_with_grad
from pretrain import losses
from pretrain.methods.base import Method, in_fp32
from pretrain.model import backbone_and_width


class SplitEncoder(nn.Module):
    """backbone + MoCo v2's MLP head, run on `splits` parts of the batch (one BN statistic per part)."""

    def __init__(self, backbone, projector, splits):
        super().__init__()
        self.backbone, self.projector, self.splits = backbone, projector, splits

    def encode(self, x):
        return torch.cat([self.projector(self.backbone(part)) for part in x.tensor_split(self.splits)])

    def forward(self, views):
        return self.encode(views[0])


class MoCoV2(Method):
    name = "mocov2"
    source = "facebookresearch/moco (builder.py, main_moco.py; README: --mlp --moco-t 0.2 --aug-plus --cos)"
    keys = ("views", "temperature", "queue_size", "bn_splits", "tau_base", "proj_hidden", "proj_out")
    ema = "constant"
    sync_bn_by_default = False  # its shuffle BN: statistics per part of the batch, never across processes

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.sync_bn == "true":
            raise UserError("mocov2 keeps BatchNorm statistics per split (its shuffle BN); sync_bn would merge them")
        micro = cfg.batch_size // cfg.accumulate
        if cfg.queue_size < micro or cfg.queue_size % micro:
            raise UserError(f"queue_size {cfg.queue_size} must be a multiple of the batch of one step "
                            f"({micro} images), as MoCo's queue takes whole batches")

    def __init__(self, cfg, world=1):
        super().__init__(cfg, world)
        if cfg.bn_splits % world:
            raise UserError(f"bn_splits {cfg.bn_splits} is not divisible by the {world} processes")
        backbone, width = backbone_and_width(cfg)
        head = nn.Sequential(nn.Linear(width, cfg.proj_hidden), nn.ReLU(inplace=True),
                             nn.Linear(cfg.proj_hidden, cfg.proj_out))
        self.online = SplitEncoder(backbone, head, cfg.bn_splits // world)
        if cfg.batch_size // (world * cfg.accumulate) < 2 * self.online.splits:
            raise UserError(f"{cfg.batch_size // (world * cfg.accumulate)} images per process and step cannot be split "
                            f"into {self.online.splits} BatchNorm parts of 2 or more (bn_splits)")
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.target.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_out), dim=1))
        self.target.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # The pointer as a Python int, so that a step does not wait for the device to read it; the buffer keeps
        # it in checkpoints, and is read once after a checkpoint is loaded into the key encoder.
        self._queue_ptr = 0
        self.target.register_load_state_dict_post_hook(self._pointer_from_buffer)

    def _pointer_from_buffer(self, module, incompatible_keys):
        self._queue_ptr = int(self.target.queue_ptr)

    @torch.no_grad()
    def keys_of(self, x, g):
        perm = torch.randperm(x.shape[0], generator=g, device=g.device).to(x.device)
        k = self.target.encode(x[perm])
        return F.normalize(torch.empty_like(k).index_copy_(0, perm, k), dim=1)

    @torch.no_grad()
    def enqueue(self, k):
        k = gather_with_grad(k)
        ptr = self._queue_ptr
        self.target.queue[ptr:ptr + k.shape[0]] = k
        self._queue_ptr = (ptr + k.shape[0]) % self.target.queue.shape[0]
        self.target.queue_ptr.fill_(self._queue_ptr)

    def loss(self, q, views, g, shared):
        k = self.keys_of(views[1], g)
        terms = {"loss_moco": in_fp32(losses.moco_infonce_loss, q, k, self.target.queue.clone(),
                                               self.cfg.temperature)}
        self.enqueue(k)  # after the logits: this batch's keys are negatives from the next step on
        return terms["loss_moco"], terms, q
