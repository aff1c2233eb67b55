"""Pretraining: schedules, LARS, EMA, configs, and a resumed run ending exactly where an uninterrupted one does."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.cli import UserError
from pretrain import train as train_mod
from pretrain.config import load_config
from pretrain.model import Encoder, ema_update, run_views, tau_schedule
from pretrain.optim import LARS, lars_param_groups, learning_rate, max_learning_rate, step_learning_rate

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny training steps are latency-bound: one thread is several times faster than two on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ["crop_size=32", "batch_size=16", "epochs=1", "warmup_epochs=0", "max_steps=4", "workers=0",
        "proj_hidden=64", "pred_hidden=64", "proj_out=32", "save_every_steps=1000", "log_every_steps=1"]
# (last.pth is written at the end or the stop only: a ResNet-18 state with its optimiser is ~130 MB a save)


def test_schedules_hand_computed():
    assert max_learning_rate(0.4, 512, 4) == pytest.approx(3.2)  # 0.4 x 512/256 x 4
    assert learning_rate(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert learning_rate(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert learning_rate(55, 100, 10, 1.0) == pytest.approx(0.5)  # half-way through the cosine
    assert learning_rate(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert tau_schedule(0, 100, 0.99) == pytest.approx(0.99)
    assert tau_schedule(50, 100, 0.99) == pytest.approx(0.995)
    assert tau_schedule(100, 100, 0.99) == pytest.approx(1.0)
    assert max_learning_rate(0.3, 512, 2, "linear") == pytest.approx(0.6)  # BYOL, SimCLR v1: x batch/256
    assert max_learning_rate(0.075, 4096, 2, "sqrt") == pytest.approx(4.8)  # SimCLR v2: 0.075 x 64
    assert max_learning_rate(2e-3, 512, 4, "none") == 2e-3  # W-MSE, MoCo
    assert learning_rate(100, 100, 10, 1.0, final_ratio=0.001) == pytest.approx(0.001)  # Barlow Twins' end LR
    assert learning_rate(55, 100, 10, 1.0, final_ratio=0.001) == pytest.approx(0.5005)
    # W-MSE: 500 warm-up iterations, x0.2 at epochs 190 and 215 of 240 (10 steps per epoch here)
    assert step_learning_rate(0, 10, 240, 500, 2e-3) == pytest.approx(2e-3 / 500)
    assert step_learning_rate(1899, 10, 240, 500, 2e-3) == pytest.approx(2e-3)
    assert step_learning_rate(1900, 10, 240, 500, 2e-3) == pytest.approx(4e-4)
    assert step_learning_rate(2150, 10, 240, 500, 2e-3) == pytest.approx(8e-5)


def test_lars_step_hand_computed():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS(lars_param_groups([("w", w), ("b", b)]), lr=0.1, momentum=0.9, weight_decay=0.1,
               trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 0.6]]), torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.3, 1.0]])  # g + wd w
    trust = 0.01 * 5 / update.norm()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    assert torch.allclose(b, torch.tensor([0.8]))  # bias: plain SGD, no decay, no trust ratio
    w.grad, b.grad = torch.zeros(1, 2), torch.zeros(1)
    before = b.detach().clone()
    opt.step()
    assert torch.allclose(b, before - 0.1 * 0.9 * 2.0)  # momentum carries on


def test_ema_update_matches_formula():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    o = [torch.tensor([3.0, 0.0]), torch.tensor([1.0])]
    tb, ob = [torch.tensor([5.0])], [torch.tensor([7.0])]
    ema_update((t, o, tb, ob), tau=0.9)
    assert torch.allclose(t[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2]))
    assert torch.allclose(t[1], torch.tensor([0.1]))
    assert tb[0].item() == 7.0


def test_config_errors():
    with pytest.raises(UserError, match="unknown config key 'lamda_s'; valid keys: dataset"):
        load_config("demo", ["lamda_s=0.1"])
    with pytest.raises(UserError, match="no config 'nope'"):
        load_config("nope")
    with pytest.raises(UserError, match="expected int"):
        load_config("demo", ["views=four"])
    cfg, name = load_config("in100_r18_k8", ["lambda_b=0.25"])
    assert (name, cfg.views, cfg.lambda_b, cfg.dataset) == ("in100_r18_k8", 8, 0.25, "imagenet100")


@pytest.mark.parametrize("config, overrides, message", [
    ("demo_simclr", ["lambda_s=0.1"], "config key lambda_s is not used by method simclr (whose own keys are: views, "
                                      "temperature"),
    ("demo", ["method=simclr"], "config key pred_hidden is not used by method simclr"),  # demo.yaml's MSBReg keys
    ("demo_byol_uniformity", ["lambda_b=0.5"], "config key lambda_b is not used by method byol_uniformity"),
    ("demo_mocov2", ["trust_coefficient=0.01"], "config key trust_coefficient is not used by optimizer sgd"),
    ("demo", ["lr_drops=10,5"], "config key lr_drops is not used by lr_schedule cosine"),
    ("demo_cpc", ["views=2"], "config key views is not used by method cpc"),
    ("demo_simclr", ["temperature=0.2", "view_forward=diagonal"], "view_forward='diagonal' is not one of"),
    ("demo_byol", ["views=4"], "method byol takes views=2, not 4"),
    ("demo", ["loss=byol", "method=msbreg"], "the command line gives method msbreg and loss byol"),
    ("demo_wmse", ["w_size=24"], "w_size 24 must divide the batch of one step (32 images)"),
    ("demo_mocov2", ["queue_size=48"], "queue_size 48 must be a multiple of the batch of one step"),
    ("demo_cpc", ["crop_size=42"], "crop_size 42 does not cut into a 3 x 3 grid"),
    ("demo_wmse", ["warmup_epochs=1"], "give the warm-up once"),
    ("demo_byol_multicrop", ["blur_p=[1.0,0.1]"], "blur_p lists 2 values for 8 views"),
])
def test_a_key_or_value_the_method_cannot_use_is_one_sentence(config, overrides, message):
    with pytest.raises(UserError) as e:
        load_config(config, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_loss_is_the_old_name_of_method():
    cfg, _ = load_config("demo", ["loss=byol", "views=2", "lambda_s=0", "lambda_b=0"])
    assert (cfg.method, cfg.loss, cfg.views) == ("byol", "byol", 2)
    cfg, _ = load_config("demo_simclr")
    assert (cfg.method, cfg.loss, cfg.views) == ("simclr", "simclr", 2)  # views default to the method's own


def test_every_config_loads_and_every_method_key_exists():
    from pretrain.config import CONFIG_DIR, METHODS, PretrainConfig
    from pretrain.methods import METHODS as CLASSES

    assert tuple(CLASSES) == METHODS
    fields = set(PretrainConfig.__dataclass_fields__)
    for cls in CLASSES.values():
        assert set(cls.keys) <= fields, cls.name
    exempt = {"base", "workers", "save_every_steps", "log_every_steps", "amp"}
    seen = set()
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg, _ = load_config(path.stem)
        seen.add(cfg.method)
        for line in path.read_text().splitlines():  # each value states its source
            key = line.split(":", 1)[0]
            if line and not line.startswith((" ", "#")) and key not in exempt:
                assert "#" in line or key.startswith("data_root"), f"{path.name}: {line}"
    assert seen == set(METHODS)
    for method in METHODS:  # a demo, an ImageNet-100 ResNet-18 and an ImageNet ResNet-50 config per method
        stems = {"msbreg": ("demo", "in100_r18_k4", "imagenet_r50_k4"), "wmse": ("demo_wmse", "wmse_in100_r18",
                 "wmse4_imagenet_r50")}.get(method, (f"demo_{method}", f"{method}_in100_r18", f"{method}_imagenet_r50"))
        for stem in stems:
            assert (CONFIG_DIR / f"{stem}.yaml").is_file(), stem
    assert load_config("stl10_r18_k4")[0].stem == "3x3" and load_config("in100_r18_k4")[0].stem == "torchvision"
    byol300 = load_config("byol_in100_r18_300")[0]  # BYOL's 300-epoch presets (Grill et al. App. F)
    assert (byol300.epochs, byol300.tau_base, byol300.base_lr, byol300.weight_decay) == (300, 0.99, 0.3, 1e-6)


def test_views_per_view_or_in_one_pass():
    """per_view: BatchNorm statistics of each view alone (BYOL, W-MSE); one_pass: of all views together."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3)
    views = [torch.randn(5, 3) * (i + 1) + i for i in range(3)]
    separate = run_views(bn, views, per_view=True)
    joint = run_views(bn, views, per_view=False)
    for v, s, j in zip(views, separate, joint):
        assert torch.allclose(s, torch.nn.functional.batch_norm(v, None, None, training=True))
    assert torch.allclose(torch.cat(joint), torch.nn.functional.batch_norm(torch.cat(views), None, None, training=True))
    mixed = run_views(lambda x: x.mean(dim=(2, 3)), [torch.ones(2, 3, 8, 8), torch.ones(2, 3, 4, 4)], per_view=False)
    assert [m.shape for m in mixed] == [(2, 3), (2, 3)]  # multi-crop: one pass per view size
    enc = Encoder(torch.nn.Identity(), torch.nn.BatchNorm1d(3), head_on_concat=True)
    z, p = enc(views)
    assert p is None and torch.allclose(torch.cat(z), torch.nn.functional.batch_norm(torch.cat(views), None, None,
                                                                                      training=True))


