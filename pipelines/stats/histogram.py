"""The ``<dataset>_histograms.png`` of ``vlaprep stats``: per action dimension, the display histogram
(``exact.histogram_bins``) with q01/q99 marked, for people to check the normalization by eye."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from vlaprep.paths import write_bytes_atomic

_PANEL_W, _PANEL_H, _MARGIN = 320, 150, 24


def render_histograms(dataset: str, histogram: dict, action: dict, path: str) -> None:
    """histogram: {"counts": [D][B], "min": [D], "max": [D]}; action: the entry's action block."""
    counts = histogram["counts"]
    dims = len(counts)
    cols = min(dims, 4)
    rows = (dims + cols - 1) // cols
    image = Image.new("RGB", (cols * _PANEL_W, rows * _PANEL_H + _MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), f"{dataset}: action histograms (red: q01/q99)", fill="black")
    for d in range(dims):
        x0 = (d % cols) * _PANEL_W + 8
        y0 = (d // cols) * _PANEL_H + _MARGIN
        w, h = _PANEL_W - 16, _PANEL_H - 36
        lo, hi = histogram["min"][d], histogram["max"][d]
        peak = max(max(counts[d]), 1)
        bins = len(counts[d])
        for b, c in enumerate(counts[d]):
            bar = int(round(h * c / peak))
            bx = x0 + int(b * w / bins)
            draw.rectangle([bx, y0 + h - bar, x0 + int((b + 1) * w / bins) - 1, y0 + h], fill=(70, 110, 180))
        span = hi - lo if hi > lo else 1.0
        for q in (action["q01"][d], action["q99"][d]):
            qx = x0 + int(round((q - lo) / span * w))
            draw.line([qx, y0, qx, y0 + h], fill=(220, 30, 30), width=2)
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline="gray")
        mask = "normalized" if action["mask"][d] else "raw"
        draw.text((x0, y0 + h + 3), f"dim {d} [{lo:.3g}, {hi:.3g}] {mask}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
