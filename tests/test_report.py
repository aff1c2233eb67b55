"""The paper tables from hand-written records: exact cells, trials, demo marking, determinism, plots."""
import csv
import json
import math

import pytest
import torch

from evaluate.report import cli as report_cli
from tasks.metrics import alignment, uniformity

MSBREG_K4 = {"dataset": "imagenet100", "arch": "resnet18", "views": 4, "loss": "msbreg", "lambda_s": 0.004,
             "lambda_b": 0.5, "head_norm": "batchnorm", "batch_size": 512, "epochs": 320}


PROBES = {"linear_in100": "linear:wmse", "knn_in100": "knn:wmse", "knn_stl10": "knn:wmse"}


def record(task, metrics, sha, pretraining=None, demo=False, path="/ckpts/r18.pth", engine="pytorch", probe=None):
    return {"record_version": 2, "task": task, "demo": demo, "engine": engine, "metrics": metrics, "arch": "resnet18",
            "probe": {"probe": probe or PROBES[task]},
            "checkpoint": {"path": path, "sha256": sha, "format": "torchvision", "pretraining": pretraining}}


@pytest.fixture
def records_dir(tmp_path):
    recs = {
        "linear_in100/a.json": record("linear_in100", {"in100_linear_top1": 80.0, "in100_linear_top5": 95.0},
                                      "a" * 64, MSBREG_K4, path="/runs/k4/backbone.pth"),
        "linear_in100/b.json": record("linear_in100", {"in100_linear_top1": 81.0, "in100_linear_top5": 95.5},
                                      "a" * 64, MSBREG_K4, path="/runs/k4/backbone.pth"),
        "knn_in100/c.json": record("knn_in100", {"in100_knn5_top1": 74.0}, "a" * 64, MSBREG_K4,
                                   path="/runs/k4/backbone.pth"),
        "linear_in100/d.json": record("linear_in100", {"in100_linear_top1": 40.0}, "d" * 64, MSBREG_K4, demo=True,
                                      path="/runs/demo/backbone.pth"),
        "knn_stl10/e.json": record("knn_stl10", {"stl10_knn5_top1": 12.0}, None, path="random:resnet18:seed0"),
        "linear_in100/g.json": record("linear_in100", {"in100_linear_top1": 78.0}, "g" * 64,
                                      {**MSBREG_K4, "epochs": 300}, path="/runs/k4_300ep/backbone.pth"),
        "linear_in100/f.json": record("linear_in100", {"in100_linear_top1": 70.0}, "a" * 64, MSBREG_K4,
                                      path="/runs/k4/backbone.pth", probe="linear:fast"),
    }
    for rel, rec in recs.items():
        path = tmp_path / "records" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    (tmp_path / "records" / "stray.json").write_text("{not json")
    return tmp_path


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cell(rows, label, metric):
    hit = [r for r in rows if r["method_or_checkpoint"] == label and r["metric"] == metric]
    assert len(hit) == 1, (label, metric, hit)
    return hit[0]


def test_table1_cells(records_dir, capsys):
    assert report_cli(["--records", str(records_dir)]) == 0
    out = records_dir / "tables"
    rows = read_rows(out / "table1.csv")
    k4 = cell(rows, "MSBReg K=4", "in100_linear_top1")
    assert (k4["ours_mean"], k4["n"], k4["paper"], k4["difference"]) == ("80.5000", "2", "80.38", "+0.1200")
    assert k4["ours_std"] == f"{math.sqrt(0.5):.4f}" and k4["records"] == "r3 r4"
    assert cell(rows, "MSBReg K=4", "in100_knn5_top1")["ours_mean"] == "74.0000"
    k8 = cell(rows, "MSBReg K=8", "in100_linear_top1")
    assert (k8["ours_mean"], k8["paper"], k8["n"]) == ("", "81.56", "0")  # reported only
    demo = cell(rows, "demo/backbone.pth [demo]", "in100_linear_top1")
    assert demo["source"] == "ours" and demo["ours_mean"] == "40.0000" and demo["paper"] == ""
    rand = cell(rows, "random:resnet18:seed0", "stl10_knn5_top1")
    assert rand["ours_mean"] == "12.0000"
    md = (out / "table1.md").read_text()
    assert "80.50 ± 0.71 (n=2) (paper 80.38, Δ +0.12) [r3, r4]" in md
    assert "— (paper 81.56, reported)" in md and "- r3: records/linear_in100/a.json" in md


