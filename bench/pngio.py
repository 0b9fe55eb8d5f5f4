"""Write PNG files with numpy + zlib (no PIL needed)."""
import struct
import zlib

import numpy as np


def write_png(path: str, image: np.ndarray) -> None:
    """Write an [H, W, 3] (or [H, W]) uint8 array as an RGB (or grey) PNG."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    colour = 2 if img.ndim == 3 else 0
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def grid(images: np.ndarray, cols: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] images into one [rows*H, cols*W, 3] picture (nearest upscaling)."""
    n, h, w, c = images.shape
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        big = images[k].repeat(scale, 0).repeat(scale, 1)
        y, x = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        out[y:y + h * scale, x:x + w * scale] = big
    return out
