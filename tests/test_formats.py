"""Every release format: detected, loaded into identical tensors, and giving identical kNN metrics."""
import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from backbones.checkpoints import load_checkpoint, make_encoder
from core.cli import UserError
from evaluate.convert import cli as convert_cli
from backbones.formats import detectron2_to_torchvision_key, torchvision_to_detectron2_key
from evaluate.run import cli as run_cli
from tests.release_layouts import EXPECTED_FORMAT, save

FORMATS = list(EXPECTED_FORMAT)


@pytest.fixture(scope="module")
def weights():
    out = {}
    for arch, feat in (("resnet18", 512), ("resnet50", 2048)):
        torch.manual_seed(7)
        model = torchvision.models.get_model(arch)
        for m in model.modules():  # non-trivial BN statistics, so that a swap would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        out[arch] = (model.state_dict(), feat)
    return out


def expected(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_release_layout_loads_identically(tmp_path, weights, arch, fmt):
    sd, feat = weights[arch]
    path = tmp_path / ("ckpt.pkl" if fmt == "detectron2-pkl" else "ckpt.pth.tar")
    save(fmt, sd, feat, path)
    model, info, got_arch = make_encoder(str(path))
    assert info.format == EXPECTED_FORMAT[fmt] and got_arch == arch
    state = model.state_dict()
    for k, v in expected(sd).items():
        if fmt == "dino" and v.is_floating_point():
            v = v + 1  # the teacher, taken by default, differs from the student here
        if k.endswith("num_batches_tracked") and fmt.startswith("detectron2"):
            continue
        assert torch.equal(state[k], v), k
    if fmt not in ("torchvision", "torchvision-nested", "detectron2-pkl"):
        assert info.dropped, "a release with heads must report what it dropped"


def test_dino_student_part_and_bad_part(tmp_path, weights):
    sd, feat = weights["resnet18"]
    save("dino", sd, feat, tmp_path / "dino.pth")
    model, info, _ = make_encoder(str(tmp_path / "dino.pth"), part="student")
    assert info.part == "student" and torch.equal(model.state_dict()["conv1.weight"], sd["conv1.weight"])
    with pytest.raises(UserError, match="parts teacher and student"):
        make_encoder(str(tmp_path / "dino.pth"), part="online")


def test_dropped_groups_are_reported(tmp_path, weights):
    sd, feat = weights["resnet18"]
    save("moco", sd, feat, tmp_path / "moco.pth")
    info = load_checkpoint(tmp_path / "moco.pth")
    assert set(info.dropped) == {"module.encoder_k", "module.encoder_q", "module.queue", "module.queue_ptr"}
    assert info.dropped["module.encoder_q"] == 4  # the MLP head's two linear layers


def test_simclr_converted_is_forced_and_brings_its_normalisation(tmp_path, weights):
    sd, feat = weights["resnet18"]
    torch.save({"state_dict": sd}, tmp_path / "simclr.pth")
    assert load_checkpoint(tmp_path / "simclr.pth").format == "torchvision"
    info = load_checkpoint(tmp_path / "simclr.pth", format_name="simclr-converted")
    assert info.input_normalization == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match="not laid out as format 'moco'"):
        load_checkpoint(tmp_path / "simclr.pth", format_name="moco")


def test_detectron2_names_round_trip(weights):
    sd, _ = weights["resnet50"]
    for k in expected(sd):
        if k.endswith("num_batches_tracked"):
            continue
        d2 = torchvision_to_detectron2_key(k)
        assert d2 is not None and detectron2_to_torchvision_key(d2) == k
    assert torchvision_to_detectron2_key("layer1.0.downsample.1.running_var") == "res2.0.shortcut.norm.running_var"
    assert torchvision_to_detectron2_key("bn1.weight") == "stem.conv1.norm.weight"
    assert torchvision_to_detectron2_key("layer4.2.bn3.bias") == "res5.2.conv3.norm.bias"


@pytest.mark.parametrize("target, suffix", [("torchvision", ".pth"), ("safetensors", ".safetensors"),
                                            ("detectron2", ".pkl")])
def test_convert_round_trips(tmp_path, weights, capsys, target, suffix):
    sd, feat = weights["resnet18"]
    save("swav", sd, feat, tmp_path / "swav.pth.tar")
    out = tmp_path / f"out{suffix}"
    assert convert_cli(["--ckpt", str(tmp_path / "swav.pth.tar"), "--to", target, "--out", str(out)]) == 0
    model, info, _ = make_encoder(str(out))
    assert info.format == ("detectron2" if target == "detectron2" else "torchvision")
    for k, v in expected(sd).items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[k], v), k
    if target == "detectron2":
        with open(out, "rb") as f:
            d2 = pickle.load(f)
        assert d2["matching_heuristics"] is True and "res5.1.conv2.norm.running_var" in d2["model"]


def test_knn_metrics_identical_across_formats(tmp_path, weights, capsys, demo_root):
    sd, feat = weights["resnet18"]
    metrics = {}
    for fmt in FORMATS:
        path = tmp_path / (f"{fmt}.pkl" if fmt == "detectron2-pkl" else f"{fmt}.pth")
        save(fmt, sd, feat, path)
        out = tmp_path / f"out-{fmt}"
        assert run_cli(["--ckpt", str(path), "--task", "knn_stl10", "--demo", "--out", str(out)]) == 0
        rec = json.loads(next((out / "records").rglob("*.json")).read_text())
        assert rec["checkpoint"]["format"] == EXPECTED_FORMAT[fmt]
        metrics[fmt] = rec["metrics"]
    capsys.readouterr()
    reference = metrics["torchvision"]
    metrics.pop("dino")  # the teacher (the default part) holds other weights in this fixture
    assert all(m == reference for m in metrics.values()), metrics


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_code_in_a_pickle_never_runs_and_exits_2(tmp_path, capsys, suffix, demo_root):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"conv1.weight": _Evil(str(marker))}}, f)
    code = run_cli(["--ckpt", str(path), "--task", "knn_stl10", "--demo", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "refused for safety" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.pth", b"", "is empty"),
    ("notes.txt", b"just some text\n", "not a readable checkpoint"),
    ("broken.pkl", b"\x80\x04\x95", "not a readable pickle"),
])
def test_bad_files_exit_2(tmp_path, capsys, name, content, message, demo_root):
    (tmp_path / name).write_bytes(content)
    code = run_cli(["--ckpt", str(tmp_path / name), "--task", "knn_stl10", "--demo", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_truncated_release_and_vit_exit_2(tmp_path, capsys, weights, demo_root):
    sd, feat = weights["resnet18"]
    save("mocov3", sd, feat, tmp_path / "m.pth.tar")
    data = (tmp_path / "m.pth.tar").read_bytes()
    (tmp_path / "t.pth.tar").write_bytes(data[: len(data) // 3])
    vit = {"state_dict": {"module.base_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                          "module.base_encoder.blocks.0.attn.qkv.weight": torch.zeros(24, 8)}}
    torch.save(vit, tmp_path / "vit.pth.tar")
    for name, message in (("t.pth.tar", "not a readable checkpoint"), ("vit.pth.tar", "not in a known ResNet format")):
        code = run_cli(["--ckpt", str(tmp_path / name), "--task", "knn_stl10", "--demo", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
