"""SGD linear probes: the paper's step schedule, and an interrupted run resumed to the same result."""
import json

import pytest

from evaluate.run import cli
from tasks import linear_sgd
from tasks.linear_sgd import LinearSgdProtocol, learning_rate


def test_step_schedule_divides_by_ten_twice_at_thirds():
    p = LinearSgdProtocol(epochs=28, lr=0.2)
    assert [learning_rate(p, e, 0, 10) for e in (0, 9, 10, 18, 19, 27)] == pytest.approx(
        [0.2, 0.2, 0.02, 0.02, 0.002, 0.002])
    c = LinearSgdProtocol(epochs=10, lr=1.0, schedule="cosine")
    assert learning_rate(c, 0, 0, 4) == pytest.approx(1.0) and learning_rate(c, 5, 0, 4) == pytest.approx(0.5)


def metrics_of(out):
    return json.loads(next((out / "records").rglob("*.json")).read_text())["metrics"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path, capsys, monkeypatch, demo_root):
    args = ["--ckpt", "random", "--arch", "resnet18", "--task", "linear_places205", "--demo"]
    assert cli(args + ["--out", str(tmp_path / "full")]) == 0
    real, calls = linear_sgd.atomic_torch_save, {"n": 0}

    def interrupted_after_first_epoch(obj, path):
        real(obj, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(linear_sgd, "atomic_torch_save", interrupted_after_first_epoch)
    assert cli(args + ["--out", str(tmp_path / "split")]) == 130
    assert not (tmp_path / "split" / "records").exists()
    assert cli(args + ["--out", str(tmp_path / "split"), "--resume"]) == 0
    assert "after epoch 1" in capsys.readouterr().out
    assert metrics_of(tmp_path / "split") == metrics_of(tmp_path / "full")


def test_semisup_tasks_train_on_the_subsets_and_leave_the_encoder_alone(tmp_path, capsys, monkeypatch, demo_root):
    import torch
    import torchvision

    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, ckpt)
    args = ["--ckpt", str(ckpt), "--task", "semisup_10pct,knn_in1k", "--demo", "--out", str(tmp_path / "a")]
    assert cli(args) == 0
    recs = {r["task"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "a" / "records").rglob("*.json"))}
    semi = recs["semisup_10pct"]
    assert set(semi["metrics"]) == {"semisup10_top1", "semisup10_top5"}
    assert semi["data"]["train_size"] == 72 and semi["data"]["test_size"] == 120  # 10% list; full val
    assert semi["protocol"]["encoder_lr"]["value"] == 2.5e-4 and semi["protocol"]["nesterov"]["value"] is True
    # knn_in1k ran after the finetuning in the same process: it must match a run of its own, with an empty
    # feature cache (so that its features are extracted again from the checkpoint).
    import evaluate.features

    monkeypatch.setattr(evaluate.features, "cache_dir", lambda: tmp_path / "fresh-cache")
    assert cli(["--ckpt", str(ckpt), "--task", "knn_in1k", "--demo", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "fresh-cache" / "features").is_dir()
    assert metrics_of(tmp_path / "b") == recs["knn_in1k"]["metrics"]
