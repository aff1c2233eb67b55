"""Finding Vision Transformers in a checkpoint by structure, and each releasing project's way of saving them.

Wherever a dict of the file holds `...patch_embed.proj.weight`, the tensors under that prefix are renamed to
timm's names (DINOv2's `register_tokens`, `mlp.w12`/`mlp.w3` and chunked `blocks.C.N.`; everything else already
uses timm's names) and analysed (`backbones.vit.analyse`). The release is told by the file's structure:

- DINO (facebookresearch/dino main_dino.py, utils.save_on_master): {'student', 'teacher', 'optimizer', 'epoch',
  'args', 'dino_loss', 'fp16_scaler'}; the teacher's `backbone.` is evaluated (eval_linear.py / eval_knn.py
  --checkpoint_key teacher); its backbone-only release is a flat timm-named dict (told from timm's by the file
  name dino_*, or --ckpt-format dino).
- iBOT (bytedance/ibot main_ibot.py): the same with 'ibot_loss'; its checkpoint_teacher.pth holds the teacher,
  flat or under 'state_dict'.
- MoCo v3 (facebookresearch/moco-v3 main_moco.py): {'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'} with
  module.base_encoder (its `head` is the projection MLP), module.momentum_encoder, module.predictor; the DeiT
  conversion (convert_to_deit.py) {'model': base_encoder without head}. Its position table is MoCo v3's fixed
  2-D sin-cos one, which tells it from MAE's.
- MAE (facebookresearch/mae main_pretrain.py, util/misc.py save_model): {'model', 'optimizer', 'epoch',
  'scaler', 'args'} with decoder_* and mask_token beside the encoder; the released encoder {'model'}; its table
  is MAE's fixed sin-cos one.
- DINOv2 (facebookresearch/dinov2 hub backbones, dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth): a flat dict with
  LayerScale (ls1.gamma), mask_token, patch 14, position embeddings for 518 px (37 x 37 + 1), register_tokens.
- timm (huggingface/pytorch-image-models): a VisionTransformer state dict, with or without `head`.
"""
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from backbones.discovery import tensor_dicts
from backbones.reading import is_tensor
from backbones.vit import HEADS, POS_RULES, analyse, sincos_mae, sincos_mocov3
from core.cli import UserError

ANCHOR = re.compile(r"(?:^|\.)(patch_embed\.proj\.weight)$")
BACKBONE = re.compile(r"^(cls_token|pos_embed|reg_token|register_tokens|patch_embed\..+|blocks\..+|norm\..+)$")
RELEASE_NAMES = ("dino", "ibot", "mocov3", "mae", "dinov2", "timm")
PROJECTS = {
    "dino": "facebookresearch/dino (main_dino.py utils.save_on_master; backbone-only releases dino_*_pretrain.pth)",
    "ibot": "bytedance/ibot (main_ibot.py; checkpoint_teacher.pth)",
    "mocov3": "facebookresearch/moco-v3 (main_moco.py save_checkpoint; convert_to_deit.py)",
    "mae": "facebookresearch/mae (main_pretrain.py, util/misc.py save_model; mae_pretrain_vit_*.pth)",
    "dinov2": "facebookresearch/dinov2 (hub backbones dinov2_vit*14[_reg4]_pretrain.pth)",
    "timm": "huggingface/pytorch-image-models (VisionTransformer state dict)",
}


@dataclass
class ViTCandidate:
    container: tuple
    prefix: str
    state: dict  # backbone tensors under timm names (pos_embed as the file holds it; registers folded)
    spec: object
    problems: list
    keys: list = field(default_factory=list)  # the file keys taken
    renamed: list = field(default_factory=list)  # what was renamed, for --inspect

    @property
    def fits(self):
        return self.spec is not None and not self.problems

    @property
    def parts(self):
        return [str(c) for c in self.container] + [p for p in self.prefix.split(".") if p]

    @property
    def location(self):
        """'container/path/prefix' without the prefix's last dot, as for ResNets (what --ckpt-key names)."""
        parts = [str(c) for c in self.container] + ([self.prefix[:-1]] if self.prefix else [])
        return "/".join(parts) or "(top level)"

    @property
    def parameters(self):
        return sum(math.prod(v.shape) for v in self.state.values())


