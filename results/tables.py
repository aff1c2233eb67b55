"""Result records -> the paper's tables: which record fills which cell, and how cells aggregate.

A record fills a paper cell only when both hold:
- its checkpoint carries this suite's pretraining settings and they agree with the row: method, backbone,
  every key of the row's setting (K, λ_s, λ_b, norm, batch, epochs, Table 8's loss-term flags), and the
  pretraining length the paper states for the table (`TABLE_EPOCHS`);
- it was measured with the protocol that produced the paper's number (`cell_protocol`): W-MSE's probes for
  Table 1 and the ImageNet-100 / STL-10 ablations, BYOL's linear evaluation for Tables 2 and 7, SimCLR's
  semi-supervised protocol, NPID's kNN, Goyal et al.'s SVM features, the paper's or Barlow Twins' Places205 /
  iNat18 probe by row, Detectron2 for detection.
Every other record is a row of its own, named after its checkpoint; a record whose method and settings fit
a paper row but whose protocol does not is marked with the protocol it was measured with, and a footnote
says which protocol the paper's cells use. Demo records are never placed in a paper row.

The paper's numbers are kept as the text the paper prints (93.00, not 93.0).
"""
import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from core.files import REPO_ROOT

PAPER_CSV = REPO_ROOT / "results" / "paper" / "paper_tables.csv"
# The pretraining settings of rows the paper copies from other papers, with their sources: a reproduction fills
# such a row only when it was pretrained the same way (epochs, batch).
ROW_SETTINGS_CSV = REPO_ROOT / "results" / "paper" / "row_settings.csv"

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

# Pretraining length the paper states for its own runs of a table (§7.1: 320 epochs on ImageNet-100 and
# STL-10, 300 on ImageNet; §10: Table 11's grid ran 300 epochs). Rows whose setting names epochs use those.
TABLE_EPOCHS = {"table1": 320, "table8": 320, "table12": 320, "table13": 320, "table11": 300, "table3": 300,
                "table4": 300, "table5": 300, "table10": 300}
# The paper's own rows (the ones its authors trained); the other rows copy numbers from other papers.
OWN_ROWS = ("MSBReg", "BYOL (reproduced by the paper's authors)")
W_MSE_TABLES = ("table1", "table8", "table11", "table12", "table13", "efficiency")


def cell_protocol(table: str, method: str, metric: str) -> dict:
    """The protocol that produced the paper's number in this cell, as the record fields that must match
    (record['probe'][key], or record[key]); {} when no protocol is known (nothing is required)."""
    if metric.startswith(("voc_det_", "coco_")):
        return {"engine": "detectron2"}  # MoCo's recipe through Detectron2 (paper §8.4)
    if metric in ("alignment", "uniformity"):
        return {"probe": "align_uniform:projector"}  # Wang & Isola's unit-sphere embeddings (Table 12)
    if table in W_MSE_TABLES and "_linear_" in metric:
        return {"probe": "linear:wmse"}  # Table 1's ResNet-18 rows are W-MSE's numbers and protocol
    if table in W_MSE_TABLES and "_knn" in metric:
        return {"probe": "knn:wmse"}
    if table in ("table2", "table7"):
        return {"probe": "sgd:byol"}  # BYOL's linear evaluation (the protocol=sgd of linear_in1k)
    if table == "table3":
        return {"probe": "semisup:simclr"}
    if table == "table4":
        return {"probe": "knn:npid"}
    if metric == "voc07_svm_map":
        return {"probe": "svm:goyal", "feature": "res5-avgpool6s1"}
    if metric.startswith(("places205_", "inat18_")):  # the paper's own row: §8.4; the others: Barlow Twins'
        return {"probe": "sgd:paper" if method.startswith(OWN_ROWS) else "sgd:barlowtwins"}
    return {}


def describe_protocol(requirement: dict) -> str:
    return ", ".join(f"{v}" if k == "probe" else f"{k} {v}" for k, v in requirement.items()) or "any"


def record_protocol(record: dict, requirement: dict) -> dict:
    probe = record.get("probe") or {}
    return {k: probe.get(k, record.get(k)) for k in requirement}


def protocol_matches(requirement: dict, record: dict) -> bool:
    return record_protocol(record, requirement) == requirement


@dataclass(frozen=True)
class PaperValue:
    table: str
    method: str
    backbone: str
    setting: str
    metric: str
    text: str  # as the paper prints it
    note: str

    @property
    def value(self) -> float:
        return float(self.text)


def read_paper(path=PAPER_CSV, row_settings=ROW_SETTINGS_CSV):
    """The paper's values; a row copied from another paper gets that paper's pretraining settings appended."""
    extra = {}
    if row_settings and Path(row_settings).is_file():
        with open(row_settings, newline="") as f:
            extra = {(r["table"], r["method"]): r["setting"] for r in csv.DictReader(f)}
    with open(path, newline="") as f:
        return [PaperValue(r["table"], r["method"], r["backbone"],
                           ";".join(s for s in (r["setting"], extra.get((r["table"], r["method"]), "")) if s),
                           r["metric"], r["value"].strip(), r["note"]) for r in csv.DictReader(f)]


