"""Pictures of a DPCache schedule, in pure numpy (no PIL, no matplotlib).

``render_pact_path`` draws the PACT cost tensor as a heatmap with the chosen key-step path on it;
``render_timeline`` draws a key-step strip for schedules without a PACT. A tiny bitmap font,
a PNG writer and a converter to ComfyUI's IMAGE tensor come along.
"""

from __future__ import annotations

import math
import operator
import os
import struct
import tempfile
import zlib

import numpy as np

__all__ = [
    "render_pact_path",
    "render_timeline",
    "draw_text",
    "text_size",
    "write_png",
    "to_comfy_image",
]

# Colours (RGB). The pictures are dark so they sit well in ComfyUI's dark node previews.
BACKGROUND = (30, 30, 32)
TEXT = (228, 228, 228)
MUTED = (150, 150, 155)
UNDEFINED = (62, 62, 66)  # +inf cells
KEY = (255, 70, 120)  # key-step markers, computed cells
PATH = (255, 255, 255)
PREDICTED = (196, 200, 214)  # predicted (skipped) cells of the timeline
LABEL_BOX = (14, 14, 16)

# Viridis sampled at 9 points; interpolated linearly.
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)

# 5x8 glyphs (7 rows + 1 descender row), each row a byte in hex, bit 4 = leftmost column.
_FONT = {
    '0': "0e11131519110e00", '1': "040c040404040e00", '2': "0e11010204081f00", '3': "1f02040201110e00",
    '4': "02060a121f020200", '5': "1f101e0101110e00", '6': "0608101e11110e00", '7': "1f01020408080800",
    '8': "0e11110e11110e00", '9': "0e11110f01020c00", 'A': "0e11111f11111100", 'B': "1e11111e11111e00",
    'C': "0e11101010110e00", 'D': "1c12111111121c00", 'E': "1f10101e10101f00", 'F': "1f10101e10101000",
    'G': "0e11101711110f00", 'H': "1111111f11111100", 'I': "0e04040404040e00", 'J': "0702020202120c00",
    'K': "1112141814121100", 'L': "1010101010101f00", 'M': "111b151511111100", 'N': "1111191513111100",
    'O': "0e11111111110e00", 'P': "1e11111e10101000", 'Q': "0e11111115120d00", 'R': "1e11111e14121100",
    'S': "0f10100e01011e00", 'T': "1f04040404040400", 'U': "1111111111110e00", 'V': "11111111110a0400",
    'W': "1111111515150a00", 'X': "11110a040a111100", 'Y': "11110a0404040400", 'Z': "1f01020408101f00",
    'a': "00000e010f110f00", 'b': "1010161911111e00", 'c': "00000e1010110e00", 'd': "01010d1311110f00",
    'e': "00000e111f100e00", 'f': "0609081c08080800", 'g': "00000f11110f010e", 'h': "1010161911111100",
    'i': "04000c0404040e00", 'j': "020006020202120c", 'k': "1010121418141200", 'l': "0c04040404040e00",
    'm': "00001a1515111100", 'n': "0000161911111100", 'o': "00000e1111110e00", 'p': "00001e11111e1010",
    'q': "00000f11110f0101", 'r': "0000161910101000", 's': "00000f100e011e00", 't': "08081c0808090600",
    'u': "0000111111130d00", 'v': "00001111110a0400", 'w': "0000111115150a00", 'x': "0000110a040a1100",
    'y': "00001111110f010e", 'z': "00001f0204081f00", '.': "00000000000c0c00", ',': "00000000000c0c08",
    ':': "000c0c000c0c0000", ';': "000c0c000c0c0408", '(': "0204080808040200", ')': "0804020202040800",
    '/': "0001020408100000", '-': "0000001f00000000", '+': "0004041f04040000", '=': "00001f001f000000",
    '%': "1819020408130300", '<': "0204081008040200", '>': "0804020102040800", '[': "0e08080808080e00",
    ']': "0e02020202020e00", '_': "000000000000001f", "'": "0404080000000000", '!': "0404040404000400",
    '?': "0e11010204000400", '*': "0004150e15040000", '#': "0a0a1f0a1f0a0a00", '|': "0404040404040400",
    '"': "0a0a000000000000", '~': "0000081502000000",
}
_GLYPH_W, _GLYPH_H = 5, 8
_ADVANCE, _LINE = 6, 10  # horizontal advance and line height at scale 1
_MASKS: dict[str, np.ndarray] = {}