def to_timm(under: dict):
    """(backbone under timm names, file keys taken, notes on renaming) for the tensors under one prefix."""
    out, taken, notes = {}, [], []
    for k, v in under.items():
        if not BACKBONE.match(k):
            continue
        name = k
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.+)$", k)  # DINOv2 training checkpoints: block_chunks
        if m:
            name = f"blocks.{m.group(2)}.{m.group(3)}"
        name = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", name)  # DINOv2 SwiGLU (timm _convert_dinov2)
        name = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", name)
        out[name] = v
        taken.append(k)
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in taken):
        notes.append("chunked blocks (blocks.C.N.) renumbered")
    if "blocks.0.mlp.fc1.weight" in out and any(".mlp.w12." in k for k in taken):
        notes.append("SwiGLU w12/w3 named fc1/fc2 (timm SwiGLUPacked)")
    if "register_tokens" in out:
        reg = out.pop("register_tokens")
        out["reg_token"] = reg
        if "cls_token" in out and "pos_embed" in out:
            pos = out["pos_embed"]
            if hasattr(pos, "dim"):  # real tensors (not shapes only)
                out["cls_token"] = out["cls_token"] + pos[:, :1]
                out["pos_embed"] = pos[:, 1:]
            else:
                from backbones.reading import TensorInfo

                out["pos_embed"] = TensorInfo((pos.shape[0], pos.shape[1] - 1, pos.shape[2]), pos.dtype)
        notes.append("register_tokens as reg_token, the class token's position added to it (DINOv2 registers "
                     "take no position; timm _convert_dinov2)")
    return out, taken, notes


def find_vits(obj) -> list:
    out = []
    for path, d in tensor_dicts(obj):
        prefixes = []
        for key, value in d.items():
            if isinstance(key, str) and is_tensor(value):
                m = ANCHOR.search(key)
                if m and key[:m.start(1)] not in prefixes:
                    prefixes.append(key[:m.start(1)])
        for prefix in prefixes:
            under = {k[len(prefix):]: v for k, v in d.items()
                     if isinstance(k, str) and k.startswith(prefix) and is_tensor(v)}
            state, taken, notes = to_timm(under)
            spec, problems = analyse(state)
            out.append(ViTCandidate(path, prefix, state, spec, problems, [prefix + k for k in taken], notes))
    return out


# ---- which project ------------------------------------------------------------------------------------

def _keys(obj):
    return set(obj) if isinstance(obj, dict) else set()


def _table_matches(c: ViTCandidate, make) -> bool:
    pos = c.state.get("pos_embed")
    if not hasattr(pos, "dim") or c.spec.pos_prefix != 1:
        return False
    import torch

    ref = make(c.spec.pos_grid, c.spec.embed_dim)
    return bool(torch.allclose(pos[:, 1:].float(), ref, atol=1e-4) and torch.all(pos[:, 0] == 0))


def recognise(obj, fits, path: Path):
    """(release name, why) from the file's structure."""
    keys = _keys(obj)
    if {"student", "teacher"} <= keys:
        if "ibot_loss" in keys:
            return "ibot", "iBOT's training checkpoint (student, teacher, ibot_loss): its teacher is evaluated"
        return "dino", "DINO's training checkpoint (student, teacher, dino_loss): its teacher is evaluated " \
                       "(eval_knn.py / eval_linear.py --checkpoint_key teacher)"
    if any("base_encoder" in c.parts for c in fits):
        return "mocov3", "MoCo v3's training checkpoint (module.base_encoder, module.momentum_encoder, " \
                         "module.predictor): the base encoder is evaluated (main_lincls.py)"
    if any(k.startswith("decoder") for c in fits for k in _container(obj, c.container) if isinstance(k, str)):
        return "mae", "MAE's pretraining checkpoint (decoder_*, mask_token beside the encoder)"
    for c in fits:
        held = _container(obj, c.container)
        dinov2_names = c.prefix + "register_tokens" in held or c.prefix + "mask_token" in held
        if dinov2_names and c.spec.layerscale and c.spec.patch == 14:
            return "dinov2", "DINOv2's layout (patch 14, position embeddings for " + \
                f"{c.spec.pos_grid[0] * 14} px, LayerScale, mask_token" + \
                (", register_tokens" if c.spec.reg_tokens else "") + ")"
    for c in fits:
        if _table_matches(c, sincos_mocov3):
            return "mocov3", "MoCo v3's fixed 2-D sin-cos position table (vits.py), as in its DeiT conversion"
        if _table_matches(c, sincos_mae):
            return "mae", "MAE's fixed 2-D sin-cos position table (util/pos_embed.py)"
    name = path.name.lower()
    if name.startswith("checkpoint_teacher"):
        return "ibot", "iBOT's checkpoint_teacher.pth (the teacher, as iBOT releases it)"
    if name.startswith("dino_") or "_dino_" in name:
        return "dino", "a DINO backbone-only release (the file name dino_*; timm names)"
    return "timm", "timm's VisionTransformer names and a learned position table"