def test_settings_place_records_in_ablation_rows(records_dir, capsys):
    report_cli(["--records", str(records_dir)])
    t11 = read_rows(records_dir / "tables" / "table11.csv")
    hit = [r for r in t11 if r["ours_mean"]]
    # Table 11's grid ran 300 epochs (§10): the 300-epoch record fills its cell, the 320-epoch ones do not
    assert [(r["method_or_checkpoint"], r["setting"], r["ours_mean"]) for r in hit if r["source"] == "paper"] == [
        ("MSBReg K=4", "K=4;lambda_s=0.004;lambda_b=0.5", "78.0000")]
    t8 = read_rows(records_dir / "tables" / "table8.csv")
    assert [r["setting"] for r in t8 if r["source"] == "paper" and r["ours_mean"]] == [
        "K=4;centroid=1;brownian=1;singular=1"]
    t1 = read_rows(records_dir / "tables" / "table1.csv")
    assert "78.0000" not in {r["ours_mean"] for r in t1 if r["source"] == "paper"}  # Table 1 is 320 epochs (§7.1)
    eff = read_rows(records_dir / "tables" / "efficiency.csv")
    # the efficiency table's MSBReg row is 300 epochs: the 300-epoch record fills it, the 320-epoch ones do not
    assert [r["ours_mean"] for r in eff if r["source"] == "paper" and r["ours_mean"]] == ["78.0000"]


def test_a_record_of_another_protocol_is_not_placed_and_says_why(records_dir, capsys):
    report_cli(["--records", str(records_dir)])
    rows = read_rows(records_dir / "tables" / "table1.csv")
    fast = cell(rows, "k4/backbone.pth [linear:fast]", "in100_linear_top1")
    assert fast["source"] == "ours" and fast["ours_mean"] == "70.0000" and fast["paper"] == ""
    assert cell(rows, "MSBReg K=4", "in100_linear_top1")["ours_mean"] == "80.5000"  # the fast record is not in it
    md = (records_dir / "tables" / "table1.md").read_text()
    assert ("k4/backbone.pth [linear:fast]: pretrained as the paper's row 'MSBReg K=4', but measured with "
            "linear:fast; the paper's cell was measured with linear:wmse") in md
    assert "| paper | MSBReg K=4 | resnet18 |  | 80.50 ± 0.71 (n=2) (paper 80.38, Δ +0.12)" in md
    assert "(paper 93.00, reported)" in md and "(paper 74.30," in md  # the paper's numbers as it prints them


def test_family_tables_plots_and_determinism(records_dir, tmp_path, capsys):
    runs = tmp_path / "runs" / "demo"
    runs.mkdir(parents=True)
    (runs / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1 / s, "lr": 0.1, "tau": 0.99,
                                                          "embedding_std": 0.08, "effective_rank": 30.0})
                                              for s in range(1, 6)) + "\n")
    assert report_cli(["--records", str(records_dir), "--runs", str(tmp_path / "runs")]) == 0
    out = records_dir / "tables"
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    linear = read_rows(out / "linear.csv")
    assert {(r["checkpoint"], r["protocol"]) for r in linear} == {
        ("k4/backbone.pth", "linear:wmse"), ("k4/backbone.pth", "linear:fast"), ("k4_300ep/backbone.pth", "linear:wmse"),
        ("demo/backbone.pth [demo]", "linear:wmse")}
    for name in ("linear", "knn"):
        for line in (out / f"{name}.md").read_text().splitlines():
            assert line.count("|") - 1 <= 12 if line.startswith("|") else True
    pngs = [p for p in first if p.suffix == ".png"]
    assert {"plots/linear.png", "plots/knn.png"} <= {p.as_posix() for p in pngs}
    assert any("pretraining" in p.name for p in pngs) and any(p.name == "table11_lambda_grid.png" for p in pngs)
    assert all(first[p].startswith(b"\x89PNG") for p in pngs)
    assert report_cli(["--records", str(records_dir), "--runs", str(tmp_path / "runs")]) == 0
    second = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert first == second


def test_report_without_records_exits_2(tmp_path, capsys):
    assert report_cli(["--records", str(tmp_path)]) == 2
    assert "holds no records/ folder" in capsys.readouterr().err


def test_alignment_and_uniformity_against_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    align = sum(float(((x[i] - y[i]) ** 2).sum()) for i in range(12)) / 12
    pairs = [math.exp(-2 * float(((x[i] - x[j]) ** 2).sum())) for i in range(12) for j in range(i + 1, 12)]
    assert alignment(x, y) == pytest.approx(align, rel=1e-6)
    assert uniformity(x) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-6)


