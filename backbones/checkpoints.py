"""Checkpoint files -> an encoder (a ResNet here; a Vision Transformer through `backbones.vit_layouts`), strictly
and safely.

A file is read without running anything in it (`backbones.reading`), its ResNets are found by structure
(`backbones.discovery`), one is chosen by the convention of the project that saved it (`backbones.releases`)
or by `--ckpt-key`, and the record says which, why, under which names, and how the input is prepared.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from backbones.load_report import load_report
from backbones.discovery import (Candidate, distinguishing_part, find_candidates, is_momentum_copy, matches_key,
                                 same_tensors, tensor_dicts)
from backbones.reading import FileContent, foreign_name, plain, read_file
from backbones.releases import NO_NORMALIZATION, RELEASE_NAMES, by_name, recognise
from backbones.resnet import STEM_NAMES, TIMM_DEEP, build_backbone, infer_arch, load_into, summarise_keys  # noqa: F401
from core.cli import UserError
from core.files import sha256_of
from core.settings import setting

CIFAR = ("cifar10", "cifar100", "cifar-10", "cifar-100")


@dataclass(frozen=True)
class InputSettings:
    """How the chosen weights are run, where the file alone may not say (`--set KEY=VALUE` of evaluate/run.py)."""

    normalize: str = setting("auto", "auto: the release's own where it differs from the task's (SimCLR v1/v2 "
                                     "conversions: none, RGB in [0, 1]), else each task's protocol mean/std; or "
                                     "imagenet, none, 'mean,std' or 'm1,m2,m3,s1,s2,s3'")
    maxpool: Optional[bool] = setting(None, "auto (none): the stem's max-pool is kept unless the file's metadata (or "
                                            "its project's code) says the model is a CIFAR one; true or false")
    stem_padding: Optional[int] = setting(None, "auto (none): padding of a 3x3 stem, 2 for solo-learn "
                                                "(solo/methods/base.py), 1 otherwise (W-MSE model.py); 1 or 2")
    vit_heads: Optional[int] = setting(None, "auto (none): a ViT's attention heads from its releasing project's "
                                             "architecture definition (backbones.vit.HEADS); or a number")


@dataclass
class Checkpoint:
    """A backbone state dict (None for a random encoder) and what is known about where it came from."""

    state_dict: dict
    path: str
    sha256: str
    format: str  # the release that saved it (backbones.releases), or the naming scheme when none is known
    part: str = None  # the name that sets the chosen network apart from the file's others ('teacher', 'online')
    dropped: dict = field(default_factory=dict)  # group -> number of tensors not taken
    input_normalization: tuple = None  # (mean, std) the weights expect, when not the task protocol's
    notes: dict = field(default_factory=dict)
    pretraining: dict = None  # this suite's pretraining settings, when the checkpoint carries them
    resnet: "ResNetInput" = None  # the ResNet family's input settings (None for other families)
    key: str = None  # location of the chosen ResNet in the file (container path / prefix)
    prefix: str = None
    scheme: str = None
    arch: str = None
    project: str = None
    chosen_because: str = None
    normalization: str = "the task protocol's mean/std"
    candidates: list = field(default_factory=list)  # every fitting ResNet: location, scheme, arch, parameters
    foreign: list = field(default_factory=list)  # classes and functions read as inert placeholders
    settings: dict = field(default_factory=dict)  # --set values that changed how the weights run
    family: str = "resnet"  # backbones.families.FAMILIES
    release: str = None  # the releasing project when known (ViTs: dino, ibot, mocov3, mae, dinov2, timm)
    load_report: dict = None  # backbones.load_report: tensors loaded / expected, unused file tensors by group
    vit: dict = None  # the ViT family's settings (heads, position rule, token grids), None for other families

    @property
    def stem(self):
        return self.resnet.stem if self.resnet else None

    @property
    def maxpool(self):
        return self.resnet.maxpool if self.resnet else None

    @property
    def stem_padding(self):
        return self.resnet.stem_padding if self.resnet else None

    @property
    def cache_id(self) -> str:
        """What the features of this encoder depend on besides the transform: file, network taken, and the
        family's settings (a ResNet's stem; a ViT's heads and position rule)."""
        if not self.sha256:
            return self.path
        if self.family == "vit":
            return f"{self.sha256}|{self.key}|vit|{self.vit['heads']}|{self.vit['pos_rule']}"
        return f"{self.sha256}|{self.key}|{self.stem}|{self.maxpool}|{self.stem_padding}"

    def describe(self) -> dict:
        """The record's `checkpoint` section."""
        out = {"path": self.path, "sha256": self.sha256, "format": self.format, "project": self.project,
               "family": self.family, "release": self.release, "load": self.load_report,
               "key": self.key, "prefix": self.prefix, "scheme": self.scheme, "arch": self.arch,
               "part": self.part, "chosen_because": self.chosen_because, "candidates": self.candidates}
        if self.resnet is not None:
            out.update(stem=self.stem, maxpool=self.maxpool, stem_padding=self.stem_padding)
        if self.vit is not None:
            out["vit"] = self.vit
        out.update({"normalization": self.normalization, "input_normalization": self.input_normalization,
                    "dropped": self.dropped, "notes": self.notes, "foreign": self.foreign, "settings": self.settings,
                    "pretraining": self.pretraining})
        return out


