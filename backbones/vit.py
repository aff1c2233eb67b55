"""Vision Transformers: what a set of weights is (`analyse`: width, depth, patch, tokens, LayerScale, SwiGLU, from
the shapes alone), the timm `VisionTransformer` that runs it, each project's position-embedding rule, and the
feature taps the releasing projects' evaluations read.

The network is always timm's own `VisionTransformer` (timm parameter names), so that detection and finetuning see
one module; what the weights do not hold (attention heads, LayerNorm eps) comes from the releasing project's model
definition (`HEADS`). Position embeddings are kept as the file holds them and resized to each input's token grid
by the releasing project's rule (`POS_RULES`), the way the project does it at every forward (DINO, DINOv2) or when
it loads weights for another size (MAE, timm); MoCo v3's fixed sin-cos table is rebuilt for the grid.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.cli import UserError

# embed_dim -> size name in timm's / the projects' architecture names
SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1536: "giant"}
# Attention heads by project and width: not in the weights, and not the same for one name everywhere.
HEADS = {
    # timm/models/vision_transformer.py vit_{tiny,small,base,large,huge}_patch*, vit_giant_patch14_dinov2
    "timm": {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24},
    # facebookresearch/dino vision_transformer.py vit_tiny/vit_small/vit_base
    "dino": {192: 3, 384: 6, 768: 12},
    # bytedance/ibot models/vision_transformer.py vit_tiny/small/base/large
    "ibot": {192: 3, 384: 6, 768: 12, 1024: 16},
    # facebookresearch/moco-v3 vits.py: vit_small has 12 heads (head dim 32), vit_base 12, large 16, huge 16
    "mocov3": {384: 12, 768: 12, 1024: 16, 1280: 16},
    # facebookresearch/mae models_vit.py / models_mae.py: base 12, large 16, huge 16
    "mae": {768: 12, 1024: 16, 1280: 16},
    # facebookresearch/dinov2 dinov2/models/vision_transformer.py vit_small 6, base 12, large 16, giant2 24
    "dinov2": {384: 6, 768: 12, 1024: 16, 1536: 24},
}
LN_EPS = 1e-6  # every one of these projects: norm_layer=partial(nn.LayerNorm, eps=1e-6)
POS_RULES = {
    "dino": "bicubic with DINO's +0.1 on the scale factor (dino vision_transformer.py interpolate_pos_encoding)",
    "dinov2": "bicubic with the +0.1 offset, no antialias (dinov2 vision_transformer.py interpolate_pos_encoding)",
    "dinov2-reg": "bicubic to the grid size with antialias, no offset (dinov2 hub backbones: "
                  "interpolate_antialias=True, interpolate_offset=0.0 for the _reg models)",
    "mae": "bicubic to the grid size, align_corners=False (mae util/pos_embed.py interpolate_pos_embed)",
    "mocov3": "the fixed 2-D sin-cos table rebuilt for the grid (moco-v3 vits.py "
              "build_2d_sincos_position_embedding)",
    "timm": "timm's resample_abs_pos_embed (bicubic, antialias)",
}


@dataclass(frozen=True)
class ViTSpec:
    """What a ViT's weights (under timm names) say about it."""

    embed_dim: int
    depth: int
    patch: int
    in_chans: int
    mlp_hidden: int  # out features of fc1 (SwiGLU: both halves, gate and value)
    swiglu: bool  # DINOv2 giant: SwiGLU feed-forward (w12 / w3, timm's SwiGLUPacked)
    layerscale: bool  # ls1.gamma / ls2.gamma
    qkv_bias: bool
    class_token: bool
    reg_tokens: int
    pos_grid: tuple  # the token grid the file's position embedding is for
    pos_prefix: int  # position-embedding rows before the patch rows (1: the class token's)
    patch_bias: bool

    @property
    def size(self):
        return SIZES.get(self.embed_dim)

    def name(self, img=None) -> str:
        size = self.size or f"d{self.embed_dim}"
        return f"vit_{size}_patch{self.patch}" + (f"_reg{self.reg_tokens}" if self.reg_tokens else "") + \
            ("_swiglu" if self.swiglu else "") + (f"_{img}" if img else "")

    def describe(self) -> str:
        grid = "x".join(map(str, self.pos_grid))
        return (f"width {self.embed_dim}, {self.depth} blocks, patch {self.patch}, position embeddings for a {grid} "
                f"grid ({self.pos_grid[0] * self.patch} px)" + (f", {self.reg_tokens} registers" if self.reg_tokens
                                                                 else "")
                + (", LayerScale" if self.layerscale else "") + (", SwiGLU" if self.swiglu else ""))