def _container(obj, path):
    for p in path:
        obj = obj[p]
    return obj if isinstance(obj, dict) else {}


def evaluated(release, fits):
    """The candidates the release evaluates when the file holds several."""
    if release in ("dino", "ibot"):
        return [c for c in fits if c.container[:1] == ("teacher",)]
    if release == "mocov3":
        return [c for c in fits if "base_encoder" in c.parts]
    return []


def choose(path, fits, release, why, key=None):
    from backbones.discovery import matches_key

    if key is not None:
        chosen = [c for c in fits if matches_key(c, key)]
        if len(chosen) != 1:
            raise UserError(f"--ckpt-key {key!r} {'matches several' if chosen else 'matches none'} of the ViTs in "
                            f"checkpoint {path} ({', '.join(c.location for c in (chosen or fits))}); give one of "
                            "these locations")
        return chosen[0], f"chosen with --ckpt-key {key}"
    if len(fits) == 1:
        return fits[0], "the only ViT in the file"
    chosen = evaluated(release, fits)
    if len(chosen) == 1:
        return chosen[0], why
    raise UserError(f"checkpoint {path} holds {len(fits)} ViTs ({', '.join(c.location for c in fits)}) and nothing "
                    "in it says which one its project evaluates; choose one with --ckpt-key")


def pos_rule(release, spec) -> str:
    if release == "dinov2":
        return "dinov2-reg" if spec.reg_tokens else "dinov2"
    return {"dino": "dino", "ibot": "dino", "mocov3": "mocov3", "mae": "mae"}.get(release, "timm")


def heads_for(release, spec, forced=None):
    """(heads, source) from the release's own architecture definition (HEADS), or --set vit_heads."""
    if forced is not None:
        if spec.embed_dim % forced:
            raise UserError(f"--set vit_heads={forced} does not divide the width {spec.embed_dim}")
        return forced, "--set vit_heads"
    table = HEADS.get(release) or HEADS["timm"]
    if spec.embed_dim in table:
        return table[spec.embed_dim], f"{release} defines {spec.size or spec.embed_dim} with {table[spec.embed_dim]}"
    if spec.embed_dim in HEADS["timm"]:
        return HEADS["timm"][spec.embed_dim], f"timm's vit_{spec.size} ({release} defines no such width)"
    raise UserError(f"no project defines a ViT of width {spec.embed_dim}; give its heads with --set vit_heads=N")


def spec_of(info):
    """The ViTSpec of a loaded Checkpoint's tensors."""
    return analyse(info.state_dict)[0]


# ---- the entry points -----------------------------------------------------------------------------------