@dataclass(frozen=True)
class ResNetInput:
    """How a ResNet's stem runs (backbones.resnet.STEMS), where the weights alone may not say."""

    stem: str = "torchvision"
    maxpool: bool = True
    stem_padding: int = 1


# ---- which ResNet --------------------------------------------------------------------------------------

def _closest(candidates, limit=3):
    best = sorted(candidates, key=lambda c: -c.score())[:limit]
    return "; ".join(f"{c.location} ({c.scheme.name} names{', ' + c.arch if c.arch else ''}) lacks "
                     f"{', '.join(c.problems)}" for c in best)


def no_resnet_error(path, content: FileContent, candidates) -> UserError:
    if not candidates:
        return UserError(f"checkpoint {path} holds no ResNet or ViT in a known naming scheme (no tensor is named "
                         "like a residual block's first convolution or a patch embedding; top-level keys: "
                         f"{summarise_keys(content.obj)})")
    return UserError(f"checkpoint {path} holds no complete ResNet; the closest: {_closest(candidates)}")


def choose(path, fits, release, key=None):
    """(chosen candidate, why)."""
    if key is not None:
        chosen = [c for c in fits if matches_key(c, key)]
        if len(chosen) != 1:
            listed = ", ".join(c.location for c in (chosen or fits))
            raise UserError(f"--ckpt-key {key!r} {'matches several' if chosen else 'matches none'} of the ResNets in "
                            f"checkpoint {path} ({listed}); give one of these locations")
        return chosen[0], f"chosen with --ckpt-key {key}"
    if len(fits) == 1:
        return fits[0], "the only ResNet in the file"
    if release is not None and release.evaluates is not None:
        chosen = [c for c in fits if release.evaluates(c)]
        if len(chosen) == 1:
            return chosen[0], release.why
    online = [c for c in fits if not is_momentum_copy(c)]
    if len(online) == 1:
        others = [c.location for c in fits if c is not online[0]]
        return online[0], (f"the online network; {', '.join(others)} {'is' if len(others) == 1 else 'are'} named "
                           "as momentum (moving-average) copies")
    if all(same_tensors(fits[0], c) for c in fits[1:]):
        return fits[0], "the file's ResNets hold the same tensors"
    raise UserError(f"checkpoint {path} holds {len(fits)} ResNets ({', '.join(c.location for c in fits)}) and "
                    "nothing in it says which one its project evaluates; choose one with --ckpt-key")


def _forced_release(name, obj, fits):
    releases = by_name(name)
    if not releases:
        raise UserError(f"unknown checkpoint format {name!r}; known formats: {', '.join(RELEASE_NAMES)}")
    for r in releases:
        if r.detect(obj, fits) or r.evaluates is None or any(r.evaluates(c) for c in fits):
            return r
    raise UserError(f"the checkpoint is not laid out as format {name!r} ({releases[0].project})")


