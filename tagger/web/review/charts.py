"""Server-rendered SVG charts for the health page (pure: data in, markup out; no JavaScript library)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

from tagger.review import ACCEPTED, APPROVED, PENDING, REJECTED, AgreementPoint, AttributeHealth

STATE_COLOURS = {ACCEPTED: "#5b9b6b", PENDING: "#e0a030", APPROVED: "#3d6fb6", REJECTED: "#c24b4b"}
STATE_NAMES = {ACCEPTED: "auto-accepted", PENDING: "pending", APPROVED: "approved", REJECTED: "rejected"}
FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def _text(x: float, y: float, content: str, *, anchor: str = "start", fill: str = "#222", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}" {FONT} {extra}>'
            f"{escape(content)}</text>")


def _percent(share: float) -> str:
    return f"{share * 100:.0f}%"


def state_bars(rows: Sequence[AttributeHealth], width: int = 760) -> str:
    """One stacked bar per attribute: the share of its products auto-accepted, pending, approved, rejected."""
    label_w, count_w, bar_h, gap, top = 130, 100, 22, 10, 30
    bar_w = width - label_w - count_w
    height = top + len(rows) * (bar_h + gap) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="Tag states per attribute">']
    x = label_w
    for state in (ACCEPTED, PENDING, APPROVED, REJECTED):  # legend
        parts.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{STATE_COLOURS[state]}"/>')
        parts.append(_text(x + 16, 16, STATE_NAMES[state]))
        x += 120
    for i, row in enumerate(rows):
        y = top + i * (bar_h + gap)
        parts.append(_text(label_w - 8, y + bar_h / 2 + 4, row.attribute, anchor="end"))
        offset = float(label_w)
        for state in (ACCEPTED, PENDING, APPROVED, REJECTED):
            share = row.share(state)
            if share <= 0:
                continue
            w = share * bar_w
            title = f"{row.attribute}: {STATE_NAMES[state]} {row.counts.get(state, 0)} of {row.total} ({_percent(share)})"
            parts.append(f'<rect x="{offset:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                         f'fill="{STATE_COLOURS[state]}"><title>{escape(title)}</title></rect>')
            if w >= 34:
                parts.append(_text(offset + w / 2, y + bar_h / 2 + 4, _percent(share), anchor="middle", fill="#fff"))
            offset += w
        parts.append(_text(label_w + bar_w + 8, y + bar_h / 2 + 4, f"{row.total} products"))
    parts.append("</svg>")
    return "".join(parts)


def agreement_line(points: Sequence[AgreementPoint], width: int = 760, height: int = 220) -> str:
    """Share of decisions that approved the machine's proposal, per day, with the number of decisions."""
    left, right, top, bottom = 48, 16, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="Agreement of reviewers with the machine per day">']
    for tick in (0, 25, 50, 75, 100):
        y = top + plot_h * (1 - tick / 100)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        parts.append(_text(left - 6, y + 4, f"{tick}%", anchor="end", fill="#666"))
    usable = [p for p in points if p.decided and not math.isnan(p.rate)]
    if not usable:
        parts.append(_text(left + plot_w / 2, top + plot_h / 2, "no decisions yet", anchor="middle", fill="#888"))
        parts.append("</svg>")
        return "".join(parts)
    step = plot_w / max(1, len(usable) - 1)
    coords = []
    for i, point in enumerate(usable):
        x = left + (i * step if len(usable) > 1 else plot_w / 2)
        y = top + plot_h * (1 - point.rate)
        coords.append((x, y, point))
    if len(coords) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y, _) in enumerate(coords))
        parts.append(f'<path d="{path}" fill="none" stroke="#3d6fb6" stroke-width="2"/>')
    every = max(1, len(coords) // 8)  # at most about eight date labels
    for i, (x, y, point) in enumerate(coords):
        title = f"{point.day}: {point.agreed} of {point.decided} decisions approved the machine ({_percent(point.rate)})"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#3d6fb6"><title>{escape(title)}</title></circle>')
        parts.append(_text(x, y - 8, f"{_percent(point.rate)} of {point.decided}", anchor="middle", fill="#333"))
        if i % every == 0 or i == len(coords) - 1:
            parts.append(_text(x, top + plot_h + 18, point.day, anchor="middle", fill="#666"))
    parts.append("</svg>")
    return "".join(parts)


def corrected_bars(rows: Sequence[tuple[str, str, int, int, str | None]], width: int = 760) -> str:
    """Labels the machine proposed that people corrected most (bar length: corrections)."""
    label_w, bar_h, gap, top = 230, 18, 8, 8
    bar_w = width - label_w - 260
    height = top + max(1, len(rows)) * (bar_h + gap) + 6
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="Most corrected labels">']
    if not rows:
        parts.append(_text(width / 2, top + 14, "no corrections yet", anchor="middle", fill="#888"))
    peak = max((r[2] for r in rows), default=1)
    for i, (attribute, label, corrections, rejections, instead) in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = max(2.0, corrections / peak * bar_w)
        parts.append(_text(label_w - 8, y + bar_h / 2 + 4, f"{attribute}: {label}", anchor="end"))
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#c24b4b"/>')
        detail = f"{corrections}" + (f" ({rejections} rejected)" if rejections else "")
        if instead:
            detail += f", mostly to {instead}"
        parts.append(_text(label_w + w + 6, y + bar_h / 2 + 4, detail))
    parts.append("</svg>")
    return "".join(parts)
