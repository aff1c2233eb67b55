"""Regenerate the paper's tables from result records, side by side with the numbers the paper reports.

    python evaluate/report.py                                  # records under results/ -> results/tables/
    python evaluate/report.py --records /tmp/myresults --runs runs/

Writes, for every paper table, `<table>.md` and `<table>.csv` (our value, the paper's value and the
difference in each cell; the paper's rows we did not run stay, marked as reported), a
`leaderboard.md/.csv` (one row per checkpoint, one column per metric) and PNG plots under `plots/`.
Every cell names the records it came from (r1, r2, ... listed under each table). Running it twice on
the same records writes byte-identical files.
"""
import csv
import io
import json
from collections import defaultdict
from pathlib import Path

from core.cli import ArgumentParser, UserError
from core.files import REPO_ROOT, atomic_write_bytes
from results.record import read_records
from results.tables import TITLES, Cell, build_table, checkpoint_key, read_paper, row_matches


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def table_files(table, paper, records, ids):
    metrics, rows = build_table(table, paper, records)
    md = [f"# {TITLES.get(table, table)}", "",
          "Each cell: our value (mean ± std over records when several) with the paper's value and the "
          "difference; `— (paper x, reported)` where we have no record; `[rN]` names the records.", "",
          _md_row(["source", "method / checkpoint", "backbone", "setting"] + metrics),
          _md_row(["---"] * (4 + len(metrics)))]
    long = [["table", "source", "method_or_checkpoint", "backbone", "setting", "metric", "ours_mean", "ours_std",
             "n", "paper", "difference", "records"]]
    used = set()
    for key, cells in rows:
        if key[0] == "paper":
            source, label, backbone, setting = "paper", key[1], key[2], key[3]
        else:
            source, label, backbone, setting = "ours", key[1], key[3], ""
        texts = ["not reported" if source == "paper" and cells[m].paper is None and not cells[m].values
                 else cells[m].text() for m in metrics]
        md.append(_md_row([source, label, backbone, setting] + texts))
        for m in metrics:
            c = cells[m]
            used.update(c.records)
            mean = c.mean()
            long.append([table, source, label, backbone, setting, m, "" if mean is None else f"{mean:.4f}",
                         f"{c.std():.4f}" if c.values else "", len(c.values),
                         "" if c.paper is None else f"{c.paper:g}",
                         "" if mean is None or c.paper is None else f"{mean - c.paper:+.4f}", " ".join(c.records)])
    if used:
        md += ["", "Records:", ""] + [f"- {rid}: {ids[rid]}" for rid in sorted(used, key=lambda r: int(r[1:]))]
    return "\n".join(md) + "\n", _csv(long)


def leaderboard(records, ids):
    """One row per checkpoint, one column per metric (mean over its records)."""
    by_ckpt = defaultdict(lambda: defaultdict(list))
    for rid, rec in records:
        for metric, value in rec.get("metrics", {}).items():
            by_ckpt[checkpoint_key(rec)][metric].append((float(value), rid))
    metrics = sorted({m for per in by_ckpt.values() for m in per})
    md = ["# Leaderboard", "", "Mean over records; `[rN]` names them (see the paper tables' record lists).", "",
          _md_row(["checkpoint", "sha256", "arch"] + metrics), _md_row(["---"] * (3 + len(metrics)))]
    rows = [["checkpoint", "sha256", "arch"] + metrics]
    for key in sorted(by_ckpt):
        cells = [Cell([v for v, _ in by_ckpt[key][m]], [r for _, r in by_ckpt[key][m]]) for m in metrics]
        md.append(_md_row(list(key) + [c.text() if c.values else "" for c in cells]))
        rows.append(list(key) + [f"{c.mean():.4f}" if c.values else "" for c in cells])
    md += ["", "Records:", ""] + [f"- {rid}: {path}" for rid, path in ids.items()]
    return "\n".join(md) + "\n", _csv(rows)


# ---- plots ---------------------------------------------------------------------------------------

def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def plot_checkpoints(records, paper):
    """Per checkpoint: bars across its metrics, beside the paper's value for the row it matches."""
    import matplotlib.pyplot as plt

    by_ckpt = defaultdict(lambda: defaultdict(list))
    for _, rec in records:
        for m, v in rec.get("metrics", {}).items():
            by_ckpt[checkpoint_key(rec)][m].append((float(v), rec))
    out = {}
    for key in sorted(by_ckpt):
        metrics = sorted(by_ckpt[key])
        ours = [sum(v for v, _ in by_ckpt[key][m]) / len(by_ckpt[key][m]) for m in metrics]
        theirs = []
        for m in metrics:
            rec = by_ckpt[key][m][0][1]
            hit = [p.value for p in paper if p.metric == m and row_matches(p, rec)]
            theirs.append(hit[0] if hit else float("nan"))
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(metrics) + 2), 3.5))
        x = range(len(metrics))
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="ours")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="paper (matching row)")
        ax.set_xticks(list(x), metrics, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("value")
        ax.set_title(key[0], fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out[f"{_slug(key[0])}_{key[1]}_tasks.png"] = _figure_bytes(fig)
    return out


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
    if not cells:
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
                    vals = [float(r["metrics"][p.metric]) for _, r in records
                            if p.metric in r.get("metrics", {}) and row_matches(p, r)]
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


def write_report(records_dir: Path, out_dir: Path, runs=(), paper_csv=None):
    import matplotlib

    matplotlib.use("Agg")
    paper = read_paper(paper_csv) if paper_csv else read_paper()
    loaded = read_records(records_dir)
    ids = {f"r{i}": path.relative_to(records_dir).as_posix() for i, (path, _) in enumerate(loaded, 1)}
    records = [(f"r{i}", rec) for i, (_, rec) in enumerate(loaded, 1)]
    files = {}
    for table in dict.fromkeys(p.table for p in paper):
        md, csv_text = table_files(table, paper, records, ids)
        files[f"{table}.md"], files[f"{table}.csv"] = md.encode(), csv_text.encode()
    md, csv_text = leaderboard(records, ids)
    files["leaderboard.md"], files["leaderboard.csv"] = md.encode(), csv_text.encode()
    plots = {**plot_checkpoints(records, paper), **plot_knn_curves(records), **plot_lambda_grid(paper, records)}
    for run_dir in runs:
        for log in sorted(Path(run_dir).rglob("log.jsonl")):
            png = plot_pretraining(log)
            if png:
                plots[f"pretraining_{_slug(log.parent.as_posix().strip('/'))}.png"] = png
    files.update({f"plots/{name}": data for name, data in plots.items()})
    for name, data in sorted(files.items()):
        atomic_write_bytes(out_dir / name, data)
    return sorted(files), len(records)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, default=REPO_ROOT / "results",
                   help="the --out folder of evaluate/run.py (holding records/); default results/")
    p.add_argument("--out", type=Path, default=None, help="where the tables go (default <records>/tables)")
    p.add_argument("--runs", type=Path, action="append", default=[],
                   help="pretraining run folders (their log.jsonl become curves); repeatable")
    args = p.parse_args(argv)
    if not (args.records / "records").is_dir():
        raise UserError(f"{args.records} holds no records/ folder; give the --out folder of evaluate/run.py")
    for r in args.runs:
        if not r.is_dir():
            raise UserError(f"--runs {r} is not a directory")
    out = args.out or args.records / "tables"
    written, n = write_report(args.records, out, args.runs)
    print(f"{n} records -> {len(written)} files in {out}")
    return 0
