"""Leaderboard, files and plot of a bench run.

rich and matplotlib are optional: without them the leaderboard is plain text and the plot
is skipped with a message, so the bench still works in a minimal environment.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

#: Column order of ``results.csv`` (one row per job × seed).
CSV_FIELDS = (
    "suite", "task", "model", "norm", "batch_size", "seed", "epochs", "lr", "weight_decay", "steps",
    "epochs_done", "test_acc", "train_loss", "ms_per_step", "train_time_s", "params", "status", "error",
)  # fmt: skip


def _group_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["suite"], row["task"], row["model"], row["norm"], row["batch_size"])


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def leaderboard(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate runs over seeds: one entry per (suite, task, model, norm, batch size).

    Metrics are over the successful seeds only; ``status`` is ``ok`` only if every seed
    succeeded, otherwise the first failure's status and message. Sorted by task, model,
    batch size (largest first), then accuracy (best first, failures last).
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault(_group_key(row), []).append(row)
    board = []
    for (suite, task, model, norm, bs), rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok"]
        bad = [r for r in rows if r["status"] != "ok"]
        accs = [r["test_acc"] for r in ok]
        board.append(
            {
                "suite": suite,
                "task": task,
                "model": model,
                "norm": norm,
                "batch_size": bs,
                "seeds": [r["seed"] for r in rows],
                "acc_mean": _mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
                "ms_per_step": _mean([r["ms_per_step"] for r in ok]),
                "train_loss": _mean([r["train_loss"] for r in ok]),
                "status": bad[0]["status"] if bad else "ok",
                "error": bad[0]["error"] if bad else "",
            }
        )
    board.sort(key=lambda e: (e["task"], e["model"], -e["batch_size"], -(e["acc_mean"] if e["acc_mean"] is not None else -1.0)))
    return board


def _fmt_acc(entry: dict[str, Any]) -> str:
    if entry["acc_mean"] is None:
        return "-"
    if len(entry["seeds"]) > 1:
        return f"{entry['acc_mean']:.1%} ± {entry['acc_std']:.1%}"
    return f"{entry['acc_mean']:.1%}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(entry: dict[str, Any]) -> list[str]:
    status = entry["status"] if entry["status"] == "ok" else f"{entry['status']}: {entry['error']}"
    return [
        entry["task"],
        entry["model"],
        entry["norm"],
        str(entry["batch_size"]),
        ",".join(map(str, entry["seeds"])),
        _fmt_acc(entry),
        _fmt(entry["ms_per_step"], ".2f"),
        _fmt(entry["train_loss"], ".4f"),
        status,
    ]


_HEADERS = ["task", "model", "norm", "batch", "seeds", "test acc", "ms/step", "train loss", "status"]


def format_leaderboard(board: Sequence[dict[str, Any]]) -> str:
    """Plain-text leaderboard (used without rich, and handy in logs/tests)."""
    rows = [_HEADERS] + [_cells(e) for e in board]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_leaderboard(board: Sequence[dict[str, Any]], title: str, file: TextIO | None = None) -> None:
    """Print the leaderboard as a rich table (sections per task/model/batch) or plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}\n{format_leaderboard(board)}", file=file)
        return
    table = Table(title=title, title_justify="left")
    for h in _HEADERS:
        numeric = h in {"batch", "test acc", "ms/step", "train loss"}
        # Only the status (error message) may wrap; names and numbers must stay readable.
        table.add_column(h, justify="right" if numeric else "left", no_wrap=h != "status", min_width=6 if h == "status" else None)
    previous = None
    for entry in board:
        section = (entry["task"], entry["model"], entry["batch_size"])
        if previous is not None and section != previous:
            table.add_section()
        previous = section
        cells = _cells(entry)
        cells[-1] = "[green]ok[/]" if entry["status"] == "ok" else f"[red]{cells[-1]}[/]"
        table.add_row(*cells)
    console = Console(file=file)
    if not console.is_terminal:  # rich assumes 80 columns when redirected: too narrow for the table
        console = Console(file=file, width=160)
    console.print(table)