def test_records_of_every_version_read_with_their_version(tmp_path):
    from core.cli import UserError
    from results.record import RECORD_VERSION, read_record, read_records

    old = tmp_path / "records" / "knn_stl10" / "r18__20260101-000000.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"task": "knn_stl10", "metrics": {}, "checkpoint": {}}))  # version 1: no field
    assert read_record(old)["record_version"] == 1
    future = old.with_name("r18__20260101-000001.json")
    future.write_text(json.dumps({"record_version": RECORD_VERSION + 1, "task": "x", "metrics": {}, "checkpoint": {}}))
    with pytest.raises(UserError, match=f"version {RECORD_VERSION + 1}, newer than"):
        read_record(future)
    skipped = []
    assert [p.name for p, _ in read_records(tmp_path, warn=skipped.append)] == [old.name]
    assert len(skipped) == 1 and "newer than" in skipped[0]


def test_detection_trials_fill_a_cell_with_their_mean_and_std(tmp_path, capsys):
    pre = {**MSBREG_K4, "dataset": "imagenet", "arch": "resnet50", "epochs": 300}
    trials = [{"seed": s, "metrics": {"ap50": v, "ap75": 0.0, "ap": 0.0}} for s, v in enumerate((80.0, 82.0, 84.0))]
    rec = {**record("linear_in100", {"voc_det_ap50": 82.0}, "c" * 64, pre, path="/runs/r50/backbone.pth",
                    engine="detectron2"), "task": "voc_det", "arch": "resnet50",
           "probe": {"engine": "detectron2", "trials": 3}, "data": {"trials": trials}}
    path = tmp_path / "records" / "voc_det" / "r50__20260101-000000.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    assert report_cli(["--records", str(tmp_path)]) == 0
    c = cell(read_rows(tmp_path / "tables" / "table5.csv"), "MSBReg K=4", "voc_det_ap50")
    assert (c["ours_mean"], c["ours_std"], c["n"]) == ("82.0000", "2.0000", "3")


def test_runs_of_compared_methods_fill_their_rows_as_reproductions(tmp_path, capsys):
    wmse4 = {"dataset": "imagenet100", "arch": "resnet18", "views": 4, "method": "wmse", "batch_size": 256,
             "epochs": 240}
    mocov2 = {"dataset": "imagenet", "arch": "resnet50", "views": 2, "method": "mocov2", "batch_size": 256,
              "epochs": 200}
    recs = {"linear_in100/w.json": record("linear_in100", {"in100_linear_top1": 78.5}, "w" * 64, wmse4),
            "voc_det/m.json": {**record("linear_in100", {"voc_det_ap50": 81.9}, "m" * 64, mocov2, engine="detectron2"),
                               "task": "voc_det", "arch": "resnet50", "probe": {"engine": "detectron2"}}}
    for rel, rec in recs.items():
        path = tmp_path / "records" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    assert report_cli(["--records", str(tmp_path)]) == 0
    assert cell(read_rows(tmp_path / "tables" / "table1.csv"), "W-MSE 4", "in100_linear_top1")["ours_mean"] == "78.5000"
    # Table 5 writes "MoCo v2" where Table 2 writes "MoCo-v2": the run of the mocov2 method fills both spellings
    assert cell(read_rows(tmp_path / "tables" / "table5.csv"), "MoCo v2", "voc_det_ap50")["ours_mean"] == "81.9000"
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "| paper, reproduced here | W-MSE 4 | resnet18 |" in md
    assert "| paper | MSBReg K=4 | resnet18 |" in md  # the paper's own rows are not reproductions


def write_records(root, recs):
    for rel, rec in recs.items():
        path = root / "records" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    return root