# Smaller still, for the tests that train the same steps three times (resume after damage, kill -9).
SMALL = ["crop_size=16", "batch_size=8", "views=2"]


def run_tiny(tmp_path, name, extra=(), resume=False):
    cfg, _ = load_config("demo", TINY + [f"out_dir={tmp_path / name}", *extra])
    return train_mod.train(cfg, name, resume=resume, log=lambda *a: None)


# One demo config per method (BYOL through its + L_b / + L_s variants), each cut down to two tiny steps.
METHOD_DEMOS = ("demo", "demo_byol_lb", "demo_byol_ls", "demo_byol_uniformity", "demo_byol_multicrop", "demo_simclr",
                "demo_simclrv2", "demo_mocov2", "demo_barlowtwins", "demo_wmse", "demo_drlim", "demo_cpc")
TINY_METHOD = {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 32, "queue_size": 16, "bn_splits": 2,
               "small_crops": 2, "small_crop_size": 8, "w_size": 8}


def tiny_overrides(config):
    """Two steps of 8 images at 16 px with small heads; only keys the config's method reads."""
    from pretrain.config import used_keys

    cfg, _ = load_config(config)
    used = used_keys(cfg)
    out = ["crop_size=16", "batch_size=8", "epochs=1", "max_steps=2", "workers=0", "save_every_steps=100",
           "log_every_steps=1", "warmup_steps=1" if cfg.warmup_steps else "warmup_epochs=0"]
    out += [f"{k}={v}" for k, v in TINY_METHOD.items() if k in used]
    if cfg.method == "wmse":
        out += ["proj_out=4", "stem=3x3"]  # w_size 8 > 4 dimensions; and the small-image stem's export
    return out