def resolve_vit(path: Path, content, fits, format_name=None, key=None, settings=None, with_sha=True):
    """The Checkpoint of the ViT a project evaluates in the file (fits: its complete ViT candidates)."""
    from backbones.checkpoints import Checkpoint, InputSettings, _normalization
    from backbones.load_report import load_report
    from core.files import sha256_of

    settings = settings or InputSettings()
    if format_name is not None:
        if format_name not in RELEASE_NAMES:
            raise UserError(f"unknown ViT checkpoint format {format_name!r}; known: {', '.join(RELEASE_NAMES)}")
        release, why = format_name, f"--ckpt-format {format_name}"
        if evaluated(release, fits):
            why += "; " + {"dino": "the teacher", "ibot": "the teacher", "mocov3": "the base encoder"}[release]
    else:
        release, why = recognise(content.obj, fits, path)
    chosen, because = choose(path, fits, release, why, key)
    spec = chosen.spec
    heads, heads_source = heads_for(release, spec, settings.vit_heads)
    rule = pos_rule(release, spec)
    norm, norm_text = _normalization(settings.normalize, None)
    if norm is None:
        norm_text = "ImageNet mean/std (the ViT evaluation input of DINO, DINOv2, MAE: backbones.families)"
    import torch

    state = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in chosen.state.items()}
    expected = len(state)  # analyse() checked them against timm's model: every tensor present, none extra
    report = load_report(content.obj, chosen.container, chosen.prefix, set(chosen.keys), expected, len(state))
    changed = {k: v for k, v in vars(settings).items() if v != getattr(InputSettings(), k)}
    vit = {"heads": heads, "heads_source": heads_source, "ln_eps": 1e-6, "qkv_bias": spec.qkv_bias,
           "layerscale": spec.layerscale, "registers": spec.reg_tokens, "patch": spec.patch,
           "width": spec.embed_dim, "depth": spec.depth, "file_grid": list(spec.pos_grid), "pos_rule": rule,
           "pos_rule_source": POS_RULES[rule], "renamed": chosen.renamed}
    notes = {"architecture": f"{spec.describe()}; {heads} heads ({heads_source}), LayerNorm eps 1e-6"}
    return Checkpoint(
        state_dict=state, path=str(path.resolve()), sha256=sha256_of(path) if with_sha else None,
        format=release, part=None, dropped={}, input_normalization=norm, notes=notes, key=chosen.location,
        prefix=chosen.prefix, scheme="timm-vit", arch=spec.name(), project=PROJECTS[release],
        chosen_because=because if because != why else why, normalization=norm_text,
        candidates=[{"location": c.location, "scheme": "timm-vit", "arch": c.spec.name(), "parameters": c.parameters}
                    for c in fits],
        foreign=content.foreign, settings=changed, family="vit", release=release, load_report=report, vit=vit)


def vit_lines(path, content, format_name=None, key=None, settings=None) -> list:
    """--inspect's lines for a file whose networks are ViTs."""
    cands = find_vits(content.obj)
    fits = [c for c in cands if c.fits]
    if not fits:
        lines = ["ViTs found: none complete"]
        for c in cands[:3]:
            lines.append(f"  closest: {c.location}  {c.spec.describe() if c.spec else '-'}; lacks "
                         f"{', '.join(c.problems)}")
        return lines
    if not all(hasattr(v, "dim") for c in fits for v in c.state.values()):
        from backbones.reading import read_file

        content = read_file(path)  # position tables tell MoCo v3 from MAE: their values are read
        fits = [c for c in find_vits(content.obj) if c.fits]
    lines = [f"ViTs found ({len(fits)}):"]
    try:
        info, error = resolve_vit(Path(path), content, fits, format_name, key, settings, with_sha=False), None
    except UserError as e:
        info, error = None, str(e)
    for c in fits:
        used = info is not None and c.location == info.key
        lines.append(f"  {'*' if used else ' '} {c.location}  file path {'/'.join(map(str, c.container)) or '-'}, "
                     f"prefix {c.prefix or '-'}, timm names{' (' + '; '.join(c.renamed) + ')' if c.renamed else ''}, "
                     f"{c.spec.name()}: {c.spec.describe()}, {c.parameters / 1e6:.2f}M parameters")
    if info is None:
        lines.append(f"would use: none ({error})")
        return lines
    from backbones.load_report import describe

    lines.append(f"would use: {info.key} ({info.chosen_because})")
    lines.append(f"release: {info.release} ({info.project})")
    lines.append(f"architecture: {info.notes['architecture']}")
    lines.append(f"position embeddings: {info.vit['pos_rule_source']}")
    lines.append(f"input: {info.normalization}")
    lines.append(f"load: {describe(info.load_report)}")
    return lines
