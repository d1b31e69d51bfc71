"""Reports: markdown tables, results.json / results.csv and plots, written atomically to --out.

A results dictionary has the keys `command` ('ppl' or 'passkey'), `config` (what was asked),
`environment` (versions, device, date), `methods` and `records`: flat dictionaries, one per
(method, length) for perplexity and per (method, length, depth) for passkey, holding every raw
number (per-document NLL sums, per-trial answers, token counts, peak memory).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from . import runs

environment = runs.environment  # kept for the recipes that record it beside their results


def label(record: dict) -> str:
    return record["method"] + (" [stock]" if record.get("impl") == "stock" else "")


def _length_name(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _table(cells: dict, rows: list[str], columns: list[int], fmt) -> str:
    head = "| method | " + " | ".join(_length_name(c) for c in columns) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in columns) + " |"
    lines = [head, rule]
    for row in rows:
        values = [fmt(cells[row][c]) if c in cells[row] else "" for c in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _order(records: Sequence[dict]) -> tuple[list[str], list[int]]:
    rows = list(dict.fromkeys(label(r) for r in records))
    columns = sorted({r["length"] for r in records})
    return rows, columns


def ppl_table(records: Sequence[dict]) -> str:
    """Markdown: rows = method, columns = length, cells = perplexity."""
    cells: dict = defaultdict(dict)
    for r in records:
        cells[label(r)][r["length"]] = r["ppl"]
    rows, columns = _order(records)
    return _table(cells, rows, columns, lambda v: f"{v:.3f}" if math.isfinite(v) and v < 1e5 else f"{v:.3g}")


def passkey_accuracy_by_length(records: Sequence[dict]) -> dict:
    """{label: {length: accuracy over all depths and trials}}."""
    correct: dict = defaultdict(lambda: defaultdict(int))
    total: dict = defaultdict(lambda: defaultdict(int))
    for r in records:
        correct[label(r)][r["length"]] += r["n_correct"]
        total[label(r)][r["length"]] += r["n_trials"]
    return {m: {n: correct[m][n] / total[m][n] for n in total[m]} for m in total}


def passkey_table(records: Sequence[dict]) -> str:
    """Markdown: rows = method, columns = length, cells = accuracy over depths and trials."""
    rows, columns = _order(records)
    return _table(passkey_accuracy_by_length(records), rows, columns, lambda v: f"{100 * v:.0f}%")


def table(results: dict) -> str:
    records = results["records"]
    return ppl_table(records) if results["command"] == "ppl" else passkey_table(records)


def to_csv(records: Sequence[dict]) -> str:
    """One row per record, scalar fields only (lists and dicts live in results.json)."""
    columns: list[str] = []
    for r in records:
        for k, v in r.items():
            if not isinstance(v, (list, dict)) and k not in columns:
                columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: r.get(k) for k in columns})
    return buf.getvalue()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_ppl(records: Sequence[dict], path) -> bool:
    """Perplexity against length, one line per method, log y (and log2 x). False if no matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows, _ = _order(records)
    for row in rows:
        points = sorted((r["length"], r["ppl"]) for r in records if label(r) == row)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=row)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_passkey(records: Sequence[dict], path) -> bool:
    """Heatmap of accuracy (depth × length), one panel per method. False if no matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    rows, lengths = _order(records)
    depths = sorted({r["depth"] for r in records})
    fig, axes = plt.subplots(1, len(rows), figsize=(1.2 + 0.7 * len(lengths) * len(rows) + 1.5 * len(rows), 3.8),
                             squeeze=False)
    image = None
    for ax, row in zip(axes[0], rows):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for r in records:
            if label(r) == row:
                grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_title(row)
        ax.set_xticks(range(len(lengths)), [_length_name(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("length")
        ax.set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_results(out, results: dict, force: bool = False) -> Path:
    """Write results.json, results.csv and the plot into `out` atomically (refuses an existing
    folder unless force). Returns the folder."""
    with runs.staged(out, force, command=f"eval {results['command']}") as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (tmp / "results.csv").write_text(to_csv(results["records"]))
        (tmp / "table.md").write_text(table(results) + "\n")
        plot = plot_ppl if results["command"] == "ppl" else plot_passkey
        name = "ppl.png" if results["command"] == "ppl" else "passkey.png"
        if results["records"] and not plot(results["records"], tmp / name):
            print("note: matplotlib is not installed, plots skipped (pip install 'longrope[plot]')")
    return Path(out)
