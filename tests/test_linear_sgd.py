"""SGD linear probes: the paper's step schedule, and an interrupted run resumed to the same result."""
import json
import math
from contextlib import contextmanager

import pytest
import torch

from evaluate.run import cli
import core.resume
from tasks.classifier_training import learning_rate
from tasks.linear_sgd import LinearSgdProtocol


def test_step_schedule_divides_by_ten_twice_at_thirds():
    p = LinearSgdProtocol(epochs=28, lr=0.2)
    assert [learning_rate(p, e, 0, 10) for e in (0, 9, 10, 18, 19, 27)] == pytest.approx(
        [0.2, 0.2, 0.02, 0.02, 0.002, 0.002])
    c = LinearSgdProtocol(epochs=10, lr=1.0, schedule="cosine")
    assert learning_rate(c, 0, 0, 4) == pytest.approx(1.0) and learning_rate(c, 5, 0, 4) == pytest.approx(0.5)


def metrics_of(out):
    return json.loads(next((out / "records").rglob("*.json")).read_text())["metrics"]


# 3 epochs, at 32 px: what these tests check (resume, damage, processes) does not depend on the image size
SMALL_IMAGES = ["--set", "resize=36", "--set", "crop=32"]
ARGS = ["--ckpt", "random", "--arch", "resnet18", "--task", "linear_places205", "--demo", "--no-report", *SMALL_IMAGES]


def state_of(out):
    (path,) = (out / "state").glob("*.pt")
    return path


@contextmanager
def one_thread():
    """torch on one thread, as the killed process of the kill -9 test runs (OMP_NUM_THREADS=1): bit-equal runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_root):
    """The output folder of the probe run through (one thread), which the interrupted runs below must equal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    with one_thread():
        assert cli(ARGS + ["--out", str(out)]) == 0
    return out


def test_damaged_state_falls_back_to_the_previous_epoch_or_starts_over(tmp_path, capsys, monkeypatch, uninterrupted):
    """Interrupted after epoch 2: with its state file truncated, --resume continues from the previous state
    (epoch 1); with both files unreadable, it starts over. Each says which in one line; the record is the
    uninterrupted run's."""
    real = core.resume.atomic_save
    for name, damage, message in (("truncated", "half", "resuming from the previous state"),
                                  ("empty", "both", "starting over")):
        calls = {"n": 0}

        def interrupted_after_second_epoch(path, write):
            real(path, write)
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(core.resume, "atomic_save", interrupted_after_second_epoch)
        out = tmp_path / name
        with one_thread():
            assert cli(ARGS + ["--out", str(out)]) == 130
        monkeypatch.setattr(core.resume, "atomic_save", real)
        state = state_of(out)
        assert torch.load(state.with_name(state.name + ".prev"), weights_only=True)["epoch"] == 1
        data = state.read_bytes()
        state.write_bytes(data[:len(data) // 2] if damage == "half" else b"")
        if damage == "both":
            state.with_name(state.name + ".prev").write_bytes(b"\x00" * 10)
        capsys.readouterr()
        with one_thread():
            assert cli(ARGS + ["--out", str(out), "--resume"]) == 0
        said = [line for line in capsys.readouterr().out.splitlines() if "--resume:" in line]
        assert len(said) == 1 and message in said[0], said
        assert metrics_of(out) == metrics_of(uninterrupted)


def test_kill_9_in_the_middle_of_a_probe_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, uninterrupted):
    """A real process killed (SIGKILL) as soon as an epoch's state is saved; the same command with --resume
    writes the uninterrupted run's record, with a bit-equal head (CPU)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from core.files import REPO_ROOT

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "evaluate" / "run.py"), *ARGS, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not list((killed / "state").glob("*.pt")) and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (killed / "records").exists()
    assert torch.load(state_of(killed), weights_only=True)["epoch"] < 3
    with one_thread():
        assert cli(ARGS + ["--out", str(killed), "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert metrics_of(killed) == metrics_of(uninterrupted)
    heads = [torch.load(state_of(d), weights_only=True)["head"] for d in (killed, uninterrupted)]
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_semisup_tasks_train_on_the_subsets_and_leave_the_encoder_alone(tmp_path, capsys, monkeypatch, demo_root):
    import torch
    import torchvision

    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, ckpt)
    args = ["--ckpt", str(ckpt), "--task", "semisup_10pct,knn_in1k", "--demo", "--no-report", *SMALL_IMAGES,
            "--out", str(tmp_path / "a")]
    assert cli(args) == 0
    recs = {r["task"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "a" / "records").rglob("*.json"))}
    semi = recs["semisup_10pct"]
    assert set(semi["metrics"]) == {"semisup10_top1", "semisup10_top5"}
    assert semi["data"]["train_size"] == 72 and semi["data"]["test_size"] == 120  # 10% list; full val
    assert semi["protocol"]["encoder_lr"]["value"] == 2.5e-4 and semi["protocol"]["nesterov"]["value"] is True
    # knn_in1k ran after the finetuning in the same process: it must match a run of its own, with an empty
    # feature cache (so that its features are extracted again from the checkpoint).
    import backbones.features

    monkeypatch.setattr(backbones.features, "cache_dir", lambda: tmp_path / "fresh-cache")
    assert cli(["--ckpt", str(ckpt), "--task", "knn_in1k", "--demo", "--no-report", *SMALL_IMAGES,
                "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "fresh-cache" / "features").is_dir()
    assert metrics_of(tmp_path / "b") == recs["knn_in1k"]["metrics"]


def test_torchrun_with_two_processes_trains_the_same_classifier(tmp_path, demo_root):
    """2 processes over Gloo: each takes half of every batch; the result equals one process's."""
    import os
    import subprocess
    import sys

    import torch

    from core.files import REPO_ROOT

    args = [*ARGS, "--set", "epochs=2"]
    assert cli(args + ["--out", str(tmp_path / "one")]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(REPO_ROOT / "evaluate" / "run.py"), *args,
                           "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("record:") == 1  # rank 0 alone reports and writes
    record = json.loads(next((tmp_path / "two" / "records").rglob("*.json")).read_text())
    assert record["data"]["processes"] == 2
    heads = [torch.load(next((tmp_path / d / "state").glob("*.pt")), weights_only=True)["head"] for d in ("one", "two")]
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], atol=1e-5, rtol=1e-4)
    assert record["metrics"] == metrics_of(tmp_path / "one")


