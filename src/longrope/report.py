"""Reports: markdown tables, results.json / results.csv and plots, written atomically to --out:
`longrope eval`'s results (`write_results`), `longrope extend`'s report (`write_extend_report`),
the demo's (`write_demo_report`) and a search's plot (`plot_search`); the summaries the commands
print (`search_summary`, `extend_summary`).

An eval results dictionary has the keys `command` ('ppl', 'passkey' or 'ruler'), `config` (what was
asked), `environment` (versions, device, date), `methods` and `records`: flat dictionaries, one per
(method, length) for perplexity, per (method, length, depth) for passkey and per (method, task,
length, depth, sample) for RULER, holding every raw number (per-document NLL sums, per-trial
answers, outputs, token counts, peak memory).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import pipeline, runs, train
from . import scaling as sc
from .pipeline import format_length

environment = runs.environment  # kept for the recipes that record it beside their results


def label(record: dict) -> str:
    return record["method"] + (" [stock]" if record.get("impl") == "stock" else "")


def _table(cells: dict, rows: list[str], columns: list[int], fmt) -> str:
    head = "| method | " + " | ".join(format_length(c) for c in columns) + " |"
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


def ruler_scores(records: Sequence[dict]) -> dict:
    """{(label, length): {task: mean score over depths and samples}}, RULER's 0..1 scores."""
    scores: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        scores[label(r), r["length"]][r["task"]].append(r["score"])
    return {cell: {task: sum(v) / len(v) for task, v in by_task.items()} for cell, by_task in scores.items()}