def _glyph(ch: str) -> np.ndarray:
    if ch not in _MASKS:
        hexrows = _FONT.get(ch, _FONT["?"]) if ch != " " else "00" * _GLYPH_H
        rows = [int(hexrows[k:k + 2], 16) for k in range(0, 2 * _GLYPH_H, 2)]
        bits = [[(r >> (_GLYPH_W - 1 - c)) & 1 for c in range(_GLYPH_W)] for r in rows]
        _MASKS[ch] = np.array(bits, dtype=bool)
    return _MASKS[ch]


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of one line of ``text`` drawn at ``scale``."""
    n = len(text)
    return (max(0, n * _ADVANCE - 1) * scale, _GLYPH_H * scale)


def _text_mask(text: str, scale: int = 1) -> np.ndarray:
    mask = np.zeros((_GLYPH_H, max(1, len(text) * _ADVANCE - 1)), dtype=bool)
    for k, ch in enumerate(text):
        mask[:, k * _ADVANCE:k * _ADVANCE + _GLYPH_W] = _glyph(ch)
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


def _paste(img: np.ndarray, x: int, y: int, mask: np.ndarray, color) -> None:
    h, w = mask.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img.shape[1]), min(y + h, img.shape[0])
    if x0 < x1 and y0 < y1:
        img[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = color


def draw_text(img: np.ndarray, x: int, y: int, text: str, color=TEXT, scale: int = 1) -> np.ndarray:
    """Draw one line of ``text`` with its top-left corner at (x, y), in place; clipped at the edges.

    Characters outside the font are drawn as '?'. Returns ``img``.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if text:
        _paste(img, int(x), int(y), _text_mask(str(text), int(scale)), color)
    return img


def _rect(img, x0, y0, x1, y1, color) -> None:
    """Fill the half-open box [x0, x1) x [y0, y1), clipped."""
    x0, y0 = max(int(x0), 0), max(int(y0), 0)
    x1, y1 = min(int(x1), img.shape[1]), min(int(y1), img.shape[0])
    if x0 < x1 and y0 < y1:
        img[y0:y1, x0:x1] = color


def _disk(img, cx, cy, r, color) -> None:
    ri = int(math.ceil(r))
    yy, xx = np.mgrid[-ri:ri + 1, -ri:ri + 1]
    _paste(img, int(round(cx)) - ri, int(round(cy)) - ri, xx * xx + yy * yy <= r * r + 0.5, color)