def dropped_groups(obj, chosen: Candidate) -> dict:
    """Tensors of the file not taken, counted by where they sit (container, then names as deep as the prefix)."""
    taken = set(chosen.keys)
    depth = chosen.prefix.count(".")
    out = {}
    for path, d in tensor_dicts(obj):
        common = 0
        while common < min(len(path), len(chosen.container)) and path[common] == chosen.container[common]:
            common += 1
        for k, v in d.items():
            if not isinstance(k, str) or not hasattr(v, "shape") or (path == chosen.container and k in taken):
                continue
            if v.ndim == 0 and not k.endswith("num_batches_tracked"):
                continue  # a scalar beside the weights (MoCo's best_acc1), not a weight
            parts = k.split(".")
            head = parts[:depth + 1] if path == chosen.container and k.startswith(chosen.prefix) else \
                parts[:max(1, depth)]
            # beside the chosen network: container and names; further away: the container one level below
            # what it shares with the chosen one (optimizer, classy_state_dict.base_model.model.heads)
            names = list(path) + head if len(path) <= common + 1 else list(path[:common + 1])
            group = ".".join(map(str, names))
            out[group] = out.get(group, 0) + 1
    return dict(sorted(out.items()))


# ---- how to run it -------------------------------------------------------------------------------------

def metadata_dataset(obj, path: Path):
    """(dataset name, where) from the file's own metadata (Lightning hyper_parameters, argparse args, configs),
    or from solo-learn's args.json beside it (solo/utils/checkpointer.py save_args); (None, None) if none."""
    def search(node, where, depth=0):
        if depth > 12:
            return None
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "dataset" and isinstance(v, str):
                    return v, f"{where}.{k}"
            for k, v in node.items():
                if isinstance(v, (dict, list)) and not (isinstance(v, dict) and any(hasattr(x, "shape")
                                                                                     for x in v.values())):
                    found = search(v, f"{where}.{k}", depth + 1)
                    if found:
                        return found
        elif isinstance(node, list):
            for i, v in enumerate(node[:50]):
                found = search(v, f"{where}[{i}]", depth + 1)
                if found:
                    return found
        return None

    if isinstance(obj, dict):
        meta = {k: plain(v) for k, v in obj.items() if not (isinstance(v, dict) and any(
            hasattr(x, "shape") for x in v.values()))}
        found = search(meta, "file")
        if found:
            return found
    sidecar = path.parent / "args.json"
    if sidecar.is_file():
        try:
            found = search(json.loads(sidecar.read_text()), sidecar.name)
        except (OSError, ValueError):
            found = None
        if found:
            return found
    return None, None


def _normalization(value: str, release):
    """(mean, std) or None (the task's), and the record's description."""
    if value == "auto":
        if release is not None and release.normalization is not None:
            return release.normalization, f"{_describe_norm(release.normalization)}: {release.normalization_source}"
        return None, "the task protocol's mean/std"
    if value == "imagenet":
        from datasets.views import IMAGENET_MEAN, IMAGENET_STD

        return (IMAGENET_MEAN, IMAGENET_STD), "ImageNet mean/std (--set normalize=imagenet)"
    if value == "none":
        return NO_NORMALIZATION, "none, RGB in [0, 1] (--set normalize=none)"
    try:
        numbers = [float(x) for x in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 6):
        raise UserError(f"--set normalize={value}: give auto, imagenet, none, 'mean,std' or 'm1,m2,m3,s1,s2,s3'")
    mean, std = (tuple(numbers[:1] * 3), tuple(numbers[1:] * 3)) if len(numbers) == 2 else \
        (tuple(numbers[:3]), tuple(numbers[3:]))
    if any(s <= 0 for s in std):
        raise UserError(f"--set normalize={value}: the standard deviations must be positive")
    return (mean, std), f"mean {mean}, std {std} (--set normalize={value})"


def _describe_norm(norm):
    return "none, RGB in [0, 1]" if norm == NO_NORMALIZATION else f"mean {norm[0]}, std {norm[1]}"


