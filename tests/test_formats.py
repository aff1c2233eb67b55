"""Real release layouts (tests/release_layouts.py): found by structure, the network each project evaluates
taken, identical tensors and features, the same kNN metric as the same weights in torchvision form; metadata
read without running anything; bad files refused with one sentence."""
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backbones.checkpoints import inspect_lines, load_checkpoint, make_encoder, resolve_settings
from backbones.reading import Foreign, read_file
from backbones.schemes import detectron2_to_torchvision_key, torchvision_to_detectron2_key
from core.cli import UserError
from evaluate.convert import cli as convert_cli
from evaluate.run import cli as run_cli
from tests.release_layouts import LAYOUTS, NONE, RESNET50_LAYOUTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every layout, built once (ResNet-18 where the project allows it)."""
    out = {}
    for name, build in LAYOUTS.items():
        out[name] = build(tmp_path_factory.mktemp(name))
    return out


@pytest.fixture(scope="module")
def saved50(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in RESNET50_LAYOUTS.items()}


def check_layout(s):
    model, info, arch = make_encoder(str(s.path))
    for key, value in s.expect.items():
        if key == "foreign":
            assert set(value) <= set(info.foreign), info.foreign
        else:
            assert getattr(info, key) == value, (key, getattr(info, key))
    state = model.state_dict()
    for k, v in s.tensors.items():
        assert state[k].shape == v.shape and torch.equal(state[k], v), k
    torch.manual_seed(0)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        ours, theirs = model(x), s.reference.eval()(x).flatten(1)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), (ours - theirs).abs().max()
    return info


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_loads_as_its_project_evaluates_it(saved, name):
    info = check_layout(saved[name])
    assert info.chosen_because and info.sha256 and info.scheme
    if len(info.candidates) > 1:
        assert info.part is not None  # the name that sets the chosen network apart
    # --inspect reads shapes only, through the same rules, and must come to the same choice
    assert f"would use: {info.key} ({info.chosen_because})" in inspect_lines(saved[name].path)


@pytest.mark.parametrize("name", list(RESNET50_LAYOUTS))
def test_resnet50_only_layouts(saved50, name):
    check_layout(saved50[name])


def test_what_is_not_taken_is_counted(saved):
    moco = load_checkpoint(saved["moco"].path)
    assert moco.dropped == {"state_dict.module.encoder_k": 124, "state_dict.module.encoder_q.fc": 4,
                            "state_dict.module.queue": 1, "state_dict.module.queue_ptr": 1}
    assert load_checkpoint(saved["moco-lincls"].path).dropped == {"state_dict.module.fc": 2}
    assert load_checkpoint(saved["torchvision"].path).dropped == {"fc": 2}
    assert moco.load_report == {"tensors_loaded": 100, "tensors_expected": 100, "unused": {
        "heads": 4, "ema_teacher_momentum": 124, "other": 2}}
    converted = load_checkpoint(saved["detectron2-pkl-mocov2"].path)  # MoCo's converter: the head is stem.fc.*
    assert converted.load_report["unused"] == {"heads": 4} and converted.dropped == {"model.stem": 4}


def test_choices_follow_each_projects_evaluation_code(saved):
    dino = load_checkpoint(saved["dino"].path)
    assert "teacher" in dino.chosen_because and {c["location"] for c in dino.candidates} == \
        {"teacher/module.backbone", "student/module.backbone"}
    lightly = load_checkpoint(saved["lightly-dino"].path)
    assert lightly.key == "state_dict/backbone" and "teacher" in lightly.chosen_because
    byol = load_checkpoint(saved["w-mse-byol"].path)
    assert byol.key == "model.module" and "model_t" not in byol.key
    solo = load_checkpoint(saved["solo-learn"].path)
    assert "momentum_backbone" not in solo.key and len(solo.candidates) == 2


def test_lightning_checkpoint_without_its_version_key(saved, tmp_path):
    """Lightning checkpoints are recognised by their structure, not by pytorch-lightning_version."""
    ckpt = torch.load(saved["lightly-byol"].path, weights_only=False)  # a file this test wrote itself
    del ckpt["pytorch-lightning_version"]
    torch.save(ckpt, tmp_path / "no_version.ckpt")
    info = load_checkpoint(tmp_path / "no_version.ckpt")
    assert (info.format, info.key) == ("lightly", "state_dict/backbone")
    assert "state_dict.teacher_backbone" in info.dropped and "state_dict.online_classifier" in info.dropped


def test_cyclic_metadata_is_read_in_bounded_time(saved, tmp_path):
    shared = []
    for _ in range(40):
        shared = [shared, shared]  # 2**40 paths through 40 objects
    loop = {}
    loop["self"] = loop
    torch.save({"state_dict": saved["torchvision"].tensors, "meta": {"x": shared, "loop": loop}},
               tmp_path / "cyclic.pth")
    started = time.perf_counter()
    info = load_checkpoint(tmp_path / "cyclic.pth")
    assert info.key == "state_dict" and time.perf_counter() - started < 30


def test_ckpt_key_and_part_override(saved):
    student = load_checkpoint(saved["dino"].path, part="student")
    assert student.key == "student/module.backbone" and student.part == "student"
    key = load_checkpoint(saved["moco"].path, key="module.encoder_k")
    assert key.key == "state_dict/module.encoder_k" and key.chosen_because == "chosen with --ckpt-key module.encoder_k"
    assert not torch.equal(key.state_dict["conv1.weight"], saved["moco"].tensors["conv1.weight"])
    with pytest.raises(UserError, match="matches none of the ResNets.*teacher/module.backbone"):
        load_checkpoint(saved["dino"].path, part="online")
    with pytest.raises(UserError, match="not both"):
        load_checkpoint(saved["dino"].path, part="student", key="teacher")


def test_ckpt_format_forces_a_release(saved):
    tv = saved["torchvision"]
    forced = load_checkpoint(tv.path, format_name="simclr-converted")
    assert forced.format == "simclr-converted" and forced.input_normalization == NONE
    with pytest.raises(UserError, match="not laid out as format 'moco'"):
        load_checkpoint(tv.path, format_name="moco")
    with pytest.raises(UserError, match="unknown checkpoint format 'nope'; known formats:"):
        load_checkpoint(tv.path, format_name="nope")


def test_simclr_v1_recognised_only_by_its_converters_key_order(saved, saved50, tmp_path):
    """A {'state_dict': ...} file in torchvision's own key order is not taken for a SimCLR conversion."""
    v1 = load_checkpoint(saved50["simclr-v1"].path)
    assert v1.format == "simclr-converted" and "without normalization" in v1.normalization
    torch.save({"state_dict": torch.load(saved["torchvision"].path, weights_only=True)}, tmp_path / "sd.pth")
    plain = load_checkpoint(tmp_path / "sd.pth")
    assert plain.format == "torchvision" and plain.input_normalization is None