def ruler_table(records: Sequence[dict]) -> str:
    """Markdown: a row per method and length, a column per task and the average over the tasks
    (RULER's average), scores in percent as RULER reports them."""
    rows, lengths = _order(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    scores = ruler_scores(records)
    lines = ["| method | length | " + " | ".join(tasks) + " | average |",
             "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
    for row in rows:
        for length in lengths:
            by_task = scores.get((row, length))
            if by_task is None:
                continue
            cells = [f"{100 * by_task[t]:.1f}" if t in by_task else "" for t in tasks]
            average = 100 * sum(by_task.values()) / len(by_task)
            lines.append(f"| {row} | {format_length(length)} | " + " | ".join(cells) + f" | {average:.1f} |")
    return "\n".join(lines)


TABLES = {"ppl": ppl_table, "passkey": passkey_table, "ruler": ruler_table}


def table(results: dict) -> str:
    return TABLES[results["command"]](results["records"])


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


def _write_png(fig, path, **savefig_kwargs) -> None:
    """Save `fig` as a PNG atomically (`runs.write_text`): a reader never meets half a plot."""
    png = io.BytesIO()
    fig.savefig(png, format="png", **savefig_kwargs)
    runs.write_text(path, png.getvalue())


def _pyplot():
    try:  # matplotlib is optional (the plot extra): without it results are written, plots skipped
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
    _write_png(fig, path, dpi=120)
    plt.close(fig)
    return True


def _heatmaps(panels: Mapping[str, Mapping[tuple[float, int], float]], path, value: str, columns: int) -> bool:
    """Depth × length heatmaps of values in [0, 1], one panel per title ({(depth, length): value}),
    `columns` panels a row. False if no matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    depths = sorted({d for cells in panels.values() for d, _ in cells})
    lengths = sorted({n for cells in panels.values() for _, n in cells})
    n_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(n_rows, columns, squeeze=False, gridspec_kw={"hspace": 0.6, "wspace": 0.4},
                             figsize=(1.2 + 0.7 * len(lengths) * columns + 1.5 * columns, 3.8 * n_rows))
    image = None
    for ax, (title, cells) in zip(axes.flat, panels.items()):
        grid = [[cells.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_title(title)
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("length")
        ax.set_ylabel("needle depth")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes.flat), label=value)
    _write_png(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


LOSS_WINDOW = 10  # steps in the training loss's running mean


def training_curves(entries: Sequence[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """A fine-tune's curves from its step log (`train_log.jsonl`'s entries): {panel: {line: [(step,
    value)]}}: "loss" (the training loss and its running mean over the last LOSS_WINDOW logged
    steps), "needle loss" (the mean and each depth's), "passkey" (the share found, overall and at
    each depth); a panel only where the log has its values. A step logged twice (a resumed run
    repeats its last steps) has its later values."""
    by_step: dict[int, dict] = {}
    for e in entries:
        by_step[e["step"]] = {**by_step.get(e["step"], {}), **e}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}

    def add(panel: str, line: str, step: int, value) -> None:
        if value is not None:
            curves.setdefault(panel, {}).setdefault(line, []).append((step, float(value)))

    losses: list[float] = []
    for step in sorted(by_step):
        e = by_step[step]
        add("loss", "training loss", step, e.get("loss"))
        if e.get("loss") is not None:  # micro-batches of different kinds make the loss jump step to step
            losses.append(float(e["loss"]))
            if len(losses) >= LOSS_WINDOW:
                add("loss", f"mean of {LOSS_WINDOW} steps", step, sum(losses[-LOSS_WINDOW:]) / LOSS_WINDOW)
        for name, mean, label, depths in (("needle loss", "needle_loss", "mean", "needle_loss_by_depth"),
                                          ("passkey", "passkey", "all depths", "passkey_by_depth")):
            add(name, label, step, e.get(mean))
            for depth, value in sorted((e.get(depths) or {}).items(), key=lambda kv: float(kv[0])):
                add(name, f"depth {float(depth):g}", step, value)
    return curves


def plot_training(entries: Sequence[dict], path) -> bool:
    """The curves of `training_curves`, one panel each beside the others (needle loss on a log
    scale), against optimizer steps: what a fine-tune's retrieval did over the run. False if no
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    curves = training_curves(entries)
    fig, axes = plt.subplots(1, len(curves), squeeze=False, figsize=(5 * len(curves), 4))
    for ax, (panel, lines) in zip(axes[0], curves.items()):
        for line, points in lines.items():
            bold = line in ("mean", "all depths") or line.startswith("mean of")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 40 else None,
                    markersize=3, linewidth=2 if bold else 1, alpha=1 if bold else 0.7, label=line)
        ax.set_title(panel)
        ax.set_xlabel("step")
        if panel == "needle loss":
            ax.set_yscale("log")
        if panel == "passkey":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(True, which="both", alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _write_png(fig, path, dpi=120)
    plt.close(fig)
    return True


TRAINING_PNG = "training.png"


def plot_training_log(folder) -> bool:
    """`plot_training` of the step log in a fine-tune's `folder`, into folder/training.png. False
    if there is no log or no matplotlib."""
    log = Path(folder) / train.LOG
    if not log.exists():
        return False
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return plot_training(entries, Path(folder) / TRAINING_PNG)


def plot_passkey(records: Sequence[dict], path) -> bool:
    """Heatmap of accuracy (depth × length), one panel per method. False if no matplotlib."""
    rows, _ = _order(records)
    panels = {row: {(r["depth"], r["length"]): r["accuracy"] for r in records if label(r) == row} for row in rows}
    return _heatmaps(panels, path, "accuracy", columns=len(rows))


def plot_ruler(records: Sequence[dict], path) -> bool:
    """Heatmaps of the mean RULER score of the NIAH tasks (depth × length): a row of panels per
    task, one panel per method; none without a NIAH task. False if no matplotlib."""
    rows, _ = _order(records)
    niah = [r for r in records if r["task"].startswith("niah")]
    if not niah:
        return True
    scores: dict = defaultdict(list)
    for r in niah:
        scores[r["task"], label(r), r["depth"], r["length"]].append(r["score"])
    panels: dict = defaultdict(dict)
    for (task, row, depth, length), values in scores.items():
        panels[f"{row}: {task}"][depth, length] = sum(values) / len(values)
    tasks = list(dict.fromkeys(r["task"] for r in niah))
    ordered = {f"{row}: {task}": panels[f"{row}: {task}"] for task in tasks for row in rows}
    return _heatmaps(ordered, path, "RULER score", columns=len(rows))


# each eval command's plot: the function and its file name
PLOTS = {"ppl": (plot_ppl, "ppl.png"), "passkey": (plot_passkey, "passkey.png"),
         "ruler": (plot_ruler, "ruler_niah.png")}


def write_results(out, results: dict, force: bool = False, in_place: bool = False) -> Path:
    """Write results.json, results.csv, table.md and the plot into `out` atomically: the whole
    folder at once (refused if it exists, unless force), or with `in_place` (`out` is the
    command's own folder, made by `runs.open_dir` for a run that writes as it goes) file by file.
    Returns the folder."""
    if in_place:
        _write_result_files(Path(out), results)
    else:
        with runs.staged(out, force, command=f"eval {results['command']}") as tmp:
            _write_result_files(tmp, results)
    return Path(out)


def _write_result_files(folder: Path, results: dict) -> None:
    runs.write_text(folder / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    runs.write_text(folder / "results.csv", to_csv(results["records"]))
    runs.write_text(folder / "table.md", table(results) + "\n")
    plot, name = PLOTS[results["command"]]
    if results["records"] and not plot(results["records"], folder / name):
        print("note: matplotlib is not installed, plots skipped (pip install 'longrope[plot]')")


# --------------------------------------------------------------------------------------------
# longrope extend: report.md and report.png from what report.json holds (`pipeline.measure_report`)

EXTEND_MD, EXTEND_PNG = "report.md", "report.png"


def extend_markdown(report: dict) -> str:
    """The stages' results, then perplexity (and the base model's inside its window) and passkey by length."""
    final = sc.from_dict(report["scaling"])
    lines = [f"# longrope extend: {format_length(report['original_length'])} -> "
             f"{format_length(report['target_length'])}", "", "| stage | result |", "| --- | --- |"]
    for stage in report["stages"]:
        s = stage["summary"]
        if "final_loss" in s:
            what = f"loss {s['first_loss']:.4g} -> {s['final_loss']:.4g} in {s['steps']} steps"
        elif "from_factor" in s:
            what = f"factors carried from scale {s['from_factor']:g} to {s['factor']:g}, no search"
        elif "all_ones_fitness" in s:
            what = f"perplexity at L₀ {s['fitness']:.4g} (all-ones short factors {s['all_ones_fitness']:.4g})"
        else:
            what = f"search perplexity {s['fitness']:.4g} ({s['evals']} evaluations)"
        lines.append(f"| {stage['stage']} | {what} |")
    lines += ["", "| length | perplexity | base model | passkey |", "| ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        ppl = "n/a" if r["ppl"] is None else f"{r['ppl']:.3f}"
        base_ppl = f"{r['base_ppl']:.3f}" if "base_ppl" in r else ""
        passkey = "n/a" if r["passkey"] is None else f"{r['passkey']:.0%} of {r['passkey_trials']}"
        lines.append(f"| {format_length(r['length'])} | {ppl} | {base_ppl} | {passkey} |")
    lines += ["", f"Checkpoint: `{pipeline.MODEL_DIR}/` ({final.rope_type}, factor {final.factor:g}, "
                  f"n̂ = {final.n_hat}).", report["note"] + "."]
    return "\n".join(lines) + "\n"


def extend_summary(report: dict) -> str:
    """Perplexity and passkey accuracy by length, a line each, for the console."""
    lines = []
    for r in report["results"]:
        ppl = "n/a" if r["ppl"] is None else f"{r['ppl']:.3f}"
        passkey = "n/a" if r["passkey"] is None else f"{r['passkey']:.0%}"
        lines.append(f"  {format_length(r['length']):>8}: perplexity {ppl}, passkey {passkey}")
    return "\n".join(lines)


def write_extend_report(out, report: dict) -> None:
    """report.md and report.png (perplexity by length of the extended model, and of the base model
    inside its window) in `out`, and each fine-tuning stage's training.png, each written
    atomically: `pipeline.extend`'s `render_report`."""
    out = Path(out)
    runs.write_text(out / EXTEND_MD, extend_markdown(report))
    rows = report["results"]
    records = [{"method": "extended", "length": r["length"], "ppl": r["ppl"]} for r in rows if r["ppl"] is not None]
    records += [{"method": "base model", "length": r["length"], "ppl": r["base_ppl"]} for r in rows if "base_ppl" in r]
    if records:
        plot_ppl(records, out / EXTEND_PNG)
    for stage in sorted(out.glob("stage-*-finetune-*")):  # each fine-tuning stage's curves beside its log
        plot_training_log(stage)


# --------------------------------------------------------------------------------------------
# longrope demo


def write_demo_report(out, ppl: Sequence[dict], passkey: Sequence[dict], searched: Mapping[int, sc.LongRoPEScaling],
                      info, *, seconds: float, eval_docs: int, depths: Sequence[float], trials: int,
                      search_folder: Callable[[int], str], export_scale: int, export_folder: str,
                      device: str = "cpu") -> str:
    """The demo's report.md (tables, plots, the searched factors), ppl.png, passkey.png and
    results.json in `out`, each written atomically; returns the two tables (markdown)."""
    out = Path(out)
    ppl_md, passkey_md = ppl_table(ppl), passkey_table(passkey)
    plot_ppl(ppl, out / "ppl.png")
    plot_passkey(passkey, out / "passkey.png")
    lines = [
        "# longrope demo report", "",
        f"Bundled tiny Llama (context {info.original_length}, rotary dim {info.dim}, base {info.base:g}) "
        f"extended without fine-tuning. Each method is configured for the scale it is evaluated at. "
        f"Perplexity: first L tokens of {eval_docs} evaluation documents the search never saw. "
        f"Passkey: {len(depths)} depths × {trials} keys per length. Total time {seconds:.0f} s.", "",
        "## Perplexity", "", ppl_md, "", "![perplexity](ppl.png)", "",
        "## Passkey accuracy", "", passkey_md, "", "![passkey](passkey.png)", "",
        "## Searched factors", "",
    ]
    for scale, scaling in searched.items():
        lines += [f"- {scale}×: n̂ = {scaling.n_hat}, λ from {scaling.long_factor[0]:.2f} to "
                  f"{scaling.long_factor[-1]:.2f}; search log and plot in `{search_folder(scale)}/`"]
    lines += ["", f"The {export_scale}× model is exported as a Hugging Face checkpoint in `{export_folder}/`."]
    runs.write_text(out / "report.md", "\n".join(lines) + "\n")
    runs.write_text(out / "results.json", json.dumps({"ppl": ppl, "passkey": passkey,
                                                      "environment": runs.environment(device)}, indent=1))
    return ppl_md + "\n\n" + passkey_md


def search_summary(result, space, fitness: str = "ppl") -> str:
    """A finished search in a few lines (`search.SearchResult` of a `search.SearchSpace`): what it
    returns, its fitness and genes beside the baselines', on validation beside the best reference
    and the gain over it, the evaluations and their cost."""
    s, best = result.summary, result.summary["best"]
    genes = f"n_hat={best['n_hat']}"
    if "critical_dim" in best:
        genes += f", critical dim {best['critical_dim']} (theoretical {space.critical_dim})"
    if "attention_factor" in best:
        genes += f", attention factor {best['attention_factor']:.2f}"
    baselines = ", ".join(f"{k} {v:.4g}" for k, v in s["baselines"].items() if v is not None)
    what = {"ppl": "perplexity", "needle": "answer perplexity (needle)"}.get(fitness, f"fitness ({fitness})")
    searched = f"{genes}; seeds on the grid: {baselines}"
    if result.returned == "search":
        lines = [f"best {what} {result.fitness:.4g} ({searched})"]
    else:  # a reference beat every searched genome on the criterion: say both
        lines = [f"returned the reference {result.returned}: {what} {result.fitness:.4g}; the best searched genome "
                 f"({searched})"]
    reference = s.get("best_reference")
    if s.get("selection") == "validation":
        lines.append(f"on the {len(s.get('data', {}).get('validation_documents', []))} validation documents: "
                     f"{_maybe(s['best_validation'])} (the fittest genome: {_maybe(s['fittest']['validation'])})")
    if reference:
        key = s["selection"]
        lines.append(f"best reference on {key}: {reference['name']} {_maybe(reference[key])}; gain "
                     f"{_maybe(s['gain_over_best_reference'], '.2%')}" +
                     ("" if result.returned == "search" else f"; nothing searched beat it, so {result.returned} "
                                                              "is returned"))
    lines.append(f"{s['evals']} evaluations in {s['seconds']:.0f}s, {s['overhead_share']:.1%} outside the model")
    if space.algorithm != "short-factor":  # a readjustment leaves the long factors as they were
        lines += unseen_angles_note(result.scaling, space.dim, space.base, space.original_length, space.target_length)
    return "\n".join(lines)


def unseen_angles_note(scaling, dim: int, base: float, original_length: int, length: int) -> list[str]:
    """A line when some frequency pairs of `scaling` turn by angles that pretraining never showed
    at distances below `length` (`scaling.seen_distance`, below what interpolating every pair by
    length / original_length keeps), else none."""
    seen = sc.seen_distance(scaling, dim, base, original_length, length)
    if seen >= (original_length - 1) * length / original_length * (1 - 1e-9):
        return []
    return [f"note: beyond a distance of {seen:,.0f} tokens some frequency pairs of this scaling turn by angles "
            f"pretraining never showed (at {length:,} tokens); retrieval from further back may fail: "
            "`finetune --keep-angles-seen` raises their factors"]


def _maybe(value, fmt: str = ".4g") -> str:
    return "n/a" if value is None else format(value, fmt)


def plot_search(path, result, space) -> bool:
    """A search's plot (`search.SearchResult` of a `search.SearchSpace`): best and median fitness
    per generation; the searched λ beside PI, NTK and YaRN. Written atomically. False without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    import matplotlib.ticker  # optional dependency, there since _pyplot found matplotlib

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    gens = [r["generation"] for r in result.stats]
    for key in ("best", "median"):
        ax1.plot(gens, [float("nan") if r[key] is None else r[key] for r in result.stats], marker=".", label=key)
    ax1.set(xlabel="generation", ylabel="perplexity (population)", title="search")
    ax1.legend()
    pairs = range(space.size)
    for name, factors in space.references().items():
        ax2.plot(pairs, factors, linestyle="--", label={"pi": "PI", "ntk": "NTK", "yarn": "YaRN"}.get(name, name))
    best = result.best
    ax2.plot(pairs, space.lambdas(best), color="black", label=f"searched (n̂={space.n_hats[best.n_hat_index]})")
    if best.critical_pairs is not None:
        ax2.axvline(best.critical_pairs - 0.5, color="black", linewidth=0.8, label="searched critical pair")
        ax2.axvline(space.critical_dim / 2 - 0.5, color="grey", linestyle=":", label="theoretical (d_tcd/2)")
    ax2.set(xlabel="frequency pair i", ylabel="rescale factor λ_i", yscale="log",
            title=f"{space.original_length} → {space.target_length} tokens (s = {space.factor:g})")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 4, not 4×10⁰
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    runs.write_text(path, png.getvalue())
    return True
