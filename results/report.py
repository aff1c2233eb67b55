"""Regenerate the paper's tables from result records, side by side with the numbers the paper reports.

    python evaluate/report.py                                  # records under results/ -> results/tables/
    python evaluate/report.py --records /tmp/myresults --runs runs/

Writes, for every paper table, `<table>.md` and `<table>.csv` (our value, the paper's value and the
difference in each cell; the paper's rows we did not run stay, marked as reported); one table per task
family (`linear`, `knn`, `semisup`, `transfer`, `detection`, `representation`: rows = checkpoint x
protocol, at most 12 columns); and PNG plots under `plots/` (a grouped bar chart per family, kNN accuracy
against k, alignment against uniformity, Table 11's λ grid, pretraining curves). Every cell names the
records it came from (r1, r2, ... listed under each table). Running it twice on the same records writes
byte-identical files.

`--format` picks the table files: `md` (default: `<table>.md` and the long `<table>.csv`), `latex`
(`<table>.tex`, a booktabs tabular per table), `csv` (`records.csv`: one row per record, every metric and
its std across trials); several can be given (`--format md,latex,csv`). When records come from the epoch
checkpoints of a run folder (`checkpoint.epoch`), `plots/epochs_<kind>.png` draws each metric against epoch,
one plot per metric kind (linear, knn, ...). ViT records stay in the per-family tables with their family
and feature tap, and a paper table of ResNet rows marks them as another architecture.
"""
import csv
import io
import json
from collections import defaultdict
from pathlib import Path

from core.cli import ArgumentParser, UserError
from core.files import REPO_ROOT, atomic_write_bytes
from results.record import read_records
from results.tables import TITLES, Cell, build_table, cell_protocol, checkpoint_key, own_row, protocol_matches, \
    read_paper, row_matches, trial_values


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def table_files(table, paper, records, ids):
    metrics, rows, notes = build_table(table, paper, records)
    md = [f"# {TITLES.get(table, table)}", "",
          "Each cell: our value (mean ± std over records when several) with the paper's value and the "
          "difference; `— (paper x, reported)` where we have no record; `[rN]` names the records. A record fills "
          "a paper row only when it was pretrained as the row says and measured with the protocol of the "
          "paper's number.", "",
          _md_row(["source", "method / checkpoint", "backbone", "setting"] + metrics),
          _md_row(["---"] * (4 + len(metrics)))]
    long = [["table", "source", "method_or_checkpoint", "backbone", "setting", "metric", "ours_mean", "ours_std",
             "n", "paper", "difference", "records"]]
    used, grid = set(), []
    for key, cells in rows:
        if key[0] == "paper":
            source, label, backbone, setting = "paper", key[1], key[2], key[3]
        else:
            source, label, backbone, setting = "ours", key[1], key[3], ""
        texts = ["not reported" if source == "paper" and cells[m].paper is None and not cells[m].values
                 else cells[m].text() for m in metrics]
        # another paper's numbers beside our run of its method: a reproduction
        reproduced = source == "paper" and not own_row(table, label) and any(c.values for c in cells.values())
        md.append(_md_row(["paper, reproduced here" if reproduced else source, label, backbone, setting] + texts))
        grid.append(["paper, reproduced here" if reproduced else source, label, backbone, setting] + texts)
        for m in metrics:
            c = cells[m]
            used.update(c.records)
            mean = c.mean()
            long.append([table, source, label, backbone, setting, m, "" if mean is None else f"{mean:.4f}",
                         f"{c.std():.4f}" if c.values else "", len(c.values), c.paper or "",
                         "" if mean is None or c.paper is None else f"{mean - float(c.paper):+.4f}",
                         " ".join(c.records)])
    if notes:
        md += ["", "Not placed in the paper's rows:", ""] + [f"- {n}" for n in notes]
    if used:
        md += ["", "Records:", ""] + [f"- {rid}: {ids[rid]}" for rid in sorted(used, key=lambda r: int(r[1:]))]
    tex = _latex(TITLES.get(table, table), ["source", "method / checkpoint", "backbone", "setting"] + metrics, grid,
                 notes)
    return "\n".join(md) + "\n", _csv(long), tex


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "λ": r"$\lambda$", "—": "---", "×": r"$\times$"}