def write_csv(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """One row per run (job × seed) with the :data:`CSV_FIELDS` columns."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (env, runs, leaderboard, claims) as indented JSON."""
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def plot(path: Path, board: Sequence[dict[str, Any]], title: str) -> bool:
    """Grouped bar chart: one panel per task/model/batch size, one bar per norm (± std).

    Uses matplotlib's object API with the Agg canvas, so the caller's pyplot backend is left
    alone. Returns False (with nothing written) if matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        return False
    panels: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for e in board:
        panels.setdefault((e["task"], e["model"], e["batch_size"]), []).append(e)
    accs = [e["acc_mean"] for e in board if e["acc_mean"] is not None]
    # Zoom on the range of the results (bars start at `low`, not 0): on easy tasks the norms
    # differ by a few points, invisible on a 0-100% axis. Labels carry the exact values.
    low = max(0.0, min(accs, default=0.0) - 0.05)
    color = {n: f"C{i % 10}" for i, n in enumerate(sorted({e["norm"] for e in board}))}  # same norm, same color
    fig = Figure(figsize=(max(4.0, 3.2 * len(panels)), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False, sharey=True)[0]
    for ax, ((task, model, bs), entries) in zip(axes, panels.items()):
        entries = sorted(entries, key=lambda e: e["norm"])
        xs = list(range(len(entries)))
        heights = [e["acc_mean"] if e["acc_mean"] is not None else low for e in entries]
        errs = [e["acc_std"] or 0.0 for e in entries]
        colors = [color[e["norm"]] if e["status"] == "ok" else "lightgrey" for e in entries]
        ax.bar(xs, heights, yerr=errs if any(errs) else None, color=colors, capsize=3)
        for x, e in zip(xs, entries):
            ok = e["acc_mean"] is not None
            label = _fmt_acc(e) if ok else e["status"]
            ax.text(x, low + 0.03 * (1 - low), label, ha="center", va="bottom", rotation=90, fontsize=8,
                    color="white" if ok else "black")  # fmt: skip
        ax.set_xticks(xs, [e["norm"] for e in entries], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{task} {model}, batch {bs}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (eval mode)")
    axes[0].set_ylim(low, 1.0)
    axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    return True


# --------------------------------------------------------------------------- one HTML report


def parse_claim(line: str) -> dict[str, str]:
    """Split a claim line (:func:`normkit.bench.verdict.format_claim`) into its fields for tables.

    ``{"label", "source", "claim", "paper", "ours", "delta"}``; fields a line lacks are "".
    A line that is not a claim (a note) gives ``{"note": line}``.
    """
    from normkit.bench.verdict import label_of

    label = label_of(line)
    if label is None:
        return {"note": line.strip()}
    body = line[line.index("]") + 1 :].strip()
    head, *rest = body.split(" | ")
    source, _, claim = head.partition(": ")
    out = {"label": label, "source": source, "claim": claim, "paper": "", "ours": "", "delta": ""}
    for part in rest:
        key, _, value = part.partition(": ") if not part.startswith("Δ ") else ("delta", "", part[2:])
        if key in out:
            out[key] = value
    return out


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;line-height:1.4}
h1{font-size:1.6rem} h2{font-size:1.3rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2.5rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.85rem;width:100%}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.supported{background:#d8f5d8} .contradicted{background:#f8d7d7} .inconclusive{background:#f3f3f3}
.label{font-weight:600;white-space:nowrap} .scope{color:#555;font-size:.8rem}
img{max-width:100%;border:1px solid #eee;margin:.4rem 0} .env{color:#666;font-size:.8rem}
"""


def _esc(value: Any) -> str:
    import html

    return html.escape("" if value is None else str(value))


def _img(path: Path) -> str:
    import base64

    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_esc(path.name)}" src="data:image/png;base64,{data}">'


def _claims_table(claims: Sequence[str], scope: str) -> str:
    rows, notes = [], []
    for line in claims:
        c = parse_claim(line)
        if "note" in c:
            notes.append(f"<p class='scope'>{_esc(c['note'])}</p>")
            continue
        n = re.findall(r"(\d+) seeds?", c["delta"])
        shows = f"Shows: the sign of the effect on our task over {n[0] if n else 'no'} paired seeds (interval beside)."
        rows.append(
            f"<tr class='{c['label']}'><td class='label'>{_esc(c['label'])}</td><td>{_esc(c['source'])}</td>"
            f"<td>{_esc(c['claim'])}</td><td>{_esc(c['paper'])}</td><td>{_esc(c['ours'])}</td><td>{_esc(c['delta'])}</td>"
            f"<td class='scope'>{_esc(shows)} Cannot show: {_esc(scope or 'whether it holds at the paper scale.')}</td></tr>"
        )
    if not rows:
        return "".join(notes) or "<p>No claims.</p>"
    columns = ("verdict", "source", "claim", "paper's setting", "ours", "Δ (95% CI)", "shows / cannot show at this scale")
    head = "".join(f"<th>{h}</th>" for h in columns)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{''.join(notes)}"


