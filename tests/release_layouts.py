"""Checkpoints saved the way each project's own code saves them, with small random weights.

Each builder makes the project's module structure (its classes' attribute names and nesting, built here with
torchvision, or with the project's own package where it is installed: timm, lightly, PyTorch Lightning,
OmegaConf, mmengine), wraps it as the project does (nn.DataParallel names parameters exactly as DDP does:
`module.`), and saves it with the project's save call. The projects' code was read at the commits named in
the README's table of layouts; nothing of it is copied here.

A builder returns `Saved`: the file, the module that computes the evaluated network's pooled features the
project's way (the reference the loaded encoder must match), its torchvision-named backbone tensors, and
what the record must say.
"""
import argparse
import copy
import json
import pickle
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from backbones.schemes import torchvision_to_detectron2_key

NONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
SHARED = 1  # the seed of the evaluated network in the layouts whose kNN metric is compared with one torchvision file


@dataclass
class Saved:
    path: object
    reference: nn.Module  # input images -> the evaluated network's pooled features, as the project computes them
    tensors: dict  # the evaluated backbone under torchvision names
    expect: dict = field(default_factory=dict)  # Checkpoint attributes the loader must report


def torchvision_resnet(arch, seed, fc=True):
    """A torchvision ResNet with random weights and non-trivial BatchNorm statistics (a swap would show)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    if not fc:
        model.fc = nn.Identity()
    return model.eval()


def backbone_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def perturbed(module, seed=99):
    """A copy with other weights: the momentum / student network a wrong choice would take."""
    other = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return other


def mlp(dims, last_bias=True):
    """Linear, BatchNorm1d, ReLU, ..., Linear: the projectors of Barlow Twins, VICReg, BYOL-style methods."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last_bias or not last))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers)


# ---- MoCo v1/v2 (facebookresearch/moco moco/builder.py MoCo; main_moco.py save_checkpoint) -------------------

class MoCo(nn.Module):
    def __init__(self, arch, dim=128, queue=64):
        super().__init__()
        self.encoder_q = torchvision_resnet(arch, SHARED)
        self.encoder_q.fc = nn.Linear(self.encoder_q.fc.in_features, dim)
        width = self.encoder_q.fc.weight.shape[1]
        self.encoder_q.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.encoder_q.fc)  # --mlp (v2)
        self.encoder_k = perturbed(self.encoder_q)  # a moving average after training: other weights
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def moco(tmp, arch="resnet18"):
    model = nn.DataParallel(MoCo(arch))
    opt = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    path = tmp / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": arch, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
    q = copy.deepcopy(model.module.encoder_q)
    q.fc = nn.Identity()
    return Saved(path, q, backbone_tensors(q), {"format": "moco", "key": "state_dict/module.encoder_q",
                                                 "part": "encoder_q", "scheme": "torchvision"})


def moco_lincls(tmp, arch="resnet18"):
    """main_lincls.py: a torchvision ResNet with a trained 1000-way fc, DataParallel, and best_acc1 a tensor."""
    model = nn.DataParallel(torchvision_resnet(arch, 2))
    opt = torch.optim.SGD(model.module.fc.parameters(), 30.0, momentum=0.9)
    path = tmp / "model_best.pth.tar"
    torch.save({"epoch": 100, "arch": arch, "state_dict": model.state_dict(), "best_acc1": torch.tensor(67.5),
                "optimizer": opt.state_dict()}, path)
    ref = copy.deepcopy(model.module)
    ref.fc = nn.Identity()
    return Saved(path, ref, backbone_tensors(ref), {"format": "lincls", "key": "state_dict/module",
                                                     "dropped": {"state_dict.module.fc": 2}})


# ---- MoCo v3 (facebookresearch/moco-v3 moco/builder.py MoCo_ResNet) --------------------------------------

def mocov3(tmp, arch="resnet18"):
    def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
        layers = []
        for i in range(num_layers):
            a = input_dim if i == 0 else mlp_dim
            b = output_dim if i == num_layers - 1 else mlp_dim
            layers.append(nn.Linear(a, b, bias=False))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(b, affine=False))
        return nn.Sequential(*layers)

    class MoCoV3(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_encoder = torchvision_resnet(arch, 3)
            hidden = self.base_encoder.fc.weight.shape[1]
            del self.base_encoder.fc
            self.base_encoder.fc = build_mlp(2, hidden, 64, 32)
            self.momentum_encoder = perturbed(self.base_encoder)
            self.predictor = build_mlp(2, 32, 64, 32, False)

    model = nn.DataParallel(MoCoV3())
    path = tmp / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": arch, "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), 0.1).state_dict(),
                "scaler": torch.amp.GradScaler("cpu").state_dict()}, path)
    ref = copy.deepcopy(model.module.base_encoder)
    ref.fc = nn.Identity()
    return Saved(path, ref, backbone_tensors(ref), {"format": "mocov3", "key": "state_dict/module.base_encoder"})


# ---- SimSiam (facebookresearch/simsiam simsiam/builder.py SimSiam; main_simsiam.py) ----------------------

def simsiam(tmp, arch="resnet18"):
    class SimSiam(nn.Module):
        def __init__(self, dim=64, pred_dim=16):
            super().__init__()
            self.encoder = torchvision_resnet(arch, 4)
            prev = self.encoder.fc.weight.shape[1]
            self.encoder.fc = nn.Linear(prev, dim)
            self.encoder.fc = nn.Sequential(
                nn.Linear(prev, prev, bias=False), nn.BatchNorm1d(prev), nn.ReLU(inplace=True),
                nn.Linear(prev, prev, bias=False), nn.BatchNorm1d(prev), nn.ReLU(inplace=True),
                self.encoder.fc, nn.BatchNorm1d(dim, affine=False))
            self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                           nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    model = nn.DataParallel(SimSiam())
    groups = [{"params": model.module.encoder.parameters(), "fix_lr": False},
              {"params": model.module.predictor.parameters(), "fix_lr": True}]  # --fix-pred-lr
    path = tmp / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": arch, "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(groups, 0.05, momentum=0.9).state_dict()}, path)
    ref = copy.deepcopy(model.module.encoder)
    ref.fc = nn.Identity()
    return Saved(path, ref, backbone_tensors(ref), {"format": "simsiam", "key": "state_dict/module.encoder"})


# ---- SimCLR v1 converted (tonylins/simclr-converter resnet_wider.py, convert.py) ---------------------------

