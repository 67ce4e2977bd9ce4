"""Rasterising many points into a small RGBA image with numpy, for the viewer's point plots above a few thousand runs.

The image is what datashader's ``datashade`` would draw for these plots (a count per pixel and category, colours
mixed by count, opacity growing with the count), computed with ``np.bincount`` instead: for 100k points that takes
a few milliseconds and, unlike datashader, no import of ~1 s nor a numba compile of ~1 s per new pair of columns
in every fresh server process (datashader's generated kernels cannot use numba's on-disk cache).

Images are as on screen: row 0 is the top (highest y), column 0 the left (lowest x); Bokeh's ``image_rgba`` draws
row 0 at the bottom, so the viewer flips them.
"""

from __future__ import annotations

import numpy as np

Range = tuple[float, float]


def pixel_index(xs: np.ndarray, ys: np.ndarray, x_range: Range, y_range: Range,
                shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel index of every point inside the ranges (bounds inclusive), and the mask of those points.

    Parameters
    ----------
    xs, ys : point coordinates, 1-D, same length.
    x_range, y_range : ``(low, high)`` of the image; points with ``low <= x <= high`` (and likewise y) fall inside.
    shape : ``(width, height)`` in pixels.

    Returns
    -------
    (index, inside) : ``index[i]`` in ``[0, width * height)`` is the pixel (row-major, row 0 on top) of the
        ``i``-th point with ``inside`` True.
    """
    width, height = shape
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    (x0, x1), (y0, y1) = x_range, y_range
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    x_span, y_span = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    column = np.minimum(((xs[inside] - x0) / x_span * width).astype(np.int64), width - 1)
    row = np.minimum(((ys[inside] - y0) / y_span * height).astype(np.int64), height - 1)
    return (height - 1 - row) * width + column, inside


def count_by_category(xs: np.ndarray, ys: np.ndarray, codes: np.ndarray, n_categories: int, x_range: Range,
                      y_range: Range, shape: tuple[int, int]) -> np.ndarray:
    """Points per pixel and category: an integer array ``(n_categories, height, width)``.

    ``codes[i]`` in ``[0, n_categories)`` is point ``i``'s category; negative codes (missing) are not counted.
    """
    width, height = shape
    index, inside = pixel_index(xs, ys, x_range, y_range, shape)
    codes = np.asarray(codes)[inside]
    known = codes >= 0
    flat = np.bincount(codes[known].astype(np.int64) * (width * height) + index[known],
                       minlength=n_categories * width * height)
    return flat.reshape(n_categories, height, width)


def mean_per_pixel(xs: np.ndarray, ys: np.ndarray, values: np.ndarray, x_range: Range, y_range: Range,
                   shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(mean of ``values``, number of points) per pixel, each ``(height, width)``; NaN values are left out."""
    width, height = shape
    index, inside = pixel_index(xs, ys, x_range, y_range, shape)
    values = np.asarray(values, dtype=float)[inside]
    finite = np.isfinite(values)
    counts = np.bincount(index[finite], minlength=width * height)
    sums = np.bincount(index[finite], weights=values[finite], minlength=width * height)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means.reshape(height, width), counts.reshape(height, width)


def _opacity(total: np.ndarray, min_alpha: int) -> np.ndarray:
    """Alpha per pixel: 0 where empty, else from ``min_alpha`` (one point) up to 255 (the fullest pixel), on a log
    scale so single runs stay visible next to dense clusters."""
    peak = total.max(initial=0)
    if peak <= 0:
        return np.zeros(total.shape, dtype=np.uint8)
    scale = np.log1p(total) / np.log1p(peak)  # 1 point -> log(2)/log(1 + peak); peak -> 1
    floor = np.log1p(1) / np.log1p(peak)
    spread = (scale - floor) / (1 - floor) if peak > 1 else np.ones_like(scale)
    alpha = min_alpha + (255 - min_alpha) * np.clip(spread, 0, 1)
    return np.where(total > 0, np.rint(alpha), 0).astype(np.uint8)


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    """``"#2b83ba"`` -> ``(43, 131, 186)``."""
    value = colour.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"colour {colour!r}: expected #rrggbb")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def shade_categories(counts: np.ndarray, colours: list[str], min_alpha: int = 180) -> np.ndarray:
    """RGBA image ``(height, width, 4)`` uint8 from ``count_by_category`` counts.

    Each pixel's colour is the count-weighted mean of its categories' ``colours`` (``#rrggbb``, one per
    category); its opacity grows with the pixel's total count (see ``_opacity``); empty pixels are transparent.
    """
    rgb = np.array([hex_to_rgb(colour) for colour in colours], dtype=float)  # (n_categories, 3)
    total = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mixed = np.einsum("khw,kc->hwc", counts, rgb) / total[..., None]
    image = np.zeros((*total.shape, 4), dtype=np.uint8)
    image[..., :3] = np.nan_to_num(np.rint(mixed), nan=0).astype(np.uint8)
    image[..., 3] = _opacity(total, min_alpha)
    return image


def shade_values(means: np.ndarray, counts: np.ndarray, clim: Range, palette: list[str],
                 min_alpha: int = 180) -> np.ndarray:
    """RGBA image ``(height, width, 4)`` uint8 of per-pixel means mapped linearly through ``palette`` over ``clim``
    (clipped at both ends), opacity growing with the count as in ``shade_categories``."""
    rgb = np.array([hex_to_rgb(colour) for colour in palette], dtype=np.uint8)
    low, high = clim
    position = (np.nan_to_num(means, nan=low) - low) / ((high - low) or 1.0)
    index = np.clip(np.rint(position * (len(palette) - 1)), 0, len(palette) - 1).astype(np.int64)
    image = np.zeros((*means.shape, 4), dtype=np.uint8)
    image[..., :3] = rgb[index]
    image[..., 3] = _opacity(np.where(np.isfinite(means), counts, 0), min_alpha)
    return image


def points_in_polygon(xs: np.ndarray, ys: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Mask of the points inside ``polygon`` (``(n, 2)`` vertices, closed implicitly), by the even-odd rule.

    Crossing-number test against every edge, vectorised over points: O(points x vertices), about 20 ms for 100k
    points and a 100-vertex lasso.
    """
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    polygon = np.asarray(polygon, dtype=float)
    inside = np.zeros(xs.shape, dtype=bool)
    if polygon.ndim != 2 or len(polygon) < 3:
        return inside
    x_start, y_start = polygon[:, 0], polygon[:, 1]
    x_end, y_end = np.roll(x_start, -1), np.roll(y_start, -1)
    for xa, ya, xb, yb in zip(x_start, y_start, x_end, y_end):
        if ya == yb:
            continue  # a horizontal edge never crosses the horizontal ray
        spans = (ya > ys) != (yb > ys)
        crossing_x = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= spans & (xs < crossing_x)
    return inside


def grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` (2-D) with every True pixel's 3x3 neighbourhood set too."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + height, dx:dx + width]
    return grown
