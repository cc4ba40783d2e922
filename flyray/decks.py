"""Tables and matplotlib figures as HTML fragments: what every workload's reports are made of
(the tasks layer publishes them as Flyte decks; nothing here imports flytekit)."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def table_html(rows: dict[str, object] | list[dict], title: str = "") -> str:
    if isinstance(rows, dict):
        rows = [{"name": k, "value": v} for k, v in rows.items()]
    if not rows:
        return f"<h3>{html.escape(title)}</h3><p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    return f'{heading}<table border="1" cellpadding="4"><tr>{head}</tr>{body}</table>'


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def bar_chart_html(values: dict[str, float], title: str, ylabel: str, log: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.tick_params(axis="x", rotation=20)
    return figure_html(fig)


def line_chart_html(
    x: list, series: dict[str, list[float]], title: str, xlabel: str, ylabel: str
) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        ax.plot(x, values, marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return figure_html(fig)


def grouped_bar_html(groups: dict[str, dict[str, float]], title: str, ylabel: str) -> str:
    """One bar per (group, metric): e.g. each model's ranking metrics side by side."""
    names = list(groups)
    metrics = list(next(iter(groups.values())))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for n, name in enumerate(names):
        xs = [m + n * width for m in range(len(metrics))]
        ax.bar(xs, [groups[name][m] for m in metrics], width, label=name)
    ax.set_xticks([m + width * (len(names) - 1) / 2 for m in range(len(metrics))], metrics)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    return figure_html(fig)


def figure_html(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'