class ConverterBottleneck(nn.Module):
    """torchvision's Bottleneck, but registering `downsample` before conv1, as the converter's resnet_wider.py
    does, so that a block's downsample tensors come first in its state_dict."""

    expansion = 4
    forward = torchvision.models.resnet.Bottleneck.forward

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
        super().__init__()
        self.downsample = downsample
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride


def simclr_v1(tmp, arch="resnet50"):
    model = torchvision.models.resnet.ResNet(ConverterBottleneck, [3, 4, 6, 3])
    model.load_state_dict(torchvision_resnet(arch, 5).state_dict())
    model.eval()
    path = tmp / "resnet50-1x.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    ref = copy.deepcopy(model)
    ref.fc = nn.Identity()
    return Saved(path, ref, backbone_tensors(ref), {"format": "simclr-converted", "key": "state_dict",
                                                     "input_normalization": NONE})


# ---- SimCLR v2 converted (Separius/SimCLRv2-Pytorch resnet.py, convert.py), sk0 -----------------------------

class BatchNormRelu(nn.Sequential):
    def __init__(self, c, relu=True):
        super().__init__(nn.BatchNorm2d(c), nn.ReLU() if relu else nn.Identity())


def _conv(a, b, k=3, stride=1):
    return nn.Conv2d(a, b, k, stride, padding=(k - 1) // 2, bias=False)


class Projection(nn.Module):
    def __init__(self, a, b, stride):
        super().__init__()
        self.shortcut = _conv(a, b, 1, stride)
        self.bn = BatchNormRelu(b, relu=False)

    def forward(self, x):
        return self.bn(self.shortcut(x))


class BottleneckBlock(nn.Module):
    def __init__(self, a, c, stride, projection):
        super().__init__()
        self.projection = Projection(a, c * 4, stride) if projection else nn.Identity()
        self.net = nn.Sequential(_conv(a, c, 1), BatchNormRelu(c), _conv(c, c, 3, stride), BatchNormRelu(c),
                                 _conv(c, c * 4, 1), BatchNormRelu(c * 4, relu=False))

    def forward(self, x):
        return F.relu(self.projection(x) + self.net(x))


class Blocks(nn.Module):
    def __init__(self, n, a, c, stride):
        super().__init__()
        self.blocks = nn.ModuleList([BottleneckBlock(a, c, stride, True)] +
                                    [BottleneckBlock(c * 4, c, 1, False) for _ in range(n - 1)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class SimCLRv2ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), width=1):
        super().__init__()
        stem = nn.Sequential(_conv(3, 64 * width, 7, 2), BatchNormRelu(64 * width), nn.MaxPool2d(3, 2, 1))
        ops, a = [stem], 64 * width
        for i, n in enumerate(layers):
            ops.append(Blocks(n, a, 64 * width * 2 ** i, 1 if i == 0 else 2))
            a = 64 * width * 2 ** i * 4
        self.net = nn.Sequential(*ops)
        self.fc = nn.Linear(a, 1000)

    def forward(self, x):
        return self.net(x).mean(dim=(2, 3))


def simclr_v2(tmp, arch="resnet50"):
    """r50_1x_sk0.pth: the torchvision ResNet-50's weights placed in SimCLRv2-Pytorch's modules."""
    tv = torchvision_resnet(arch, 5)
    model = SimCLRv2ResNet().eval()
    sd = tv.state_dict()
    mine = model.state_dict()
    names = {"net.0.0.weight": "conv1.weight", **{f"net.0.1.0.{s}": f"bn1.{s}" for s in
                                                  ("weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked")}}
    for k in mine:
        if k.startswith("net.") and k not in names:
            _, stage, _, block, *rest = k.split(".")
            rest = ".".join(rest)
            table = {"projection.shortcut": "downsample.0", "projection.bn.0": "downsample.1", "net.0": "conv1",
                     "net.1.0": "bn1", "net.2": "conv2", "net.3.0": "bn2", "net.4": "conv3", "net.5.0": "bn3"}
            inner, leaf = rest.rsplit(".", 1)
            names[k] = f"layer{stage}.{block}.{table[inner]}.{leaf}"
    model.load_state_dict({k: sd[names[k]] if k in names else v for k, v in mine.items()})
    head = nn.Module()  # ContrastiveHead: its `layers`
    head.layers = nn.ModuleList([nn.Linear(2048, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Linear(64, 128, bias=False), nn.BatchNorm1d(128)])
    path = tmp / "r50_1x_sk0.pth"
    torch.save({"resnet": model.state_dict(), "head": head.state_dict()}, path)
    return Saved(path, model, backbone_tensors(tv), {"format": "simclr-v2-converted", "key": "resnet",
                                                      "scheme": "simclr-v2", "input_normalization": NONE})


# ---- Barlow Twins, VICReg (facebookresearch/barlowtwins main.py; vicreg main_vicreg.py) --------------------

class LARS(torch.optim.Optimizer):
    """The optimizer classes of Barlow Twins and VICReg keep their filters in param_groups (only state_dict is
    used here, never step)."""

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001, weight_decay_filter=None,
                 lars_adaptation_filter=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      weight_decay_filter=weight_decay_filter,
                                      lars_adaptation_filter=lars_adaptation_filter))


class BarlowTwins(nn.Module):
    def __init__(self, arch, seed, dims=(64, 64, 64), with_bn=True):
        super().__init__()
        self.backbone = torchvision_resnet(arch, seed, fc=False)
        feat = 512 if arch in ("resnet18", "resnet34") else 2048
        self.projector = mlp((feat,) + dims, last_bias=not with_bn)
        if with_bn:
            self.bn = nn.BatchNorm1d(dims[-1], affine=False)


def barlowtwins(tmp, arch="resnet18"):
    model = nn.DataParallel(BarlowTwins(arch, 6))
    path = tmp / "checkpoint.pth"
    opt = LARS(model.parameters(), 0, weight_decay=1e-6, weight_decay_filter=True, lars_adaptation_filter=True)
    torch.save(dict(epoch=1000, model=model.state_dict(), optimizer=opt.state_dict()), path)
    ref = model.module.backbone
    return Saved(path, ref, backbone_tensors(ref), {"format": "barlowtwins", "key": "model/module.backbone"})


def barlowtwins_resnet50(tmp, arch="resnet18"):
    """The backbone-only file: torch.save(model.module.backbone.state_dict(), 'resnet50.pth'), no fc."""
    model = nn.DataParallel(BarlowTwins(arch, 6))
    path = tmp / "resnet50.pth"
    torch.save(model.module.backbone.state_dict(), path)
    ref = model.module.backbone
    return Saved(path, ref, backbone_tensors(ref), {"format": "torchvision", "key": "(top level)", "dropped": {}})


