"""Projection heads rebuilt from their weights, and Table 12's alignment / uniformity on the projector's
L2-normalised outputs (Wang & Isola's unit-sphere embedding)."""
import json

import pytest
import torch
import torch.nn as nn

from backbones.heads import head_from_state_dict
from evaluate.run import cli
from tasks.metrics import alignment, uniformity


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.LayerNorm])
def test_heads_are_rebuilt_from_their_state_dicts(norm):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(12, 16), norm(16), nn.ReLU(), nn.Linear(16, 8, bias=False)).eval()
    if norm is nn.BatchNorm1d:
        head[1].running_mean.normal_()
        head[1].running_var.uniform_(0.5, 2)
    rebuilt = head_from_state_dict(head.state_dict()).eval()
    x = torch.randn(5, 12)
    torch.testing.assert_close(rebuilt(x), head(x))
    with pytest.raises(ValueError):
        head_from_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_align_uniform_uses_the_runs_projector(tmp_path, demo_root):
    run = tmp_path / "run"
    tiny = ["crop_size=32", "batch_size=16", "epochs=1", "warmup_epochs=0", "max_steps=2", "workers=0",
            "proj_hidden=64", "pred_hidden=64", "proj_out=32", f"out_dir={run}"]
    from pretrain import train as train_mod
    from pretrain.config import load_config

    train_mod.train(load_config("demo", tiny)[0], "demo", log=lambda *a: None)
    out = tmp_path / "out"
    small = ["--no-report", "--set", "decode_size=36", "--set", "crop_size=32"]  # the space, not the size, is tested
    assert cli(["--ckpt", str(run / "backbone.pth"), "--task", "align_uniform", "--demo", *small, "--out", str(out)]) == 0
    rec = json.loads(next((out / "records").rglob("*.json")).read_text())
    assert rec["data"]["space"] == "projector" and rec["data"]["feature_dim"] == 32
    assert rec["probe"] == {"probe": "align_uniform:projector"}
    # a checkpoint without a run beside it: the backbone's pooled features, and the record says so
    torch.save(torch.load(run / "backbone.pth", weights_only=True), tmp_path / "alone.pth")
    out2 = tmp_path / "out2"
    assert cli(["--ckpt", str(tmp_path / "alone.pth"), "--task", "align_uniform", "--demo", *small,
                "--out", str(out2)]) == 0
    rec2 = json.loads(next((out2 / "records").rglob("*.json")).read_text())
    assert rec2["data"]["space"] == "backbone" and rec2["data"]["feature_dim"] == 512


def test_uniformity_of_uniform_points_on_the_sphere_is_near_minus_four():
    """-4 + log 0F1(; d/2; 4) ≈ -3.94 at d = 128: the value Table 12's -3.8 is close to."""
    g = torch.Generator().manual_seed(0)
    x = nn.functional.normalize(torch.randn(1024, 128, generator=g), dim=1)
    assert uniformity(x) == pytest.approx(-3.938, abs=0.01)
    assert alignment(x, x) == 0