def test_latex_and_csv_formats(records_dir, capsys):
    assert report_cli(["--records", str(records_dir), "--format", "latex,csv"]) == 0
    out = records_dir / "tables"
    assert not (out / "table1.md").exists()  # only the formats asked for
    tex = (out / "table1.tex").read_text()
    assert r"\begin{tabular}{lllll" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"in100\_linear\_top1" in tex and r"80.50 $\pm$ 0.71 (n=2) (paper 80.38, $\Delta$ +0.12)" in tex
    assert r"\footnotesize k4/backbone.pth [linear:fast]: pretrained as the paper's row" in tex
    assert "_" not in tex.replace(r"\_", "")  # every underscore escaped
    rows = read_rows(out / "records.csv")
    on_disk = sorted(p for p in (records_dir / "records").rglob("*.json") if p.name != "stray.json")
    assert [r["record"] for r in rows] == [p.relative_to(records_dir).as_posix() for p in on_disk]
    for r, p in zip(rows, on_disk):
        rec = json.loads(p.read_text())
        for metric, value in rec["metrics"].items():
            assert r[metric] == f"{value:.2f}"
        assert r["task"] == rec["task"] and r["sha256"] == (rec["checkpoint"]["sha256"] or "")
    assert report_cli(["--records", str(records_dir), "--format", "pdf"]) == 2
    assert "--format pdf: choose from md, latex, csv" in capsys.readouterr().err


def test_metrics_against_epoch_one_plot_per_kind(tmp_path, capsys):
    recs = {}
    for epoch, (knn, lin) in {1: (20.0, 30.0), 2: (25.0, 35.0), 10: (40.0, 50.0)}.items():
        ck = {"path": f"/runs/demo/backbone_epoch{epoch:04d}.pth", "epoch": epoch}
        recs[f"knn_stl10/e{epoch}.json"] = {**record("knn_stl10", {"stl10_knn5_top1": knn}, f"{epoch}" * 64),
                                           "record_version": 3}
        recs[f"knn_stl10/e{epoch}.json"]["checkpoint"].update(ck)
        recs[f"linear_stl10/e{epoch}.json"] = {**record("linear_in100", {"stl10_linear_top1": lin}, f"{epoch}" * 64,
                                                        probe="linear:fast"), "task": "linear_stl10"}
        recs[f"linear_stl10/e{epoch}.json"]["checkpoint"].update(ck)
    write_records(tmp_path, recs)
    assert report_cli(["--records", str(tmp_path)]) == 0
    plots = tmp_path / "tables" / "plots"
    assert (plots / "epochs_knn.png").read_bytes().startswith(b"\x89PNG")
    assert (plots / "epochs_linear.png").read_bytes().startswith(b"\x89PNG")
    knn = read_rows(tmp_path / "tables" / "knn.csv")
    assert {r["checkpoint"] for r in knn} == {f"demo/backbone_epoch{e:04d}.pth" for e in (1, 2, 10)}
    without = write_records(tmp_path / "plain", {"knn_stl10/a.json": record("knn_stl10", {"stl10_knn5_top1": 1.0},
                                                                            "a" * 64)})
    assert report_cli(["--records", str(without)]) == 0
    assert not list((without / "tables" / "plots").glob("epochs_*.png"))


def test_vit_records_keep_family_and_tap_and_are_marked_beside_resnet_rows(tmp_path, capsys):
    vit = {**record("knn_stl10", {"in1k_knn20_top1": 74.5, "in1k_knn200_top1": 72.0}, "v" * 64,
                    path="/zoo/dino_deitsmall16_pretrain.pth", probe="knn:npid"), "task": "knn_in1k",
           "arch": "vit_small_patch16_224", "record_version": 3}
    vit["probe"]["tap"] = "cls"
    vit["checkpoint"].update({"family": "vit", "release": "dino"})
    r50 = {**record("knn_stl10", {"in1k_knn20_top1": 60.0}, "r" * 64, path="/zoo/r50.pth", probe="knn:npid"),
           "task": "knn_in1k", "arch": "resnet50"}
    write_records(tmp_path, {"knn_in1k/vit.json": vit, "knn_in1k/r50.json": r50})
    assert report_cli(["--records", str(tmp_path)]) == 0
    knn = read_rows(tmp_path / "tables" / "knn.csv")
    assert {(r["checkpoint"], r["family"], r["tap"]) for r in knn} == {
        ("dino_deitsmall16_pretrain.pth", "vit", "cls"), ("r50.pth", "resnet", "")}
    t4 = read_rows(tmp_path / "tables" / "table4.csv")
    assert cell(t4, "dino_deitsmall16_pretrain.pth [vit]", "in1k_knn20_top1")["ours_mean"] == "74.5000"
    assert cell(t4, "r50.pth", "in1k_knn20_top1")["ours_mean"] == "60.0000"  # a ResNet is not marked
    md = (tmp_path / "tables" / "table4.md").read_text()
    assert ("dino_deitsmall16_pretrain.pth [vit]: a vit encoder (vit_small_patch16_224), another architecture than "
            "the table's resnet50 rows") in md