def test_every_method_trains_resumes_exactly_and_exports(tmp_path, demo_root, capsys):
    """Each method: an uninterrupted run, and a run resumed from that run's state after step 1 (the file a run
    stopped there writes: both are the step's one save; test_resume_refuses_a_changed_config stops one), end with
    the same online network, target / key encoder (and MoCo's queue); the exported backbone loads as a plain
    ResNet, and its records name the method."""
    import shutil

    from backbones.checkpoints import load_checkpoint, make_encoder

    for config in METHOD_DEMOS:
        over = tiny_overrides(config) + ["save_every_steps=1"]  # the step-1 state stays as last.pth.prev
        full_dir, split_dir = tmp_path / config / "full", tmp_path / config / "split"
        cfg, _ = load_config(config, over + [f"out_dir={full_dir}"])
        train_mod.train(cfg, config, log=lambda *a: None)
        split_dir.mkdir()
        shutil.copyfile(full_dir / "last.pth.prev", split_dir / "last.pth")
        # mmap: the tensors compared are read from the page cache, the optimiser's never
        stopped = torch.load(split_dir / "last.pth", weights_only=True, mmap=True)
        assert stopped["step"] == 1
        resumed_cfg = load_config(config, over + [f"out_dir={split_dir}"])[0]
        train_mod.train(resumed_cfg, config, resume=True, log=lambda *a: None)
        full = torch.load(full_dir / "last.pth", weights_only=True, mmap=True)
        resumed = torch.load(split_dir / "last.pth", weights_only=True, mmap=True)
        assert resumed["step"] == full["step"] == 2 and full["method"] == cfg.method, config
        for part in ("online", "target"):
            assert full[part].keys() == resumed[part].keys()
            for k, v in full[part].items():
                assert torch.equal(v, resumed[part][k]), f"{config}: {part}.{k}"
        assert not torch.equal(full["online"]["backbone.conv1.weight"], stopped["online"]["backbone.conv1.weight"])
        has_target = cfg.method in ("msbreg", "byol", "byol_uniformity", "byol_multicrop", "mocov2")
        assert bool(full["target"]) == has_target, config
        log = [json.loads(line) for line in (full_dir / "log.jsonl").read_text().splitlines()]
        assert len(log) == 2 and all(math.isfinite(r["loss"]) and "effective_rank" in r for r in log), config
        model, info, arch = make_encoder(str(full_dir / "backbone.pth"))
        assert arch == "resnet18" and info.pretraining["method"] == cfg.method, config
        assert info.stem == ("3x3" if cfg.method == "wmse" else "torchvision"), config
        assert load_checkpoint(full_dir / "last.pth").pretraining["method"] == cfg.method
    moco = torch.load(tmp_path / "demo_mocov2" / "full" / "last.pth", weights_only=True)["target"]
    assert moco["queue"].shape == (16, 16) and int(moco["queue_ptr"]) == 0  # two batches of 8 keys went in
    # the 3x3-stem W-MSE backbone through the evaluation command: the record names the method and the stem
    from evaluate.run import cli

    out = tmp_path / "eval"
    assert cli(["--ckpt", str(tmp_path / "demo_wmse" / "full" / "backbone.pth"), "--task", "knn_in100", "--demo",
                "--set", "resize=36", "--set", "crop=32", "--no-report", "--out", str(out)]) == 0
    capsys.readouterr()
    record = json.loads(next((out / "records").rglob("*.json")).read_text())
    assert record["checkpoint"]["pretraining"]["method"] == "wmse" and record["checkpoint"]["stem"] == "3x3"


