"""Pretraining: schedules, LARS, EMA, configs, and a resumed run ending exactly where an uninterrupted one does."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.cli import UserError
from pretrain import train as train_mod
from pretrain.config import load_config
from pretrain.model import ema_update, tau_schedule
from pretrain.optim import LARS, lars_param_groups, learning_rate, max_learning_rate

REPO = Path(__file__).resolve().parents[1]
TINY = ["crop_size=32", "batch_size=16", "epochs=1", "warmup_epochs=0", "max_steps=4", "workers=0",
        "proj_hidden=64", "pred_hidden=64", "proj_out=32", "save_every_steps=1", "log_every_steps=1"]


def test_schedules_hand_computed():
    assert max_learning_rate(0.4, 512, 4) == pytest.approx(3.2)  # 0.4 x 512/256 x 4
    assert learning_rate(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert learning_rate(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert learning_rate(55, 100, 10, 1.0) == pytest.approx(0.5)  # half-way through the cosine
    assert learning_rate(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert tau_schedule(0, 100, 0.99) == pytest.approx(0.99)
    assert tau_schedule(50, 100, 0.99) == pytest.approx(0.995)
    assert tau_schedule(100, 100, 0.99) == pytest.approx(1.0)


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
    assert torch.allclose(t[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2])) and torch.allclose(t[1], torch.tensor([0.1]))
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


def run_tiny(tmp_path, name, extra=(), resume=False):
    cfg, _ = load_config("demo", TINY + [f"out_dir={tmp_path / name}", *extra])
    return train_mod.train(cfg, name, resume=resume, log=lambda *a: None)


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path, demo_root):
    full = torch.load(run_tiny(tmp_path, "full") / "last.pth", weights_only=True)
    run_tiny(tmp_path, "split", ["stop_after_steps=2"])
    stopped = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert stopped["step"] == 2 and not (tmp_path / "split" / "backbone.pth").exists()
    run_tiny(tmp_path, "split", resume=True)
    resumed = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert resumed["step"] == full["step"] == 4
    for part in ("online", "target"):
        for k, v in full[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"
    assert not torch.equal(full["online"]["backbone.conv1.weight"], stopped["online"]["backbone.conv1.weight"])
    log = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and "loss_singular" in log[-1] and "effective_rank" in log[-1]


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
    run_tiny(tmp_path, "r", ["stop_after_steps=1"])
    with pytest.raises(UserError, match="config differs from this one in lambda_b"):
        run_tiny(tmp_path, "r", ["lambda_b=0.1"], resume=True)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, demo_root, monkeypatch):
    real = train_mod.losses.multiview_centroid_loss
    calls = {"n": 0}

    def flaky(p, z):
        calls["n"] += 1
        return real(p, z) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(train_mod.losses, "multiview_centroid_loss", flaky)
    with pytest.raises(train_mod.Diverged, match="at step 2"):
        run_tiny(tmp_path, "nan")
    assert torch.load(tmp_path / "nan" / "last.pth", weights_only=True)["step"] == 2


def test_byol_and_layernorm_configs_train(tmp_path, demo_root):
    out = run_tiny(tmp_path, "byol_ln", ["views=2", "loss=byol", "lambda_s=0", "lambda_b=0", "head_norm=layernorm",
                                         "max_steps=2"])
    assert "loss_byol" in (out / "log.jsonl").read_text()


def test_gradient_accumulation_runs(tmp_path, demo_root):
    out = run_tiny(tmp_path, "accumulate", ["accumulate=2", "max_steps=2"])
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 2


def test_cli_exit_codes(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), "--config", "demo", "bogus=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown config key 'bogus'")


@pytest.mark.parametrize("args, message", [
    (["--config", "demo", "head_norm=groupnorm"], "config head_norm='groupnorm' is not one of batchnorm, layernorm"),
    (["--config", "demo", "device=gpu"], "config device='gpu' is not one of auto, cpu, cuda"),
    (["--config", "demo", "amp=bf61"], "config amp='bf61' is not one of none, bf16, fp16"),
    (["--config", "demo", "device=cuda", "max_steps=1"], "device=cuda, but no CUDA device is available"),
    (["--config", "{orphan}"], "names base: no_such_config, but there is no"),
])
def test_pretraining_config_mistakes_exit_2_with_one_sentence(tmp_path, args, message):
    """Each mistake stops the run before any work: exit 2, one line on stderr, no traceback."""
    if torch.cuda.is_available() and "device=cuda" in args:
        pytest.skip("this machine has CUDA")
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("base: no_such_config\nviews: 2\n")
    args = [str(orphan) if a == "{orphan}" else a for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), *args, f"out_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and not (tmp_path / "run").exists()


def test_unreadable_image_in_a_worker_is_one_sentence(tmp_path, demo_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root / "imagenet", root / "imagenet")
    victim = sorted((root / "imagenet" / "train").rglob("*.JPEG"))[5]
    victim.write_bytes(b"not a jpeg")
    proc = subprocess.run([sys.executable, str(REPO / "pretrain/train.py"), "--config", "demo", *TINY,
                           "workers=2", f"data_root={root}", "max_steps=30", "batch_size=16",
                           f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600)
    last = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert proc.returncode == 2 and last == f"error: cannot read image {victim}; fix or remove it"
    assert "Traceback" not in proc.stderr


def test_two_process_ddp_on_cpu(tmp_path, demo_root):
    """torchrun with 2 CPU processes (gloo): the singular value loss sees the global batch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "pretrain/train.py"), "--config", "demo", *TINY, "max_steps=2", f"out_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ddp" / "backbone.pth").is_file()
    assert math.isfinite(torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)["metrics"]["loss"])