def analyse(state: dict):
    """(spec or None, problems) for tensors under timm's names (backbone only, pos_embed as the file holds it,
    DINOv2 registers as reg_token with the class token's position already added)."""
    w = state.get("patch_embed.proj.weight")
    if w is None or len(w.shape) != 4 or w.shape[-1] != w.shape[-2]:
        return None, ["no square patch embedding (patch_embed.proj.weight)"]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        return None, ["no transformer blocks numbered from 0 (blocks.N)"]
    if "pos_embed" not in state:
        return None, ["no position embedding (pos_embed)"]
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        return None, ["no feed-forward layer in block 0 (mlp.fc1 / mlp.w12)"]
    swiglu = "blocks.0.mlp.fc2.weight" in state and state["blocks.0.mlp.fc2.weight"].shape[1] * 2 == fc1.shape[0]
    hidden = fc1.shape[0]
    class_token = "cls_token" in state
    reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    tokens = state["pos_embed"].shape[1]
    # rows before the patches' (timm: class and register tokens, unless no_embed_class), or none
    prefix = next((p for p in (int(class_token) + reg, 0) if tokens > p and math.isqrt(tokens - p) ** 2 == tokens - p),
                  None)
    if prefix is None:
        return None, [f"position embedding of {tokens} tokens is no square grid"]
    side = math.isqrt(tokens - prefix)
    spec = ViTSpec(dim, len(blocks), patch, in_chans, hidden, swiglu, "blocks.0.ls1.gamma" in state,
                   "blocks.0.attn.qkv.bias" in state, class_token, reg, (side, side), prefix,
                   "patch_embed.proj.bias" in state)
    from backbones.resnet import shape_problems

    expected = {k: tuple(v.shape) for k, v in build_vit(spec, heads=1, device="meta").state_dict().items()}
    expected["pos_embed"] = tuple(state["pos_embed"].shape)  # any grid: resized by the project's rule
    problems = shape_problems({k: tuple(v.shape) for k, v in state.items()}, expected)
    return spec, problems


def build_vit(spec: ViTSpec, heads: int, img_size=224, device=None, drop_path_rate=0.0):
    """timm's VisionTransformer for `spec` without a classifier (num_classes=0), at `img_size`."""
    from functools import partial

    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(img_size=img_size, patch_size=spec.patch, in_chans=spec.in_chans, num_classes=0,
                  embed_dim=spec.embed_dim, depth=spec.depth, num_heads=heads,
                  mlp_ratio=(spec.mlp_hidden + 0.5) / spec.embed_dim, qkv_bias=spec.qkv_bias,
                  init_values=1.0 if spec.layerscale else None, class_token=spec.class_token,
                  reg_tokens=spec.reg_tokens, no_embed_class=spec.pos_prefix == 0 and (spec.class_token or
                                                                                       spec.reg_tokens > 0),
                  norm_layer=partial(nn.LayerNorm, eps=LN_EPS), drop_path_rate=drop_path_rate,
                  global_pool="token" if spec.class_token else "avg")
    if spec.swiglu:
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    if not spec.patch_bias:
        kwargs["embed_layer"] = partial(_patch_embed_without_bias)
    with torch.device(device) if device else _nullcontext():
        model = VisionTransformer(**kwargs)
    return model


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _patch_embed_without_bias(**kwargs):
    from timm.layers import PatchEmbed

    return PatchEmbed(bias=False, **kwargs)


# ---- position embeddings: each project's rule -----------------------------------------------------------