def _tex(text) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in str(text))


def _latex(title, header, grid, notes=()) -> str:
    """A booktabs table: the caption, the header, one line per row; the footnotes under it."""
    lines = [r"% " + _tex(title) + " (results/report.py; needs \\usepackage{booktabs})", r"\begin{table}[t]",
             r"\centering", r"\caption{" + _tex(title) + "}", r"\resizebox{\linewidth}{!}{%",
             r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in grid]
    lines += [r"\bottomrule", r"\end{tabular}}"]
    lines += [r"\par\footnotesize " + _tex(n) for n in notes]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---- one table per task family -------------------------------------------------------------------

FAMILIES = ("linear", "knn", "semisup", "transfer", "detection", "representation")
FAMILY_TITLES = {"linear": "Linear classification on frozen features", "knn": "kNN classification",
                 "semisup": "Semi-supervised ImageNet", "transfer": "Transfer classification (VOC07 SVM, "
                 "Places205, iNat18)", "detection": "Detection and instance segmentation",
                 "representation": "Representation metrics (alignment, uniformity)"}
MAX_COLUMNS = 12  # a markdown table a screen shows


def family(metric: str) -> str:
    if metric.startswith(("voc07_", "places205_", "inat18_")):
        return "transfer"
    if metric.startswith(("voc_det_", "coco_")):
        return "detection"
    if metric.startswith("semisup"):
        return "semisup"
    if "_knn" in metric:
        return "knn"
    if "_linear_" in metric:
        return "linear"
    return "representation"


def _family_metrics(name, metrics):
    """The family's columns: top-1 (and top-5 where the family is small), in a stable order."""
    mine = sorted(m for m in metrics if family(m) == name)
    if name in ("linear", "knn") and len(mine) > MAX_COLUMNS - 3:
        mine = [m for m in mine if not m.endswith("_top5")]
    return mine


def family_tables(records, ids):
    """{family: (markdown, csv)}: rows = checkpoint x protocol, at most MAX_COLUMNS columns per markdown table."""
    out = {}
    rows = defaultdict(lambda: defaultdict(list))
    for rid, rec in records:
        probe = (rec.get("probe") or {}).get("probe") or rec.get("engine") or "?"
        tap = (rec.get("probe") or {}).get("tap") or ""
        fam = (rec.get("checkpoint") or {}).get("family") or "resnet"
        key = checkpoint_key(rec)[:1] + (checkpoint_key(rec)[2], fam, tap, probe)
        for metric, value in rec.get("metrics", {}).items():
            for v in trial_values(rec, metric) or [float(value)]:
                rows[key][metric].append((v, rid))
    all_metrics = {m for per in rows.values() for m in per}
    for name in FAMILIES:
        metrics = _family_metrics(name, all_metrics)
        if not metrics:
            continue
        keys = sorted(k for k in rows if any(m in rows[k] for m in metrics))
        head = ["checkpoint", "arch", "family", "tap", "protocol"]
        per_table = MAX_COLUMNS - len(head)
        md = [f"# {FAMILY_TITLES[name]}", "", "Mean ± std over trials and records (n when several); rows are "
              "checkpoint x feature tap x protocol; `[rN]` names the records (listed below). All metrics of every "
              "record are in `summary.csv`.", ""]
        long = [head + ["metric", "mean", "std", "n", "records"]]
        grid = []
        for start in range(0, len(metrics), per_table):
            chunk = metrics[start:start + per_table]
            md += [_md_row(head + chunk), _md_row(["---"] * (len(head) + len(chunk)))]
            for key in keys:
                cells = [Cell([v for v, _ in rows[key][m]], [r for _, r in rows[key][m]]) for m in chunk]
                md.append(_md_row(list(key) + [c.text() if c.values else "" for c in cells]))
            md.append("")
        for key in keys:
            grid.append(list(key) + [Cell([v for v, _ in rows[key][m]], []).text().rstrip(" []")
                                     if rows[key][m] else "" for m in metrics])
        for key in keys:
            for m in metrics:
                c = Cell([v for v, _ in rows[key][m]], [r for _, r in rows[key][m]])
                if c.values:
                    long.append(list(key) + [m, f"{c.mean():.4f}", f"{c.std():.4f}", len(c.values),
                                             " ".join(c.records)])
        used = sorted({r for key in keys for m in metrics for _, r in rows[key][m]}, key=lambda r: int(r[1:]))
        md += ["Records:", ""] + [f"- {rid}: {ids[rid]}" for rid in used]
        tex = _latex(FAMILY_TITLES[name], head + metrics, grid)
        out[name] = ("\n".join(md) + "\n", _csv(long), keys, metrics, rows, tex)
    return out


