"""A checkpoint's timm VisionTransformer as Detectron2's ViTDet trunk (detectron2.modeling.backbone.vit.ViT).

ViTDet (Li et al. 2022; detectron2 projects/ViTDet) finetunes a plain ViT: the patch tokens only (the CLS
token and the final norm are not used: the feature pyramid is built from the last block's tokens), the
absolute position embeddings of the pretraining grid resized to the input's by bicubic interpolation
(`get_abs_pos`), relative position biases added in the attention and initialised to zero
(rel_pos_zero_init), window attention in all blocks but every quarter. The two ViTs share the block
layout and parameter names (patch_embed.proj, pos_embed, blocks.N.norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2), which is why ViTDet loads MAE's timm-named checkpoint with matching heuristics; here
the names are mapped explicitly and every tensor is accounted for:
- LayerScale (timm `ls1.gamma` / `ls2.gamma`, DINOv2, DeiT III), which Detectron2's block has not, is folded
  exactly into the layer before it: gamma * (W x + b) = (gamma W) x + gamma b;
- cls_token, norm, fc_norm and head are not used by ViTDet (listed as not taken);
- a ViT with register tokens, a pre-norm, query/key norms or another activation than GELU has no exact
  counterpart in Detectron2's ViT and is refused with a sentence.
"""
import math

from torch import nn

from core.cli import UserError

NOT_TAKEN = ("cls_token", "norm.", "fc_norm.", "head.", "head_drop.")


def vit_arch(vit) -> dict:
    """Detectron2 ViT keyword arguments for the architecture of a timm VisionTransformer (what the weights
    do not say, e.g. the head count and LayerNorm eps, is read from the built module)."""
    block = vit.blocks[0]
    problems = []
    if getattr(vit, "num_reg_tokens", 0):
        problems.append(f"{vit.num_reg_tokens} register tokens")
    if not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity):
        problems.append("a norm before the blocks")
    if not (isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)):
        problems.append("query/key norms")
    if not (isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"):
        problems.append(f"the activation {block.mlp.act}")
    if problems:
        raise UserError(f"this ViT has {', '.join(problems)}, which Detectron2's ViTDet backbone has no place for")
    tokens = vit.pos_embed.shape[1]
    cls_in_pos = not getattr(vit, "no_embed_class", False) and vit.num_prefix_tokens > 0
    grid = math.isqrt(tokens - cls_in_pos)
    if grid * grid != tokens - cls_in_pos:
        raise UserError(f"the ViT's {tokens} position embeddings are not a square grid")
    patch = vit.patch_embed.patch_size[0]
    return dict(patch_size=patch, embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=block.attn.num_heads,
                mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
                norm_eps=block.norm1.eps, pretrain_img_size=grid * patch, pretrain_use_cls_token=cls_in_pos)


def detectron2_vit_state(vit, prefix="") -> tuple[dict, dict]:
    """(the ViT's tensors under Detectron2 ViT names, with `prefix`; {group: count} of tensors not taken)."""
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    out, dropped = {}, {}
    for i in range(len(vit.blocks)):
        b = f"blocks.{i}."
        for scale, layer in (("ls1.gamma", "attn.proj"), ("ls2.gamma", "mlp.fc2")):
            gamma = state.pop(b + scale, None)
            if gamma is not None:
                state[b + layer + ".weight"] = gamma[:, None] * state[b + layer + ".weight"]
                state[b + layer + ".bias"] = gamma * state[b + layer + ".bias"]
    for key, value in state.items():
        if key.startswith(NOT_TAKEN) or key == "reg_token":
            group = key.split(".")[0]
            dropped[group] = dropped.get(group, 0) + 1
            continue
        out[prefix + key] = value
    return out, dropped


def build_detectron2_vit(vit, **recipe):
    """Detectron2's ViT with the timm ViT's architecture and weights (strictly: every Detectron2 tensor but the
    zero-initialised relative position biases comes from the checkpoint). `recipe`: ViTDet's values (img_size,
    window_size, window_block_indexes, use_rel_pos, drop_path_rate...)."""
    from functools import partial

    from detectron2.modeling.backbone.vit import ViT

    arch = vit_arch(vit)
    eps = arch.pop("norm_eps")
    net = ViT(**arch, norm_layer=partial(nn.LayerNorm, eps=eps), **recipe)
    load_into(net, vit)
    return net


def load_into(net, vit):
    """The mapped weights into Detectron2's ViT `net`; anything missing but the relative position biases
    (zero-initialised, as ViTDet trains them from zero), or unexpected, stops the run."""
    state, _ = detectron2_vit_state(vit)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("rel_pos_h", "rel_pos_w"))]
    if missing or unexpected:
        raise UserError(f"the ViT does not map onto Detectron2's ViT: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    return net