def exclude_bias_and_norm(p):
    return p.ndim == 1


def vicreg(tmp, arch="resnet18"):
    """resnet50_fullckpt.pth: the optimizer's param_groups hold the module-level function exclude_bias_and_norm
    of main_vicreg.py, run as a script, so the pickle names __main__.exclude_bias_and_norm."""
    model = nn.DataParallel(BarlowTwins(arch, 8, with_bn=False))
    opt = LARS(model.parameters(), 0, weight_decay=1e-6, weight_decay_filter=exclude_bias_and_norm,
               lars_adaptation_filter=exclude_bias_and_norm)
    path = tmp / "resnet50_fullckpt.pth"
    main = sys.modules["__main__"]
    saved = (exclude_bias_and_norm.__module__, getattr(main, "exclude_bias_and_norm", None))
    exclude_bias_and_norm.__module__, main.exclude_bias_and_norm = "__main__", exclude_bias_and_norm
    try:
        torch.save(dict(epoch=100, model=model.state_dict(), optimizer=opt.state_dict()), path)
    finally:
        exclude_bias_and_norm.__module__ = saved[0]
        if saved[1] is None:
            del main.exclude_bias_and_norm
    ref = model.module.backbone
    return Saved(path, ref, backbone_tensors(ref), {"format": "vicreg", "key": "model/module.backbone",
                                                     "foreign": ["__main__.exclude_bias_and_norm"]})


# ---- DINO with a ResNet (facebookresearch/dino main_dino.py, utils.MultiCropWrapper) -----------------------

class MultiCropWrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone, self.head = backbone, head


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim=96, hidden=32, bottleneck=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DINO uses the older weight_norm: keys weight_g, weight_v
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))


def dino(tmp, arch="resnet18"):
    feat = 512 if arch == "resnet18" else 2048
    teacher = nn.DataParallel(MultiCropWrapper(torchvision_resnet(arch, 9), DINOHead(feat)))  # DDP for BN nets
    student = nn.DataParallel(MultiCropWrapper(torchvision_resnet(arch, 90), DINOHead(feat)))
    args = argparse.Namespace(arch=arch, out_dim=96, use_fp16=True, global_crops_scale=(0.14, 1.0), lr=0.03)
    path = tmp / "checkpoint.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": torch.optim.SGD(student.parameters(), 0.03).state_dict(), "epoch": 100, "args": args,
                "dino_loss": {"center": torch.zeros(1, 96)},
                "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}, path)
    ref = teacher.module.backbone
    return Saved(path, ref, backbone_tensors(ref), {"format": "dino", "key": "teacher/module.backbone",
                                                     "part": "teacher"})


# ---- PyTorch Lightning: solo-learn, lightly, a module saved by hand --------------------------------------

def _lightning_save(module, path, callbacks=()):
    """Lightning's own dump_checkpoint through trainer.save_checkpoint (what solo-learn's Checkpointer calls, and
    what the default ModelCheckpoint calls for lightly's benchmarks), with the trainer's callbacks' states."""
    import warnings

    import pytorch_lightning as pl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             default_root_dir=str(path.parent), callbacks=list(callbacks),
                             enable_checkpointing=bool(callbacks))
        trainer.strategy.connect(module)
        trainer.save_checkpoint(path)
    module.eval()


def _lightning_module():
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self, build, cfg=None, **hparams):
            super().__init__()
            if cfg is not None:
                self.save_hyperparameters(cfg)
            elif hparams:
                self.save_hyperparameters(hparams)
            build(self)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module


def solo_learn(tmp, arch="resnet18"):
    """solo-learn >= 1.0.3 (BYOL): backbone, projector, predictor, momentum_backbone, momentum_projector,
    classifier; saved by its Checkpointer through trainer.save_checkpoint; no hyper_parameters."""
    def build(m):
        m.backbone = torchvision_resnet(arch, 10, fc=False)
        m.projector = mlp((512, 64, 32))
        m.momentum_backbone = perturbed(m.backbone)
        m.momentum_projector = copy.deepcopy(m.projector)
        m.predictor = mlp((32, 64, 32))
        m.classifier = nn.Linear(512, 10)

    module = _lightning_module()(build)
    path = tmp / "byol-offline-abc123-ep=399.ckpt"
    _lightning_save(module, path)
    return Saved(path, module.backbone, backbone_tensors(module.backbone),
                 {"format": "solo-learn", "key": "state_dict/backbone", "part": "backbone"})


def solo_learn_old_cifar(tmp, arch="resnet18"):
    """solo-learn <= 1.0.2: encoder / momentum_encoder; a CIFAR model (BaseMethod: 3x3 conv1 with padding 2,
    max-pool removed), with args.json beside the checkpoint (Checkpointer.save_args)."""
    def build(m):
        m.encoder = torchvision_resnet(arch, 11, fc=False)
        m.encoder.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        m.encoder.maxpool = nn.Identity()
        m.projector = mlp((512, 64, 32))
        m.momentum_encoder = perturbed(m.encoder)
        m.classifier = nn.Linear(512, 10)

    module = _lightning_module()(build)
    (tmp / "old").mkdir()
    path = tmp / "old" / "byol-cifar10-ep=999.ckpt"
    _lightning_save(module, path)
    (tmp / "old" / "args.json").write_text(json.dumps({"method": "byol", "dataset": "cifar10", "encoder": arch}))
    return Saved(path, module.encoder, backbone_tensors(module.encoder),
                 {"format": "solo-learn", "key": "state_dict/encoder", "stem": "3x3", "maxpool": False,
                  "stem_padding": 2})


def lightly_byol_benchmark(tmp, arch="resnet18"):
    """lightly's ImageNet benchmarks (benchmarks/imagenet/resnet50/byol.py): backbone = resnet with fc Identity,
    lightly's BYOL heads, teacher_backbone (EMA), OnlineLinearClassifier; save_hyperparameters(); written by
    Lightning's default ModelCheckpoint, beside an EarlyStopping callback's state."""
    import pytorch_lightning as pl
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
    from lightly.utils.benchmarking import OnlineLinearClassifier

    def build(m):
        m.backbone = torchvision_resnet(arch, 12, fc=False)
        m.projection_head = BYOLProjectionHead(512, 64, 32)
        m.prediction_head = BYOLPredictionHead(32, 64, 32)
        m.teacher_backbone = perturbed(m.backbone)
        m.teacher_projection_head = copy.deepcopy(m.projection_head)
        m.online_classifier = OnlineLinearClassifier(feature_dim=512, num_classes=2)

    module = _lightning_module()(build, batch_size_per_device=4, num_classes=2)
    path = tmp / "epoch=99-step=500400.ckpt"
    _lightning_save(module, path, callbacks=[pl.callbacks.EarlyStopping(monitor="train_loss", patience=10 ** 12)])
    return Saved(path, module.backbone, backbone_tensors(module.backbone),
                 {"format": "lightly", "key": "state_dict/backbone"})