# The paper's row label of each pretraining method of this suite (pretrain/), given its settings.
def method_label(pretraining) -> str:
    if not pretraining:
        return None
    method = pretraining.get("method") or pretraining.get("loss")
    lam_s, lam_b = float(pretraining.get("lambda_s") or 0), float(pretraining.get("lambda_b") or 0)
    views = pretraining.get("views")
    if method == "msbreg":
        return f"MSBReg K={views}"
    if method == "byol":
        extra = [name for name, on in (("brownian", lam_b > 0), ("singular", lam_s > 0)) if on]
        return "BYOL" + "".join(f" + {e}" for e in extra)
    labels = {"simclr": "SimCLR", "simclrv2": "SimCLR v2", "mocov2": "MoCo-v2", "barlowtwins": "Barlow Twins",
              "byol_uniformity": "BYOL + uniformity loss", "byol_multicrop": "BYOL + multi-crop",
              "drlim": "DrLIM", "cpc": "CPC v2", "wmse": f"W-MSE {views}"}
    return labels.get(method, method)


def our_settings(p) -> dict:
    method = p.get("method") or p.get("loss")
    lam_s, lam_b = float(p.get("lambda_s") or 0), float(p.get("lambda_b") or 0)
    return {"K": p.get("views"), "lambda_s": lam_s, "lambda_b": lam_b, "norm": p.get("head_norm"),
            "batch": p.get("batch_size"), "epochs": p.get("epochs"), "centroid": int(method == "msbreg"),
            "brownian": int(lam_b > 0), "singular": int(lam_s > 0)}


def parse_setting(text: str) -> dict:
    return dict(part.split("=", 1) for part in text.split(";") if part)


def own_row(table: str, method: str) -> bool:
    """A row the paper's authors trained (MSBReg, their BYOL, the BYOL ablations of the W-MSE-protocol
    tables), not one copied from another paper: our records in any other row are reproductions."""
    return method.startswith(OWN_ROWS) or (table in W_MSE_TABLES and method.startswith("BYOL"))


def _same(ours, theirs: str) -> bool:
    try:
        return float(ours) == float(theirs)
    except (TypeError, ValueError):
        return str(ours) == theirs


def _same_method(row_method: str, label: str) -> bool:
    if row_method == label or (label == "BYOL" and row_method == "BYOL (reproduced by the paper's authors)"):
        return True
    if row_method == "MoCo v2" and label == "MoCo-v2":  # Table 5 spells it without the hyphen of Table 2
        return True
    # Table 8 names its K=2 ablation rows "BYOL" with the loss-term flags in the setting; Table 13 calls
    # MSBReg with K=2 "BYOL + brownian" (λ_b in the setting).
    return label.startswith("BYOL") and row_method in ("BYOL", "BYOL + brownian") or (
        label.startswith("MSBReg") and row_method == "MSBReg")


def row_matches(row: PaperValue, record: dict) -> bool:
    """The record's checkpoint was pretrained as the row says (method, backbone, setting, table length)."""
    pre = record.get("checkpoint", {}).get("pretraining")
    label = method_label(pre)
    if label is None or record.get("demo") or row.backbone != pre.get("arch"):
        return False
    if not _same_method(row.method, label):
        return False
    setting = parse_setting(row.setting)
    ours = our_settings(pre)
    own = own_row(row.table, row.method)
    if "epochs" not in setting and row.table in TABLE_EPOCHS and own:
        setting["epochs"] = str(TABLE_EPOCHS[row.table])
    if row.note.startswith("trained 300 epochs"):  # Table 2's MSBReg 300-epoch run, printed in the 400 column
        setting["epochs"] = "300"
    if label.startswith("BYOL") and "K" not in setting:  # every BYOL row is K = 2; its loss flags must match
        setting.setdefault("brownian", str(int("brownian" in row.method)))
        setting.setdefault("singular", str(int("singular" in row.method)))
    return all(key in ours and _same(ours[key], value) for key, value in setting.items())


def checkpoint_label(record: dict) -> str:
    ck = record.get("checkpoint", {})
    path = ck.get("path", "?")
    name = path if ck.get("format") == "random" else Path(path).name
    if Path(path).name in ("backbone.pth", "last.pth") or ck.get("epoch") is not None:
        name = f"{Path(path).parent.name}/{Path(path).name}"
    flags = ["demo"] if record.get("demo") else []
    return name + (f" [{', '.join(flags)}]" if flags else "")


def another_architecture(record: dict, paper_rows) -> str:
    """The record's encoder family when the table's rows are all of another one (a ViT beside ResNet rows),
    else ''."""
    mine = (record.get("checkpoint") or {}).get("family") or "resnet"
    theirs = {"vit" if p.backbone.startswith("vit") else "resnet" for p in paper_rows}
    return mine if theirs and mine not in theirs else ""


