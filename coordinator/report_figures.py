"""The report's figures as standalone SVG strings, drawn from results.json only.

Small hand-written SVG (no plotting library, no fonts to fetch): Kaplan-Meier curves with
confidence bands, a love plot, the propensity score distribution per arm and a forest plot.
Each function returns one ``<svg>`` element that is inlined in report.html and also saved
as ``figures/<name>.svg`` next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from math import floor, log, log10
from typing import Any

EXPOSED = "#c0392b"
COMPARATOR = "#2471a3"
ARM_COLOURS = {"exposed": EXPOSED, "comparator": COMPARATOR}
_MARKERS = ("#111111", "#e67e22", "#27ae60", "#8e44ad", "#7f8c8d", "#16a085")


@dataclass(frozen=True)
class Frame:
    """A plot area inside an SVG canvas, mapping data coordinates to pixels."""

    width: float
    height: float
    left: float
    right: float
    top: float
    bottom: float
    x_min: float
    x_max: float
    y_min: float
    y_max: float
    log_x: bool = False

    def x(self, value: float) -> float:
        lo, hi, v = self.x_min, self.x_max, value
        if self.log_x:
            lo, hi, v = log(lo), log(hi), log(value)
        return self.left + (v - lo) / (hi - lo) * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = self.height - self.top - self.bottom
        return self.top + (self.y_max - value) / (self.y_max - self.y_min) * span


def _svg(frame: Frame, title: str, body: list[str]) -> str:
    return (
        f"<svg viewBox='0 0 {frame.width:g} {frame.height:g}' "
        f"width='{frame.width:g}' height='{frame.height:g}' role='img' font-family='sans-serif' "
        f"font-size='11'><title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def _axes(frame: Frame, x_ticks: Sequence[float], y_ticks: Sequence[float], x_label: str,
          y_label: str, x_fmt: str = "{:g}", y_fmt: str = "{:g}", absolute_y: bool = False) -> list[str]:
    bottom = frame.height - frame.bottom
    parts = [f"<rect x='{frame.left}' y='{frame.top}' width='{frame.width - frame.left - frame.right}' "
             f"height='{bottom - frame.top}' fill='none' stroke='#999'/>"]
    for tick in x_ticks:
        px = frame.x(tick)
        parts.append(f"<line x1='{px:.1f}' y1='{bottom}' x2='{px:.1f}' y2='{bottom + 4}' stroke='#999'/>"
                     f"<text x='{px:.1f}' y='{bottom + 15}' text-anchor='middle'>{x_fmt.format(tick)}</text>")
    for tick in y_ticks:
        py = frame.y(tick)
        parts.append(f"<line x1='{frame.left - 4}' y1='{py:.1f}' x2='{frame.left}' y2='{py:.1f}' stroke='#999'/>"
                     f"<text x='{frame.left - 6}' y='{py + 4:.1f}' text-anchor='end'>{y_fmt.format(abs(tick) if absolute_y else tick)}</text>")
    parts.append(f"<text x='{(frame.left + frame.width - frame.right) / 2:.1f}' y='{frame.height - 4}' "
                 f"text-anchor='middle'>{escape(x_label)}</text>")
    parts.append(f"<text transform='translate(12 {(frame.top + bottom) / 2:.1f}) rotate(-90)' "
                 f"text-anchor='middle'>{escape(y_label)}</text>")
    return parts


def _nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at most ``top`` (steps of 1, 2 or 5 times a power of ten)."""
    raw = top / count
    power = 10 ** floor(log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [round(step * i, 10) for i in range(int(top / step) + 1)]


def _legend(frame: Frame, entries: Sequence[tuple[str, str]], outside: bool = False) -> list[str]:
    parts = []
    for i, (label, colour) in enumerate(entries):
        y = frame.top + 12 + 15 * i
        x = frame.width - frame.right + 10 if outside else frame.width - frame.right - 150
        parts.append(f"<rect x='{x}' y='{y - 8}' width='10' height='10' fill='{colour}'/>"
                     f"<text x='{x + 14}' y='{y + 1}'>{escape(label)}</text>")
    return parts


def _step_points(times: Sequence[float], values: Sequence[float], start: float, end: float) -> list[tuple[float, float]]:
    points = [(0.0, start)]
    level = start
    for t, v in zip(times, values, strict=True):
        points += [(float(t), level), (float(t), float(v))]
        level = float(v)
    return [*points, (end, level)]


def km_figure(km: dict[str, dict[str, list[Any]]], horizon: float, title: str) -> str:
    """Kaplan-Meier cumulative incidence (1 - S) per arm with its pointwise 95% CI band."""
    top = max((1 - min(arm["ci_low"], default=1.0) for arm in km.values()), default=0.0)
    frame = Frame(640, 300, 52, 16, 12, 40, 0.0, horizon, 0.0, min(1.0, max(0.05, top * 1.1)))
    body = _axes(frame, _nice_ticks(horizon, 4) if horizon < 90 else list(range(0, int(horizon) + 1, 90)),
                 _nice_ticks(frame.y_max, 5), "days since index", "cumulative incidence (1 - KM)", "{:.0f}", "{:.2f}")
    for arm, table in km.items():
        colour = ARM_COLOURS.get(arm, "#333")
        times = table["time"]
        upper = _step_points(times, [1 - v for v in table["ci_low"]], 0.0, horizon)
        lower = _step_points(times, [1 - v for v in table["ci_high"]], 0.0, horizon)
        band = [*upper, *reversed(lower)]
        body.append(f"<polygon fill='{colour}' fill-opacity='0.15' stroke='none' points='"
                    + " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in band) + "'/>")
        curve = _step_points(times, [1 - v for v in table["survival"]], 0.0, horizon)
        body.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.8' points='"
                    + " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in curve) + "'/>")
    body += _legend(frame, [(arm, ARM_COLOURS.get(arm, "#333")) for arm in km])
    return _svg(frame, title, body)


def love_figure(balance: dict[str, Any], title: str) -> str:
    """|SMD| per covariate, before and after each adjustment, with the 0.1 balance line."""
    labels = list(balance["max_abs_smd"])
    covariates = list(balance["covariates"])
    height = 40 + 16 * len(covariates) + 30
    largest = max((abs(v) for v in balance["max_abs_smd"].values() if v is not None), default=0.1)
    frame = Frame(720, height, 170, 110, 10, 40, 0.0, max(0.2, largest * 1.1), 0.0, len(covariates) + 0.5)
    body = _axes(frame, _nice_ticks(frame.x_max, 5), [], "|standardized mean difference|", "", "{:.2f}")
    body.append(f"<line x1='{frame.x(0.1):.1f}' y1='{frame.top}' x2='{frame.x(0.1):.1f}' "
                f"y2='{frame.height - frame.bottom}' stroke='#555' stroke-dasharray='4 3'/>")
    for row, covariate in enumerate(covariates, start=1):
        py = frame.y(len(covariates) + 1 - row)
        body.append(f"<text x='{frame.left - 6}' y='{py + 4:.1f}' text-anchor='end'>{escape(covariate)}</text>"
                    f"<line x1='{frame.left}' y1='{py:.1f}' x2='{frame.width - frame.right}' y2='{py:.1f}' "
                    "stroke='#eee'/>")
        for i, label in enumerate(labels):
            smd = (balance["covariates"][covariate].get(label) or {}).get("smd")
            if smd is not None:
                body.append(f"<circle cx='{frame.x(abs(smd)):.1f}' cy='{py:.1f}' r='3.5' "
                            f"fill='{_MARKERS[i % len(_MARKERS)]}' fill-opacity='0.85'/>")
    body += _legend(frame, [(label, _MARKERS[i % len(_MARKERS)]) for i, label in enumerate(labels)], outside=True)
    return _svg(frame, title, body)


def propensity_figure(histogram: dict[str, Any], title: str) -> str:
    """Share of each arm per propensity-score bin: exposed above the axis, comparator below.

    Suppressed bins (null in results.json) are drawn as a grey tick, not as a bar."""
    edges = histogram["edges"]
    shares = {}
    for arm in ("exposed", "comparator"):
        total = sum(c for c in histogram[arm] if c is not None) or 1
        shares[arm] = [None if c is None else c / total for c in histogram[arm]]
    top = max((s for arm in shares.values() for s in arm if s is not None), default=0.1)
    frame = Frame(640, 280, 52, 16, 12, 40, edges[0], edges[-1], -top * 1.1, top * 1.1)
    half = _nice_ticks(top, 3)
    ticks = [-t for t in reversed(half[1:])] + half
    body = _axes(frame, [edges[0] + (edges[-1] - edges[0]) * i / 5 for i in range(6)], ticks,
                 "propensity score", "share of arm (comparator below)", "{:.1f}", "{:.2f}", absolute_y=True)
    for arm, sign in (("exposed", 1), ("comparator", -1)):
        for i, share in enumerate(shares[arm]):
            x0, x1 = frame.x(edges[i]), frame.x(edges[i + 1])
            if share is None:
                body.append(f"<rect x='{x0 + 1:.1f}' y='{min(frame.y(0.0), frame.y(sign * top * 0.04)):.1f}' "
                            f"width='{x1 - x0 - 2:.1f}' height='3' fill='#aaa'/>")
                continue
            y0, y1 = sorted((frame.y(0.0), frame.y(sign * share)))
            body.append(f"<rect x='{x0 + 1:.1f}' y='{y0:.1f}' width='{x1 - x0 - 2:.1f}' height='{y1 - y0:.1f}' "
                        f"fill='{ARM_COLOURS[arm]}' fill-opacity='0.75'/>")
    body.append(f"<line x1='{frame.left}' y1='{frame.y(0):.1f}' x2='{frame.width - frame.right}' "
                f"y2='{frame.y(0):.1f}' stroke='#333'/>")
    body += _legend(frame, [("exposed", EXPOSED), ("comparator", COMPARATOR), ("suppressed bin", "#aaa")])
    return _svg(frame, title, body)


@dataclass(frozen=True)
class ForestRow:
    """One line of a forest plot: a hazard ratio and its 95% CI."""

    label: str
    hr: float
    ci_low: float
    ci_high: float
    pooled: bool = False


def forest_figure(rows: Sequence[ForestRow], title: str) -> str:
    """Hazard ratios on a log axis, per site (squares) and pooled / meta-analytic (diamonds)."""
    values = [v for r in rows for v in (r.ci_low, r.ci_high) if v > 0]
    lo, hi = min([*values, 0.5]), max([*values, 2.0])
    height = 30 + 18 * len(rows) + 40
    frame = Frame(640, height, 230, 20, 10, 40, lo / 1.1, hi * 1.1, 0.0, len(rows) + 0.5, log_x=True)
    ticks = [t for t in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0) if frame.x_min <= t <= frame.x_max]
    body = _axes(frame, ticks, [], "hazard ratio (log scale), 95% CI", "")
    body.append(f"<line x1='{frame.x(1.0):.1f}' y1='{frame.top}' x2='{frame.x(1.0):.1f}' "
                f"y2='{frame.height - frame.bottom}' stroke='#555' stroke-dasharray='4 3'/>")
    for i, row in enumerate(rows, start=1):
        py = frame.y(len(rows) + 1 - i)
        weight = "bold" if row.pooled else "normal"
        body.append(f"<text x='{frame.left - 6}' y='{py + 4:.1f}' text-anchor='end' font-weight='{weight}'>"
                    f"{escape(row.label)}</text>")
        body.append(f"<line x1='{frame.x(row.ci_low):.1f}' y1='{py:.1f}' x2='{frame.x(row.ci_high):.1f}' "
                    f"y2='{py:.1f}' stroke='#333'/>")
        cx = frame.x(row.hr)
        if row.pooled:
            body.append(f"<polygon points='{cx - 6:.1f},{py:.1f} {cx:.1f},{py - 5:.1f} {cx + 6:.1f},{py:.1f} "
                        f"{cx:.1f},{py + 5:.1f}' fill='#111'/>")
        else:
            body.append(f"<rect x='{cx - 4:.1f}' y='{py - 4:.1f}' width='8' height='8' fill='#555'/>")
    return _svg(frame, title, body)