def _stem_settings(spec, release, obj, path, settings: InputSettings, notes: dict):
    """(max-pool, 3x3 stem padding) and why."""
    dataset, where = metadata_dataset(obj, path)
    cifar = isinstance(dataset, str) and dataset.lower() in CIFAR
    maxpool, padding, why = True, 1, "kept"
    if spec.stem == "3x3":
        if release is not None and release.small_stem is not None:
            maxpool, padding, why = release.small_stem
        elif cifar:
            maxpool, why = False, f"removed: the file's metadata says {where} = {dataset}, a CIFAR model"
        else:
            why = "kept (W-MSE's STL-10 and Tiny-ImageNet models keep it; --set maxpool=false for a CIFAR one)"
    elif cifar:
        notes["maxpool"] = (f"the metadata says {where} = {dataset}, but the stem is {spec.stem}'s; max-pool kept "
                            "(--set maxpool=false if the model was trained without it)")
    if settings.maxpool is not None:
        maxpool, why = settings.maxpool, f"{'kept' if settings.maxpool else 'removed'} (--set maxpool)"
    if settings.stem_padding is not None:
        if settings.stem_padding not in (1, 2) or spec.stem != "3x3":
            raise UserError("--set stem_padding applies to 3x3 stems only, and is 1 or 2")
        padding = settings.stem_padding
    notes["stem"] = f"{STEM_NAMES[spec.stem]}" + (f", padding {padding}" if spec.stem == "3x3" else "") + \
        f"; max-pool {why}"
    return maxpool, padding


# ---- the entry points ----------------------------------------------------------------------------------

def discover(path, shapes_only=False):
    content = read_file(path, shapes_only)
    candidates = find_candidates(content.obj)
    return content, candidates, [c for c in candidates if c.fits]


def load_checkpoint(path, format_name=None, part=None, key=None, settings: InputSettings = None) -> Checkpoint:
    """Read `path`, find its networks (ResNets, else ViTs), choose one, and say how to run it. `part` is the
    older name of `key`."""
    if part is not None and key is not None and part != key:
        raise UserError("give --ckpt-key or --ckpt-part, not both")
    key = key if key is not None else part
    content, candidates, fits = discover(path)
    if not fits:
        from backbones.vit_layouts import find_vits, resolve_vit

        vits = find_vits(content.obj)
        vit_fits = [c for c in vits if c.fits]
        if vit_fits:
            return resolve_vit(Path(path), content, vit_fits, format_name, key, settings)
        if vits and not candidates:
            c = vits[0]
            raise UserError(f"checkpoint {path} holds no complete ViT; the closest: {c.location} "
                            f"({c.spec.describe() if c.spec else 'timm names'}) lacks {', '.join(c.problems)}")
    if settings is not None and settings.vit_heads is not None:
        raise UserError("--set vit_heads applies to ViTs, and this checkpoint holds a ResNet")
    return _resolve(Path(path), content, candidates, fits, format_name, key, settings)


def _resolve(path, content, candidates, fits, format_name, key, settings, with_sha=True) -> Checkpoint:
    settings = settings or InputSettings()
    if not fits:
        raise no_resnet_error(path, content, candidates)
    obj = content.obj
    release = _forced_release(format_name, obj, fits) if format_name else recognise(obj, fits)
    chosen, why = choose(path, fits, release, key)
    notes = dict(release.notes) if release else {}
    maxpool, padding = _stem_settings(chosen.spec, release, obj, path, settings, notes)
    norm, norm_text = _normalization(settings.normalize, release)
    state = {k: v.float() if hasattr(v, "is_floating_point") and v.is_floating_point() else v
             for k, v in chosen.state.items()}
    changed = {k: v for k, v in vars(settings).items() if v != getattr(InputSettings(), k)}
    expected = [k for k in chosen.spec.shapes() if not k.endswith("num_batches_tracked")]
    report = load_report(obj, chosen.container, chosen.prefix, set(chosen.keys), len(expected),
                         sum(k in chosen.state for k in expected))
    return Checkpoint(
        state_dict=state, path=str(path.resolve()), sha256=sha256_of(path) if with_sha else None,
        format=release.name if release else chosen.scheme.name,
        part=distinguishing_part(chosen, [c for c in fits if c is not chosen]), dropped=dropped_groups(obj, chosen),
        input_normalization=norm, notes=notes, pretraining=pretraining_settings(path, obj),
        resnet=ResNetInput(chosen.spec.stem, maxpool, padding), key=chosen.location, prefix=chosen.prefix, scheme=chosen.scheme.name,
        arch=chosen.arch, project=release.project if release else None, chosen_because=why, normalization=norm_text,
        candidates=[{"location": c.location, "scheme": c.scheme.name, "arch": c.arch, "parameters": c.parameters}
                    for c in fits],
        foreign=content.foreign, settings=changed, family="resnet", release=release.name if release else None,
        load_report=report)


