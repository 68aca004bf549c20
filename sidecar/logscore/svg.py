"""Small inline SVG plots for the review page and `logscore report`: no library, no script."""

from __future__ import annotations

from html import escape
from typing import Optional, Sequence

AXIS = "#666"
BAR = "#3b6ea5"
ALERT = "#c0392b"


def bars(labels: Sequence[str], values: Sequence[float], width: int = 520, height: int = 160,
         highlight_from: Optional[int] = None, title: str = "", log_scale: bool = True) -> str:
    """A bar chart, one bar per label; bars from ``highlight_from`` on in the alert colour."""
    import math

    count = max(len(values), 1)
    top, bottom, left = 18, 34, 40
    plot_h, plot_w = height - top - bottom, width - left - 8
    scale = (lambda v: math.log10(1 + v)) if log_scale else (lambda v: v)
    peak = max((scale(v) for v in values), default=0) or 1
    step = plot_w / count
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" stroke="{AXIS}"/>']
    for i, (label, value) in enumerate(zip(labels, values)):
        h = plot_h * scale(value) / peak
        x = left + i * step
        colour = ALERT if highlight_from is not None and i >= highlight_from else BAR
        parts.append(f'<rect x="{x + 2:.1f}" y="{top + plot_h - h:.1f}" width="{max(step - 4, 1):.1f}" '
                     f'height="{h:.1f}" fill="{colour}"><title>{escape(label)}: {value:,.0f}</title></rect>')
        parts.append(f'<text x="{x + step / 2:.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle" '
                     f'fill="{AXIS}">{escape(label)}</text>')
        if value:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{top + plot_h - h - 3:.1f}" font-size="9" '
                         f'text-anchor="middle" fill="{AXIS}">{value:,.0f}</text>')
    if log_scale:
        parts.append(f'<text x="{left}" y="{height - 4}" font-size="9" fill="{AXIS}">log scale</text>')
    parts.append("</svg>")
    return "".join(parts)


def timeline(points: Sequence[tuple[float, float]], start: float, end: float, width: int = 260, height: int = 48,
             label: str = "", colour: str = BAR, as_rate: bool = False, empty_text: str = "none") -> str:
    """A line over time: (x, y) points with x in [start, end]; a sparkline when small. A line with
    nothing on it says ``empty_text``, not "peak 1" (the scale's floor)."""
    top, bottom, left = 4, 14, 2
    plot_h, plot_w = height - top - bottom, width - left - 2
    span = max(end - start, 1e-9)
    highest = max((y for _, y in points), default=0)
    peak = highest or 1
    coordinates = " ".join(f"{left + plot_w * (x - start) / span:.1f},{top + plot_h - plot_h * y / peak:.1f}"
                           for x, y in points)
    peak_text = (f"peak {highest:.2%}" if as_rate else f"peak {highest:,.0f}") if highest else empty_text
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(label)}"><title>{escape(label)}</title>'
            f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 2}" y2="{top + plot_h}" stroke="{AXIS}"/>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coordinates}"/>'
            f'<text x="{left}" y="{height - 2}" font-size="9" fill="{AXIS}">{escape(peak_text)}</text></svg>')
