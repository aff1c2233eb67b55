"""Result records -> the paper's tables: which record fills which cell, and how cells aggregate.

A record fills a paper row when its checkpoint carries this suite's pretraining settings and they
agree with the row: method (MSBReg K=k or BYOL), backbone, and every key of the row's setting
(K, lambda_s, lambda_b, norm, batch, epochs, and Table 8's centroid / brownian / singular flags).
Every other record is a row of its own, named after its checkpoint. Demo records and records of
another engine are never placed in a paper row: they get rows of their own, marked.
"""
import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from core.files import REPO_ROOT

PAPER_CSV = REPO_ROOT / "results" / "paper" / "paper_tables.csv"
PAPER_ENGINE = {"voc_det": "detectron2", "coco_instseg": "detectron2"}  # what the paper's numbers used

TITLES = {
    "table1": "Table 1: ImageNet-100 and STL-10, linear and 5-NN (ResNet-18)",
    "table2": "Table 2: ImageNet linear top-1 by pretraining epochs (ResNet-50)",
    "table3": "Table 3: semi-supervised ImageNet, 1% and 10% labels",
    "table4": "Table 4: ImageNet kNN",
    "table5": "Table 5: transfer (VOC07 SVM, Places205, iNat18, VOC detection)",
    "table7": "Table 7: ImageNet linear top-1 by epochs",
    "table8": "Table 8: loss-term ablation on ImageNet-100",
    "table10": "Table 10: COCO instance segmentation",
    "table11": "Table 11: the λ_s x λ_b grid on ImageNet-100",
    "table12": "Table 12: alignment and uniformity",
    "table13": "Table 13: BatchNorm vs LayerNorm heads on STL-10",
    "efficiency": "Training efficiency (poster)",
}


@dataclass(frozen=True)
class PaperValue:
    table: str
    method: str
    backbone: str
    setting: str
    metric: str
    value: float
    note: str


def read_paper(path=PAPER_CSV):
    with open(path, newline="") as f:
        return [PaperValue(r["table"], r["method"], r["backbone"], r["setting"], r["metric"], float(r["value"]),
                           r["note"]) for r in csv.DictReader(f)]


def method_label(pretraining) -> str:
    if not pretraining:
        return None
    return "BYOL" if pretraining.get("loss") == "byol" else f"MSBReg K={pretraining.get('views')}"


def our_settings(p) -> dict:
    msbreg = p.get("loss") == "msbreg"
    lam_s, lam_b = float(p.get("lambda_s") or 0), float(p.get("lambda_b") or 0)
    return {"K": p.get("views"), "lambda_s": lam_s, "lambda_b": lam_b, "norm": p.get("head_norm"),
            "batch": p.get("batch_size"), "epochs": p.get("epochs"), "centroid": int(msbreg),
            "brownian": int(lam_b > 0), "singular": int(lam_s > 0)}


def parse_setting(text: str) -> dict:
    return dict(part.split("=", 1) for part in text.split(";") if part)


def _same(ours, theirs: str) -> bool:
    try:
        return float(ours) == float(theirs)
    except (TypeError, ValueError):
        return str(ours) == theirs


def row_matches(row: PaperValue, record: dict) -> bool:
    pre = record.get("checkpoint", {}).get("pretraining")
    label = method_label(pre)
    if label is None or record.get("demo") or record.get("engine") != PAPER_ENGINE.get(record.get("task"), "pytorch"):
        return False
    same_method = row.method == label or (label == "BYOL" and row.method.startswith("BYOL"))
    if not same_method or row.backbone != pre.get("arch"):
        return False
    ours = our_settings(pre)
    return all(key in ours and _same(ours[key], value) for key, value in parse_setting(row.setting).items())


def checkpoint_label(record: dict) -> str:
    ck = record.get("checkpoint", {})
    path = ck.get("path", "?")
    name = path if ck.get("format") == "random" else Path(path).name
    if Path(path).name in ("backbone.pth", "last.pth"):
        name = f"{Path(path).parent.name}/{Path(path).name}"
    flags = [f for f, on in (("demo", record.get("demo")),
                             (f"engine {record.get('engine')}", record.get("engine") != PAPER_ENGINE.get(
                                 record.get("task"), "pytorch"))) if on]
    return name + (f" [{', '.join(flags)}]" if flags else "")


def checkpoint_key(record: dict) -> tuple:
    ck = record.get("checkpoint", {})
    return (checkpoint_label(record), (ck.get("sha256") or "-")[:12], record.get("arch", ""))


@dataclass
class Cell:
    values: list
    records: list  # record ids (r1, r2, ...)
    paper: float = None

    def mean(self):
        return statistics.fmean(self.values) if self.values else None

    def std(self):
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        if not self.values:
            return "no record" if self.paper is None else f"— (paper {self.paper:g}, reported)"
        ours = f"{self.mean():.2f}" + (f" ± {self.std():.2f} (n={len(self.values)})" if len(self.values) > 1 else "")
        refs = f" [{', '.join(self.records)}]"
        if self.paper is None:
            return ours + refs
        return f"{ours} (paper {self.paper:g}, Δ {self.mean() - self.paper:+.2f}){refs}"


def build_table(table: str, paper, records):
    """(metrics, rows) for one paper table; rows are (kind, label columns, {metric: Cell})."""
    mine = [p for p in paper if p.table == table]
    metrics = sorted({p.metric for p in mine}, key=lambda m: [p.metric for p in mine].index(m))
    rows, order = {}, []
    for p in mine:
        key = ("paper", p.method, p.backbone, p.setting)
        if key not in rows:
            rows[key] = {m: Cell([], []) for m in metrics}
            order.append(key)
        rows[key][p.metric].paper = p.value
    for rid, rec in records:
        for metric, value in rec.get("metrics", {}).items():
            if metric not in metrics:
                continue
            placed = [k for k in order if k[0] == "paper" and rows[k][metric].paper is not None
                      and row_matches(PaperValue(table, k[1], k[2], k[3], metric, 0, ""), rec)]
            keys = placed or [("ours",) + checkpoint_key(rec)]
            for key in keys:
                if key not in rows:
                    rows[key] = {m: Cell([], []) for m in metrics}
                    order.append(key)
                rows[key][metric].values.append(float(value))
                rows[key][metric].records.append(rid)
    paper_rows = [k for k in order if k[0] == "paper"]
    our_rows = sorted(k for k in order if k[0] == "ours")
    return metrics, [(k, rows[k]) for k in paper_rows + our_rows]
