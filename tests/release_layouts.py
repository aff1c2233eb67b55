"""Checkpoint fixtures laid out exactly as each public release lays out its files, built from one state dict."""
import argparse
import pickle

import torch

from backbones.formats import torchvision_to_detectron2_key


def _no_fc(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _mlp(prefix, dims, bn=True):
    """Linear(-BN)-ReLU-...-Linear as nn.Sequential names it: Linear at 3i with BN, at 2i without."""
    out, step = {}, 3 if bn else 2
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{prefix}{step * i}.weight"] = torch.randn(b, a)
        out[f"{prefix}{step * i}.bias"] = torch.randn(b)
        if bn and i < len(dims) - 2:
            out[f"{prefix}{3 * i + 1}.weight"] = torch.ones(b)
            out[f"{prefix}{3 * i + 1}.bias"] = torch.zeros(b)
            out[f"{prefix}{3 * i + 1}.running_mean"] = torch.zeros(b)
            out[f"{prefix}{3 * i + 1}.running_var"] = torch.ones(b)
    return out


def _prefix(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def build(fmt, sd, feat):
    """The object a release would save, for torchvision state dict `sd` (feature width `feat`)."""
    bb = _no_fc(sd)
    if fmt == "torchvision":
        return sd
    if fmt == "torchvision-nested":
        return {"model": sd, "epoch": 90}
    if fmt == "moco":  # MoCo v2: MLP head in encoder_q.fc, key encoder, queue
        q = {**bb, **_mlp("fc.", [feat, feat, 128], bn=False)}
        state = {**_prefix(q, "module.encoder_q."), **_prefix(q, "module.encoder_k."),
                 "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    if fmt == "mocov3":
        enc = {**bb, **_mlp("fc.", [feat, 64, 32])}
        state = {**_prefix(enc, "module.base_encoder."), **_prefix(enc, "module.momentum_encoder."),
                 **_mlp("module.predictor.", [32, 64, 32])}
        return {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {}, "scaler": {"scale": 1.0}}
    if fmt in ("barlowtwins", "vicreg"):
        model = {**_prefix(bb, "module.backbone."), **_mlp("module.projector.", [feat, 64, 64])}
        if fmt == "barlowtwins":
            model.update({"module.bn.running_mean": torch.zeros(64), "module.bn.running_var": torch.ones(64),
                          "module.bn.num_batches_tracked": torch.tensor(5)})
        return {"epoch": 1000, "model": model, "optimizer": {}}
    if fmt == "swav":
        return {**_prefix(bb, "module."), **_mlp("module.projection_head.", [feat, 64, 32]),
                "module.prototypes.weight": torch.randn(30, 32)}
    if fmt == "deepclusterv2":
        return {**_prefix(bb, "module."), **_mlp("module.projection_head.", [feat, 64, 32]),
                **{f"module.prototypes.prototypes{i}.weight": torch.randn(30, 32) for i in range(3)}}
    if fmt == "dino":
        head = _prefix(_mlp("mlp.", [feat, 64, 32]), "module.head.")  # DINO's MultiCropWrapper(backbone, head)
        student = {**_prefix(bb, "module.backbone."), **head}
        teacher = {**_prefix({k: v + 1 if v.is_floating_point() else v for k, v in bb.items()}, "module.backbone."),
                   **head}
        return {"student": student, "teacher": teacher, "optimizer": {}, "epoch": 100,
                "args": argparse.Namespace(arch="resnet50", out_dim=60000), "dino_loss": {"center": torch.zeros(1, 32)}}
    if fmt == "solo-learn":
        state = {**_prefix(bb, "backbone."), **_mlp("projector.", [feat, 64, 32]),
                 **_prefix(bb, "momentum_backbone."), **_mlp("momentum_projector.", [feat, 64, 32]),
                 **_mlp("predictor.", [32, 64, 32]), "classifier.weight": torch.randn(10, feat),
                 "classifier.bias": torch.zeros(10)}
        return {"epoch": 399, "global_step": 10, "pytorch-lightning_version": "1.9.5", "state_dict": state,
                "hyper_parameters": {"lr": 1.0, "method": "byol"}}
    if fmt == "lightly":
        index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
        seq = {f"{index[k.split('.')[0]]}.{k.partition('.')[2]}": v for k, v in bb.items()}
        state = {**_prefix(seq, "backbone."), **_prefix(seq, "backbone_momentum."),
                 **_mlp("projection_head.layers.", [feat, 64, 32])}
        return {"epoch": 9, "global_step": 10, "pytorch-lightning_version": "2.1.0", "state_dict": state}
    if fmt == "vissl":
        return {"classy_state_dict": {"base_model": {"model": {
            "trunk": _prefix(bb, "_feature_blocks."), "heads": {"0.clf.0.weight": torch.randn(10, feat)}}}},
            "phase_idx": 3, "iteration": 100}
    if fmt == "detectron2-pth":
        model = {"backbone.bottom_up." + torchvision_to_detectron2_key(k): v for k, v in bb.items()
                 if not k.endswith("num_batches_tracked")}
        model["roi_heads.box_predictor.cls_score.weight"] = torch.randn(21, 64)
        return {"model": model, "iteration": 24000}
    raise KeyError(fmt)


def save(fmt, sd, feat, path):
    if fmt == "detectron2-pkl":
        model = {torchvision_to_detectron2_key(k): v.numpy() for k, v in _no_fc(sd).items()
                 if not k.endswith("num_batches_tracked")}
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": "MOCO", "matching_heuristics": True}, f)
    else:
        torch.save(build(fmt, sd, feat), path)


EXPECTED_FORMAT = {"torchvision": "torchvision", "torchvision-nested": "torchvision", "moco": "moco",
                   "mocov3": "mocov3", "barlowtwins": "barlowtwins", "vicreg": "vicreg", "swav": "swav",
                   "deepclusterv2": "swav", "dino": "dino", "solo-learn": "solo-learn", "lightly": "lightly",
                   "vissl": "vissl", "detectron2-pth": "detectron2", "detectron2-pkl": "detectron2"}
