"""A PNG line chart drawn with PIL (no matplotlib, as `vlm.eval.grid`): side-by-side panels, one
line per series with its points and +-std error bars, x values placed evenly in the order given
(shot counts 0, 4, 8, 16, 32 read better evenly spaced than to scale), y from 0 to a round number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vlm.eval.grid import load_font

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
_MARGIN = {"left": 60, "right": 16, "top": 36, "bottom": 48}  # pixels around a panel's plotting area
_GREY, _BLACK = (200, 200, 200), (0, 0, 0)


@dataclass(frozen=True)
class Series:
    """One line: `y[i]` +- `err[i]` at the i-th x value of its chart."""

    label: str
    y: Sequence[float]
    err: Sequence[float]


def nice_top(value: float) -> tuple[float, float]:
    """The smallest round number >= `value` (1, 2, 2.5 or 5 times a power of ten, at most 5 steps of
    such a size) and that step: the y axis's top and tick spacing."""
    if not value > 0:
        return 1.0, 0.2
    power = 10 ** math.floor(math.log10(value / 5))
    step = next(power * m for m in (1, 2, 2.5, 5, 10) if value <= 5 * power * m)
    return step * math.ceil(value / step - 1e-9), step


def line_chart(panels: Sequence[tuple[str, Sequence[Series]]], x_values: Sequence[object], *, x_label: str,
               size: tuple[int, int] = (420, 320)) -> Image.Image:
    """Panels side by side, each (title, series); every series has one y per x value."""
    width, height = size
    chart = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(chart)
    for i, (title, series) in enumerate(panels):
        _panel(draw, i * width, width, height, title, series, x_values, x_label)
    return chart


def _panel(draw: ImageDraw.ImageDraw, left: int, width: int, height: int, title: str, series: Sequence[Series],
           x_values: Sequence[object], x_label: str) -> None:
    font, small = load_font(14), load_font(11)
    x0, x1 = left + _MARGIN["left"], left + width - _MARGIN["right"]
    y0, y1 = _MARGIN["top"], height - _MARGIN["bottom"]  # y0 is the top edge
    top, step = nice_top(max((y + e for s in series for y, e in zip(s.y, s.err)), default=0.0))
    gap = (x1 - x0) / max(len(x_values), 1)

    def px(i: int) -> float:
        return x0 + gap * (i + 0.5)

    def py(value: float) -> float:
        return y1 - (y1 - y0) * min(max(value, 0.0), top) / top

    draw.text(((x0 + x1) / 2, 8), title, fill=_BLACK, font=font, anchor="mt")
    for tick in range(round(top / step) + 1):
        value = tick * step
        draw.line([(x0, py(value)), (x1, py(value))], fill=_GREY)
        draw.text((x0 - 6, py(value)), f"{value:g}", fill=_BLACK, font=small, anchor="rm")
    for i, x in enumerate(x_values):
        draw.text((px(i), y1 + 6), str(x), fill=_BLACK, font=small, anchor="mt")
    draw.text(((x0 + x1) / 2, height - 8), x_label, fill=_BLACK, font=font, anchor="mb")
    draw.rectangle([x0, y0, x1, y1], outline=_BLACK)
    for n, line in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        points = [(px(i), py(y)) for i, y in enumerate(line.y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for (x, y), value, err in zip(points, line.y, line.err):
            if err > 0:
                draw.line([(x, py(value - err)), (x, py(value + err))], fill=colour, width=1)
                for end in (value - err, value + err):
                    draw.line([(x - 4, py(end)), (x + 4, py(end))], fill=colour, width=1)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([(x0 + 8, y0 + 12 + 16 * n), (x0 + 28, y0 + 12 + 16 * n)], fill=colour, width=2)
        draw.text((x0 + 34, y0 + 12 + 16 * n), line.label, fill=_BLACK, font=small, anchor="lm")
