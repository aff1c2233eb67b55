"""Known releases: how each project's own code saves its checkpoints, and what follows for evaluation.

The ResNets themselves are found by structure (`backbones.discovery`); a release adds what the structure
cannot say: which network the project evaluates when a file holds several (online or momentum, student or
teacher), the input normalisation its weights expect when it is not the task's, and the stem's details.
`detect(obj, fits)` sees the loaded file and its fitting candidates; the first release that recognises the
file names it in the record (`format`). Each entry cites the code that writes such files (details and
commits in the README's table of layouts). A new layout whose ResNet is already found needs an entry here
only when it changes one of these; a new naming scheme goes to `backbones/schemes.py`.
"""
from dataclasses import dataclass, field
from typing import Callable

NO_NORMALIZATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # RGB in [0, 1], as the images come from ToTensor()


@dataclass(frozen=True)
class Release:
    name: str  # the record's `format`
    project: str  # the project and the code that writes such files
    detect: Callable  # (loaded object, fitting candidates) -> bool
    evaluates: Callable = None  # candidate -> bool: the network the project evaluates, when there are several
    why: str = ""  # the project's evaluation code that says so
    normalization: tuple = None  # (mean, std) its weights expect, when not the task protocol's
    normalization_source: str = ""
    small_stem: tuple = None  # (max-pool, padding, why) of its 3x3 stems, when the project's code settles them
    notes: dict = field(default_factory=dict)


def _keys(obj):
    return set(obj) if isinstance(obj, dict) else set()


