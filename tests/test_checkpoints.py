"""Checkpoint files: architectures from shapes, strictness, and refusal to execute pickled code."""
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from backbones.checkpoints import infer_arch, load_checkpoint, make_encoder
from core.cli import UserError


@pytest.fixture(scope="module")
def r18_state():
    """Random weights with non-trivial BatchNorm statistics, so that a tensor left at its initial value shows."""
    from tests.release_layouts import torchvision_resnet

    return torchvision_resnet("resnet18", 0).state_dict()


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
def test_infer_arch(arch):
    assert infer_arch(torchvision.models.get_model(arch).state_dict()) == arch


@pytest.mark.parametrize("arch", ["resnet18d", "resnet50c"])
def test_timm_deep_stems_from_shapes_alone(arch):
    """timm's deep stems are told apart by shapes, and rebuilt as timm's own model: same weights, same outputs."""
    import timm

    from backbones.resnet import analyse, build_backbone

    torch.manual_seed(0)
    ref = timm.create_model(arch, num_classes=0).eval()
    spec, problems = analyse(ref.state_dict())
    assert (spec.arch, spec.stem, problems) == (arch, "deep", [])
    ours = build_backbone(arch, "deep").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_small_image_stem_is_w_mse_s():
    """resnet34 with the 3x3 stem against torchvision's resnet34 whose conv1 is replaced as W-MSE's model.py does
    (Conv2d(3, 64, 3, stride 1, padding 1, bias False), max-pool kept): same weights, same outputs."""
    from backbones.resnet import analyse, build_backbone

    torch.manual_seed(0)
    ref = torchvision.models.resnet34()
    ref.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.fc = torch.nn.Identity()
    ref.eval()
    spec, problems = analyse(ref.state_dict())
    assert (spec.arch, spec.stem, problems) == ("resnet34", "3x3", [])
    ours = build_backbone("resnet34", "3x3").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_widened_resnet_matches_simclrs_size():
    """resnet50x2 / x4 (every width multiplied, the stem's included) have SimCLR's 94M / 375M parameters (SimCLR
    Figure 7 and Table 6, counted without the classifier, as its 24M for ResNet-50 shows)."""
    from backbones.resnet import analyse, build_backbone

    with torch.device("meta"):
        for arch, millions in (("resnet50", 24), ("resnet50x4", 375)):
            n = sum(p.numel() for p in build_backbone(arch).parameters())
            assert round(n / 1e6) == millions, (arch, n)
        model = build_backbone("resnet50x2")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 94
    spec, problems = analyse({k: v for k, v in model.state_dict().items()})
    assert (spec.arch, spec.stem, spec.stem_width, problems) == ("resnet50x2", "torchvision", 128, [])


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".pth.tar"])
def test_torchvision_state_dict_loads_identically(tmp_path, r18_state, wrap, suffix):
    path = tmp_path / f"ckpt{suffix}"
    torch.save(r18_state if wrap is None else {wrap: r18_state, "epoch": 3}, path)
    model, info, arch = make_encoder(str(path))
    assert arch == "resnet18" and info.format == "torchvision"
    assert info.dropped == ({"fc": 2} if wrap is None else {f"{wrap}.fc": 2})
    assert info.key == ("(top level)" if wrap is None else wrap) and info.prefix == "" and info.scheme == "torchvision"
    ref = torchvision.models.resnet18()
    ref.load_state_dict(r18_state)
    ref.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))  # torchvision's own model with the same weights


def test_safetensors(tmp_path, r18_state):
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in r18_state.items()}, str(path))
    model, info, arch = make_encoder(str(path))
    assert torch.equal(model.state_dict()["layer4.1.bn2.running_var"], r18_state["layer4.1.bn2.running_var"])


def test_strict_missing_and_wrong_arch(tmp_path, r18_state):
    sd = dict(r18_state)
    del sd["layer3.0.conv1.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"1 missing \(layer3.0.conv1.weight\)"):
        make_encoder(str(tmp_path / "missing.pth"), arch="resnet18")
    torch.save(r18_state, tmp_path / "r18.pth")
    with pytest.raises(UserError, match="does not fit resnet50"):
        make_encoder(str(tmp_path / "r18.pth"), arch="resnet50")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"this is not a checkpoint", "not a readable checkpoint"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_truncated_file(tmp_path, r18_state):
    path = tmp_path / "r18.pth"
    torch.save(r18_state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": payload}, f)
    with pytest.raises(UserError, match="refused for safety"):
        load_checkpoint(path)
    assert not marker.exists()


def test_non_resnet_is_refused(tmp_path):
    torch.save({"patch_embed.proj.weight": torch.zeros(384, 3, 16, 16), "blocks.0.attn.qkv.weight": torch.zeros(3, 3)},
               tmp_path / "vit.pth")
    with pytest.raises(UserError, match="holds no complete ViT"):
        load_checkpoint(tmp_path / "vit.pth")