# ---- plots ---------------------------------------------------------------------------------------

def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def plot_family(name, keys, metrics, rows):
    """One grouped bar chart per family: metrics along x, one bar per checkpoint x protocol, one y axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(metrics) + 3), 3.8))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        values = [sum(v for v, _ in rows[key][m]) / len(rows[key][m]) if rows[key][m] else float("nan")
                  for m in metrics]
        ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(metrics))], values, width,
               label=f"{key[0]} ({key[4]}{', ' + key[3] if key[3] else ''})")
    ax.set_xticks(range(len(metrics)), metrics, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("AP" if name == "detection" else "accuracy / mAP (%)")
    ax.set_title(FAMILY_TITLES[name], fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _figure_bytes(fig)


def plot_alignment_uniformity(records, paper):
    """Wang & Isola's plane: uniformity (x) against alignment (y), ours and the paper's Table 12 points."""
    import matplotlib.pyplot as plt

    ours = defaultdict(dict)
    for _, rec in records:
        for m in ("alignment", "uniformity"):
            if m in rec.get("metrics", {}):
                ours[checkpoint_key(rec)[0]][m] = float(rec["metrics"][m])
    theirs = defaultdict(dict)
    for p in paper:
        if p.metric in ("alignment", "uniformity"):
            theirs[p.method][p.metric] = p.value
    points = [(label, v, "o") for label, v in ours.items() if len(v) == 2] + \
             [(f"paper: {label}", v, "x") for label, v in theirs.items() if len(v) == 2]
    if not any(marker == "o" for _, _, marker in points):
        return {}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, v, marker in points:
        ax.scatter(v["uniformity"], v["alignment"], marker=marker, label=label)
    ax.set_xlabel("uniformity (lower is more uniform)")
    ax.set_ylabel("alignment (lower is better aligned)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return {"alignment_uniformity.png": _figure_bytes(fig)}


def plot_knn_curves(records):
    """kNN top-1 against k, per checkpoint and dataset."""
    import matplotlib.pyplot as plt

    curves = defaultdict(lambda: defaultdict(list))
    for _, rec in records:
        for m, v in rec.get("metrics", {}).items():
            if "_knn" in m and m.endswith("_top1"):
                prefix, k = m.split("_knn")[0], int(m.split("_knn")[1].split("_")[0])
                curves[(checkpoint_key(rec), prefix)][k].append(float(v))
    if not curves:
        return {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for (key, prefix), points in sorted(curves.items()):
        ks = sorted(points)
        ax.plot(ks, [sum(points[k]) / len(points[k]) for k in ks], marker="o", label=f"{key[0]} / {prefix}")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return {"knn_vs_k.png": _figure_bytes(fig)}


CURVE_KEYS = ["loss", "loss_centroid", "loss_brownian", "loss_singular", "loss_byol", "lr", "tau", "embedding_std",
              "effective_rank"]


def plot_pretraining(log_path: Path):
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keys = [k for k in CURVE_KEYS if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.6))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(str(log_path.parent.name), fontsize=8)
    fig.tight_layout()
    return _figure_bytes(fig)


def plot_lambda_grid(paper, records):
    """Table 11's layout: λ_s rows x λ_b columns, for K = 4 and 8; ours beside the paper's."""
    import matplotlib.pyplot as plt

    cells = [p for p in paper if p.table == "table11"]
    ours = {id(p): [float(r["metrics"][p.metric]) for _, r in records
                    if p.metric in r.get("metrics", {}) and row_matches(p, r)
                    and protocol_matches(cell_protocol(p.table, p.method, p.metric), r)] for p in cells}
    if not any(ours.values()):  # nothing of ours to set beside the paper's grid
        return {}
    grids = sorted({p.method for p in cells})
    lam_s = sorted({float(dict(x.split("=") for x in p.setting.split(";"))["lambda_s"]) for p in cells})
    lam_b = sorted({float(dict(x.split("=") for x in p.setting.split(";"))["lambda_b"]) for p in cells})
    fig, axes = plt.subplots(2, len(grids), figsize=(4.2 * len(grids), 6.5), squeeze=False)
    for col, method in enumerate(grids):
        for row, source in enumerate(("paper", "ours")):
            grid = [[float("nan")] * len(lam_b) for _ in lam_s]
            for p in cells:
                if p.method != method:
                    continue
                s = dict(x.split("=") for x in p.setting.split(";"))
                i, j = lam_s.index(float(s["lambda_s"])), lam_b.index(float(s["lambda_b"]))
                if source == "paper":
                    grid[i][j] = p.value
                else:
                    vals = ours[id(p)]
                    grid[i][j] = sum(vals) / len(vals) if vals else float("nan")
            ax = axes[row][col]
            im = ax.imshow(grid, cmap="viridis")
            ax.set_xticks(range(len(lam_b)), [f"{v:g}" for v in lam_b])
            ax.set_yticks(range(len(lam_s)), [f"{v:g}" for v in lam_s])
            ax.set_xlabel("λ_b")
            ax.set_ylabel("λ_s")
            ax.set_title(f"{method} ({source})", fontsize=9)
            for i in range(len(lam_s)):
                for j in range(len(lam_b)):
                    if grid[i][j] == grid[i][j]:
                        ax.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", fontsize=7, color="w")
            if all(v != v for row_values in grid for v in row_values):
                ax.text(len(lam_b) / 2 - 0.5, len(lam_s) / 2 - 0.5, "no records", ha="center", va="center")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return {"table11_lambda_grid.png": _figure_bytes(fig)}


EPOCH_KINDS = FAMILIES  # one plot per metric kind


def plot_epochs(records):
    """{`epochs_<kind>.png`: each metric of that kind against epoch}, one line per run folder x metric x
    protocol, for records of epoch checkpoints (checkpoint.epoch); top-1 only where a kind has top-5 too."""
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: defaultdict(list))  # (kind) -> (run, metric, probe) -> [(epoch, value)]
    for _, rec in records:
        ck = rec.get("checkpoint") or {}
        if ck.get("epoch") is None:
            continue
        run = Path(ck.get("path", "?")).parent.name + (" [demo]" if rec.get("demo") else "")
        probe = (rec.get("probe") or {}).get("probe") or rec.get("engine") or "?"
        for metric, value in rec.get("metrics", {}).items():
            if metric.endswith("_top5"):
                continue
            series[family(metric)][(run, metric, probe)].append((int(ck["epoch"]), float(value)))
    out = {}
    for kind in EPOCH_KINDS:
        lines = series.get(kind)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for (run, metric, probe), points in sorted(lines.items()):
            by_epoch = defaultdict(list)
            for e, v in points:
                by_epoch[e].append(v)
            epochs = sorted(by_epoch)
            ax.plot(epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs], marker="o",
                    label=f"{run}: {metric} ({probe})")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (as the checkpoint's file name gives it)")
        ax.set_ylabel("AP" if kind == "detection" else "accuracy / mAP (%)" if kind != "representation" else kind)
        ax.set_title(f"{FAMILY_TITLES[kind]} against pretraining epoch", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        out[f"epochs_{kind}.png"] = _figure_bytes(fig)
    return out


FORMATS = ("md", "latex", "csv")


def write_report(records_dir: Path, out_dir: Path, runs=(), paper_csv=None, formats=("md",)):
    """Every table and plot from the records under `records_dir`: (files written, record count, notes to say)."""
    import matplotlib

    from results.record import summary_csv

    matplotlib.use("Agg")
    paper = read_paper(paper_csv) if paper_csv else read_paper()
    loaded = read_records(records_dir)
    ids = {f"r{i}": path.relative_to(records_dir).as_posix() for i, (path, _) in enumerate(loaded, 1)}
    records = [(f"r{i}", rec) for i, (_, rec) in enumerate(loaded, 1)]
    files, notes = {}, []

    def add(name, md, csv_text, tex):
        if "md" in formats:
            files[f"{name}.md"], files[f"{name}.csv"] = md.encode(), csv_text.encode()
        if "latex" in formats:
            files[f"{name}.tex"] = tex.encode()

    for table in dict.fromkeys(p.table for p in paper):
        add(table, *table_files(table, paper, records, ids))
    if "csv" in formats:
        files["records.csv"] = summary_csv(records_dir, loaded).encode()
    grid = plot_lambda_grid(paper, records)
    if not grid:
        notes.append("Table 11's λ grid: no records (nothing drawn)")
    plots = {**plot_knn_curves(records), **grid, **plot_alignment_uniformity(records, paper),
             **plot_epochs(records)}
    for name, (md, csv_text, keys, metrics, rows, tex) in family_tables(records, ids).items():
        add(name, md, csv_text, tex)
        plots[f"{name}.png"] = plot_family(name, keys, metrics, rows)
    for run_dir in runs:
        for log in sorted(Path(run_dir).rglob("log.jsonl")):
            png = plot_pretraining(log)
            if png:
                plots[f"pretraining_{_slug(log.parent.as_posix().strip('/'))}.png"] = png
    files.update({f"plots/{name}": data for name, data in plots.items()})
    for name, data in sorted(files.items()):
        atomic_write_bytes(out_dir / name, data)
    return sorted(files), len(records), notes


def final_table(records_dir: Path, checkpoints, tasks) -> str:
    """A markdown table of the records of these checkpoints (paths) and tasks: one line per record, its top-1
    metrics (mean ± std over trials)."""
    wanted = {str(Path(c).resolve()) if c != "random" else c for c in checkpoints}
    chosen = [(p, r) for p, r in read_records(records_dir, warn=lambda *a: None) if r.get("task") in set(tasks)
              and (r.get("checkpoint", {}).get("path") in wanted
                   or ("random" in wanted and r.get("checkpoint", {}).get("format") == "random"))]
    lines = [_md_row(["checkpoint", "epoch", "task", "metric", "value"]), _md_row(["---"] * 5)]
    for _, r in sorted(chosen, key=lambda pr: (checkpoint_key(pr[1])[0], pr[1].get("checkpoint", {}).get("epoch")
                                                or 0, pr[1]["task"])):
        std = r.get("metrics_std") or {}
        for m, v in sorted(r["metrics"].items()):
            if m.endswith("_top5"):
                continue
            n = len(r.get("trials") or [1])
            value = f"{v:.2f}" + (f" ± {std[m]:.2f} (n={n})" if m in std else "")
            lines.append(_md_row([checkpoint_key(r)[0], r["checkpoint"].get("epoch", ""), r["task"], m, value]))
    return "\n".join(lines) if chosen else "no records of these jobs (see their logs)"


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, default=REPO_ROOT / "results",
                   help="the --out folder of evaluate/run.py (holding records/); default results/")
    p.add_argument("--out", type=Path, default=None, help="where the tables go (default <records>/tables)")
    p.add_argument("--runs", type=Path, action="append", default=[],
                   help="pretraining run folders (their log.jsonl become curves); repeatable")
    p.add_argument("--format", default="md", help="table files: md (markdown and long CSV per table), latex "
                                                   "(.tex per table), csv (records.csv of all records); "
                                                   "comma-separated for several (default md)")
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--format {args.format}: choose from {', '.join(FORMATS)} (comma-separated for several)")
    if not (args.records / "records").is_dir():
        raise UserError(f"{args.records} holds no records/ folder; give the --out folder of evaluate/run.py")
    for r in args.runs:
        if not r.is_dir():
            raise UserError(f"--runs {r} is not a directory")
    out = args.out or args.records / "tables"
    written, n, notes = write_report(args.records, out, args.runs, formats=formats)
    for note in notes:
        print(note)
    print(f"{n} records -> {len(written)} files in {out}")
    return 0