def lightly_dino_benchmark(tmp, arch="resnet18"):
    """benchmarks/imagenet/resnet50/dino.py: `backbone` is the teacher (the EMA network forward() uses) and
    `student_backbone` the trained one."""
    from lightly.models.modules.heads import DINOProjectionHead

    def build(m):
        m.backbone = torchvision_resnet(arch, 13, fc=False)
        m.projection_head = DINOProjectionHead(512, 32, 16, 64)
        m.student_backbone = perturbed(m.backbone)
        m.student_projection_head = DINOProjectionHead(512, 32, 16, 64)
        m.online_classifier = nn.Module()
        m.online_classifier.classification_head = nn.Linear(512, 2)

    module = _lightning_module()(build, batch_size_per_device=4, num_classes=2)
    path = tmp / "epoch=99-step=1000900.ckpt"
    _lightning_save(module, path)
    return Saved(path, module.backbone, backbone_tensors(module.backbone),
                 {"format": "lightly", "key": "state_dict/backbone"})


def lightly_tutorial(tmp, arch="resnet18"):
    """tutorial_simclr_clothing.py: backbone = nn.Sequential(*list(resnet.children())[:-1]), saved as
    {'resnet18_parameters': backbone.state_dict()}."""
    tv = torchvision_resnet(arch, SHARED)
    backbone = nn.Sequential(*list(tv.children())[:-1])
    path = tmp / "model.pth"
    torch.save({"resnet18_parameters": backbone.state_dict()}, path)
    return Saved(path, nn.Sequential(backbone, nn.Flatten(1)), backbone_tensors(tv),
                 {"format": "lightly", "key": "resnet18_parameters", "scheme": "lightly-sequential"})


def lightly_sequential_lightning(tmp, arch="resnet18"):
    """lightly's imagenette / imagenet100 benchmarks: the Sequential backbone inside a LightningModule."""
    from lightly.models.modules.heads import SimCLRProjectionHead

    tv = torchvision_resnet(arch, 15)

    def build(m):
        m.backbone = nn.Sequential(*list(tv.children())[:-1])
        m.projection_head = SimCLRProjectionHead(512, 64, 32)

    module = _lightning_module()(build)
    path = tmp / "imagenette.ckpt"
    _lightning_save(module, path)
    return Saved(path, nn.Sequential(module.backbone, nn.Flatten(1)), backbone_tensors(tv),
                 {"format": "lightly", "key": "state_dict/backbone", "scheme": "lightly-sequential"})


def lightning_by_hand(tmp, arch="resnet18"):
    """A LightningModule's state_dict() saved with torch.save beside its hparams (Lightning's AttributeDict)."""
    from lightly.models.modules.heads import SimCLRProjectionHead

    def build(m):
        m.backbone = torchvision_resnet(arch, 16, fc=False)
        m.projection_head = SimCLRProjectionHead(512, 64, 32)

    module = _lightning_module()(build, lr=0.1, temperature=0.5)
    path = tmp / "simclr_by_hand.pth"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": module.hparams}, path)
    return Saved(path, module.backbone, backbone_tensors(module.backbone),
                 {"key": "state_dict/backbone", "foreign": ["lightning_fabric.utilities.data.AttributeDict"]})