def sincos_mocov3(grid, dim, temperature=10000.0):
    """MoCo v3's fixed table (vits.py build_2d_sincos_position_embedding): the first half encodes the token's row
    (its `grid_w` after torch.meshgrid's 'ij' indexing), the second its column; no class-token row."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32),
                                torch.arange(grid[1], dtype=torch.float32), indexing="ij")
    q = dim // 4
    omega = 1.0 / temperature ** (torch.arange(q, dtype=torch.float32) / q)
    a, b = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)[None]


def sincos_mae(grid, dim):
    """MAE's fixed table (util/pos_embed.py get_2d_sincos_pos_embed): np.meshgrid(w, h) puts the column first."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    a, b = cols.flatten()[:, None] * omega, rows.flatten()[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)[None].float()


def resize_pos_embed(pos: torch.Tensor, prefix: int, old: tuple, new: tuple, rule: str) -> torch.Tensor:
    """The file's position embedding (1, prefix + old grid, D) for a `new` token grid, by `rule` (POS_RULES)."""
    if tuple(old) == tuple(new) and rule != "mocov3":
        return pos  # every project uses the stored table as it is at its own size
    head, body = pos[:, :prefix], pos[:, prefix:]
    dim = pos.shape[-1]
    if rule == "mocov3":
        if tuple(old) == tuple(new):
            return pos
        return torch.cat([head, sincos_mocov3(new, dim).to(pos.dtype)], dim=1)
    if rule == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos, list(new), list(old), num_prefix_tokens=prefix)
    grid = body.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    if rule in ("dino", "dinov2"):
        scale = ((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    elif rule == "dinov2-reg":
        grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False, antialias=True)
    elif rule == "mae":
        grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"unknown position-embedding rule {rule}")
    if tuple(grid.shape[-2:]) != tuple(new):
        raise ValueError(f"resized to {tuple(grid.shape[-2:])}, not {new}")
    return torch.cat([head, grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)], dim=1)


# ---- the encoder -----------------------------------------------------------------------------------------

TAPS = ("cls", "cls_last4", "cls+patchmean", "cls_last4+patchmean")