def test_metadata_kinds_load_as_inert_placeholders(saved):
    """VICReg's function in its optimizer, OmegaConf's DictConfig in Lightning hyper_parameters, mmengine's
    HistoryBuffer in message_hub, Lightning's AttributeDict: stand-ins that were never constructed by their class."""
    vicreg = read_file(saved["vicreg"].path)
    group = vicreg.obj["optimizer"]["param_groups"][0]
    assert repr(group["weight_decay_filter"]) == "<foreign __main__.exclude_bias_and_norm>"
    assert group["weight_decay_filter"] is group["lars_adaptation_filter"]
    with pytest.raises(pickle.UnpicklingError, match="calls __main__.exclude_bias_and_norm"):
        group["weight_decay_filter"](torch.zeros(3))  # a stand-in refuses to be called
    hydra = read_file(saved["lightning-hydra-cifar"].path)
    assert isinstance(hydra.obj["hyper_parameters"], Foreign) and "omegaconf" not in type(hydra.obj[
        "hyper_parameters"]).__module__
    info = load_checkpoint(saved["lightning-hydra-cifar"].path)
    assert info.maxpool is False and "file.hyper_parameters.data.dataset = cifar10" in info.notes["stem"]
    mm = read_file(saved["mmselfsup"].path)
    assert mm.container == "torch legacy"
    buffer = mm.obj["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, Foreign) and list(buffer._foreign["state"]["_log_history"]) == [5.0, 4.0, 3.0]
    by_hand = read_file(saved["lightning-by-hand"].path)
    assert dict(by_hand.obj["hyper_parameters"]._foreign["items"]) == {"lr": 0.1, "temperature": 0.5}


def test_detectron2_pkl_keeps_0d_arrays(saved):
    info = load_checkpoint(saved["detectron2-pkl"].path)
    assert info.state_dict["bn1.num_batches_tracked"].shape == () and info.state_dict[
        "layer1.0.bn1.num_batches_tracked"].item() == 7


def test_stems(saved, saved50):
    wmse = load_checkpoint(saved["w-mse"].path)
    assert (wmse.stem, wmse.maxpool, wmse.stem_padding) == ("3x3", True, 1)
    solo = load_checkpoint(saved["solo-learn-old-cifar"].path)
    assert (solo.stem, solo.maxpool, solo.stem_padding) == ("3x3", False, 2) and "solo/methods/base.py" in \
        solo.notes["stem"]
    timm50 = load_checkpoint(saved50["timm-resnet50d"].path)
    assert (timm50.arch, timm50.stem) == ("resnet50d", "deep")


def test_detection_refuses_a_stem_that_is_not_torchvisions(saved, capsys, tmp_path, demo_root):
    for name in ("w-mse", "timm-resnet18d"):
        code = run_cli(["--ckpt", str(saved[name].path), "--task", "voc_det", "--demo", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "stem" in err, err
    assert not (tmp_path / "records").exists()


def knn_metrics(path, out, *extra):
    assert run_cli(["--ckpt", str(path), "--task", "knn_stl10", "--demo", "--no-report", "--out", str(out), *extra]) == 0
    return json.loads(next((Path(out) / "records").rglob("*.json")).read_text())


def test_knn_metric_equals_the_torchvision_form(saved, saved50, tmp_path, capsys, demo_root):
    """One kNN run per naming scheme (lightly's Sequential, OBoW's feature blocks, Detectron2's, SimCLR v2's; the
    torchvision file is the reference) and for a stem set by metadata (CIFAR: no max-pool), against the same
    weights saved as a torchvision state_dict. Every other layout is checked above through identical tensors and
    identical features, which fix the metric. The tables are not what this test is about (half its time:
    --no-report); tests/test_report.py renders them."""
    small = ("--set", "resize=32", "--set", "crop=32")  # the same protocol for both files of a pair: 4x cheaper
    ref = knn_metrics(saved["torchvision"].path, tmp_path / "ref", *small)
    assert ref["checkpoint"]["load"] == {"tensors_loaded": 100, "tensors_expected": 100, "unused": {"heads": 2}}
    # lightly's Sequential, OBoW's feature blocks and Detectron2's names hold the reference's very weights: the
    # record's encoder (tensors bit for bit, stem, input) is the reference's, so its kNN run would repeat it
    reference = make_encoder(str(saved["torchvision"].path))[0].state_dict()
    for name in ("lightly-tutorial", "obow", "detectron2-pkl"):
        model, info, _ = make_encoder(str(saved[name].path))
        rec = info.describe()
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items()), name
        assert (rec["stem"], rec["maxpool"], rec["stem_padding"], rec["input_normalization"]) == \
            (ref["checkpoint"]["stem"], ref["checkpoint"]["maxpool"], ref["checkpoint"]["stem_padding"], None), name
        assert rec["key"] == saved[name].expect["key"] and rec["sha256"]
    cifar = saved["lightning-hydra-cifar"]
    torch.save(cifar.tensors, tmp_path / "cifar_tv.pth")
    tiny = ("--set", "resize=16", "--set", "crop=16")  # the pairs: 16 px (a last stage of 1 x 1 or more)
    rec = knn_metrics(cifar.path, tmp_path / "cifar", *tiny)
    assert rec["checkpoint"]["maxpool"] is False and rec["checkpoint"]["stem"] == "3x3"
    tv = knn_metrics(tmp_path / "cifar_tv.pth", tmp_path / "cifar_tv", "--set", "maxpool=false", *tiny)
    assert tv["checkpoint"]["settings"] == {"maxpool": False} and tv["metrics"] == rec["metrics"]
    v2 = saved50["simclr-v2"]
    torch.save(v2.tensors, tmp_path / "v2_tv.pth")
    rec = knn_metrics(v2.path, tmp_path / "v2", *tiny)
    assert rec["checkpoint"]["input_normalization"] == [list(NONE[0]), list(NONE[1])]
    assert "from the checkpoint" in rec["data"]["input_normalization"]
    tv = knn_metrics(tmp_path / "v2_tv.pth", tmp_path / "v2_tv", "--set", "normalize=none", *tiny)
    assert tv["metrics"] == rec["metrics"]
    capsys.readouterr()


def test_inspect_lists_every_candidate_and_the_choice(saved, saved50, capsys):
    assert run_cli(["--inspect", str(saved["moco"].path)]) == 0
    out = capsys.readouterr().out
    assert "* state_dict/module.encoder_q" in out and "state_dict/module.encoder_k" in out
    assert "would use: state_dict/module.encoder_q (MoCo evaluates the query encoder" in out
    assert "prefix module.encoder_q., torchvision names, resnet18" in out and "11.18M parameters" in out
    assert "top-level keys: epoch: 200; arch: 'resnet18'; state_dict:" in out
    assert run_cli(["--inspect", str(saved["vicreg"].path)]) == 0
    assert "read as inert placeholders (never imported or run): __main__.exclude_bias_and_norm" in \
        capsys.readouterr().out
    assert any("resnet50" in line for line in inspect_lines(saved50["simclr-v1"].path))


def test_inspect_reads_no_tensor_data_and_imports_no_torch(saved50, saved, tmp_path):
    code = ("import sys; from evaluate.run import cli; code = cli(['--inspect', sys.argv[1]]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)")
    for path in (saved50["simclr-v2"].path, saved["mmselfsup"].path, saved["detectron2-pkl"].path):
        proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout.endswith("torch not imported\n"), proc.stdout + proc.stderr
        assert "would use:" in proc.stdout


def test_inspect_refuses_code_too(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Evil(str(marker))}, tmp_path / "evil.pth")
    assert run_cli(["--inspect", str(tmp_path / "evil.pth")]) == 2
    assert "refused for safety" in capsys.readouterr().err and not marker.exists()


def test_inspect_of_an_incomplete_file_names_the_closest_candidates(saved, tmp_path, capsys):
    sd = dict(saved["moco"].tensors)
    del sd["layer3.0.conv1.weight"]
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "broken.pth")
    assert run_cli(["--inspect", str(tmp_path / "broken.pth")]) == 0
    out = capsys.readouterr().out
    assert "ResNets found: none" in out and "closest: state_dict/module" in out and \
        "1 missing (layer3.0.conv1.weight)" in out
    code = run_cli(["--ckpt", str(tmp_path / "broken.pth"), "--task", "knn_stl10", "--demo", "--out",
                    str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds no complete ResNet; the closest: state_dict/module" in err


def test_two_unrelated_resnets_need_ckpt_key(saved, tmp_path):
    a, b = saved["torchvision"].tensors, saved["model-prefix"].tensors
    torch.save({"first": a, "second": b}, tmp_path / "two.pth")
    with pytest.raises(UserError, match="holds 2 ResNets .*choose one with --ckpt-key"):
        load_checkpoint(tmp_path / "two.pth")
    assert load_checkpoint(tmp_path / "two.pth", key="second").key == "second"


def test_input_settings(saved, tmp_path, capsys, demo_root):
    settings = resolve_settings({"maxpool": "false", "normalize": "imagenet"})
    model, info, _ = make_encoder(str(saved["w-mse"].path), settings=settings)
    assert info.maxpool is False and isinstance(model.maxpool, torch.nn.Identity)
    assert info.input_normalization[0] == (0.485, 0.456, 0.406) and "normalize=imagenet" in info.normalization
    for value, message in (("normalize=0.5", "give auto, imagenet, none"), ("maxpool=maybe", "expected")):
        code = run_cli(["--ckpt", str(saved["w-mse"].path), "--task", "knn_stl10", "--demo", "--set", value,
                        "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "records").exists()


def test_detectron2_names_round_trip(saved50):
    sd = saved50["simclr-v1"].tensors
    for k in sd:
        d2 = torchvision_to_detectron2_key(k)
        assert d2 is not None and detectron2_to_torchvision_key(d2) == k
    assert torchvision_to_detectron2_key("layer1.0.downsample.1.running_var") == "res2.0.shortcut.norm.running_var"
    assert torchvision_to_detectron2_key("bn1.weight") == "stem.conv1.norm.weight"
    assert torchvision_to_detectron2_key("layer4.2.bn3.bias") == "res5.2.conv3.norm.bias"
    assert torchvision_to_detectron2_key("conv1.0.weight") is None  # timm's deep stem has no Detectron2 name


@pytest.mark.parametrize("target, suffix", [("torchvision", ".pth"), ("safetensors", ".safetensors"),
                                            ("detectron2", ".pkl")])
def test_convert_round_trips(saved, tmp_path, capsys, target, suffix):
    s = saved["swav"]
    out = tmp_path / f"out{suffix}"
    assert convert_cli(["--ckpt", str(s.path), "--to", target, "--out", str(out)]) == 0
    model, info, _ = make_encoder(str(out))
    assert info.format == ("detectron2" if target == "detectron2" else "torchvision")
    for k, v in s.tensors.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[k], v), k
    if target == "detectron2":
        with open(out, "rb") as f:
            d2 = pickle.load(f)
        assert d2["matching_heuristics"] is True and "res5.1.conv2.norm.running_var" in d2["model"]


def test_convert_refuses_detectron2_for_other_stems_and_says_what_the_weights_omit(saved, tmp_path, capsys):
    code = convert_cli(["--ckpt", str(saved["timm-resnet18d"].path), "--to", "detectron2", "--out",
                        str(tmp_path / "x.pkl")])
    assert code == 2 and "torchvision's stem" in capsys.readouterr().err and not (tmp_path / "x.pkl").exists()
    assert convert_cli(["--ckpt", str(saved["solo-learn-old-cifar"].path), "--to", "torchvision", "--out",
                        str(tmp_path / "c.pth")]) == 0
    assert "--set maxpool=false --set stem_padding=2" in capsys.readouterr().out


# ---- refusals ------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("zipped", [True, False])
def test_code_beside_real_weights_is_refused(saved, tmp_path, zipped):
    """A complete ResNet does not excuse a payload in the metadata, in either torch format."""
    marker = tmp_path / "pwned"
    obj = {"state_dict": saved["torchvision"].tensors, "extra": _Evil(str(marker))}
    torch.save(obj, tmp_path / "evil.pth", _use_new_zipfile_serialization=zipped)
    with pytest.raises(UserError, match="would call pathlib.Path.touch while loading; refused for safety"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pth")
    with pytest.raises(UserError, match="TorchScript archive, which runs code when loaded; refused for safety"):
        read_file(tmp_path / "ts.pth")


@pytest.mark.parametrize("name, content, message", [
    ("empty.pth", b"", "is empty"),
    ("notes.txt", b"just some text\n", "not a readable checkpoint"),
    ("broken.pkl", b"\x80\x04\x95", "not a readable checkpoint"),
])
def test_bad_files_exit_2(tmp_path, capsys, name, content, message, demo_root):
    (tmp_path / name).write_bytes(content)
    code = run_cli(["--ckpt", str(tmp_path / name), "--task", "knn_stl10", "--demo", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_truncated_release_and_vit_exit_2(tmp_path, capsys, saved, zipped, demo_root):
    data = saved["mocov3"].path.read_bytes()
    if not zipped:
        data = saved["mmselfsup"].path.read_bytes()
    (tmp_path / "t.pth.tar").write_bytes(data[: len(data) // 3])
    vit = {"state_dict": {"module.base_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                          "module.base_encoder.blocks.0.attn.qkv.weight": torch.zeros(24, 8)}}
    torch.save(vit, tmp_path / "vit.pth.tar")
    for name, message in (("t.pth.tar", "not a readable checkpoint"),
                          ("vit.pth.tar", "holds no complete ViT")):
        code = run_cli(["--ckpt", str(tmp_path / name), "--task", "knn_stl10", "--demo", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_nothing_the_files_name_was_imported(saved):
    """Loading every layout imported none of the foreign modules that no test imports itself."""
    for s in saved.values():
        read_file(s.path)
    assert "main_vicreg" not in sys.modules and not any(m.startswith(("solo", "vissl", "obow")) for m in sys.modules)
