"""Finding the ResNets in a loaded checkpoint by their structure.

Every dict of the file, at any depth, is searched: wherever a key matches a naming scheme's anchor (the
first convolution of a residual block), the tensors under that prefix are renamed to torchvision's names
and analysed. A candidate fits only when it is exactly one supported ResNet: every tensor present, none
unexpected, every shape right (BatchNorm step counters may be absent). Keys under the prefix that are
not part of a ResNet backbone (fc classifiers, projection heads) are left out and counted.
"""
import re
from dataclasses import dataclass, field

from backbones.reading import is_tensor
from backbones.resnet import analyse
from backbones.schemes import SCHEMES, Scheme

MAX_DEPTH = 8


@dataclass
class Candidate:
    container: tuple  # keys from the top of the file to the dict holding the tensors
    prefix: str  # the part of the tensors' names before the scheme's own names
    scheme: Scheme
    state: dict  # backbone tensors under torchvision names
    spec: object  # backbones.resnet.ResNetSpec or None
    problems: list  # what keeps it from being a supported ResNet exactly; empty when it fits
    not_backbone: list = field(default_factory=list)  # keys under the prefix outside the backbone
    keys: list = field(default_factory=list)  # its tensors' full keys in the container

    @property
    def fits(self) -> bool:
        return self.spec is not None and not self.problems

    @property
    def arch(self):
        return self.spec.arch if self.spec is not None else None

    @property
    def location(self) -> str:
        """'container/path/prefix' without the prefix's last dot: what --ckpt-key names."""
        parts = [str(c) for c in self.container] + ([self.prefix[:-1]] if self.prefix else [])
        return "/".join(parts) if parts else "(top level)"

    @property
    def parts(self) -> list:
        """The location's single names (container keys and the prefix's dotted parts)."""
        return [str(c) for c in self.container] + [p for p in self.prefix.split(".") if p]

    @property
    def parameters(self) -> int:
        """Learnable parameters (convolution and BatchNorm weights and biases; not the running statistics)."""
        return sum(v.numel() for k, v in self.state.items() if k.endswith((".weight", ".bias")))

    def score(self) -> float:
        """How close a non-fitting candidate comes: the share of the expected tensors it holds."""
        if self.spec is None:
            return 0.0
        expected = [k for k in self.spec.shapes() if not k.endswith("num_batches_tracked")]
        return sum(k in self.state for k in expected) / max(1, len(expected))


def tensor_dicts(obj, path=(), seen=None):
    """(path, dict) for every dict in `obj` with at least one tensor value under a string key."""
    seen = set() if seen is None else seen
    if id(obj) in seen or len(path) > MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        if any(isinstance(k, str) and is_tensor(v) for k, v in obj.items()):
            yield path, obj
        for k, v in obj.items():
            if isinstance(v, (dict, list, tuple)):
                yield from tensor_dicts(v, path + (k,), seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            if isinstance(v, (dict, list, tuple)):
                yield from tensor_dicts(v, path + (i,), seen)


def find_candidates(obj) -> list:
    """Every (container, prefix, scheme) where a ResNet may sit, analysed; in file order."""
    out = []
    for path, d in tensor_dicts(obj):
        found = {}
        for key, value in d.items():
            if not isinstance(key, str) or not is_tensor(value):
                continue
            for scheme in SCHEMES:
                m = scheme.anchor.search(key)
                if m:
                    found.setdefault((key[:m.start(1)], scheme.name), scheme)
        for (prefix, _), scheme in found.items():
            under = {k[len(prefix):]: v for k, v in d.items()
                     if isinstance(k, str) and k.startswith(prefix) and is_tensor(v)}
            backbone, other, unplaced = scheme.to_torchvision(under)
            spec, problems = analyse(backbone)
            if unplaced:
                problems = problems + [f"{len(unplaced)} the {scheme.name} names cannot place "
                                       f"({', '.join(unplaced[:3])}{' ...' if len(unplaced) > 3 else ''})"]
            keys = [prefix + k for k in under if k not in other]
            out.append(Candidate(path, prefix, scheme, backbone, spec, problems, other, keys))
    return out


MOMENTUM = re.compile(r"^(momentum_.*|.*_momentum|.*momentum_encoder|ema_.*|.*_ema|encoder_k|key_.*|.*_k|target.*|"
                      r".*_target|teacher.*|.*_teacher|model_t|.*_t)$")


def is_momentum_copy(c: Candidate) -> bool:
    """Named as a method's momentum (EMA) network: MoCo's encoder_k, BYOL's target, solo-learn's
    momentum_backbone, lightly's teacher_backbone, PyContrast's model_ema, W-MSE's model_t, OBoW's
    feature_extractor_teacher, mmselfsup's encoder_k / target_net, this suite's target."""
    return any(MOMENTUM.match(p) for p in c.parts)


def same_tensors(a: Candidate, b: Candidate) -> bool:
    """Equal tensors (False when only shapes were read)."""
    import torch

    return a.state.keys() == b.state.keys() and all(
        isinstance(v, torch.Tensor) and isinstance(b.state[k], torch.Tensor) and torch.equal(v, b.state[k])
        for k, v in a.state.items())


def distinguishing_part(chosen: Candidate, others: list):
    """The first name in the chosen candidate's location that the other fitting candidates lack (DINO's
    'teacher', this suite's 'online', MoCo's 'encoder_q'), or None when it is the only one."""
    if not others:
        return None
    for p in chosen.parts:
        if all(p not in o.parts for o in others):
            return p
    return chosen.location


def matches_key(c: Candidate, key: str) -> bool:
    """--ckpt-key KEY names a candidate by its location, or by a run of consecutive names in it
    ('teacher', 'module.encoder_k', 'state_dict/momentum_backbone')."""
    if key.strip("/.") == c.location:
        return True
    wanted = [p for p in re.split(r"[/.]", key) if p]
    names = c.parts
    return bool(wanted) and any(names[i:i + len(wanted)] == wanted for i in range(len(names) - len(wanted) + 1))
