"""Charts as inline SVG, drawn with matplotlib (no JavaScript, no network: readable offline).

Text stays text in the SVG (`svg.fonttype: none`), so labels can be searched, copied and read
by screen readers, and math parsing is off so a `$` in a display text is just a `$`.  Labels
are escaped by matplotlib's SVG writer.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from typing import Any

_STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "b12-cds",  # stable element ids: the same report renders the same bytes
    "text.parse_math": False,
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
}
PALETTE = ("#1f6fb2", "#e07b00", "#2f9e44", "#c92a2a", "#7048e8", "#868e96", "#0c8599")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline in HTML


def _wrap(label: str, width: int = 42) -> str:
    return "\n".join(textwrap.wrap(label, width)) or label


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], *, xlabel: str = "",
              color: str = PALETTE[0]) -> str:
    """Horizontal bars, first label on top, each bar labelled with its value."""
    return stacked_bar_chart(title, labels, {"": list(values)}, xlabel=xlabel, colors=(color,))


def stacked_bar_chart(title: str, labels: Sequence[str], series: dict[str, Sequence[float]], *,
                      xlabel: str = "", colors: Sequence[str] = PALETTE) -> str:
    """Horizontal stacked bars: one bar per label, one segment per series (legend when named)."""
    plt = _pyplot()
    with plt.rc_context(_STYLE):
        height = 0.9 + 0.42 * max(1, len(labels))
        fig, ax = plt.subplots(figsize=(7.5, height))
        y = list(range(len(labels)))
        left = [0.0] * len(labels)
        for i, (name, values) in enumerate(series.items()):
            bars = ax.barh(y, values, left=left, color=colors[i % len(colors)], label=name or None)
            if len(series) == 1:
                ax.bar_label(bars, labels=[_fmt(v) for v in values], padding=3)
            left = [a + b for a, b in zip(left, values)]
        if len(series) > 1:
            ax.bar_label(ax.containers[-1], labels=[_fmt(v) for v in left], padding=3)
            ax.legend(loc="lower right", frameon=False)
        ax.set_yticks(y, [_wrap(label) for label in labels])
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title, loc="left")
        ax.margins(x=0.15)
        return _svg(fig)


def line_chart(title: str, days: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str = "") -> str:
    """One line per series over `days` (ISO dates, ascending)."""
    plt = _pyplot()
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 3.2))
        x = list(range(len(days)))
        for i, (name, values) in enumerate(series.items()):
            ax.plot(x, values, marker="o", markersize=3, color=PALETTE[i % len(PALETTE)], label=name)
        step = max(1, len(days) // 8)
        ax.set_xticks(x[::step], list(days)[::step], rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title, loc="left")
        ax.legend(frameon=False)
        return _svg(fig)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
