"""Pictures of a DPCache schedule, drawn with Pillow.

``render_pact_path`` draws the PACT cost tensor as a heatmap with the chosen key-step path on it;
``render_timeline`` draws a key-step strip for schedules without a PACT; ``render_image_rows``
lays out rows of images with a label in front of each. ``write_png`` saves atomically and
``to_comfy_image`` converts to ComfyUI's IMAGE tensor. Pictures are uint8 (H, W, 3) arrays.
"""

from __future__ import annotations

import io
import math
import operator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .store import write_atomic

__all__ = ["render_pact_path", "render_timeline", "render_image_rows", "write_png", "to_comfy_image"]

# Colours (RGB). The pictures are dark so they sit well in ComfyUI's dark node previews.
BACKGROUND = (30, 30, 32)
TEXT = (228, 228, 228)
MUTED = (150, 150, 155)
UNDEFINED = (62, 62, 66)  # +inf cells
KEY = (255, 70, 120)  # key-step markers, computed cells
PATH = (255, 255, 255)
PREDICTED = (196, 200, 214)  # predicted (skipped) cells of the timeline
LABEL_BOX = (14, 14, 16)
# What a PACT cost is, under the heatmap: the sum over the predicted evaluations of a hop of the
# mean absolute error of the predicted cache point (halved, as the reference does).
COST_UNIT = "cost = sum over predicted evaluations of mean |error| / 2"

# Viridis sampled at 9 points; interpolated linearly.
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)


class Canvas:
    """A Pillow image with the font and the drawing calls the pictures use (text top-left anchored)."""

    def __init__(self, width: int, height: int, font_px: int):
        self.image = Image.new("RGB", (width, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font = font(font_px)

    def text(self, x, y, text, color=TEXT) -> None:
        self.draw.text((x, y), text, fill=color, font=self.font)

    def rect(self, x0, y0, x1, y1, color) -> None:
        """Fill the half-open box [x0, x1) x [y0, y1)."""
        if x1 > x0 and y1 > y0:
            self.draw.rectangle((int(x0), int(y0), int(x1) - 1, int(y1) - 1), fill=color)

    def disk(self, cx, cy, r, color) -> None:
        self.draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)

    def vertical_text(self, x, y_center, text, color=TEXT) -> None:
        """Text rotated to read bottom to top, its left edge at x, centred on y_center."""
        w, h = text_box(self.font, text)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=self.font)
        mask = mask.rotate(90, expand=True)
        self.image.paste(Image.new("RGB", mask.size, color), (int(x), int(y_center - mask.size[1] / 2)), mask)

    def array(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8).copy()