class ViTEncoder(nn.Module):
    """timm's VisionTransformer (`.vit`) whose forward returns the CLS token after the final norm (DINO's and
    DINOv2's kNN feature). The position embedding follows each input's token grid by the release's rule (once
    trained, from the table it learnt); inputs whose sides are not multiples of the patch lose their last rows and
    columns, as a strided convolution does. Training sets the grid at its first forward and keeps it."""

    def __init__(self, vit, pos_source: torch.Tensor, pos_prefix: int, pos_grid: tuple, rule: str):
        super().__init__()
        self.vit = vit
        self.pos_rule = rule
        self._pos_source = (pos_source.detach().float().cpu(), pos_prefix, tuple(pos_grid))
        self._grid = None
        self._trained = False
        self.vit.patch_embed.strict_img_size = False
        self.set_grid(tuple(vit.patch_embed.grid_size))
        use_fused_attention(self.vit)

    @property
    def patch(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @torch.no_grad()
    def set_grid(self, grid: tuple):
        """Position embeddings for a grid of patches (rows, columns), by the release's rule."""
        if grid == self._grid:
            return
        pos, prefix, old = self._pos_source
        if self._trained:  # finetuned: the table it learnt, at the grid it learnt it for
            pos, old = self.vit.pos_embed.detach().float().cpu(), self._grid
        new = resize_pos_embed(pos, prefix, old, grid, self.pos_rule)
        p = self.vit.pos_embed
        p.data = new.to(device=p.device, dtype=p.dtype)
        pe = self.vit.patch_embed
        pe.img_size = (grid[0] * self.patch, grid[1] * self.patch)
        pe.grid_size = tuple(grid)
        pe.num_patches = grid[0] * grid[1]
        self._grid = tuple(grid)

    def _prepare(self, x):
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        training = self.training and torch.is_grad_enabled()
        if grid != self._grid:
            if training and self.vit.pos_embed.grad is not None:
                raise UserError(f"a {tuple(x.shape[-2:])} input needs another token grid than the {self._grid} "
                                "the ViT is being trained at; train at one input size")
            self.set_grid(grid)  # before the first step: the table is resized once, then learnt at this grid
        self._trained = self._trained or training
        return x[..., :grid[0] * self.patch, :grid[1] * self.patch]

    def block_outputs(self, x, last: int = 1):
        """The token sequences (N, prefix + patches, D) after each of the last `last` blocks, final norm applied."""
        v = self.vit
        x = v.patch_embed(self._prepare(x))
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        x = v.norm_pre(x)
        outs = []
        first = len(v.blocks) - last
        for i, blk in enumerate(v.blocks):
            x = blk(x)
            if i >= first:
                outs.append(v.norm(x))
        return outs

    def features(self, x, tap: str = "cls"):
        if tap not in TAPS:
            raise UserError(f"unknown ViT feature tap {tap!r}; one of {', '.join(TAPS)}")
        outs = self.block_outputs(x, 4 if tap.startswith("cls_last4") else 1)
        cls = torch.cat([o[:, 0] for o in outs], dim=-1)
        if tap.endswith("patchmean"):
            cls = torch.cat([cls, outs[-1][:, self.prefix_tokens:].mean(dim=1)], dim=-1)
        return cls

    def forward(self, x):
        return self.features(x, "cls")


def use_fused_attention(vit):
    """timm's attention through PyTorch's fused kernel (F.scaled_dot_product_attention: flash / memory-efficient
    attention on GPUs) whatever TIMM_FUSED_ATTN says; the math is the same softmax(q k^T / sqrt(d)) v."""
    if hasattr(F, "scaled_dot_product_attention"):
        for m in vit.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True


class Tap(nn.Module):
    """The features of one tap of a ViTEncoder."""

    def __init__(self, encoder: ViTEncoder, tap: str):
        super().__init__()
        if tap not in TAPS:
            raise UserError(f"unknown ViT feature tap {tap!r}; one of {', '.join(TAPS)}")
        self.encoder, self.tap = encoder, tap

    def forward(self, x):
        return self.encoder.features(x, self.tap)


def random_vit(arch: str, seed: int):
    """timm's `arch` with timm's random initialisation, without classifier."""
    import timm

    if arch not in timm.list_models("vit_*"):
        raise UserError(f"unknown ViT architecture {arch!r}: give a timm VisionTransformer name "
                        "(vit_small_patch16_224, vit_base_patch16_224, ...)")
    torch.manual_seed(seed)
    vit = timm.create_model(arch, pretrained=False, num_classes=0)
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise UserError(f"{arch} is not a timm VisionTransformer")
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    return ViTEncoder(vit, vit.pos_embed.detach().clone(), prefix, tuple(vit.patch_embed.grid_size), "timm")


def encoder_from_state(state: dict, spec: ViTSpec, heads: int, rule: str, img_size=224) -> ViTEncoder:
    """A ViTEncoder holding `state` (timm names, pos_embed as in the file), strictly loaded."""
    vit = build_vit(spec, heads, img_size)
    expected = vit.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"the checkpoint leaves {len(missing)} tensors of the ViT at their initial values "
                        f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); refused")
    loaded = {k: state[k] for k in expected}
    loaded["pos_embed"] = vit.pos_embed.detach()  # set from the file's table below
    vit.load_state_dict(loaded, strict=True)
    return ViTEncoder(vit, state["pos_embed"], spec.pos_prefix, spec.pos_grid, rule)


def rebuild_with_drop_path(model: ViTEncoder, rate: float) -> ViTEncoder:
    """The same encoder (weights, position rule, grid) with stochastic depth `rate` over its blocks (timm's
    linear rule: block i gets rate * i / (depth - 1))."""
    from timm.layers import DropPath

    depth = len(model.vit.blocks)
    for i, blk in enumerate(model.vit.blocks):
        r = rate * i / max(1, depth - 1)
        blk.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        blk.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
    return model