def test_exported_backbone_evaluates_as_it_is(tmp_path, demo_root):
    from backbones.checkpoints import make_encoder

    out = run_tiny(tmp_path, "export")
    model, info, arch = make_encoder(str(out / "backbone.pth"))
    state = torch.load(out / "last.pth", weights_only=True)["online"]
    assert arch == "resnet18" and info.format == "torchvision"
    assert torch.equal(model.state_dict()["layer2.0.conv1.weight"], state["backbone.layer2.0.conv1.weight"])
    # last.pth itself: the online backbone by default, the EMA target on request.
    online, info, _ = make_encoder(str(out / "last.pth"))
    target, tinfo, _ = make_encoder(str(out / "last.pth"), part="target")
    assert (info.format, info.part, tinfo.part) == ("ssl-suite-pretrain", "online", "target")
    assert "online.projector" in info.dropped and "target.backbone" in info.dropped
    for k, v in model.state_dict().items():
        assert torch.equal(online.state_dict()[k], v)
    assert not torch.equal(target.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])


def test_resume_refuses_a_changed_config(tmp_path, demo_root):
    out = run_tiny(tmp_path, "r", ["stop_after_steps=1"])
    # stopped: the step's state saved, no backbone exported (the schedule is not done)
    assert torch.load(out / "last.pth", weights_only=True, mmap=True)["step"] == 1
    assert not (out / "backbone.pth").exists()
    with pytest.raises(UserError, match="config differs from this one in lambda_b"):
        run_tiny(tmp_path, "r", ["lambda_b=0.1"], resume=True)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, demo_root, monkeypatch):
    from pretrain import losses

    real = losses.multiview_centroid_loss
    calls = {"n": 0}

    def flaky(p, z):
        calls["n"] += 1
        return real(p, z) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(losses, "multiview_centroid_loss", flaky)
    with pytest.raises(train_mod.Diverged, match="at step 2"):
        run_tiny(tmp_path, "nan", ["save_every_steps=1"])
    assert torch.load(tmp_path / "nan" / "last.pth", weights_only=True)["step"] == 2


def test_layernorm_heads_are_layernorm_and_train(tmp_path, demo_root):
    """head_norm=layernorm (Table 13): every norm of the projector and predictor is a LayerNorm of the hidden
    width (none is a BatchNorm), in the built network and in the saved state (no running statistics)."""
    from pretrain.methods import build_method

    over = ["views=2", "loss=byol", "lambda_s=0", "lambda_b=0", "max_steps=2"]
    for norm, kind in (("layernorm", torch.nn.LayerNorm), ("batchnorm", torch.nn.BatchNorm1d)):
        cfg, _ = load_config("demo", TINY + over + [f"head_norm={norm}"])
        method = build_method(cfg, 1)
        for net in (method.online.projector, method.online.predictor, method.target.projector):
            norms = [m for m in net.modules()
                     if isinstance(m, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase))]
            assert [type(m) for m in norms] == [kind] and norms[0].weight.shape == (64,), norm
    out = run_tiny(tmp_path, "byol_ln", over + ["head_norm=layernorm"])
    assert "loss_byol" in (out / "log.jsonl").read_text()
    online = torch.load(out / "last.pth", weights_only=True)["online"]
    heads = [k for k in online if k.startswith(("projector.", "predictor."))]
    assert "projector.1.weight" in heads and not any("running_" in k for k in heads)