def font(px: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``px`` pixels (its scalable version where Pillow has FreeType)."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_box(fnt, text: str) -> tuple[int, int]:
    """(width, height) of one line drawn at (0, 0) with its top-left anchor, descenders included."""
    left, top, right, bottom = fnt.getbbox(text or " ")
    return max(1, int(math.ceil(right))), max(1, int(math.ceil(bottom)))


def text_width(fnt, text: str) -> int:
    return int(math.ceil(fnt.getlength(text))) if text else 0


def wrap(fnt, text: str, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width`` pixels, broken at spaces (a longer word is cut)."""
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        line = ""
        for word in para.split():
            while len(word) > 1 and text_width(fnt, word) > width:
                cut = len(word) - 1
                while cut > 1 and text_width(fnt, word[:cut]) > width:
                    cut -= 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}" if line else word
            if text_width(fnt, candidate) <= width or not line:
                line = candidate
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
    """(width, font size in pixels): 14 px at the node's 512."""
    try:
        width = operator.index(width)
    except TypeError:
        raise ValueError(f"width must be an integer number of pixels, got {width!r}") from None
    if not 160 <= width <= 8192:
        raise ValueError(f"width must be between 160 and 8192 pixels, got {width}")
    return width, max(10, round(width * 14 / 512))


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


def _legend(cv: Canvas, x, y, items, line: int) -> None:
    """(colour, label, round) entries in a row: a swatch (disk or square), then the label."""
    sw = max(6, int(line * 0.6))
    top = y + (line - sw) // 2
    for color, label, round_ in items:
        if round_:
            cv.disk(x + sw / 2 - 0.5, top + sw / 2 - 0.5, sw / 2, color)
        else:
            cv.rect(x, top, x + sw, top + sw, color)
        x += sw + sw // 2
        cv.text(x, y, label)
        x += text_width(cv.font, label) + sw * 2


def _title_lines(fnt, title, summary, width, pad) -> list[tuple[str, tuple]]:
    lines = [(t, TEXT) for t in wrap(fnt, title, width - 2 * pad)] if title else []
    return lines + [(t, MUTED if title else TEXT) for t in wrap(fnt, summary, width - 2 * pad)]


def render_pact_path(cost, key_steps, title: str | None = None, width: int = 512, hop_costs=None) -> np.ndarray:
    """Heatmap of a PACT with a key-step path on it; returns uint8 (H, width, 3).

    ``cost`` is C[a, i, j] of shape (T, T+1, T+1) (+inf where undefined). Cell (row i, column j)
    shows the cheapest anchor's cost of "key step i, predict up to j" (the path's own anchor on
    the path's hops), colour on a log scale, +inf grey. The path is drawn as a staircase: a
    horizontal run along row k_m up to column k_{m+1}, then down to the next key on the diagonal.
    ``title`` (optional) is drawn above the line with K, T, the ideal speed-up T/K and the path cost.
    ``hop_costs`` (optional, one per key step) replaces the path's hop costs read from ``cost``:
    a history-exact plan's own costs, which a 3-D tensor cannot hold.
    """
    c = _check_cost(cost)
    T = c.shape[0]
    keys = _check_keys(key_steps, T)
    width, px = _check_width(width)
    n, K = T + 1, len(keys)
    fnt = font(px)

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

    # Layout: every length follows the font size (14 px at width 512).
    line = round(px * 1.3)
    pad, gap = round(px * 0.6), max(2, px // 5)
    lines = _title_lines(fnt, title, f"K={K} of T={T} \u00b7 ideal speed-up {T / K:.2f}x \u00b7 cost {_fmt(total)}", width, pad)
    bar_w = round(px * 0.8)
    bar_label_w = max([text_width(fnt, label) for _, label in ticks] + [text_width(fnt, "cost") - bar_w - gap])
    tick_w = text_width(fnt, str(T))
    x0 = pad + line + tick_w + 2 * gap + gap  # y-axis label, tick labels, tick marks
    right = gap * 2 + bar_w + gap + bar_label_w + pad  # gap, colour bar, its labels
    size = width - x0 - right
    y0 = pad + len(lines) * line + gap * 2
    unit_lines = wrap(fnt, COST_UNIT, width - 2 * pad)
    height = y0 + size + 2 * gap + line + line + gap + line + len(unit_lines) * line + pad
    cv = Canvas(width, height, px)
    for k, (text, color) in enumerate(lines):
        cv.text(pad, pad + k * line, text, color)

    rgb = _colormap(t)
    rgb[~finite] = UNDEFINED
    ex = _edges(x0, size, n)  # the rows' edges are the same, shifted by y0 - x0
    counts = np.diff(ex)
    cells = np.repeat(np.repeat(rgb, counts, axis=0), counts, axis=1)
    cv.image.paste(Image.fromarray(cells, "RGB"), (x0, y0))
    cx = (ex[:-1] + ex[1:]) // 2  # cell centres (same for rows, shifted by y0 - x0)
    cy = cx - x0 + y0
    cell = size / n

    # Axes: ticks and labels.
    tick = max(1, px // 8)
    step = _nice_step(T, cell, tick_w + gap)
    for v in range(0, T + 1, step):
        label = str(v)
        lw = text_width(fnt, label)
        xc, yc = int(cx[v]), int(cy[v])
        cv.rect(xc - tick // 2, y0 + size, xc - tick // 2 + tick, y0 + size + gap, MUTED)
        cv.text(xc - lw // 2, y0 + size + gap, label)
        cv.rect(x0 - gap, yc - tick // 2, x0, yc - tick // 2 + tick, MUTED)
        cv.text(x0 - 2 * gap - lw, yc - line // 2, label)
    xlabel = "predict up to j"
    cv.text(x0 + (size - text_width(fnt, xlabel)) // 2, y0 + size + gap + line, xlabel)
    cv.vertical_text(pad, y0 + size / 2, "key step i")

    # Colour bar with decade ticks (none when nothing is finite).
    bx = x0 + size + 2 * gap
    bar_top, bar_h = y0 + line + gap, size - line - gap
    if ticks and bar_h > 1:
        cv.text(bx, y0, "cost")  # its unit is in the legend line: mean |error| per evaluation, summed
        strip = np.repeat(_colormap(np.linspace(1.0, 0.0, bar_h))[:, None, :], bar_w, axis=1)
        cv.image.paste(Image.fromarray(strip, "RGB"), (bx, bar_top))
        last_y = None
        for v, label in ticks[::-1]:
            yv = bar_top + int(round((lhi - math.log10(v)) / (lhi - llo) * (bar_h - 1)))
            if last_y is not None and yv - last_y < line:
                continue
            last_y = yv
            cv.rect(bx, yv, bx + bar_w, yv + tick, BACKGROUND)
            cv.text(bx + bar_w + gap, yv - line // 2, label)

    # The path: staircase, then markers, then hop costs (biggest first, never overlapping).
    lw = max(1, round(px / 7))
    for i, j, _ in hops:
        cv.rect(cx[i], cy[i] - lw // 2, cx[j] + 1, cy[i] - lw // 2 + lw, PATH)
        cv.rect(cx[j] - lw // 2, cy[i], cx[j] - lw // 2 + lw, cy[j] + 1, PATH)
    r = max(1.5, min(0.45 * cell + 0.5, px * 0.3))
    for k in keys:
        cv.disk(cx[k], cy[k], r + lw, (0, 0, 0))
        cv.disk(cx[k], cy[k], r, KEY)
    cv.disk(cx[T], cy[T], r, PATH)  # the sentinel T

    boxes: list[tuple[int, int, int, int]] = []
    for i, j, v in sorted(hops, key=lambda h: -h[2] if math.isfinite(h[2]) else -math.inf):
        text = _fmt(v)
        tw, th = text_width(fnt, text), line - gap
        mid = (cx[i] + cx[j]) / 2.0 - x0  # a point on the diagonal, in plot pixels
        for d in (gap, 3 * gap):
            # The box's top-right corner sits below-left of the diagonal (the grey, undefined
            # half), slid up along it when it would leave the plot at the bottom.
            top = min(int(mid + d), size - th - gap)
            right_edge = min(int(mid - d), top - gap)
            box = (x0 + right_edge - tw - gap, y0 + top, x0 + right_edge, y0 + top + th)
            if box[0] >= x0 and not any(
                    b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in boxes):
                boxes.append(box)
                cv.rect(*box, LABEL_BOX)
                cv.text(box[0] + gap // 2, box[1], text)
                break

    ly = y0 + size + 2 * gap + 2 * line
    _legend(cv, pad, ly, [(KEY, "key step", True), (UNDEFINED, "undefined (inf)", False)], line)
    for k, text in enumerate(unit_lines):
        cv.text(pad, ly + (k + 1) * line, text, MUTED)
    return cv.array()


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
    width, px = _check_width(width)
    K = len(keys)
    fnt = font(px)

    line = round(px * 1.3)
    pad, gap = round(px * 0.6), max(2, px // 5)
    lines = _title_lines(fnt, title, f"K={K} of T={T} \u00b7 ideal speed-up {T / K:.2f}x", width, pad)
    x0, size = pad, width - 2 * pad
    y0 = pad + len(lines) * line + 2 * gap
    strip_h = 2 * px
    height = y0 + strip_h + gap + line + gap + line + pad
    cv = Canvas(width, height, px)
    for k, (text, color) in enumerate(lines):
        cv.text(pad, pad + k * line, text, color)

    ex = _edges(x0, size, T)
    cell_gap = 1 if size / T >= 4 else 0
    is_key = np.zeros(T, dtype=bool)
    is_key[keys] = True
    for t in range(T):
        cv.rect(ex[t], y0, max(ex[t] + 1, ex[t + 1] - cell_gap), y0 + strip_h, KEY if is_key[t] else PREDICTED)

    tick = max(1, px // 8)
    step = _nice_step(T, size / T, text_width(fnt, str(T)) + 2 * gap)
    for v in range(0, T, step):
        xc = (ex[v] + ex[v + 1] - 1) // 2
        cv.rect(xc - tick // 2, y0 + strip_h, xc - tick // 2 + tick, y0 + strip_h + gap, MUTED)
        lw = text_width(fnt, str(v))
        cv.text(min(max(xc - lw // 2, 0), width - lw), y0 + strip_h + gap, str(v))

    ly = y0 + strip_h + gap + line + gap
    _legend(cv, x0, ly, [(KEY, f"computed {K}", False), (PREDICTED, f"predicted {T - K}", False)], line)
    return cv.array()


def render_image_rows(rows, scale: int = 1, font_px: int = 14, columns=None, captions=None) -> np.ndarray:
    """Rows of equal-size uint8 (h, w, 3) images, each row led by its label: [(label, [images])].

    ``columns`` (optional): a label above each column. ``captions`` (optional): {row number: [one
    text per image]} drawn under that row's images (e.g. the PSNR of each against the row above).
    """
    if not rows or not all(images for _, images in rows):
        raise ValueError("render_image_rows needs at least one row with at least one image")
    images = [[_check_rgb(img) for img in imgs] for _, imgs in rows]
    h, w = images[0][0].shape[:2]
    if any(img.shape[:2] != (h, w) for imgs in images for img in imgs):
        raise ValueError("render_image_rows needs images of one size")
    captions = dict(captions or {})
    if any(not 0 <= r < len(rows) or len(texts) > len(images[r]) for r, texts in captions.items()):
        raise ValueError("captions: {row number: [one text per image of that row]}")
    fnt = font(font_px)
    pad = max(2, font_px // 3)
    line = round(font_px * 1.3)
    label_w = max(text_width(fnt, label) for label, _ in rows) + 2 * pad
    cols = max(len(imgs) for imgs in images)
    column_texts = list(columns or [])[:cols]
    texts = column_texts + [t for ts in captions.values() for t in ts]
    cell_w = max([w * scale] + [text_width(fnt, t) for t in texts]) + pad
    header = line + pad if column_texts else 0
    heights = [h * scale + pad + (line if r in captions else 0) for r in range(len(rows))]
    cv = Canvas(label_w + cols * cell_w + pad, header + sum(heights) + pad, font_px)
    for q, text in enumerate(column_texts):
        cv.text(label_w + q * cell_w + (w * scale - text_width(fnt, text)) // 2, pad, text, MUTED)
    y = pad + header
    for r, ((label, _), imgs) in enumerate(zip(rows, images)):
        cv.text(pad, y + (h * scale - text_box(fnt, label)[1]) // 2, label)
        for q, img in enumerate(imgs):
            x = label_w + q * cell_w
            big = Image.fromarray(img, "RGB").resize((w * scale, h * scale), Image.NEAREST)
            cv.image.paste(big, (x, y))
            if q < len(captions.get(r, ())):
                text = captions[r][q]
                cv.text(x + (w * scale - text_width(fnt, text)) // 2, y + h * scale + pad // 2, text)
        y += heights[r]
    return cv.array()


def _check_rgb(rgb) -> np.ndarray:
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected a uint8 image of shape (H, W, 3), got {a.dtype} {tuple(a.shape)}")
    return np.ascontiguousarray(a)


def write_png(path, rgb) -> None:
    """Write a uint8 (H, W, 3) image as PNG, atomically (``store.write_atomic``)."""
    buffer = io.BytesIO()
    Image.fromarray(_check_rgb(rgb), "RGB").save(buffer, format="PNG")
    write_atomic(str(path), buffer.getvalue())


def to_comfy_image(rgb):
    """uint8 (H, W, 3) -> ComfyUI IMAGE: float32 torch tensor [1, H, W, 3] in 0..1."""
    import torch

    a = _check_rgb(rgb)
    return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(0)