def _wrap(text: str, max_chars: int) -> list[str]:
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        line = ""
        for word in para.split():
            while len(word) > max_chars:  # a word longer than a line is cut
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:max_chars])
                word = word[max_chars:]
            if not line:
                line = word
            elif len(line) + 1 + len(word) <= max_chars:
                line += " " + word
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _colormap(t: np.ndarray) -> np.ndarray:
    """Viridis-like colours for t in [0, 1]; returns uint8 (..., 3)."""
    t = np.clip(t, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    grid = np.arange(len(_VIRIDIS))
    out = np.stack([np.interp(t, grid, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return np.round(out).astype(np.uint8)


def _fmt(v: float) -> str:
    """Short number: 0, 0.012, 5.4, 88, 1,032, 2.1e7, 3.9e-5."""
    if not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    if 10 <= abs(v) < 1e6:
        return f"{v:,.0f}"
    text = f"{v:.2g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _fmt_tick(v: float) -> str:
    """Colour-bar tick at a decade: 1e-4, 0.001, 0.01, 0.1, 1, 10, 100, 1k, 10k, 100k, 1M ..."""
    if v < 1e-3:
        return f"1e{round(math.log10(v))}"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _check_width(width) -> tuple[int, int]:
    try:
        width = operator.index(width)
    except TypeError:
        raise ValueError(f"width must be an integer number of pixels, got {width!r}") from None
    if not 160 <= width <= 8192:
        raise ValueError(f"width must be between 160 and 8192 pixels, got {width}")
    return width, max(1, round(width / 256))


def _check_keys(key_steps, num_evals: int) -> list[int]:
    try:
        keys = [operator.index(k) for k in key_steps]
    except TypeError:
        raise ValueError(f"key_steps must be a sequence of integers, got {key_steps!r}") from None
    if not keys:
        raise ValueError("key_steps is empty: a schedule needs at least one key step")
    bad = [k for k in keys if not 0 <= k < num_evals]
    if bad:
        raise ValueError(
            f"key step(s) {bad} out of range: key steps must lie in 0..{num_evals - 1} "
            f"for T={num_evals} evaluations")
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise ValueError(f"key_steps must be strictly increasing without repeats, got {keys}")
    return keys


def _check_cost(cost) -> np.ndarray:
    try:
        c = np.array(cost, dtype=np.float64)  # a copy: the caller's array is never touched
    except (TypeError, ValueError):
        raise ValueError(
            f"cost must be a numeric array of shape (T, T+1, T+1), got {type(cost).__name__}") from None
    if c.ndim != 3 or c.shape[0] < 1 or c.shape[1:] != (c.shape[0] + 1, c.shape[0] + 1):
        raise ValueError(
            f"cost must be a PACT of shape (T, T+1, T+1), got shape {tuple(c.shape)}")
    c[np.isnan(c)] = np.inf
    return c


def _nice_step(n: int, cell: float, label_px: int) -> int:
    """Tick spacing in steps: 10 where there is room (finer for short runs, coarser if crowded)."""
    step = 10 if n >= 20 else (5 if n >= 8 else 1)
    for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if s >= step and s * cell >= label_px:
            return s
    return max(n, 1)


def _edges(start: int, size: int, n: int) -> np.ndarray:
    """Pixel edges of n cells spread over ``size`` pixels from ``start``."""
    return start + (np.arange(n + 1) * size) // n


def _swatch_legend(img, x, y, items, s) -> None:
    """Draw (colour, label, round) legend entries in a row: a swatch (disk or square), then the label."""
    for color, label, round_ in items:
        if round_:
            _disk(img, x + 4 * s - 0.5, y + 4 * s - 0.5, 4 * s, color)
        else:
            _rect(img, x, y, x + 8 * s, y + 8 * s, color)
        x += 11 * s
        draw_text(img, x, y, label, TEXT, s)
        x += text_size(label, s)[0] + 14 * s


def render_pact_path(cost, key_steps, title: str | None = None, width: int = 512, hop_costs=None) -> np.ndarray:
    """Heatmap of a PACT with a key-step path on it; returns uint8 (H, width, 3).

    ``cost`` is C[a, i, j] of shape (T, T+1, T+1) (+inf where undefined). Cell (row i, column j)
    shows the cheapest anchor's cost of "key step i, predict up to j" (the path's own anchor on
    the path's hops), colour on a log scale, +inf grey. The path is drawn as a staircase: a
    horizontal run along row k_m up to column k_{m+1}, then down to the next key on the diagonal.
    ``title`` (optional) is drawn above the line with K, T, the ideal speed-up and the path cost.
    ``hop_costs`` (optional, one per key step) replaces the path's hop costs read from ``cost``:
    a history-exact plan's own costs, which a 3-D tensor cannot hold.
    """
    c = _check_cost(cost)
    T = c.shape[0]
    keys = _check_keys(key_steps, T)
    width, s = _check_width(width)
    n, K = T + 1, len(keys)

    # The 2-D view: best anchor per (i, j), path hops with their real anchor.
    view = c.min(axis=0)
    view[np.tril_indices(n)] = np.inf
    ends = keys + [T]
    hops = []  # (i, j, cost) of each hop k_m -> k_{m+1}
    if hop_costs is not None and len(hop_costs) != K:
        raise ValueError(f"hop_costs needs one cost per key step ({K}), got {len(hop_costs)}")
    for m in range(K):
        a = keys[m - 1] if m > 0 else 0
        i, j = ends[m], ends[m + 1]
        v = float(c[a, i, j]) if hop_costs is None else float(hop_costs[m])
        hops.append((i, j, v))
        view[i, j] = v
    total = float(sum(h[2] for h in hops))

    # Log colour scale over the finite positive values; colour-bar ticks at whole decades.
    finite = np.isfinite(view)
    pos = view[finite & (view > 0)]
    lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (1.0, 10.0)
    if hi <= lo:
        hi = lo * 10.0
    llo, lhi = math.log10(lo), math.log10(hi)
    t = (np.log10(np.clip(np.where(finite, view, lo), lo, hi)) - llo) / (lhi - llo)
    ticks = [(10.0 ** e, _fmt_tick(10.0 ** e))
             for e in range(math.ceil(llo - 1e-9), math.floor(lhi + 1e-9) + 1)]
    if len(ticks) < 2:
        ticks = [(lo, _fmt(lo)), (hi, _fmt(hi))]
    if not finite.any():
        ticks = []
    bar_label_w = max([text_size(label, s)[0] for _, label in ticks] + [text_size("cost", s)[0] - 8 * s])

    # Layout (all sizes scale with s; s = 2 at width 512).
    pad, line = 5 * s, _LINE * s
    max_chars = (width - 2 * pad) // (_ADVANCE * s)
    lines = _wrap(title, max_chars) if title else []
    lines += _wrap(f"K={K} T={T}  speed-up {T / K:.2f}x  cost {_fmt(total)}", max_chars)
    tick_w = text_size(str(T), s)[0]
    x0 = pad + 8 * s + 4 * s + tick_w + 3 * s  # y-axis label, tick labels, tick marks
    right = 5 * s + 8 * s + bar_label_w + pad  # gap, colour bar, tick labels
    size = width - x0 - right
    y0 = pad + len(lines) * line + 4 * s
    height = y0 + size + 3 * s + line + 2 * s + line + 5 * s + line + pad
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for k, text in enumerate(lines):
        draw_text(img, pad, pad + k * line, text, TEXT if k < len(lines) - 1 or not title else MUTED, s)

    rgb = _colormap(t)
    rgb[~finite] = UNDEFINED
    ex, ey = _edges(x0, size, n), _edges(y0, size, n)
    counts = np.diff(ex)
    img[y0:y0 + size, x0:x0 + size] = np.repeat(np.repeat(rgb, counts, axis=0), counts, axis=1)
    cx = (ex[:-1] + ex[1:]) // 2  # cell centres (same for rows, shifted by y0 - x0)
    cy = cx - x0 + y0
    cell = size / n

    # Axes: ticks and labels.
    step = _nice_step(T, cell, tick_w + 3 * s)
    for v in range(0, T + 1, step):
        label = str(v)
        lw = text_size(label, s)[0]
        xc, yc = int(round(cx[v])), int(round(cy[v]))
        _rect(img, xc - s // 2, y0 + size, xc - s // 2 + max(1, s // 2 + 1), y0 + size + 2 * s, MUTED)
        draw_text(img, xc - lw // 2, y0 + size + 3 * s, label, TEXT, s)
        _rect(img, x0 - 2 * s, yc - s // 2, x0, yc - s // 2 + max(1, s // 2 + 1), MUTED)
        draw_text(img, x0 - 3 * s - lw, yc - 4 * s, label, TEXT, s)
    xlabel = "predict up to j"
    draw_text(img, x0 + (size - text_size(xlabel, s)[0]) // 2, y0 + size + 3 * s + line + s, xlabel, TEXT, s)
    ylabel = np.rot90(_text_mask("key step i", s))  # reads bottom to top
    _paste(img, pad, y0 + (size - ylabel.shape[0]) // 2, ylabel, TEXT)

    # Colour bar with decade ticks (none when nothing is finite).
    bx = x0 + size + 5 * s
    bar_top, bar_h = y0 + line + 4 * s, size - line - 4 * s
    if ticks and bar_h > 1:
        draw_text(img, bx, y0, "cost", TEXT, s)
        img[bar_top:bar_top + bar_h, bx:bx + 6 * s] = _colormap(np.linspace(1.0, 0.0, bar_h))[:, None, :]
        last_y = None
        for v, label in ticks[::-1]:
            yv = bar_top + int(round((lhi - math.log10(v)) / (lhi - llo) * (bar_h - 1)))
            if last_y is not None and yv - last_y < line:
                continue
            last_y = yv
            _rect(img, bx, yv, bx + 6 * s, yv + max(1, s // 2), BACKGROUND)
            draw_text(img, bx + 8 * s, yv - 4 * s, label, TEXT, s)

    # The path: staircase, then markers, then hop costs (biggest first, never overlapping).
    lw = max(1, s)
    for i, j, _ in hops:
        _rect(img, cx[i], cy[i] - lw // 2, cx[j] + 1, cy[i] - lw // 2 + lw, PATH)
        _rect(img, cx[j] - lw // 2, cy[i], cx[j] - lw // 2 + lw, cy[j] + 1, PATH)
    r = max(1.5, min(0.45 * cell + 0.5, 4.0 * s))
    for k in keys:
        _disk(img, cx[k], cy[k], r + max(1, s // 2), (0, 0, 0))
        _disk(img, cx[k], cy[k], r, KEY)
    _disk(img, cx[T], cy[T], r, PATH)  # the sentinel T

    boxes: list[tuple[int, int, int, int]] = []
    for i, j, v in sorted(hops, key=lambda h: -h[2] if math.isfinite(h[2]) else -math.inf):
        text = _fmt(v)
        tw, th = text_size(text, s)
        mid = (cx[i] + cx[j]) / 2.0 - x0  # a point on the diagonal, in plot pixels
        for d in (2 * s, 6 * s):
            # The box's top-right corner sits below-left of the diagonal (the grey, undefined
            # half), slid up along it when it would leave the plot at the bottom.
            top = min(int(mid + d), size - th - 2 * s)
            right = min(int(mid - d), top - 2 * s)
            box = (x0 + right - tw - 2 * s, y0 + top, x0 + right, y0 + top + th + 2 * s)
            if box[0] >= x0 and not any(
                    b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in boxes):
                boxes.append(box)
                _rect(img, *box, LABEL_BOX)
                draw_text(img, box[0] + s, box[1] + s, text, TEXT, s)
                break

    ly = y0 + size + 3 * s + 2 * line + 4 * s
    _swatch_legend(img, pad, ly, [(KEY, "key step", True), (UNDEFINED, "undefined (inf)", False)], s)
    return img


def render_timeline(num_evals: int, key_steps, title: str | None = None, width: int = 512) -> np.ndarray:
    """Strip of T cells, key evaluations filled, predicted ones light; returns uint8 (H, width, 3).

    For schedules without a PACT (uniform / manual). ``title`` (optional) is drawn above the line
    with K, T and the ideal speed-up T/K.
    """
    try:
        T = operator.index(num_evals)
    except TypeError:
        raise ValueError(f"num_evals must be an integer, got {num_evals!r}") from None
    if T < 1:
        raise ValueError(f"num_evals must be >= 1, got {T}")
    keys = _check_keys(key_steps, T)
    width, s = _check_width(width)
    K = len(keys)

    pad, line = 5 * s, _LINE * s
    max_chars = (width - 2 * pad) // (_ADVANCE * s)
    lines = _wrap(title, max_chars) if title else []
    lines += _wrap(f"K={K} of T={T}  ideal speed-up {T / K:.2f}x", max_chars)
    x0, size = pad, width - 2 * pad
    y0 = pad + len(lines) * line + 4 * s
    strip_h = 16 * s
    height = y0 + strip_h + 3 * s + line + 4 * s + line + pad
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for k, text in enumerate(lines):
        draw_text(img, pad, pad + k * line, text, TEXT if k < len(lines) - 1 or not title else MUTED, s)

    ex = _edges(x0, size, T)
    gap = 1 if size / T >= 4 else 0
    is_key = np.zeros(T, dtype=bool)
    is_key[keys] = True
    for t in range(T):
        _rect(img, ex[t], y0, max(ex[t] + 1, ex[t + 1] - gap), y0 + strip_h, KEY if is_key[t] else PREDICTED)

    tick_w = text_size(str(T), s)[0]
    step = _nice_step(T, size / T, tick_w + 4 * s)
    for v in range(0, T, step):
        xc = (ex[v] + ex[v + 1] - 1) // 2
        _rect(img, xc - s // 2, y0 + strip_h, xc - s // 2 + max(1, s // 2 + 1), y0 + strip_h + 2 * s, MUTED)
        lw = text_size(str(v), s)[0]
        draw_text(img, min(max(xc - lw // 2, 0), width - lw), y0 + strip_h + 3 * s, str(v), TEXT, s)

    ly = y0 + strip_h + 3 * s + line + 4 * s
    _swatch_legend(img, x0, ly, [(KEY, f"computed {K}", False), (PREDICTED, f"predicted {T - K}", False)], s)
    return img


def _check_rgb(rgb) -> np.ndarray:
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected a uint8 image of shape (H, W, 3), got {a.dtype} {tuple(a.shape)}")
    return np.ascontiguousarray(a)


def write_png(path, rgb) -> None:
    """Write a uint8 (H, W, 3) image as PNG, atomically (temp file in the same folder, then replace)."""
    a = _check_rgb(rgb)
    h, w, _ = a.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # filter byte 0 on every row
    raw[:, 1:] = a.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
           + chunk(b"IEND", b""))
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def to_comfy_image(rgb):
    """uint8 (H, W, 3) -> ComfyUI IMAGE: float32 torch tensor [1, H, W, 3] in 0..1."""
    import torch

    a = _check_rgb(rgb)
    return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(0)