def lightning_hydra_cifar(tmp, arch="resnet18"):
    """A Hydra-configured LightningModule: save_hyperparameters(cfg) pickles the OmegaConf DictConfig as
    hyper_parameters (and its class as hparams_type); cfg.data.dataset says CIFAR, and the model is W-MSE's
    CIFAR ResNet (3x3 conv1, padding 1, no max-pool)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": {"dataset": "cifar10", "num_classes": 10}, "optimizer": {"lr": 0.5,
                                                                                            "betas": [0.9, 0.99]}})

    def build(m):
        m.net = torchvision_resnet(arch, 17, fc=False)
        m.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.net.maxpool = nn.Identity()
        m.head = nn.Linear(512, 10)

    module = _lightning_module()(build, cfg=cfg)
    path = tmp / "hydra-cifar.ckpt"
    _lightning_save(module, path)
    return Saved(path, module.net, backbone_tensors(module.net),
                 {"key": "state_dict/net", "stem": "3x3", "maxpool": False, "stem_padding": 1,
                  "foreign": ["omegaconf.dictconfig.DictConfig"]})


# ---- OpenMMLab (mmselfsup MoCo v2 with mmengine's ExponentialMovingAverage; publish_model.py) --------------

def mmselfsup(tmp, arch="resnet18"):
    from mmengine.logging import MessageHub
    from mmengine.model import ExponentialMovingAverage

    class MoCoV2(nn.Module):  # algorithms/moco.py: backbone, neck, head; encoder_k = EMA(Sequential(backbone, neck))
        def __init__(self):
            super().__init__()
            self.backbone = torchvision_resnet(arch, 18, fc=False)
            self.neck = nn.Module()
            self.neck.mlp = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 32))
            self.encoder_k = ExponentialMovingAverage(nn.Sequential(perturbed(self.backbone), self.neck), 0.001)
            self.register_buffer("queue", torch.randn(32, 64))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    model = MoCoV2()
    hub = MessageHub(f"mmselfsup-{tmp.name}")
    for step in range(3):
        hub.update_scalar("train/loss", 5.0 - step)
        hub.update_scalar("train/lr", np.float64(0.03))
    hub.update_info("epoch", 200)
    hub.update_info("eta", np.float64(0.0))
    checkpoint = {"meta": {"epoch": 200, "iter": 1000, "cfg": "model = dict(type='MoCo', ...)", "seed": 0,
                           "mmengine_version": "0.10.7"},
                  "state_dict": OrderedDict((k, v.cpu()) for k, v in model.state_dict().items()),
                  "message_hub": hub.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                  "param_schedulers": [{"T_max": 200, "eta_min": 0.0, "last_step": 200}]}
    del checkpoint["optimizer"]  # tools/model_converters/publish_model.py process_checkpoint
    path = tmp / "mocov2_resnet50_8xb32-coslr-200e_in1k_20220825-b6d23c86.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return Saved(path, model.backbone, backbone_tensors(model.backbone),
                 {"format": "mmselfsup", "key": "state_dict/backbone",
                  "foreign": ["mmengine.logging.history_buffer.HistoryBuffer"]})


# ---- VISSL (vissl/models/trunks/resnext.py, hooks/log_hooks.py) -------------------------------------------

def vissl(tmp, arch="resnet18"):
    tv = torchvision_resnet(arch, 19)
    trunk = nn.Module()
    trunk._feature_blocks = nn.ModuleDict([("conv1", tv.conv1), ("bn1", tv.bn1), ("conv1_relu", tv.relu),
                                           ("maxpool", tv.maxpool), ("layer1", tv.layer1), ("layer2", tv.layer2),
                                           ("layer3", tv.layer3), ("layer4", tv.layer4), ("avgpool", tv.avgpool),
                                           ("flatten", nn.Flatten(1))])
    head = nn.Module()
    head.clf = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 32))
    heads = nn.ModuleList([head])
    base_model = {"model": {"trunk": trunk.state_dict(), "heads": heads.state_dict()},
                  "meta": {"trunk": {}, "heads": []}}
    classy = {"train": True, "base_model": base_model, "meters": [], "phase_idx": 399, "train_phase_idx": 199,
              "num_updates": 25000, "losses": [4.1, 4.0], "hooks": {}, "loss": {},
              "optimizer": {"optim": torch.optim.SGD(trunk.parameters(), 0.3).state_dict()}}
    path = tmp / "model_final_checkpoint_phase199.torch"
    torch.save({"phase_idx": 399, "iteration": 25000, "loss": {}, "iteration_num": 25000, "train_phase_idx": 199,
                "classy_state_dict": classy}, path)
    reference = nn.Sequential(*trunk._feature_blocks.values())
    return Saved(path, reference, backbone_tensors(tv),
                 {"format": "vissl", "key": "classy_state_dict/base_model/model/trunk/_feature_blocks"})


# ---- PyContrast (networks/build_backbone.py RGBSingleHead; learning/contrast_trainer.py save) -------------

def pycontrast(tmp, arch="resnet18"):
    class RGBSingleHead(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.encoder = torchvision_resnet(arch, seed, fc=False)
            self.head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(inplace=True), nn.Linear(64, 32))

    class Memory(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("memory", torch.randn(128, 32))
            self.register_buffer("params", torch.tensor([0.07, -1.0]))

    model = nn.DataParallel(RGBSingleHead(20))  # DDP in ContrastTrainer.wrap_up; model_ema is not wrapped
    model_ema = perturbed(model.module)
    path = tmp / "ckpt_epoch_200.pth"
    torch.save({"model": model.state_dict(), "contrast": Memory().state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), 0.03).state_dict(), "epoch": 200,
                "model_ema": model_ema.state_dict()}, path)
    ref = model.module.encoder
    return Saved(path, ref, backbone_tensors(ref), {"format": "pycontrast", "key": "model/module.encoder"})


# ---- OBoW (obow/feature_extractor.py ResNet; builder_obow.py OBoW; solver.py save_*) -----------------------

class OBoWFeatureExtractor(nn.Module):
    def __init__(self, tv):
        super().__init__()
        stem = nn.Sequential(OrderedDict([("Conv", tv.conv1), ("bn", tv.bn1), ("relu", tv.relu),
                                          ("maxpool", tv.maxpool)]))
        self._feature_blocks = nn.ModuleList([stem, tv.layer1, tv.layer2, tv.layer3, tv.layer4])

    def forward(self, x):
        for block in self._feature_blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


def obow_feature_extractor(tmp, arch="resnet18"):
    tv = torchvision_resnet(arch, SHARED)
    fe = OBoWFeatureExtractor(tv)
    path = tmp / "feature_extractor_net_checkpoint_199.pth.tar"
    torch.save({"epoch": 200, "network": fe.state_dict(), "meters": None}, path)
    return Saved(path, fe, backbone_tensors(tv), {"format": "obow", "key": "network/_feature_blocks",
                                                   "scheme": "obow"})


def obow_full(tmp, arch="resnet18"):
    tv = torchvision_resnet(arch, 22)

    class OBoW(nn.Module):
        def __init__(self):
            super().__init__()
            self.feature_extractor = OBoWFeatureExtractor(tv)
            self.feature_extractor_teacher = perturbed(self.feature_extractor)
            self.bow_predictor = nn.Module()
            self.bow_predictor.layers_w = nn.Linear(512, 64)
            self.register_buffer("_alpha", torch.tensor(0.99))
            self.register_buffer("_iteration", torch.zeros(1))

    model = nn.DataParallel(OBoW())
    path = tmp / "model_net_checkpoint_199.pth.tar"
    torch.save({"epoch": 200, "network": model.state_dict(), "meters": None}, path)
    return Saved(path, model.module.feature_extractor, backbone_tensors(tv),
                 {"format": "obow", "key": "network/module.feature_extractor._feature_blocks"})


# ---- timm (timm.create_model; a plain state_dict) ---------------------------------------------------------

def timm_deep_stem(tmp, arch="resnet18d"):
    import timm

    torch.manual_seed(23)
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    path = tmp / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return Saved(path, model, backbone_tensors(model), {"format": "timm", "key": "(top level)", "stem": "deep",
                                                         "arch": arch})


# ---- W-MSE (htdt/self-supervised model.py get_model, methods/base.py, train.py) ---------------------------

def w_mse(tmp, arch="resnet18", byol=False):
    """The method's state_dict, whose encoder is an nn.DataParallel inside it: model.module.*. STL-10: 3x3
    conv1 with padding 1, max-pool kept."""
    def get_model():
        model = torchvision_resnet(arch, 24, fc=False)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        return nn.DataParallel(model)

    method = nn.Module()
    method.model = get_model()
    method.head = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    if byol:
        method.pred = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
        method.model_t = perturbed(method.model)
        method.head_t = copy.deepcopy(method.head)
    path = tmp / f"{'byol' if byol else 'w_mse'}_stl10_200.pt"
    torch.save(method.state_dict(), path)
    ref = method.model.module
    return Saved(path, ref, backbone_tensors(ref), {"format": "w-mse", "key": "model.module", "stem": "3x3",
                                                     "maxpool": True, "stem_padding": 1})


# ---- Detectron2 (MoCo's convert-pretrain-to-detectron2.py .pkl; a trained detector's .pth) ---------------

def detectron2_pkl(tmp, arch="resnet18"):
    """MoCo's converter: every tensor, BatchNorm step counters included (0-d arrays), under Detectron2's names."""
    tv = torchvision_resnet(arch, SHARED, fc=False)
    model = {torchvision_to_detectron2_key(k): v.numpy() for k, v in tv.state_dict().items()}
    path = tmp / "moco_r18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "MOCO", "matching_heuristics": True}, f)
    return Saved(path, tv, backbone_tensors(tv), {"format": "detectron2", "key": "model",
                                                   "scheme": "detectron2"})


def moco_convert_to_detectron2(state_dict):
    """facebookresearch/moco detection/convert-pretrain-to-detectron2.py, its renaming rules applied in order."""
    model = {}
    for k, v in state_dict.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[k] = v.numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def detectron2_pkl_mocov2(tmp, arch="resnet18"):
    """A MoCo v2 checkpoint (MLP head, --mlp) through MoCo's converter: the head becomes stem.fc.0 / stem.fc.2."""
    model = nn.DataParallel(MoCo(arch))
    path = tmp / "moco_v2_800ep.pkl"
    with open(path, "wb") as f:
        pickle.dump(moco_convert_to_detectron2(model.state_dict()), f)
    q = copy.deepcopy(model.module.encoder_q)
    q.fc = nn.Identity()
    return Saved(path, q, backbone_tensors(q), {"format": "detectron2", "key": "model", "scheme": "detectron2",
                                                 "dropped": {"model.stem": 4}})