def _board_table(board: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in _HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in _cells(e)) + "</tr>" for e in board)
    return f"<table>{head}{body}</table>"


def _lr_text(lrs: dict[str, list[float]]) -> str:
    return "; ".join(f"{model}: {', '.join(f'{v:g}' for v in values)}" for model, values in lrs.items()) or "-"


def write_html(path: Path, sections: Sequence[dict[str, Any]], title: str = "normkit bench report") -> Path:
    """One self-contained HTML page: per suite its claims (verdict table), leaderboard and PNGs (embedded).

    ``sections``: ``{"suite", "description", "scope", "claims", "leaderboard", "images": [png paths], "env"}``
    per suite, in order. Images are base64 data URIs, so the page is one file that opens anywhere.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body>")
    parts.append(f"<h1>{_esc(title)}</h1>")
    summary = []
    for s in sections:
        counts: dict[str, int] = {}
        for line in s.get("claims", []):
            label = parse_claim(line).get("label")
            if label:
                counts[label] = counts.get(label, 0) + 1
        summary.append(
            f"<tr><td><a href='#{_esc(s['suite'])}'>{_esc(s['suite'])}</a></td><td>{_esc(s.get('description', ''))}</td>"
            + "".join(f"<td class='num'>{counts.get(k, 0)}</td>" for k in ("supported", "contradicted", "inconclusive"))
            + "</tr>"
        )
    parts.append(
        "<table><tr><th>suite</th><th>what it runs</th><th>supported</th><th>contradicted</th><th>inconclusive</th></tr>"
        + "".join(summary) + "</table>"
    )  # fmt: skip
    for s in sections:
        env = s.get("env", {})
        parts.append(f"<h2 id='{_esc(s['suite'])}'>{_esc(s['suite'])}</h2><p>{_esc(s.get('description', ''))}</p>")
        parts.append(
            f"<p class='env'>seeds {_esc(env.get('seeds'))}, scale {_esc(env.get('scale'))}, full {_esc(env.get('full'))}, "
            f"{_esc(env.get('total_time_s'))} s wall, {_esc(env.get('cpu_s'))} s CPU, {_esc(env.get('workers'))} worker(s) × "
            f"{_esc(env.get('threads'))} thread(s), torch {_esc(env.get('torch'))}</p>"
            f"<p class='env'>learning rates (shared by every method of a model; several = a grid): "
            f"{_esc(_lr_text(env.get('lrs', {})))}</p>"
        )
        parts.append("<h3>Claims</h3>" + _claims_table(s.get("claims", []), s.get("scope", "")))
        parts.append("<h3>Leaderboard</h3>" + _board_table(s.get("leaderboard", [])))
        for img in s.get("images", []):
            parts.append(_img(Path(img)))
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


def downsample(values: Sequence[float], points: int = 50) -> list[float]:
    """Mean of ``points`` equal chunks of ``values`` (a training-loss curve small enough for the JSON)."""
    n = len(values)
    if n <= points:
        return [float(v) for v in values]
    edges = [round(i * n / points) for i in range(points + 1)]
    return [statistics.fmean(values[a:b]) for a, b in zip(edges, edges[1:]) if b > a]


def plot_curves(path: Path, results: Sequence[dict[str, Any]], title: str) -> bool:
    """Training-loss curves (``loss_curve`` of each run), mean over seeds, one panel per task/model/batch size.

    Returns False when matplotlib is missing or no run recorded a curve.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    groups: dict[tuple[Any, ...], dict[str, list[list[float]]]] = {}
    for r in results:
        if r.get("status") == "ok" and r.get("loss_curve"):
            groups.setdefault((r["task"], r["model"], r["batch_size"]), {}).setdefault(r["norm"], []).append(r["loss_curve"])
    if not groups:
        return False
    fig = Figure(figsize=(max(4.0, 3.6 * len(groups)), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    color = {n: f"C{i % 10}" for i, n in enumerate(sorted({n for g in groups.values() for n in g}))}
    for ax, ((task, model, bs), by_norm) in zip(axes, groups.items()):
        for norm, curves in sorted(by_norm.items()):
            k = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(k)]
            ax.plot([(i + 0.5) / k for i in range(k)], mean, label=norm, color=color[norm], lw=1.2)
        ax.set(title=f"{task} {model}, batch {bs}", xlabel="fraction of training", ylabel="train loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    return True