def test_a_row_of_its_own_measured_with_another_protocol_carries_a_footnote(tmp_path, capsys):
    npid = record("knn_stl10", {"stl10_knn5_top1": 50.0}, "t" * 64, path="/zoo/third_party.pth", probe="knn:npid")
    fast = record("linear_in100", {"in100_linear_top1": 60.0}, "t" * 64, path="/zoo/third_party.pth",
                  probe="linear:fast")
    wmse = record("knn_stl10", {"stl10_knn5_top1": 45.0}, "u" * 64, path="/zoo/other.pth")
    write_records(tmp_path, {"knn_stl10/a.json": npid, "linear_in100/b.json": fast, "knn_stl10/c.json": wmse})
    assert report_cli(["--records", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "tables" / "table1.csv")
    assert cell(rows, "third_party.pth [knn:npid]", "stl10_knn5_top1")["ours_mean"] == "50.0000"
    assert cell(rows, "third_party.pth [linear:fast]", "in100_linear_top1")["ours_mean"] == "60.0000"
    assert cell(rows, "other.pth", "stl10_knn5_top1")["ours_mean"] == "45.0000"  # Table 1's protocol: no mark
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert ("- third_party.pth [knn:npid]: measured with knn:npid; the paper's cells of this table were measured "
            "with knn:wmse, so the numbers do not compare") in md
    assert "- third_party.pth [linear:fast]: measured with linear:fast; the paper's cells of this table were " \
           "measured with linear:wmse" in md
    assert "other.pth:" not in md


def test_lambda_grid_without_records_draws_nothing_and_says_so(tmp_path, capsys):
    write_records(tmp_path, {"knn_stl10/a.json": record("knn_stl10", {"stl10_knn5_top1": 1.0}, "a" * 64)})
    assert report_cli(["--records", str(tmp_path)]) == 0
    assert "Table 11's λ grid: no records (nothing drawn)" in capsys.readouterr().out
    assert not (tmp_path / "tables" / "plots" / "table11_lambda_grid.png").exists()


def test_trials_of_a_record_give_mean_and_std_over_n(tmp_path, capsys):
    trials = [{"seed": s, "metrics": {"in100_linear_top1": v}} for s, v in enumerate((79.0, 80.0, 84.0))]
    rec = {**record("linear_in100", {"in100_linear_top1": 81.0}, "a" * 64, MSBREG_K4, path="/runs/k4/backbone.pth"),
           "record_version": 3, "trials": trials, "metrics_std": {"in100_linear_top1": 2.6458}}
    write_records(tmp_path, {"linear_in100/a.json": rec})
    assert report_cli(["--records", str(tmp_path)]) == 0
    c = cell(read_rows(tmp_path / "tables" / "table1.csv"), "MSBReg K=4", "in100_linear_top1")
    assert (c["ours_mean"], c["ours_std"], c["n"]) == ("81.0000", f"{math.sqrt(7):.4f}", "3")
    linear = (tmp_path / "tables" / "linear.md").read_text()
    assert f"81.00 ± {math.sqrt(7):.2f} (n=3)" in linear


def test_a_record_of_version_2_is_the_same_run_as_a_new_command_on_its_checkpoint(tmp_path):
    from results.record import finished_runs, make_run_key, read_record, run_key_text

    protocol = {"k": {"value": [5], "source": "paper"}, "temperature": {"value": 0.07, "source": "NPID"}}
    old = {**record("knn_stl10", {"stl10_knn5_top1": 30.0}, "b" * 64), "protocol": protocol, "seed": 0}
    path = write_records(tmp_path, {"knn_stl10/r18__20260101-000000.json": old}) / "records" / "knn_stl10" / \
        "r18__20260101-000000.json"
    assert read_record(path)["record_version"] == 2
    same = make_run_key(checkpoint_id="b" * 64, task="knn_stl10", protocol_values={"k": (5,), "temperature": 0.07},
                        seeds=[0], demo=False, selection={"arch": None, "settings": {}})
    assert finished_runs(tmp_path) == {run_key_text(same): path}
    for other in (dict(seeds=[1]), dict(demo=True), dict(protocol_values={"k": (20,), "temperature": 0.07}),
                  dict(checkpoint_id="c" * 64), dict(selection={"ckpt_key": "teacher"})):
        key = make_run_key(**{**dict(checkpoint_id="b" * 64, task="knn_stl10", seeds=[0], demo=False,
                                     protocol_values={"k": (5,), "temperature": 0.07}), **other})
        assert run_key_text(key) not in finished_runs(tmp_path), other