def detectron2_pth(tmp, arch="resnet18"):
    tv = torchvision_resnet(arch, 26, fc=False)
    model = {"backbone.bottom_up." + torchvision_to_detectron2_key(k): v for k, v in tv.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    model["roi_heads.box_predictor.cls_score.weight"] = torch.randn(21, 64)
    path = tmp / "model_final.pth"
    torch.save({"model": model, "iteration": 24000}, path)
    return Saved(path, tv, {k: v for k, v in backbone_tensors(tv).items() if not k.endswith("num_batches_tracked")},
                 {"format": "detectron2", "key": "model/backbone.bottom_up"})


# ---- SwAV / DeepCluster-v2 (facebookresearch/swav: module. with projection_head, prototypes) -------------

def swav(tmp, arch="resnet18"):
    """swav's src/resnet50.py: the ResNet itself holds projection_head and prototypes (no fc)."""
    net = torchvision_resnet(arch, 27, fc=False)
    net.projection_head = mlp((512, 64, 32))
    net.prototypes = nn.Linear(32, 30, bias=False)
    path = tmp / "swav_800ep_pretrain.pth.tar"
    torch.save(nn.DataParallel(net).state_dict(), path)
    ref = copy.deepcopy(net)
    del ref.projection_head, ref.prototypes
    return Saved(path, ref, backbone_tensors(ref), {"format": "swav", "key": "module"})


# ---- plain torchvision, and a DataParallel save ----------------------------------------------------------

def torchvision_plain(tmp, arch="resnet18", seed=SHARED):
    tv = torchvision_resnet(arch, seed)
    path = tmp / f"{arch}_tv.pth"
    torch.save(tv.state_dict(), path)
    ref = copy.deepcopy(tv)
    ref.fc = nn.Identity()
    return Saved(path, ref, backbone_tensors(tv), {"format": "torchvision", "key": "(top level)"})


def data_parallel(tmp, arch="resnet18"):
    tv = torchvision_resnet(arch, 28)
    path = tmp / "dp.pth"
    torch.save(nn.DataParallel(tv).state_dict(), path)
    ref = copy.deepcopy(tv)
    ref.fc = nn.Identity()
    return Saved(path, ref, backbone_tensors(tv), {"format": "torchvision", "key": "module"})


def model_prefix(tmp, arch="resnet18"):
    wrapper = nn.Module()
    wrapper.model = torchvision_resnet(arch, 29, fc=False)
    path = tmp / "wrapped.pth"
    torch.save(wrapper.state_dict(), path)
    return Saved(path, wrapper.model, backbone_tensors(wrapper.model), {"format": "torchvision", "key": "model"})


LAYOUTS = {
    "torchvision": torchvision_plain, "data-parallel": data_parallel, "model-prefix": model_prefix,
    "moco": moco, "moco-lincls": moco_lincls, "mocov3": mocov3, "simsiam": simsiam,
    "barlowtwins": barlowtwins, "barlowtwins-resnet50": barlowtwins_resnet50, "vicreg": vicreg, "dino": dino,
    "swav": swav, "solo-learn": solo_learn, "solo-learn-old-cifar": solo_learn_old_cifar,
    "lightly-byol": lightly_byol_benchmark, "lightly-dino": lightly_dino_benchmark,
    "lightly-tutorial": lightly_tutorial, "lightly-sequential-lightning": lightly_sequential_lightning,
    "lightning-by-hand": lightning_by_hand, "lightning-hydra-cifar": lightning_hydra_cifar,
    "mmselfsup": mmselfsup, "vissl": vissl, "pycontrast": pycontrast, "obow": obow_feature_extractor,
    "obow-full": obow_full, "timm-resnet18d": timm_deep_stem, "w-mse": w_mse,
    "w-mse-byol": lambda tmp: w_mse(tmp, byol=True), "detectron2-pkl": detectron2_pkl,
    "detectron2-pkl-mocov2": detectron2_pkl_mocov2,
    "detectron2-pth": detectron2_pth,
}
RESNET50_LAYOUTS = {"simclr-v1": simclr_v1, "simclr-v2": simclr_v2,
                    "timm-resnet50d": lambda tmp: timm_deep_stem(tmp, "resnet50d")}


# ==== Vision Transformers ==================================================================================
# The projects' ViTs use timm's module names (DINO's and iBOT's vision_transformer.py, MAE's models_mae.py and
# MoCo v3's vits.py build on timm's Block / VisionTransformer; DINOv2's blocks are named alike), so their backbones
# are built here from timm modules with each project's arguments, inside each project's wrappers, and saved with
# each project's save call. `ViTSaved.reference` says how the project would run the evaluated backbone: timm's
# VisionTransformer with the project's arguments (`timm_kwargs`) and the project's position rule (`pos_rule`),
# which tests/test_vit.py writes out on its own.

@dataclass
class ViTSaved:
    path: object
    tensors: dict  # the evaluated backbone as the project's model holds it (DINOv2: its own names)
    timm_kwargs: dict  # timm VisionTransformer arguments of the project's architecture (heads, eps, ...)
    pos_rule: str  # dino | dinov2 | dinov2-reg | mae | mocov3 | timm
    expect: dict = field(default_factory=dict)  # Checkpoint attributes the loader must report
    unused: dict = field(default_factory=dict)  # the load report's unused groups


def timm_vit(seed, embed_dim=192, depth=4, num_heads=3, patch_size=16, img_size=224, **kwargs):
    """timm's VisionTransformer with random weights (LayerNorms and LayerScale perturbed: a mix-up would show)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kwargs.setdefault("num_classes", 0)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma")) or name == "cls_token":
                p.add_(torch.randn_like(p) * 0.2)
            if name == "pos_embed":
                p.normal_(0, 0.5)
    return model.eval()


def _vit_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def _kwargs(heads, **more):
    return {"num_heads": heads, **more}


def timm_with_head(tmp):
    model = timm_vit(40, num_classes=10)
    path = tmp / "vit_tiny_patch16_224.pth"
    torch.save(model.state_dict(), path)
    return ViTSaved(path, _vit_state(model), _kwargs(3), "timm",
                    {"release": "timm", "family": "vit", "key": "(top level)"}, {"heads": 2})


def timm_safetensors(tmp):
    from safetensors.torch import save_file

    model = timm_vit(41, embed_dim=384, num_heads=6, patch_size=8)
    path = tmp / "vit_small_patch8_224.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return ViTSaved(path, _vit_state(model), _kwargs(6), "timm", {"release": "timm", "arch": "vit_small_patch8"})


def timm_registers(tmp):
    """timm's registers: reg_token, no_embed_class (the position table holds patches only), LayerScale."""
    model = timm_vit(42, embed_dim=384, num_heads=6, patch_size=14, img_size=98, reg_tokens=4, no_embed_class=True,
                     init_values=1e-5)
    path = tmp / "vit_small_patch14_reg4.pth"
    torch.save(model.state_dict(), path)
    return ViTSaved(path, _vit_state(model), _kwargs(6, reg_tokens=4, no_embed_class=True, init_values=1e-5), "timm",
                    {"release": "timm", "arch": "vit_small_patch14_reg4"})


# ---- DINO (facebookresearch/dino main_dino.py; utils.MultiCropWrapper, DINOHead; utils.save_on_master) --------

def dino_vit_backbone_only(tmp):
    """dino_deitsmall16_pretrain.pth: the teacher's backbone, flat, DINO's ViT-S/16 (6 heads)."""
    model = timm_vit(43, embed_dim=384, num_heads=6)
    path = tmp / "dino_deitsmall16_pretrain.pth"
    torch.save(model.state_dict(), path)
    return ViTSaved(path, _vit_state(model), _kwargs(6), "dino", {"release": "dino", "key": "(top level)"})


def _dino_like(tmp, seed, loss_key, masked_embed=False, embed_dim=384, heads=6):
    teacher = MultiCropWrapper(timm_vit(seed, embed_dim=embed_dim, num_heads=heads), DINOHead(embed_dim))
    student_vit = perturbed(timm_vit(seed, embed_dim=embed_dim, num_heads=heads))
    if masked_embed:  # iBOT's student: VisionTransformer(masked_im_modeling=True) holds masked_embed
        student_vit.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))
    student = nn.DataParallel(MultiCropWrapper(student_vit, DINOHead(embed_dim)))  # DDP: module.
    regularized = [p for n, p in student.named_parameters() if not n.endswith(".bias") and p.ndim > 1]
    not_regularized = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.ndim == 1]
    opt = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    loss = nn.Module()
    loss.register_buffer("center", torch.zeros(1, 96))
    if loss_key == "ibot_loss":
        loss.register_buffer("center2", torch.zeros(1, 1, 96))
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=96, use_fp16=True, lr=0.0005, epochs=100)
    save = {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": opt.state_dict(),
            "epoch": 100, "args": args, loss_key: loss.state_dict(),
            "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}
    path = tmp / "checkpoint.pth"
    torch.save(save, path)  # utils.save_on_master: torch.save on rank 0
    return path, teacher, student


def dino_vit_full(tmp):
    path, teacher, student = _dino_like(tmp, 44, "dino_loss")
    n = len(student.state_dict())
    return ViTSaved(path, _vit_state(teacher.backbone), _kwargs(6), "dino",
                    {"release": "dino", "key": "teacher/backbone"},
                    {"heads": len(teacher.head.state_dict()), "ema_teacher_momentum": n, "other": 1})


def ibot_full(tmp):
    path, teacher, student = _dino_like(tmp, 45, "ibot_loss", masked_embed=True)
    return ViTSaved(path, _vit_state(teacher.backbone), _kwargs(6), "dino",
                    {"release": "ibot", "key": "teacher/backbone"})


def ibot_teacher(tmp, wrapped=True):
    """checkpoint_teacher.pth: extract_backbone_weights.py --checkpoint_key teacher (flat), or the released file's
    {'state_dict': ...}."""
    teacher = MultiCropWrapper(timm_vit(46 + wrapped, embed_dim=768, num_heads=12, depth=2), DINOHead(768))
    flat = {k[len("backbone."):]: v for k, v in teacher.state_dict().items() if k.startswith("backbone.")}
    path = tmp / "checkpoint_teacher.pth"
    torch.save({"state_dict": flat} if wrapped else flat, path)
    return ViTSaved(path, _vit_state(teacher.backbone), _kwargs(12), "dino",
                    {"release": "ibot", "key": "state_dict" if wrapped else "(top level)"})


# ---- MoCo v3 (facebookresearch/moco-v3 moco/builder.py MoCo_ViT; vits.py; main_moco.py; convert_to_deit.py) ---

def _mocov3_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    layers = []
    for i in range(num_layers):
        a = input_dim if i == 0 else mlp_dim
        b = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(a, b, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def mocov3_sincos(grid, dim, temperature=10000.0):
    """vits.py build_2d_sincos_position_embedding, with its class-token row of zeros, as a (1, 1 + h*w, dim) table."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), table], dim=1)


def mocov3_vit_small(seed, img_size=224):
    """vits.py vit_small: patch 16, 384 wide, 12 heads (not timm's 6), the fixed sin-cos table (not trained)."""
    model = timm_vit(seed, embed_dim=384, num_heads=12, depth=4, img_size=img_size, num_classes=256)
    with torch.no_grad():
        model.pos_embed.copy_(mocov3_sincos(img_size // 16, 384))
    return model


def mocov3_vit(tmp):
    class MoCoViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_encoder = mocov3_vit_small(48)
            self.momentum_encoder = perturbed(mocov3_vit_small(48))
            hidden = self.base_encoder.head.weight.shape[1]
            del self.base_encoder.head, self.momentum_encoder.head
            self.base_encoder.head = _mocov3_mlp(3, hidden, 64, 32)  # the projector (builder.py)
            self.momentum_encoder.head = _mocov3_mlp(3, hidden, 64, 32)
            self.predictor = _mocov3_mlp(2, 32, 64, 32, False)

    model = nn.DataParallel(MoCoViT())
    path = tmp / "checkpoint_0299.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": model.state_dict(),
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                "scaler": torch.amp.GradScaler("cpu").state_dict()}, path)
    base = model.module.base_encoder
    heads = len(base.head.state_dict())
    return ViTSaved(path, _vit_state(base), _kwargs(12), "mocov3",
                    {"release": "mocov3", "key": "state_dict/module.base_encoder"},
                    {"heads": heads + len(model.module.predictor.state_dict()),
                     "ema_teacher_momentum": len(model.module.momentum_encoder.state_dict())})


def mocov3_deit(tmp):
    """convert_to_deit.py: module.base_encoder.* without head, prefix removed, saved as {'model': ...}."""
    model = mocov3_vit_small(49)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    path = tmp / "vit-s-300ep.pth.tar"
    torch.save({"model": sd}, path)
    return ViTSaved(path, _vit_state(model), _kwargs(12), "mocov3", {"release": "mocov3", "key": "model"})


# ---- MAE (facebookresearch/mae models_mae.py MaskedAutoencoderViT; util/misc.py save_model) ----------------

def mae_sincos(grid, dim):
    """util/pos_embed.py get_2d_sincos_pos_embed(dim, grid, cls_token=True), in numpy as MAE computes it."""
    gh, gw = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, dim]), emb], axis=0)).float()[None]