def per_sample_norms(module):
    """The ResNet's BatchNorm2d layers replaced by GroupNorm(1, C): statistics of each image alone."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, torch.nn.GroupNorm(1, child.num_features))
        else:
            per_sample_norms(child)
    return module


def test_gradient_accumulation_of_2_x_b_equals_one_step_of_2b(tmp_path, demo_root, monkeypatch):
    """accumulate=2 (two micro-batches of 8) ends with the parameters of accumulate=1 (one batch of 16).

    Exact only where every sample's loss is independent of the others in its micro-batch, so here: BYOL's
    per-image loss (no L_s / L_b, whose batch covariance and noise draws depend on the micro-batch), LayerNorm
    heads and the backbone's BatchNorm swapped for a per-image GroupNorm (BatchNorm normalises over the
    micro-batch of 8, not 16: accumulation then changes the statistics by design), and views cut without
    random draws (the augmentation's draws follow the micro-batch order). What remains is float summation
    order: parameters equal within 1e-6."""
    import pretrain.model

    real_build = pretrain.model.build_backbone
    monkeypatch.setattr(pretrain.model, "build_backbone", lambda *a, **k: per_sample_norms(real_build(*a, **k)))

    def fixed_views(cfg, batch, augs, g):
        x = torch.nn.functional.interpolate(batch.float() / 255, size=cfg.crop_size, mode="bilinear")
        return [x, x.flip(3)]

    monkeypatch.setattr(train_mod, "cut_views", fixed_views)
    over = ["views=2", "loss=byol", "lambda_s=0", "lambda_b=0", "head_norm=layernorm", "max_steps=2",
            "crop_size=16"]
    states = [torch.load(run_tiny(tmp_path, f"acc{a}", over + [f"accumulate={a}"]) / "last.pth", weights_only=True)
              for a in (1, 2)]
    for part in ("online", "target"):
        for k, v in states[0][part].items():
            torch.testing.assert_close(states[1][part][k], v, atol=1e-6, rtol=0, msg=f"{part}.{k}")
    from pretrain.methods import build_method

    torch.manual_seed(0)  # the initial network, as train() builds it: both runs moved away from it
    initial = build_method(load_config("demo", TINY + over)[0], 1).online.state_dict()
    assert states[0]["step"] == states[1]["step"] == 2
    for k in ("backbone.conv1.weight", "projector.0.bias", "predictor.1.weight"):
        assert (states[0]["online"][k] - initial[k]).abs().max() > 1e-4, k


def test_cli_exit_codes(tmp_path, capsys):
    assert train_mod.cli(["--config", "demo", "bogus=1", f"out_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key 'bogus'")


def test_the_script_runs_as_a_file(tmp_path):
    """One real process for the script's own entry (its sys.path line, its exit code); the mistakes
    themselves are tested in-process below."""
    proc = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), "--config", "demo", "views=four"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "expected int" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--config", "demo", "head_norm=groupnorm"], "config head_norm='groupnorm' is not one of batchnorm, layernorm"),
    (["--config", "demo", "device=gpu"], "device='gpu' is not cpu, cuda or cuda:N"),
    (["--config", "demo", "amp=bf61"], "config amp='bf61' is not one of none, bf16, fp16"),
    (["--config", "demo", "device=cuda", "max_steps=1"], "device=cuda asked for CUDA, but no CUDA device is available"),
    (["--config", "{orphan}"], "names base: no_such_config, but there is no"),
    (["--config", "demo", "--resume"], "--resume: no checkpoint at"),
])
def test_pretraining_config_mistakes_exit_2_with_one_sentence(tmp_path, capsys, args, message):
    """Each mistake stops the run before any work: exit 2, one line on stderr, no traceback, no run folder."""
    if torch.cuda.is_available() and "device=cuda" in args:
        pytest.skip("this machine has CUDA")
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("base: no_such_config\nviews: 2\n")
    args = [str(orphan) if a == "{orphan}" else a for a in args]
    code = train_mod.cli([*args, f"out_dir={tmp_path / 'run'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("error: ") and not (tmp_path / "run").exists()


def test_unreadable_image_in_a_worker_is_one_sentence(tmp_path, demo_root, capsys):
    """An image that cannot be decoded, met in a loader worker process: exit 2 naming it, no traceback."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root / "imagenet", root / "imagenet")
    victim = sorted((root / "imagenet" / "train").rglob("*.JPEG"))[5]
    victim.write_bytes(b"not a jpeg")
    code = train_mod.cli(["--config", "demo", *TINY, "crop_size=16", "views=2", "workers=2", f"data_root={root}",
                          "max_steps=30", "batch_size=16", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert code == 2 and last == f"error: cannot read image {victim}; fix or remove it"
    assert "Traceback" not in err


# Run by torchrun in two Gloo processes: one group (made here, so that each training keeps it) for the trainings
# of sys.argv[1] (JSON [[config, overrides]]), one after the other: one torchrun start for both.
DDP_SCRIPT = """
import json
import sys
import torch.distributed as dist
from pretrain.config import load_config
from pretrain.train import train

dist.init_process_group("gloo")
for config, overrides in json.loads(sys.argv[1]):
    cfg, name = load_config(config, overrides)
    train(cfg, name, log=print if dist.get_rank() == 0 else (lambda *a: None))
dist.destroy_process_group()
"""
DDP_CONFIGS = ("demo", "demo_mocov2")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, demo_root):
    """Both DDP trainings under one torchrun with 2 CPU processes (OMP_NUM_THREADS=1): the output folder of each."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "script.py").write_text(DDP_SCRIPT)
    runs = {"demo": [*TINY, "max_steps=2"],
            "demo_mocov2": [*tiny_overrides("demo_mocov2"), "batch_size=16", "queue_size=32"]}
    plan = [[config, [*runs[config], f"out_dir={out / config}"]] for config in DDP_CONFIGS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(out / "script.py"), json.dumps(plan)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {config: out / config for config in DDP_CONFIGS}


@pytest.mark.parametrize("config", DDP_CONFIGS)
def test_two_process_ddp_on_cpu(two_process_runs, config):
    """torchrun with 2 CPU processes (gloo): MSBReg's singular value loss sees the global batch; MoCo's keys of
    both processes enter the queue, and each process splits its own part of the batch for BatchNorm."""
    out = two_process_runs[config]
    assert (out / "backbone.pth").is_file()
    import yaml

    # sync_bn=auto in force: off, as SyncBatchNorm needs CUDA (on 2 GPUs it is on: test_sync_bn_follows_...)
    assert yaml.safe_load((out / "config.yaml").read_text())["sync_bn"] == "false"
    state = torch.load(out / "last.pth", weights_only=True)
    assert math.isfinite(state["metrics"]["loss"])
    if config == "demo_mocov2":  # 2 steps x 16 keys (8 from each process) fill the queue of 32 exactly once
        assert int(state["target"]["queue_ptr"]) == 0 and state["target"]["queue"].shape == (32, 16)


def test_shutdown_leaves_the_group_its_caller_made_and_ends_the_one_it_made(tmp_path, monkeypatch):
    """core.distributed: a script that made its process group keeps it through a training's shutdown (the DDP
    fixture above runs two trainings in one group); a group setup_distributed made, shutdown ends."""
    import torch.distributed as dist

    from core import distributed

    real = dist.init_process_group

    def one_process_group(backend, **kwargs):  # a real Gloo group of one process, where torchrun's would be
        real(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store0'}", rank=0, world_size=1)
    try:
        distributed.setup_distributed(torch.device("cpu"))  # joins the caller's group (a second init would raise)
        distributed.shutdown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    monkeypatch.setattr(distributed.dist, "init_process_group", one_process_group)
    distributed.setup_distributed(torch.device("cpu"))
    assert dist.is_initialized()
    distributed.shutdown()
    assert not dist.is_initialized()


def test_sweeps_expand_to_loadable_commands():
    import yaml

    from pretrain.sweep import commands

    table11 = list(commands(yaml.safe_load((REPO / "pretrain/sweeps/table11.yaml").read_text())))
    assert len(table11) == 3 * 4 * 5 and all("epochs=300" in c for c in table11)  # paper §10: 300 epochs
    table8 = list(commands(yaml.safe_load((REPO / "pretrain/sweeps/table8.yaml").read_text())))
    for cmd in table11[::7] + table8:
        at = cmd.index("--config")
        cfg, _ = load_config(cmd[at + 1], [a for a in cmd[at + 2:] if not a.startswith("out_dir=")])
        assert cfg.epochs == (300 if cmd in table11 else 320)


@pytest.fixture
def epochs_of_two_steps(monkeypatch):
    """The demo images cut to 32, so that a batch of 16 makes an epoch of two steps."""

    class FirstImages(train_mod.SquareImages):
        def __init__(self, splits, size):
            super().__init__(splits, size)
            self.items = self.items[:32]

    monkeypatch.setattr(train_mod, "SquareImages", FirstImages)


def test_save_every_epochs_exports_the_backbone_after_each_epoch(tmp_path, demo_root, epochs_of_two_steps):
    """backbone_epoch0001.pth is the online backbone after epoch 1 (step 2), backbone_epoch0002.pth after
    epoch 2, equal to the final backbone.pth; a resumed run keeps numbering by completed epochs."""
    out = run_tiny(tmp_path, "epochs", ["save_every_epochs=1", "epochs=2", "max_steps=0", "stop_after_steps=3"])
    after_two = torch.load(out / "last.pth", weights_only=True)  # saved every step: step 3 now
    first = torch.load(out / "backbone_epoch0001.pth", weights_only=True)
    assert sorted(p.name for p in out.glob("backbone*.pth")) == ["backbone_epoch0001.pth"]
    assert after_two["step"] == 3 and not any(k.startswith("fc.") for k in first)
    run_tiny(tmp_path, "epochs", ["save_every_epochs=1", "epochs=2", "max_steps=0"], resume=True)
    second = torch.load(out / "backbone_epoch0002.pth", weights_only=True)
    final = torch.load(out / "backbone.pth", weights_only=True)
    assert second.keys() == final.keys() == first.keys()
    assert all(torch.equal(second[k], final[k]) for k in final)
    assert not torch.equal(first["conv1.weight"], second["conv1.weight"])
    # epoch 1 is the network after step 2: a run stopped there saved the same weights
    two = run_tiny(tmp_path, "two", ["epochs=2", "max_steps=0", "stop_after_steps=2"])
    online = torch.load(two / "last.pth", weights_only=True)["online"]
    assert all(torch.equal(first[k], online[f"backbone.{k}"]) for k in first)


def assert_same_networks(a, b):
    for part in ("online", "target"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_or_starts_over(tmp_path, demo_root):
    """--resume with a truncated last.pth continues from last.pth.prev (the step before), with an empty one
    and an unreadable previous state it starts over; each says which in one line and ends where an
    uninterrupted run does."""
    full = torch.load(run_tiny(tmp_path, "full", SMALL + ["max_steps=3"]) / "last.pth", weights_only=True)
    for name, damage, message in (("truncated", "half", "resuming from the previous state"),
                                  ("empty", "both", "starting over")):
        out = tmp_path / name
        cfg, _ = load_config("demo", TINY + SMALL + [f"out_dir={out}", "max_steps=3", "stop_after_steps=2",
                                                     "save_every_steps=1"])
        train_mod.train(cfg, name, log=lambda *a: None)
        assert torch.load(out / "last.pth.prev", weights_only=True)["step"] == 1
        data = (out / "last.pth").read_bytes()
        (out / "last.pth").write_bytes(data[:len(data) // 2] if damage == "half" else b"")
        if damage == "both":
            (out / "last.pth.prev").write_bytes(b"not a checkpoint")
        (out / ".last.pth.x1y2.tmp").write_bytes(b"left by a killed writer")
        cfg, _ = load_config("demo", TINY + SMALL + [f"out_dir={out}", "max_steps=3"])
        said = []
        train_mod.train(cfg, name, resume=True, log=said.append)
        damaged = [line for line in said if line.startswith("--resume:")]
        assert len(damaged) == 1 and message in damaged[0] and "\n" not in damaged[0], said
        assert any(line.startswith("resumed") and "last.pth.prev at step 1" in line for line in said) == (
            damage == "half"), said
        assert_same_networks(torch.load(out / "last.pth", weights_only=True), full)
        assert not list(out.glob(".last.pth.*.tmp"))


def test_kill_9_in_the_middle_of_pretraining_then_resume_equals_an_uninterrupted_run(tmp_path, demo_root):
    """SIGKILL as soon as a step is saved (a real process, no clean-up of any kind); the same command with
    --resume ends bit-equal to an uninterrupted run (CPU, one thread)."""
    import signal
    import time

    argv = ["--config", "demo", *TINY, *SMALL, "max_steps=6", "save_every_steps=1", f"out_dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain/train.py"), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not (tmp_path / "killed" / "last.pth").exists() and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)["step"]
    assert killed_at < 6 and not (tmp_path / "killed" / "backbone.pth").exists()
    assert train_mod.main(argv + ["--resume"]) == 0
    full = torch.load(run_tiny(tmp_path, "full", SMALL + ["max_steps=6"]) / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)
    assert resumed["step"] == 6
    assert_same_networks(resumed, full)
    assert resumed["optimizer"]["state"].keys() == full["optimizer"]["state"].keys()
    for k, v in full["optimizer"]["state"].items():
        assert all(torch.equal(v[n], resumed["optimizer"]["state"][k][n]) for n in v if torch.is_tensor(v[n]))


def test_sync_bn_follows_the_process_count():
    """sync_bn=auto: on with several CUDA processes (global batch statistics, as BYOL), off on one process,
    on the CPU and for MoCo v2's shuffle BN; explicit values win where they can run."""
    demo = load_config("demo")[0]
    assert demo.sync_bn == "auto"
    cases = [(demo, 1, "cuda", False), (demo, 2, "cuda", True), (demo, 8, "cuda:3", True), (demo, 2, "cpu", False),
             (load_config("demo_mocov2")[0], 2, "cuda", False),
             (load_config("demo", ["sync_bn=false"])[0], 2, "cuda", False),
             (load_config("demo", ["sync_bn=true"])[0], 1, "cuda", False)]
    for cfg, world, device, expected in cases:
        on, sentence = train_mod.batch_norm_sync(cfg, world, torch.device(device))
        assert on is expected and ("synchronised" in sentence) is expected, (cfg.method, world, device)
    with pytest.raises(UserError, match="sync_bn=true needs CUDA"):
        train_mod.batch_norm_sync(load_config("demo", ["sync_bn=true"])[0], 2, torch.device("cpu"))
    with pytest.raises(UserError, match="mocov2 keeps BatchNorm statistics per split"):
        load_config("demo_mocov2", ["sync_bn=true"])


@pytest.fixture
def host_reads(monkeypatch):
    """Counts tensor reads to the host (.item(), .tolist(), int(), float()) made directly by the code of
    pretrain/ and tasks/classifier_training.py: on a GPU each one waits for the device."""
    counted = {"n": 0}
    ours = (str(REPO / "pretrain"), str(REPO / "tasks" / "classifier_training.py"))
    for name in ("item", "tolist", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                counted["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counted


@pytest.mark.parametrize("config", ["demo", "demo_mocov2"])
def test_no_host_read_per_training_step(tmp_path, demo_root, host_reads, config):
    """Runs of 2 and 5 steps, logged and saved once at the end, read the device equally often: the loss
    terms are summed on the device and MoCo's queue pointer is a Python int."""
    over = tiny_overrides(config) + ["log_every_steps=1000", "save_every_steps=1000"]
    over += ["queue_size=64"] if config == "demo_mocov2" else ["views=2"]
    counts = []
    for steps in (2, 5):
        cfg, _ = load_config(config, over + [f"max_steps={steps}", f"out_dir={tmp_path / str(steps)}"])
        host_reads["n"] = 0
        train_mod.train(cfg, config, log=lambda *a: None)
        counts.append(host_reads["n"])
    assert counts[0] == counts[1], counts


def reference_lars(groups, steps):
    """LARS as it was written before (and as BYOL's optimizer.py states it), one tensor at a time:
    u = g + wd w; u *= eta ||w|| / ||u|| where both norms are > 0 (else 1); buf = m buf + u (buf = u at first);
    w -= lr buf. Excluded groups (lars=False, wd 0): plain SGD with momentum."""
    bufs = {}
    for grads in steps:
        for group in groups:
            for p in group["params"]:
                g = grads[id(p)]
                u = g + group["weight_decay"] * p if group["lars"] else g.clone()
                if group["lars"]:
                    w_norm, u_norm = p.norm(), u.norm()
                    u = u * torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                bufs[id(p)] = u.clone() if id(p) not in bufs else bufs[id(p)] * group["momentum"] + u
                p -= group["lr"] * bufs[id(p)]


def test_vectorised_lars_equals_the_per_tensor_formula():
    torch.manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (16,), (32, 16), (32,), (10, 32), (10,), (4, 4)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    with torch.no_grad():
        params[-1].zero_()  # ||w|| = 0: trust ratio 1
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    steps = [{id(p): torch.randn_like(p) for p in params} for _ in range(3)]
    steps[1][id(params[3])].zero_()  # a zero gradient with weight decay still moves the weights
    opt = LARS(lars_param_groups(named), lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=1e-3)
    ref_params = [p.detach().clone() for p in params]
    initial = [p.detach().clone() for p in params]
    ref_groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [ref_params[[id(q) for q in params].index(id(p))] for p in g["params"]]}
                  for g in opt.param_groups]
    ref_steps = [{id(ref_params[i]): s[id(p)] for i, p in enumerate(params)} for s in steps]
    for grads in steps:
        for p in params:
            p.grad = grads[id(p)].clone()
        opt.step()
    reference_lars(ref_groups, ref_steps)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
    assert all((p.detach() - w).abs().max() > 1e-6 for p, w in zip(params, initial))  # every tensor moved