def _state(obj, *path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return {}
        obj = obj[key]
    return obj if isinstance(obj, dict) else {}


def _any_key(state, *starts):
    return any(isinstance(k, str) and k.startswith(starts) for k in state)


def _at(fits, container, prefix=None):
    return any(c.container == container and (prefix is None or c.prefix == prefix) for c in fits)


def _lightning(obj):
    """A Lightning checkpoint (dump_checkpoint: epoch, global_step, state_dict, ...; the
    pytorch-lightning_version key is absent from some, e.g. lightly's benchmark files)."""
    return {"state_dict", "epoch", "global_step"} <= _keys(obj)


def _downsample_first(obj):
    """tonylins/simclr-converter resnet_wider.py assigns Bottleneck.downsample before conv1 ("hack: moving
    downsample to the first"), so in its files a block's downsample keys come before its conv1's."""
    keys = [k for k in _state(obj, "state_dict") if isinstance(k, str)]
    first = next((k for k in keys if k.startswith("layer1.0.")), "")
    return first.startswith("layer1.0.downsample.")


def _obow_export(obj, fits):
    return _keys(obj) == {"network"} and _at(fits, ("network",), "")


RELEASES = [
    Release("ssl-suite-pretrain", "this suite's pretrain/train.py last.pth (online and target networks)",
            lambda o, f: isinstance(o, dict) and o.get("format") == "ssl-suite-pretrain",
            lambda c: c.container[:1] == ("online",),
            "pretrain/train.py exports the online backbone as backbone.pth; the target is its moving average"),
    Release("dino", "facebookresearch/dino main_dino.py (student, teacher, optimizer, epoch, args, dino_loss)",
            lambda o, f: isinstance(_state(o, "student"), dict) and _state(o, "teacher") != {} and
            _at(f, ("teacher",)),
            lambda c: c.container[:1] == ("teacher",),
            "DINO evaluates the teacher (eval_linear.py and eval_knn.py: --checkpoint_key teacher)"),
    Release("simclr-v2-converted", "Separius/SimCLRv2-Pytorch convert.py ({'resnet': ..., 'head': ...})",
            lambda o, f: any(c.scheme.name == "simclr-v2" for c in f),
            normalization=NO_NORMALIZATION,
            normalization_source="SimCLR's TensorFlow models take RGB in [0, 1] without mean/std "
                                 "(SimCLRv2-Pytorch verify.py: ToTensor() only)"),
    Release("simclr-converted", "tonylins/simclr-converter convert.py ({'state_dict': ...}, SimCLR v1 1x/2x/4x)",
            lambda o, f: _keys(o) == {"state_dict"} and _at(f, ("state_dict",), "") and _downsample_first(o),
            normalization=NO_NORMALIZATION,
            normalization_source="SimCLR v1's TensorFlow models take RGB in [0, 1] without mean/std "
                                 "(simclr-converter README: 'without normalization')"),
    Release("obow", "valeoai/obow solver.py (save_network, save_feature_extractor: {'epoch', 'network', "
            "'meters'}; the torchvision export: {'network'})",
            lambda o, f: any(c.scheme.name == "obow" for c in f) or _obow_export(o, f),
            lambda c: "feature_extractor_teacher" not in c.parts,
            "OBoW evaluates the student feature extractor (main_linear_classification.py)"),
    Release("vissl", "facebookresearch/vissl LogCheckpointHook (classy_state_dict -> base_model -> model -> trunk)",
            lambda o, f: any(c.container[:1] == ("classy_state_dict",) for c in f),
            lambda c: c.container == ("classy_state_dict", "base_model", "model", "trunk"),
            "VISSL evaluates the trunk of base_model"),
    Release("mmselfsup", "open-mmlab mmselfsup / mmpretrain (mmengine Runner.save_checkpoint; publish_model.py)",
            lambda o, f: {"meta", "state_dict"} <= _keys(o) and _at(f, ("state_dict",), "backbone."),
            lambda c: c.container == ("state_dict",) and c.prefix == "backbone.",
            "OpenMMLab evaluates `backbone`; encoder_k / target_net hold its moving average"),
    Release("pycontrast", "HobbitLong/PyContrast ContrastTrainer.save (model, contrast, optimizer, epoch, model_ema)",
            lambda o, f: {"model", "contrast", "optimizer", "epoch"} <= _keys(o) and _at(f, ("model",)),
            lambda c: c.container == ("model",),
            "PyContrast's linear_trainer.py load_encoder_weights reads ckpt['model'], not model_ema"),
    Release("lightly", "lightly's DINO benchmark (benchmarks/imagenet/resnet50/dino.py, Lightning checkpoint)",
            lambda o, f: _lightning(o) and _at(f, ("state_dict",), "backbone.") and
            _at(f, ("state_dict",), "student_backbone."),
            lambda c: c.container == ("state_dict",) and c.prefix == "backbone.",
            "lightly's DINO evaluates `backbone`, its teacher (student_backbone is trained; dino.py forward)"),
    Release("lightly", "lightly-ai/lightly (benchmarks' Lightning checkpoints; tutorials' "
            "{'resnet18_parameters': nn.Sequential(*list(resnet.children())[:-1]).state_dict()})",
            lambda o, f: any(c.scheme.name == "lightly-sequential" for c in f) or (_lightning(o) and _any_key(
                _state(o, "state_dict"), "projection_head.layers.", "online_classifier.", "prediction_head.layers."))),
    Release("solo-learn", "vturrisi/solo-learn (Lightning checkpoint; backbone. from 1.0.3, encoder. before)",
            lambda o, f: _lightning(o) and "classifier.weight" in _state(o, "state_dict") and
            (_at(f, ("state_dict",), "backbone.") or _at(f, ("state_dict",), "encoder.")),
            lambda c: c.container == ("state_dict",) and c.prefix in ("backbone.", "encoder."),
            "solo-learn evaluates the online backbone (main_linear.py)",
            small_stem=(False, 2, "solo-learn gives only CIFAR models a 3x3 stem, with padding 2 and without "
                                  "max-pool (solo/methods/base.py BaseMethod.__init__)")),
    Release("moco", "facebookresearch/moco main_moco.py ({'epoch', 'arch', 'state_dict', 'optimizer'})",
            lambda o, f: any("encoder_q" in c.parts for c in f),
            lambda c: "encoder_q" in c.parts,
            "MoCo evaluates the query encoder (main_lincls.py keeps module.encoder_q.)"),
    Release("mocov3", "facebookresearch/moco-v3 main_moco.py ({'epoch', 'arch', 'state_dict', 'optimizer', "
            "'scaler'})",
            lambda o, f: any("base_encoder" in c.parts for c in f),
            lambda c: "base_encoder" in c.parts,
            "MoCo v3 evaluates the base encoder (main_lincls.py keeps module.base_encoder.)"),
    Release("simsiam", "facebookresearch/simsiam main_simsiam.py ({'epoch', 'arch', 'state_dict', 'optimizer'})",
            lambda o, f: _at(f, ("state_dict",), "module.encoder.") and
            _any_key(_state(o, "state_dict"), "module.predictor.")),
    Release("barlowtwins", "facebookresearch/barlowtwins main.py checkpoint.pth ({'epoch', 'model', 'optimizer'})",
            lambda o, f: _at(f, ("model",), "module.backbone.") and "module.bn.running_mean" in _state(o, "model")),
    Release("vicreg", "facebookresearch/vicreg main_vicreg.py model.pth ({'epoch', 'model', 'optimizer'})",
            lambda o, f: _at(f, ("model",), "module.backbone.") and _any_key(_state(o, "model"), "module.projector.")),
    Release("swav", "facebookresearch/swav (also DeepCluster-v2, SeLa-v2): module. with projection_head, prototypes",
            lambda o, f: any(c.prefix == "module." for c in f) and any(
                _any_key(d, "module.projection_head.", "module.prototypes.") for d in (o, _state(o, "state_dict")))),
    Release("lincls", "facebookresearch/moco and simsiam main_lincls.py ({'epoch', 'arch', 'state_dict', "
            "'best_acc1', 'optimizer'}: the frozen backbone and its trained classifier)",
            lambda o, f: {"arch", "state_dict", "best_acc1"} <= _keys(o)),
    Release("w-mse", "htdt/self-supervised train.py (the method's state_dict: model = nn.DataParallel(ResNet))",
            lambda o, f: _at(f, (), "model.module.") and _any_key(o, "head."),
            lambda c: c.prefix == "model.module.",
            "W-MSE evaluates `model` (test.py); model_t is BYOL's target"),
    Release("timm", "huggingface/pytorch-image-models (deep-stem ResNets: resnet50d, ...)",
            lambda o, f: any(c.spec.stem == "deep" for c in f)),
    Release("detectron2", "Detectron2 (stem, res2-res5; .pkl of numpy arrays or a .pth)",
            lambda o, f: any(c.scheme.name == "detectron2" for c in f),
            notes={"input": "torchvision-converted weights (MoCo's converter) take RGB input; "
                            "MSRA/caffe2 weights take BGR 0-255 and are not supported"}),
    Release("torchvision", "a torchvision / timm state dict, bare or under 'state_dict' / 'model' (also the "
            "backbone-only releases of Barlow Twins, VICReg, DINO)",
            lambda o, f: any(c.scheme.name == "torchvision" and c.prefix == "" and
                             c.container in ((), ("state_dict",), ("model",)) for c in f)),
]
RELEASE_NAMES = sorted({r.name for r in RELEASES})
ALIASES = {"simclr-v1-converted": "simclr-converted"}


def recognise(obj, fits):
    return next((r for r in RELEASES if r.detect(obj, fits)), None)


def by_name(name):
    name = ALIASES.get(name, name)
    return [r for r in RELEASES if r.name == name]