def checkpoint_key(record: dict) -> tuple:
    ck = record.get("checkpoint", {})
    return (checkpoint_label(record), (ck.get("sha256") or "-")[:12], record.get("arch", ""))


@dataclass
class Cell:
    values: list
    records: list  # record ids (r1, r2, ...)
    paper: str = None  # the paper's number as printed

    def mean(self):
        return statistics.fmean(self.values) if self.values else None

    def std(self):
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        if not self.values:
            return "no record" if self.paper is None else f"— (paper {self.paper}, reported)"
        ours = f"{self.mean():.2f}" + (f" ± {self.std():.2f} (n={len(self.values)})" if len(self.values) > 1 else "")
        refs = f" [{', '.join(self.records)}]"
        if self.paper is None:
            return ours + refs
        return f"{ours} (paper {self.paper}, Δ {self.mean() - float(self.paper):+.2f}){refs}"


def build_table(table: str, paper, records):
    """(metrics, rows, notes) for one paper table; rows are (key, {metric: Cell}); notes are footnotes naming
    the records whose protocol kept them out of the paper's rows."""
    mine = [p for p in paper if p.table == table]
    metrics = list(dict.fromkeys(p.metric for p in mine))
    rows, order, notes = {}, [], {}
    for p in mine:
        key = ("paper", p.method, p.backbone, p.setting)
        if key not in rows:
            rows[key] = {m: Cell([], []) for m in metrics}
            order.append(key)
        rows[key][p.metric].paper = p.text
    for rid, rec in records:
        for metric, value in rec.get("metrics", {}).items():
            if metric not in metrics:
                continue
            fitting = [k for k in order if k[0] == "paper" and rows[k][metric].paper is not None
                       and row_matches(PaperValue(table, k[1], k[2], k[3], metric, "0", _note(mine, k)), rec)]
            placed = [k for k in fitting if protocol_matches(cell_protocol(table, k[1], metric), rec)]
            if placed:
                keys = placed
            else:
                key = ("ours",) + checkpoint_key(rec)
                other_arch = another_architecture(rec, mine)
                if other_arch:
                    key = key[:1] + (f"{key[1]} [{other_arch}]",) + key[2:]
                    notes[key[1]] = (f"{key[1]}: a {other_arch} encoder ({rec.get('arch')}), another architecture "
                                     f"than the table's {'/'.join(sorted({p.backbone for p in mine}))} rows; shown "
                                     "for reference, never in a paper row")
                if fitting:
                    needed = cell_protocol(table, fitting[0][1], metric)
                    got = describe_protocol(record_protocol(rec, needed)) if needed else "?"
                    key = key[:1] + (f"{key[1]} [{got}]",) + key[2:]
                    notes[key[1]] = (f"{key[1]}: pretrained as the paper's row '{fitting[0][1]}', but measured with "
                                     f"{got}; the paper's cell was measured with {describe_protocol(needed)}")
                else:  # a row of its own: say when it was measured with another protocol than the paper's cells
                    row = next((k for k in order if k[0] == "paper" and rows[k][metric].paper is not None), None)
                    needed = cell_protocol(table, row[1], metric) if row else {}
                    if needed and not protocol_matches(needed, rec):
                        got = describe_protocol(record_protocol(rec, needed))
                        key = key[:1] + (f"{key[1]} [{got}]",) + key[2:]
                        notes[key[1]] = (f"{key[1]}: measured with {got}; the paper's cells of this table were "
                                         f"measured with {describe_protocol(needed)}, so the numbers do not compare")
                keys = [key]
            for key in keys:
                if key not in rows:
                    rows[key] = {m: Cell([], []) for m in metrics}
                    order.append(key)
                values = trial_values(rec, metric) or [float(value)]
                rows[key][metric].values.extend(values)
                rows[key][metric].records.extend([rid] * len(values))
    paper_rows = [k for k in order if k[0] == "paper"]
    our_rows = sorted(k for k in order if k[0] == "ours")
    return metrics, [(k, rows[k]) for k in paper_rows + our_rows], [notes[k] for k in sorted(notes)]


def trial_values(record: dict, metric: str) -> list:
    """The per-trial values of a record that ran several trials: its seeds (record v3 `trials`), or
    detection's own trials (`data.trials`, metric names without the task prefix); else []."""
    values = [t["metrics"].get(metric) for t in record.get("trials") or [] if isinstance(t, dict) and "metrics" in t]
    if len(values) > 1 and None not in values:
        return [float(v) for v in values]
    trials = (record.get("data") or {}).get("trials") or []
    prefix = {"voc_det": "voc_det_", "coco_instseg": "coco_"}.get(record.get("task"), "")
    values = [t["metrics"].get(metric[len(prefix):]) for t in trials if isinstance(t, dict) and "metrics" in t]
    return [float(v) for v in values] if len(values) > 1 and None not in values else []


def _note(mine, key):
    return next((p.note for p in mine if (p.method, p.backbone, p.setting) == key[1:] and p.note), "")
