"""The end-of-run loss chart, drawn with Pillow (a dependency already; matplotlib is not): raw
training loss, smoothed loss and validation loss against the step, with axes, ticks and a legend."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (960, 540)
_MARGIN = {"left": 86, "right": 24, "top": 44, "bottom": 64}
_SERIES = (  # column, legend, colour, line width, dots
    ("loss", "training loss", (160, 190, 225), 1, False),
    ("loss_smoothed", "smoothed", (31, 90, 170), 3, False),
    ("val_loss", "validation", (230, 110, 20), 2, True),
)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    if not high > low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [round(math.floor(low / step) * step, 12)]
    while ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks if len(ticks) > 1 else [ticks[0], round(ticks[0] + step, 12)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable from Pillow 10.1
    except TypeError:
        return ImageFont.load_default()


def draw_loss_chart(rows: Sequence[Mapping[str, float | None]], path: Path, title: str = "") -> Path:
    """Draw the series found in `rows` (CSV log rows) to a PNG at `path`, written atomically."""
    from ..fileformat import atomic_write_bytes

    series = []
    for column, legend, colour, width, dots in _SERIES:
        points = sorted((float(r["step"]), float(r[column])) for r in rows
                        if r.get(column) is not None and math.isfinite(float(r[column])))
        if points:
            series.append((points, legend, colour, width, dots))
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    small, big = _font(13), _font(16)
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = SIZE[0] - _MARGIN["right"], SIZE[1] - _MARGIN["bottom"]
    all_points = [p for s in series for p in s[0]] or [(0.0, 0.0)]
    xs, ys = [p[0] for p in all_points], [p[1] for p in all_points]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for x in x_ticks:
        px = at(x, y0)[0]
        draw.line([(px, top), (px, bottom)], fill=(232, 232, 232))
        draw.line([(px, bottom), (px, bottom + 5)], fill="black")
        draw.text((px, bottom + 8), _label(x), fill="black", font=small, anchor="mt")
    for y in y_ticks:
        py = at(x0, y)[1]
        draw.line([(left, py), (right, py)], fill=(232, 232, 232))
        draw.line([(left - 5, py), (left, py)], fill="black")
        draw.text((left - 8, py), _label(y), fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, SIZE[1] - 8), "step", fill="black", font=big, anchor="mb")
    axis = Image.new("RGBA", (120, 24), (255, 255, 255, 0))
    ImageDraw.Draw(axis).text((60, 12), "loss", fill="black", font=big, anchor="mm")
    axis = axis.rotate(90, expand=True)
    image.paste(axis, (4, int((top + bottom) / 2 - axis.height / 2)), axis)
    if title:
        draw.text(((left + right) / 2, 12), title, fill="black", font=big, anchor="mt")

    for points, _, colour, width, dots in series:
        pixels = [at(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=width, joint="curve")
        if dots or len(pixels) == 1:
            for px, py in pixels:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    # legend, top right inside the plot
    entry_height, legend_width = 20, 150
    lx, ly = right - legend_width - 8, top + 8
    draw.rectangle([lx, ly, lx + legend_width, ly + 8 + entry_height * len(series)], fill="white",
                   outline=(190, 190, 190))
    for i, (_, legend, colour, width, _) in enumerate(series):
        y = ly + 4 + entry_height * i + entry_height / 2
        draw.line([(lx + 8, y), (lx + 36, y)], fill=colour, width=max(width, 2))
        draw.text((lx + 44, y), legend, fill="black", font=small, anchor="lm")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return atomic_write_bytes(path, out.getvalue())
