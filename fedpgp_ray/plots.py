"""Figures and tables from a results document (`federation.results_document`, i.e. results.json).

Pure functions: a results dict in, a PNG / CSV / Markdown file (or string) out. Figures use
matplotlib's Agg canvas directly, so nothing here touches pyplot's global backend or state.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

ACCURACY_KEYS = ("local", "base", "novel", "hm3", "hm2")
LABELS = {"local": "Local", "base": "Base", "novel": "Novel", "hm3": "HM3", "hm2": "HM2"}
TABLE_COLUMNS = ("client", *ACCURACY_KEYS)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / None / NaN."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _harmonic_mean(values: list[float | None]) -> float | None:
    """Harmonic mean (as the strategy computes it): None if a value is missing, 0 if one is <= 0."""
    if any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _title(doc: dict[str, Any]) -> str:
    return f"{doc.get('algorithm', '?')} on {doc.get('dataset', '?')} (seed {doc.get('seed', '?')})"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def evaluated_rounds(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds of the document that carry an evaluation (they have aggregate accuracies)."""
    return [r for r in doc.get("rounds", []) if any(k in r.get("metrics", {}) for k in ACCURACY_KEYS)]


def accuracy_curves(doc: dict[str, Any], path: str | Path) -> Path:
    """accuracy_figure(doc) as a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    accuracy_figure(doc).savefig(path, format="png")
    return path


def accuracy_figure(doc: dict[str, Any]):
    """Local / Base / Novel / HM3 / HM2 (%) against the round: a marker per evaluated round and a
    line through the evaluated rounds (with `evaluation.every: 5` that is rounds 0, 5, 10, ...;
    the rounds between have no accuracy, so no marker); the legend beside the axes."""
    rounds = evaluated_rounds(doc)
    fig = _figure(7.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"hm3": dict(linestyle="--", linewidth=2.0), "hm2": dict(linestyle=":", linewidth=2.0)}
    plotted = 0
    for key in ACCURACY_KEYS:
        points = [(r["round"], _number(r["metrics"].get(key))) for r in rounds]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=LABELS[key], **styles.get(key, {}))
            plotted += 1
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy per round: {_title(doc)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if plotted:  # beside the axes, never over the curves
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, "no evaluated rounds", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def hm3_wall_time_figure(docs: dict[str, list[dict[str, Any]]], title: str):
    """HM3 (%) against the training wall time (s, evaluation phases excluded: `train_wall_seconds`) of each
    evaluated round: one line per run, one colour per label of `docs` (label -> results documents)."""
    fig = _figure(7.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for index, (label, runs) in enumerate(docs.items()):
        for number, doc in enumerate(runs):
            points = [(_number(r["metrics"].get("train_wall_seconds")), _number(r["metrics"].get("hm3")))
                      for r in evaluated_rounds(doc)]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, color=f"C{index}", alpha=0.8,
                        label=label if number == 0 else None)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("HM3 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def hm3_wall_time(doc: dict[str, Any], path: str | Path) -> Path:
    """HM3 against wall time of one run (time-to-accuracy) as a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hm3_wall_time_figure({doc.get("runtime", "run"): [doc]}, f"HM3 against wall time: {_title(doc)}").savefig(
        path, format="png")
    return path


