"""Vision Transformers: every release layout (tests/release_layouts.py VIT_LAYOUTS) found by structure, the network
its project evaluates taken, run as the project runs it — compared with timm's own VisionTransformer built with the
project's arguments, its weights loaded, and the project's position-embedding rule written out here; load reports;
the family seam (taps, inputs, supported tasks)."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.checkpoints import inspect_lines, load_checkpoint, make_encoder, resolve_settings
from backbones.families import eval_transform, linear_protocol, supports, tap_model
from core.cli import UserError
from evaluate.run import cli as run_cli
from tests.release_layouts import VIT_LAYOUTS, mocov3_sincos


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in VIT_LAYOUTS.items()}


# ---- the reference: timm's VisionTransformer with the project's arguments and position rule ---------------

def project_pos_embed(rule, pos, prefix, grid):
    """The projects' own resizing, written out from their code."""
    head, body = pos[:, :prefix], pos[:, prefix:]
    n, dim = body.shape[1], body.shape[2]
    m = int(math.sqrt(n))
    if m == grid and rule != "mocov3":
        return pos
    patches = body.reshape(1, m, m, dim).permute(0, 3, 1, 2).float()
    if rule in ("dino", "dinov2"):  # dino vision_transformer.py interpolate_pos_encoding (w0 + 0.1)
        w0 = h0 = grid + 0.1
        patches = F.interpolate(patches, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    elif rule == "dinov2-reg":  # interpolate_offset 0, interpolate_antialias True: size=(w0, h0)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    elif rule == "mae":  # util/pos_embed.py interpolate_pos_embed
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    elif rule == "mocov3":  # vits.py: the table built for the model's own grid
        return mocov3_sincos(grid, dim)
    elif rule == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos, (grid, grid), num_prefix_tokens=prefix)
    return torch.cat([head, patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def reference_cls(s, x, heads=None):
    """CLS after the final norm, as the releasing project computes it, through timm's modules."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    t = dict(s.tensors)
    dim, _, patch, _ = t["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blocks."))
    kwargs = dict(s.timm_kwargs)
    if heads is not None:
        kwargs["num_heads"] = heads
    swiglu = "blocks.0.mlp.w12.weight" in t
    if swiglu:
        t = {k.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2"): v for k, v in t.items()}
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=t["blocks.0.mlp.fc1.weight"].shape[0] / dim)
    grid = x.shape[-1] // patch
    dinov2 = s.pos_rule.startswith("dinov2")
    registers = t.pop("register_tokens", None)
    t.pop("mask_token", None)
    model = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_classes=0,
                              qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs).eval()
    prefix = 0 if kwargs.get("no_embed_class") else 1
    pos = project_pos_embed(s.pos_rule, t.pop("pos_embed"), prefix, grid)
    model.load_state_dict({**t, "pos_embed": model.pos_embed if dinov2 else pos}, strict=True)
    with torch.no_grad():
        if not dinov2:
            return model.forward_features(x)[:, 0]
        # dinov2 vision_transformer.py prepare_tokens_with_masks: cls, + position (cls's included), registers
        tokens = torch.cat([t["cls_token"].expand(len(x), -1, -1), model.patch_embed(x)], dim=1) + pos
        if registers is not None:
            tokens = torch.cat([tokens[:, :1], registers.expand(len(x), -1, -1), tokens[:, 1:]], dim=1)
        for blk in model.blocks:
            tokens = blk(tokens)
        return model.norm(tokens)[:, 0]


def _input(s, px=None):
    patch = s.tensors["patch_embed.proj.weight"].shape[-1]
    torch.manual_seed(0)
    px = px or 4 * patch
    return torch.rand(2, 3, px, px)


@pytest.mark.parametrize("name", list(VIT_LAYOUTS))
def test_vit_layout_runs_as_its_project_runs_it(vits, name):
    s = vits[name]
    model, info, arch = make_encoder(str(s.path))
    assert info.family == "vit" and info.vit["pos_rule"] == s.pos_rule, (info.family, info.vit)
    for key, value in s.expect.items():
        assert getattr(info, key) == value, (key, getattr(info, key))
    assert info.vit["heads"] == s.timm_kwargs["num_heads"]
    assert isinstance(model.vit, __import__("timm").models.vision_transformer.VisionTransformer)
    x = _input(s)
    with torch.no_grad():
        ours = model(x)
    theirs = reference_cls(s, x)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), (ours - theirs).abs().max()
    report = info.load_report
    assert report["tensors_loaded"] == report["tensors_expected"] == len(model.vit.state_dict())
    for group, n in s.unused.items():
        assert report["unused"].get(group) == n, report
    lines = inspect_lines(s.path)
    assert f"would use: {info.key} ({info.chosen_because})" in lines, lines
    assert f"release: {info.release} ({info.project})" in lines


def test_native_size_uses_the_stored_table(vits):
    """At the size the table was made for (224 px, DINO ViT-S/16) no project resizes it."""
    s = vits["dino-full"]
    model, info, _ = make_encoder(str(s.path))
    x = _input(s, 224)[:1]
    with torch.no_grad():
        assert torch.allclose(model(x), reference_cls(s, x), rtol=1e-4, atol=1e-4)


def test_mocov3_small_has_twelve_heads(vits):
    """MoCo v3's vit_small (vits.py) has 12 heads; timm's 6 would give other features."""
    s = vits["mocov3-deit"]
    model, info, _ = make_encoder(str(s.path))
    x = _input(s)
    with torch.no_grad():
        ours = model(x)
    assert info.vit["heads"] == 12 and "mocov3" in info.vit["heads_source"]
    assert not torch.allclose(ours, reference_cls(s, x, heads=6), atol=1e-3)
    forced, _, _ = make_encoder(str(s.path), settings=resolve_settings({"vit_heads": "6"}))
    with torch.no_grad():
        assert torch.allclose(forced(x), reference_cls(s, x, heads=6), rtol=1e-4, atol=1e-4)


def test_teacher_not_student(vits):
    dino = load_checkpoint(vits["dino-full"].path)
    assert dino.key == "teacher/backbone" and "teacher" in dino.chosen_because
    student = load_checkpoint(vits["dino-full"].path, key="student")
    assert student.key == "student/module.backbone"
    assert not torch.equal(student.state_dict["blocks.0.attn.qkv.weight"], dino.state_dict["blocks.0.attn.qkv.weight"])


def test_missing_backbone_tensor_is_refused_naming_it(vits, tmp_path, capsys, demo_root):
    sd = torch.load(vits["dino-backbone"].path, weights_only=True)
    del sd["blocks.2.attn.proj.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"holds no complete ViT.*1 missing \(blocks.2.attn.proj.weight\)"):
        load_checkpoint(tmp_path / "broken.pth")
    code = run_cli(["--ckpt", str(tmp_path / "broken.pth"), "--task", "knn_stl10", "--demo", "--out",
                    str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "blocks.2.attn.proj.weight" in err


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch8_224",
                                  "vit_base_patch16_224", "vit_large_patch16_224", "vit_large_patch14_dinov2",
                                  "vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2"])
def test_architectures_from_shapes_on_the_meta_device(name):
    """Real widths and depths (meta tensors: shapes only): the spec found, timm's heads, the same tensors."""
    import timm

    from backbones.vit import analyse, build_vit
    from backbones.vit_layouts import heads_for

    with torch.device("meta"):
        ref = timm.create_model(name, num_classes=0)
    spec, problems = analyse(ref.state_dict())
    heads, _ = heads_for("dinov2" if "dinov2" in name else "timm", spec)
    assert problems == [] and heads == ref.blocks[0].attn.num_heads
    built = build_vit(spec, heads, ref.patch_embed.img_size[0], device="meta")
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


# ---- the family seam -------------------------------------------------------------------------------------

def _manual_tokens(model, x):
    """Every block's output of a timm VisionTransformer, by its modules in order (DINO get_intermediate_layers)."""
    v = model.vit
    t = v._pos_embed(v.patch_embed(x))
    outs = []
    for blk in v.blocks:
        t = blk(t)
        outs.append(v.norm(t))
    return outs


def test_taps_follow_each_projects_evaluation():
    model, info, _ = make_encoder("random", "vit_tiny_patch16_224", seed=3)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        outs = _manual_tokens(model, x)
        cls4 = torch.cat([o[:, 0] for o in outs[-4:]], dim=-1)  # dino eval_linear.py n_last_blocks=4
        mean = outs[-1][:, 1:].mean(dim=1)  # avgpool_patchtokens: patch tokens of the last block
        assert torch.allclose(tap_model(model, "cls")(x), model.vit.forward_features(x)[:, 0], atol=1e-5)
        assert torch.allclose(tap_model(model, "cls_last4")(x), cls4, atol=1e-5)
        assert torch.allclose(tap_model(model, "cls+patchmean")(x), torch.cat([outs[-1][:, 0], mean], -1), atol=1e-5)
        assert torch.allclose(tap_model(model, "cls_last4+patchmean")(x), torch.cat([cls4, mean], -1), atol=1e-5)
    with pytest.raises(UserError, match="unknown ViT feature tap"):
        tap_model(model, "avgpool")
    r50, rinfo, _ = make_encoder("random", "resnet18")
    assert tap_model(r50, "avgpool") is r50 and linear_protocol(rinfo) == [("avgpool", "linear")]


def test_linear_protocol_and_inputs_by_release(vits):
    dino_s = load_checkpoint(vits["dino-full"].path)
    assert linear_protocol(dino_s) == [("cls_last4", "linear")]
    assert linear_protocol(load_checkpoint(vits["ibot-teacher"].path)) == [("cls+patchmean", "linear")]
    assert linear_protocol(load_checkpoint(vits["mae-encoder"].path)) == [("cls", "bn_linear")]
    assert linear_protocol(load_checkpoint(vits["mocov3"].path)) == [("cls", "linear")]
    assert len(linear_protocol(load_checkpoint(vits["dinov2"].path))) == 4
    t = eval_transform(dino_s)
    assert (t.resize, t.crop, t.interpolation, t.mean) == (256, 224, "bicubic", (0.485, 0.456, 0.406))
    assert supports(dino_s, "frozen") is None and "ResNet recipe" in supports(dino_s, "detection_c4")


def test_random_vit_and_unsupported_tasks(tmp_path, capsys, demo_root):
    code = run_cli(["--ckpt", "random", "--arch", "vit_tiny_patch16_224", "--task", "voc_det", "--demo", "--out",
                    str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Faster R-CNN C4 is a ResNet recipe" in err
    model, info, arch = make_encoder("random", "vit_tiny_patch16_224")
    assert info.describe()["family"] == "vit" and info.load_report is None and info.vit["heads"] == 3
    with pytest.raises(UserError, match="unknown ViT architecture"):
        make_encoder("random", "vit_nope")


def test_fused_attention_is_used_and_is_the_same_math():
    """The encoder's attention runs PyTorch's fused kernel even where timm's default is off; its output equals
    timm's explicit softmax(q k^T / sqrt(d)) v path."""
    import timm.layers

    from backbones.vit import use_fused_attention

    timm.layers.set_fused_attn(False)
    try:
        model, _, _ = make_encoder("random", "vit_tiny_patch16_224", seed=1)
    finally:
        timm.layers.set_fused_attn(True)
    flags = [m.fused_attn for m in model.vit.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
        for m in model.vit.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        explicit = model(x)
    use_fused_attention(model.vit)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_inspect_says_what_was_found_and_why(vits, capsys):
    assert run_cli(["--inspect", str(vits["mocov3-deit"].path)]) == 0
    out = capsys.readouterr().out
    assert "ViTs found (1):" in out and "* model  file path model, prefix -, timm names" in out
    assert "would use: model (the only ViT in the file)" in out
    assert "release: mocov3" in out and "12 heads (mocov3 defines small with 12)" in out
    assert "position embeddings: the fixed 2-D sin-cos table rebuilt for the grid" in out
    assert run_cli(["--inspect", str(vits["dinov2-reg4"].path)]) == 0
    out = capsys.readouterr().out
    assert "register_tokens as reg_token" in out and "518 px" in out and "antialias" in out
    assert run_cli(["--inspect", str(vits["mae-full"].path)]) == 0
    assert "load: 30 of 30 tensors loaded; unused in the file: decoder 20" in capsys.readouterr().out


def test_format_and_settings_overrides(vits):
    forced = load_checkpoint(vits["timm-head"].path, format_name="dino")
    assert forced.release == "dino" and forced.vit["pos_rule"] == "dino"
    with pytest.raises(UserError, match="unknown ViT checkpoint format 'nope'"):
        load_checkpoint(vits["timm-head"].path, format_name="nope")
    with pytest.raises(UserError, match="does not divide the width 192"):
        load_checkpoint(vits["timm-head"].path, settings=resolve_settings({"vit_heads": "5"}))


def test_finetuning_keeps_the_grid_it_learns_at_and_drop_path_follows_timm():
    """Training at 64 px resizes the table once, then learns it; a later grid comes from the learnt table; a grid
    change mid-training is refused. Drop path: timm's linear rule (block i: rate * i / (depth - 1))."""
    from timm.models.vision_transformer import VisionTransformer

    from backbones.families import rebuild_with_drop_path

    model, _, _ = make_encoder("random", "vit_tiny_patch16_224", seed=2)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    opt.step()
    learnt = model.vit.pos_embed.detach().clone()
    assert learnt.shape[1] == 1 + 16
    with pytest.raises(UserError, match="train at one input size"):
        model(torch.rand(2, 3, 96, 96))
    model.eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
        assert torch.equal(model.vit.pos_embed, learnt)
        model(torch.rand(1, 3, 32, 32))
        from timm.layers import resample_abs_pos_embed

        assert torch.allclose(model.vit.pos_embed, resample_abs_pos_embed(learnt, [2, 2], [4, 4]), atol=1e-6)
    rebuild_with_drop_path(model, 0.1)
    ref = VisionTransformer(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1)
    ours = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.vit.blocks]
    theirs = [getattr(b.drop_path1, "drop_prob", 0.0) for b in ref.blocks]
    assert ours == pytest.approx(theirs)


def test_dinov2_training_checkpoint_chunks_and_arch_check(vits, tmp_path):
    """DINOv2 training checkpoints chunk their blocks (BlockChunk: blocks.C.N with the global index N); the same
    weights load as the hub file does. An --arch the weights are not is refused."""
    import re

    s = vits["dinov2"]
    sd = torch.load(s.path, weights_only=True)
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // 2}.{m.group(1)}.", k): v
               for k, v in sd.items()}
    torch.save({"teacher": {f"backbone.{k}": v for k, v in chunked.items()}}, tmp_path / "teacher_checkpoint.pth")
    model, info, _ = make_encoder(str(tmp_path / "teacher_checkpoint.pth"))
    x = _input(s)
    with torch.no_grad():
        assert torch.allclose(model(x), reference_cls(s, x), rtol=1e-4, atol=1e-4)
    assert info.release == "dinov2" and "chunked blocks (blocks.C.N.) renumbered" in info.vit["renamed"]
    with pytest.raises(UserError, match="--arch vit_base_patch16_224 does not fit"):
        make_encoder(str(s.path), arch="vit_base_patch16_224")


def test_task_all_skips_what_the_family_does_not_support():
    """--task all keeps every task the encoder supports and names the skipped one with the family's sentence; a
    ResNet with another stem than torchvision's skips both detection tasks."""
    from backbones.checkpoints import Checkpoint, ResNetInput
    from evaluate.run import supported_tasks
    from tasks.registry import TASKS

    tasks = list(TASKS.values())
    todo = [(t, None) for t in tasks]  # the command's work items: (task, its protocol, ...)
    said = []
    _, vit, _ = make_encoder("random", "vit_tiny_patch16_224")
    kept = [t for t, _ in supported_tasks(todo, vit, True, said.append)]
    assert [t.name for t in tasks if t not in kept] == ["voc_det"]
    assert said == ["--task all: skipping voc_det: " + supports(vit, "detection_c4")]
    small = Checkpoint(None, "x", None, "w-mse", resnet=ResNetInput("3x3", True, 1), notes={"stem": "3x3 stem"})
    kept = [t for t, _ in supported_tasks(todo, small, True, said.append)]
    assert {t.name for t in tasks if t not in kept} == {"voc_det", "coco_instseg"}
    with pytest.raises(UserError, match="^coco_instseg: the detector is built on torchvision's ResNet stem"):
        supported_tasks([(TASKS["coco_instseg"], None)], small, False, said.append)