def pretraining_settings(path: Path, obj) -> dict:
    """This suite's pretraining config, from last.pth itself or the config.yaml beside an exported backbone.

    The result tables use it to place a checkpoint in the paper's rows (method, K, λ_s, λ_b, ...).
    """
    import yaml

    config = obj.get("config") if isinstance(obj, dict) and obj.get("format") == "ssl-suite-pretrain" else None
    sidecar = path.parent / "config.yaml"
    if config is None and sidecar.is_file() and (path.parent / "last.pth").is_file():
        try:
            config = yaml.safe_load(sidecar.read_text())
        except yaml.YAMLError:
            config = None
    if not isinstance(config, dict) or "loss" not in config:
        return None
    keys = ("dataset", "arch", "views", "loss", "lambda_s", "lambda_b", "head_norm", "batch_size", "epochs",
            "max_steps", "svl_normalize", "method", "stem", "view_forward")
    return {k: config.get(k) for k in keys}


def make_encoder(ckpt_arg: str, arch=None, seed=0, format_name=None, part=None, key=None,
                 settings: InputSettings = None):
    """`--ckpt` (a path or 'random') -> (backbone module in eval mode, Checkpoint, arch name)."""
    import torch

    if ckpt_arg == "random":
        if format_name or part or key:
            raise UserError("--ckpt random has no file: drop --ckpt-format, --ckpt-key and --ckpt-part")
        arch = arch or "resnet50"
        settings = settings or InputSettings()
        if arch.startswith("vit_"):
            return _random_vit(arch, seed, settings)
        if settings.stem_padding is not None:
            raise UserError("--set stem_padding applies to 3x3 stems, and a random encoder has torchvision's")
        torch.manual_seed(seed)
        stem = "deep" if arch in TIMM_DEEP else "torchvision"
        maxpool = True if settings.maxpool is None else settings.maxpool
        model = build_backbone(arch, stem, maxpool)
        norm, norm_text = _normalization(settings.normalize, None)
        info = Checkpoint(None, f"random:{arch}:seed{seed}", None, "random", resnet=ResNetInput(stem, maxpool),
                          arch=arch, input_normalization=norm, normalization=norm_text,
                          settings={k: v for k, v in vars(settings).items() if v != getattr(InputSettings(), k)})
    else:
        info = load_checkpoint(ckpt_arg, format_name, part, key, settings)
        if info.family == "vit":
            from backbones.vit import encoder_from_state
            from backbones.vit_layouts import spec_of

            if arch is not None and not arch.startswith(info.arch):
                raise UserError(f"the checkpoint holds a {info.arch} ({info.notes['architecture']}); --arch {arch} "
                                "does not fit it")
            model = encoder_from_state(info.state_dict, spec_of(info), info.vit["heads"], info.vit["pos_rule"])
            return model.eval(), info, arch or info.arch
        arch = arch or info.arch
        model = build_backbone(arch, info.stem, info.maxpool, info.stem_padding)
        load_into(model, info.state_dict, arch)
    return model.eval(), info, arch


def _random_vit(arch, seed, settings):
    """timm's randomly initialised `arch`, as a ViTEncoder (its position table resized by timm's rule)."""
    import torch

    from backbones.vit import random_vit

    if settings.maxpool is not None or settings.stem_padding is not None:
        raise UserError("--set maxpool and stem_padding apply to ResNets, not to a ViT")
    model = random_vit(arch, seed)
    norm, norm_text = _normalization(settings.normalize, None)
    v = model.vit
    info = Checkpoint(None, f"random:{arch}:seed{seed}", None, "random", arch=arch, input_normalization=norm,
                      normalization=norm_text if norm else "ImageNet mean/std (backbones.families.eval_transform)",
                      settings={k: val for k, val in vars(settings).items() if val != getattr(InputSettings(), k)},
                      family="vit", release=None,
                      vit={"heads": v.blocks[0].attn.num_heads, "heads_source": f"timm's {arch}", "ln_eps": 1e-6,
                           "qkv_bias": v.blocks[0].attn.qkv.bias is not None, "layerscale": not isinstance(
                               v.blocks[0].ls1, torch.nn.Identity), "registers": v.num_reg_tokens,
                           "patch": model.patch, "width": v.embed_dim, "depth": len(v.blocks),
                           "file_grid": list(v.patch_embed.grid_size), "pos_rule": "timm",
                           "pos_rule_source": "timm's resample_abs_pos_embed (bicubic, antialias)", "renamed": []})
    return model.eval(), info, arch