def test_torchrun_refuses_tasks_that_cannot_share_their_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(["--ckpt", "random", "--task", "align_uniform,linear_places205", "--demo", "--out", str(tmp_path)]) == 2
    assert "align_uniform cannot share its work over processes" in capsys.readouterr().err


def test_protocol_sgd_of_the_imagenet_and_stl10_linear_tasks(tmp_path, demo_root):
    out = tmp_path / "sgd"
    assert cli(["--ckpt", "random", "--arch", "resnet18", "--task", "linear_in100,linear_stl10", "--demo",
                "--set", "protocol=sgd", "--set", "sgd_epochs=1", "--no-report", *SMALL_IMAGES, "--out", str(out)]) == 0
    recs = {r["task"]: r for r in (json.loads(p.read_text()) for p in (out / "records").rglob("*.json"))}
    for task, prefix, train_size in (("linear_in100", "in100", 180), ("linear_stl10", "stl10", None)):
        r = recs[task]
        assert set(r["metrics"]) == {f"{prefix}_linear_top1", f"{prefix}_linear_top5"}
        assert 0 <= r["metrics"][f"{prefix}_linear_top1"] <= r["metrics"][f"{prefix}_linear_top5"] <= 100
        assert r["protocol"]["protocol"]["value"] == "sgd" and r["protocol"]["sgd_epochs"]["value"] == 1
        assert r["protocol"]["sgd_schedule"]["value"] == "cosine"
        assert train_size is None or r["data"]["train_size"] == train_size
    # one epoch was trained and saved per task (the state file names the task and protocol)
    assert sorted(p.name.split("__")[0] for p in (out / "state").glob("*.pt")) == ["linear_in100_sgd",
                                                                                   "linear_stl10_sgd"]


def test_places205_probe_on_a_random_resnet50_does_not_diverge_and_presets_carry_sources(tmp_path, demo_root):
    out = tmp_path / "bt"
    assert cli(["--ckpt", "random", "--arch", "resnet50", "--task", "linear_places205", "--demo",
                "--set", "protocol=barlowtwins", "--out", str(out)]) == 0
    rec = json.loads(next((out / "records").rglob("*.json")).read_text())
    history = rec["data"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(math.isfinite(h["train_loss"]) for h in history)
    assert history[-1]["train_loss"] < 2 * history[0]["train_loss"] < 20  # a random ResNet-50's raw features diverged
    assert rec["probe"] == {"probe": "sgd:barlowtwins", "epochs": 3}
    assert rec["protocol"]["lr"]["value"] == 0.01 and rec["protocol"]["lr"]["source"].startswith("Barlow Twins")
    assert rec["protocol"]["weight_decay"]["value"] == 5e-4 and rec["protocol"]["nesterov"]["value"] is True
    assert rec["protocol"]["head_batchnorm"]["value"] is True


def test_no_host_read_per_probe_step(tmp_path, monkeypatch, demo_root):
    """A probe in batches of 8 and one in batches of 32 read the device equally often from classifier_training.py
    (.item(), .tolist(), int(), float()): the loss and accuracy are summed on the device, read once an epoch."""
    import sys

    from core.files import REPO_ROOT

    counted = {"n": 0}
    ours = str(REPO_ROOT / "tasks" / "classifier_training.py")
    for name in ("item", "tolist", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, **k):
            counted["n"] += sys._getframe(1).f_code.co_filename == ours
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    counts = []
    for batch in (8, 32):
        counted["n"] = 0
        assert cli(ARGS + ["--set", f"train_batch_size={batch}", "--set", "epochs=1",
                           "--out", str(tmp_path / str(batch))]) == 0
        counts.append(counted["n"])
    assert counts[0] == counts[1], counts


class TinyViT(torch.nn.Module):
    """timm's vit_tiny at 32 px with 8 px patches, as the family contract's ViT encoder: `.vit` is the timm
    VisionTransformer and forward returns the CLS token after the final norm."""

    def __init__(self):
        super().__init__()
        import timm

        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                     num_classes=0, dynamic_img_size=True)

    def forward(self, x):
        return self.vit(x)