class MaskedAutoencoderViT(nn.Module):
    """models_mae.py: the encoder (cls_token, fixed pos_embed, patch_embed, blocks, norm) and the decoder
    (decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred)."""

    def __init__(self, seed, embed_dim=768, depth=2, heads=12, decoder_dim=64, img_size=224):
        super().__init__()
        from timm.models.vision_transformer import Block

        enc = timm_vit(seed, embed_dim=embed_dim, depth=depth, num_heads=heads, img_size=img_size)
        self.cls_token, self.patch_embed, self.blocks, self.norm = enc.cls_token, enc.patch_embed, enc.blocks, enc.norm
        self.pos_embed = nn.Parameter(mae_sincos(img_size // 16, embed_dim), requires_grad=False)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(mae_sincos(img_size // 16, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, 4, 4.0, qkv_bias=True) for _ in range(1)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, 16 * 16 * 3)


def _mae_encoder_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}


def mae_full(tmp):
    model = MaskedAutoencoderViT(50)
    loss_scaler = torch.amp.GradScaler("cpu")  # util/misc.py NativeScalerWithGradNormCount wraps one
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, blr=1.5e-4)
    to_save = {"model": model.state_dict(), "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
               "epoch": 799, "scaler": loss_scaler.state_dict(), "args": args}
    path = tmp / "checkpoint-799.pth"
    torch.save(to_save, path)  # util/misc.py save_on_master
    decoder = sum(k.startswith("decoder") or k == "mask_token" for k in model.state_dict())
    return ViTSaved(path, _mae_encoder_state(model), _kwargs(12), "mae", {"release": "mae", "key": "model"},
                    {"decoder": decoder})