# ---- --inspect -----------------------------------------------------------------------------------------

def _value_summary(v) -> str:
    name = foreign_name(v)
    if name is not None:
        return f"{name} (read as a placeholder)"
    if hasattr(v, "shape"):
        return f"tensor {tuple(v.shape)}"
    if isinstance(v, dict):
        tensors = sum(hasattr(x, "shape") for x in v.values())
        return f"dict of {len(v)}" + (f" ({tensors} tensors)" if tensors else "")
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} of {len(v)}"
    text = repr(v)
    return text if len(text) <= 40 else f"{type(v).__name__} {text[:37]}..."


def inspect_lines(path, format_name=None, key=None, settings: InputSettings = None) -> list:
    """The lines `evaluate/run.py --inspect` prints: what was read, every ResNet found, which would be used."""
    path = Path(path)
    content, candidates, fits = discover(path, shapes_only=True)
    obj = content.obj
    size = path.stat().st_size
    lines = [f"checkpoint: {path} ({size / 1e6:.1f} MB, {content.container})"]
    if isinstance(obj, dict):
        lines.append("top-level keys: " + "; ".join(f"{k}: {_value_summary(v)}" for k, v in list(obj.items())[:20])
                     + (" ..." if len(obj) > 20 else ""))
    if content.foreign:
        lines.append("read as inert placeholders (never imported or run): " + ", ".join(content.foreign))
    if not fits:
        from backbones.vit_layouts import find_vits, vit_lines

        vits = find_vits(obj)
        if vits and (any(c.fits for c in vits) or not candidates):
            return lines + vit_lines(path, content, format_name, key, settings)
    if not fits:
        lines.append("ResNets found: none")
        lines.append(str(no_resnet_error(path, content, candidates)))
        for c in sorted(candidates, key=lambda c: -c.score())[:3]:
            lines.append(f"  closest: {c.location}  {c.scheme.name} names  {c.spec.describe() if c.spec else '-'}  "
                         f"{c.score():.0%} of the tensors; lacks {', '.join(c.problems)}")
        return lines
    lines.append(f"ResNets found ({len(fits)}):")
    try:
        info = _resolve(path, content, candidates, fits, format_name, key, settings, with_sha=False)
    except UserError as e:
        info, error = None, str(e)
    for c in fits:
        used = info is not None and c.location == info.key
        lines.append(f"  {'*' if used else ' '} {c.location}  file path {'/'.join(map(str, c.container)) or '-'}, "
                     f"prefix {c.prefix or '-'}, {c.scheme.name} names, {c.arch} ({c.spec.stem} stem), "
                     f"{c.parameters / 1e6:.2f}M parameters")
    if info is None:
        lines.append(f"would use: none ({error})")
        return lines
    lines.append(f"would use: {info.key} ({info.chosen_because})")
    lines.append(f"release: {info.format}" + (f" ({info.project})" if info.project else ""))
    lines.append(f"stem: {info.notes['stem']}")
    lines.append(f"input normalisation: {info.normalization}")
    if info.dropped:
        lines.append("not taken: " + ", ".join(f"{g} ({n})" for g, n in info.dropped.items()))
    for k, note in info.notes.items():
        if k != "stem":
            lines.append(f"note ({k}): {note}")
    if info.pretraining:
        lines.append(f"this suite's pretraining settings: {info.pretraining}")
    return lines


def resolve_settings(values: dict) -> InputSettings:
    """InputSettings with `--set` values (strings) applied through the one override parser."""
    from core.settings import with_overrides

    out = with_overrides(InputSettings(), values, "--set")
    _normalization(out.normalize, None)  # a bad value stops the run before any work
    return out


SETTING_KEYS = tuple(InputSettings.__dataclass_fields__)