def vit_protocol(**kw):
    import dataclasses

    from tasks.registry import TASKS

    task = TASKS["semisup_10pct"]
    return dataclasses.replace(task.protocol, **{**task.demo, "crop": 32, "resize": 36, "vit_drop_path": 0.0,
                                                 "vit_warmup_epochs": 1.0, **kw})


def test_vit_finetuning_lr_per_layer_is_peak_times_decay_to_the_depth():
    """BEiT / MAE layer-wise decay, computed here from the parameter names: LR = peak x ld^(depth + 1 - layer),
    layer 0 = patch embedding, position embedding and CLS token, layer i = block i - 1, the final norm and the
    head at the peak; no weight decay on biases, norms, pos_embed, cls_token (MAE). (timm's
    param_groups_layer_decay fails it: it gives the last block the final norm's scale.)"""
    from types import SimpleNamespace

    from tasks.classifier_training import make_head, strategy_for

    torch.manual_seed(0)
    p = vit_protocol(vit_layer_decay=0.7)
    ctx = SimpleNamespace(model=TinyViT(), checkpoint=SimpleNamespace(family="vit"))
    strategy = strategy_for(ctx, p)
    assert type(strategy).__name__ == "ViTFinetunedEncoder"
    encoder = strategy.encoder(ctx, torch.device("cpu"))
    head = make_head(192, p)
    opt = strategy.optimizer(p, strategy.param_groups(p, head, encoder))
    assert isinstance(opt, torch.optim.AdamW)
    peak = 5e-4 * p.train_batch_size / 256  # ViT-Ti: ViT-S's values, MAE's blr 5e-4
    assert strategy.learning_rate(p, 1, 0, 10) == pytest.approx(peak)  # the end of the one-epoch warm-up
    assert strategy.learning_rate(p, 0, 5, 10) == pytest.approx(peak / 2)
    strategy.apply_lr(opt, p, peak)
    where = {id(q): g for g in opt.param_groups for q in g["params"]}
    depth = len(encoder.vit.blocks)
    names = list(encoder.vit.named_parameters()) + [(f"head.{n}", q) for n, q in head.named_parameters()]
    assert len(where) == len(names)
    for name, q in names:
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        assert where[id(q)]["lr"] == pytest.approx(peak * 0.7 ** (depth + 1 - layer)), name
        no_decay = q.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert where[id(q)]["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_vit_finetuning_end_to_end_on_the_10pct_subset(tmp_path, demo_root):
    """The 10% task with a ViT: AdamW + layer decay trains a copy (the run's encoder untouched), the MAE
    schedule's LR per epoch in the history, the recipe and its sources in the record's data."""
    from types import SimpleNamespace

    from tasks import semisup
    from tasks.context import RunContext

    torch.manual_seed(0)
    model = TinyViT().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = SimpleNamespace(family="vit", cache_id="tiny-vit-test", sha256="0" * 16, path="tiny",
                                 input_normalization=None)
    ctx = RunContext(model, checkpoint, "vit_tiny", demo_root, torch.device("cpu"), 0, True, tmp_path,
                     log=lambda *a: None)
    p = vit_protocol()
    out = semisup.run(ctx, p, task_name="semisup_10pct")
    assert set(out.metrics) == {"semisup10_top1", "semisup10_top5"}
    info = out.info
    assert info["encoder_training"]["optimizer"].startswith("AdamW")
    assert info["encoder_training"]["layer_decay"] == {"value": 0.75, "source": "as ViT-S"}
    peak = 5e-4 * p.train_batch_size / 256
    assert [h["lr"] for h in info["history"]] == pytest.approx([0.0, peak])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    saved = torch.load(ctx.state_path("semisup_10pct"), weights_only=True)["encoder"]
    assert not torch.equal(saved["vit.blocks.0.attn.qkv.weight"], before["vit.blocks.0.attn.qkv.weight"])