def mae_encoder(tmp):
    """mae_pretrain_vit_base.pth: {'model': the encoder's tensors}."""
    model = MaskedAutoencoderViT(51)
    path = tmp / "mae_pretrain_vit_base.pth"
    torch.save({"model": _mae_encoder_state(model)}, path)
    return ViTSaved(path, _mae_encoder_state(model), _kwargs(12), "mae", {"release": "mae", "key": "model"})


# ---- DINOv2 (facebookresearch/dinov2 dinov2/models/vision_transformer.py DinoVisionTransformer; hub) ----------

class DinoVisionTransformer(nn.Module):
    """DINOv2's backbone: cls_token, pos_embed for 518 px (37 x 37 + 1), register_tokens, mask_token, patch_embed,
    blocks with LayerScale ls1/ls2 (init_values 1.0 in the hub models), norm; head Identity."""

    def __init__(self, seed, embed_dim=384, depth=4, heads=6, registers=0, swiglu=False):
        super().__init__()
        from timm.layers import SwiGLUPacked

        kw = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2 * 2.6667) if swiglu else {}
        v = timm_vit(seed, embed_dim=embed_dim, depth=depth, num_heads=heads, patch_size=14, img_size=518,
                     init_values=1.0, **kw)
        self.cls_token, self.pos_embed, self.patch_embed, self.norm = v.cls_token, v.pos_embed, v.patch_embed, v.norm
        self.register_tokens = nn.Parameter(torch.randn(1, registers, embed_dim)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = v.blocks
        if swiglu:  # SwiGLUFFNFused: w12 (both halves), w3
            for b in self.blocks:
                b.mlp.w12, b.mlp.w3 = b.mlp.fc1, b.mlp.fc2
                del b.mlp.fc1, b.mlp.fc2
        self.head = nn.Identity()


def dinov2(tmp, registers=0, swiglu=False):
    model = DinoVisionTransformer(52 + registers, registers=registers, swiglu=swiglu)
    name = f"dinov2_vits14{'_reg4' if registers else ''}_pretrain.pth"
    path = tmp / name
    torch.save(model.state_dict(), path)  # the hub files: the backbone's state_dict
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ViTSaved(path, tensors, _kwargs(6, init_values=1.0), "dinov2-reg" if registers else "dinov2",
                    {"release": "dinov2", "key": "(top level)"}, {"other": 1})


VIT_LAYOUTS = {
    "timm-head": timm_with_head, "timm-safetensors": timm_safetensors, "timm-registers": timm_registers,
    "dino-backbone": dino_vit_backbone_only, "dino-full": dino_vit_full, "ibot-full": ibot_full,
    "ibot-teacher": ibot_teacher, "ibot-teacher-flat": lambda tmp: ibot_teacher(tmp, wrapped=False),
    "mocov3": mocov3_vit, "mocov3-deit": mocov3_deit, "mae-full": mae_full, "mae-encoder": mae_encoder,
    "dinov2": dinov2, "dinov2-reg4": lambda tmp: dinov2(tmp, registers=4),
    "dinov2-swiglu": lambda tmp: dinov2(tmp, swiglu=True),
}