def client_bars(doc: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars of each client's final Local / Base / Novel accuracy (%); beyond the clients a
    results document lists (client_results.MAX_LISTED_CLIENTS), their distribution instead."""
    summary = doc.get("final_summary", {})
    if max((s["n"] for s in summary.values()), default=0) > len(doc.get("final_clients", {})):
        return client_distribution(doc, path)
    clients = sorted(doc.get("final_clients", {}).items(), key=lambda item: int(item[0]))
    keys = [k for k in ("local", "base", "novel") if any(_number(m.get(k)) is not None for _, m in clients)]
    fig = _figure(min(max(6.4, 0.22 * len(clients) * max(len(keys), 1) + 1.5), 18.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(keys), 1)
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(clients))]
        ys = [_number(m.get(key)) or 0.0 for _, m in clients]
        ax.bar(xs, ys, width=width, label=LABELS[key])
    ax.set_xticks(range(len(clients)))
    ax.set_xticklabels([cid for cid, _ in clients])
    ax.set_xlabel("client")
    ax.set_ylabel("final accuracy (%)")
    ax.set_title(f"Final accuracy per client: {_title(doc)}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if keys:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, "no per-client results", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def client_distribution(doc: dict[str, Any], path: str | Path) -> Path:
    """Histogram and CDF over clients of the final Local / Base / Novel accuracy (%), from the results
    document's `final_summary` (5-point bins), with the mean +- 95% interval in the legend."""
    summary = doc["final_summary"]
    fig = _figure(11.0, 4.0)
    hist, cdf = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key in [k for k in ("local", "base", "novel") if k in summary]:
        s = summary[key]
        counts = s["histogram"]
        edges = [100.0 * i / len(counts) for i in range(len(counts) + 1)]
        label = f"{LABELS[key]} {s['mean']:.1f} ± {s['ci95']:.1f}"
        hist.stairs(counts, edges, label=label)
        total, running = max(sum(counts), 1), 0
        ys = [0.0]
        for c in counts:
            running += c
            ys.append(running / total)
        cdf.plot(edges, ys, label=LABELS[key])
    n = max(s["n"] for s in summary.values())
    hist.set_xlabel("final accuracy (%)")
    hist.set_ylabel("clients")
    hist.set_title(f"{n} clients: {_title(doc)}", fontsize=10)
    hist.legend(fontsize=8, title="mean ± 95% CI", title_fontsize=8)
    cdf.set_xlabel("final accuracy (%)")
    cdf.set_ylabel("share of clients at or below")
    cdf.set_title("CDF over clients", fontsize=10)
    for ax in (hist, cdf):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def results_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per client (final Local / Base / Novel and their HM3 / HM2), then the aggregate row "all".

    The "all" row is the document's `final`: accuracies averaged over clients, HMs of those averages.
    """
    rows = []
    for cid, m in sorted(doc.get("final_clients", {}).items(), key=lambda item: int(item[0])):
        local, base, novel = (_number(m.get(k)) for k in ("local", "base", "novel"))
        row = {"client": cid, "local": local, "base": base, "novel": novel, "hm3": None, "hm2": None}
        if "novel" in m:
            row["hm3"] = _harmonic_mean([local, base, novel])
            row["hm2"] = _harmonic_mean([base, novel])
        rows.append(row)
    final = doc.get("final", {})
    rows.append({"client": "all", **{k: _number(final.get(k)) for k in ACCURACY_KEYS}})
    return rows


def round_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per round with its aggregate metrics (columns: round, then every metric seen, sorted)."""
    keys = sorted({k for r in doc.get("rounds", []) for k in r.get("metrics", {})})
    return [{"round": r["round"], **{k: _number(r["metrics"].get(k)) for k in keys}} for r in doc.get("rounds", [])]


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows (dicts with the same keys) as CSV; missing values are empty cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return path


def markdown_table(rows: list[dict[str, Any]], digits: int = 2) -> str:
    """Rows as a GitHub Markdown table; floats rounded to `digits`, missing values as "-"."""
    if not rows:
        return ""
    columns = list(rows[0])
    cell = lambda v: "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))
    out = io.StringIO()
    out.write("| " + " | ".join(LABELS.get(c, c) for c in columns) + " |\n")
    out.write("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|\n")
    for row in rows:
        out.write("| " + " | ".join(cell(row.get(c)) for c in columns) + " |\n")
    return out.getvalue()


def results_markdown(doc: dict[str, Any]) -> str:
    """The final results table (per client and "all") with a heading and the metric definitions."""
    lines = [f"# Results: {_title(doc)}", "", f"Runtime: {doc.get('runtime', '?')}; "
             f"wall time {float(doc.get('wall_seconds', 0.0)):.1f} s.", "", markdown_table(results_rows(doc))]
    names = doc.get("metric_names", {})
    if names:
        lines += ["Metrics:", ""] + [f"- **{LABELS.get(k, k)}**: {v}" for k, v in names.items()]
        lines += ["- the **all** row averages each accuracy over clients; its HMs are HMs of those averages", ""]
    return "\n".join(lines)


def write_results_tables(doc: dict[str, Any], directory: str | Path) -> list[Path]:
    """results.csv + results.md (final, per client) and rounds.csv (aggregates per round) in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / "results.md"
    md.write_text(results_markdown(doc))
    return [write_csv(results_rows(doc), directory / "results.csv"), md,
            write_csv(round_rows(doc), directory / "rounds.csv")]


def write_figures(doc: dict[str, Any], directory: str | Path) -> list[Path]:
    """accuracy.png (curves per round), hm3_wall_time.png (HM3 against wall time) and clients.png (final
    per-client bars) in `directory`."""
    directory = Path(directory)
    return [accuracy_curves(doc, directory / "accuracy.png"), hm3_wall_time(doc, directory / "hm3_wall_time.png"),
            client_bars(doc, directory / "clients.png")]
