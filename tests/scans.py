"""Test fixtures: small but real scans of every accepted format, made on the fly."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

FORMATS = ("pdf", "tiff", "jpeg", "png", "bmp")
EXTENSIONS = {"pdf": ".pdf", "tiff": ".tif", "jpeg": ".jpg", "png": ".png", "bmp": ".bmp"}


def _page(seed: int, text: str) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("L", (120, 80), 255)
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), text[:18], fill=0)
    for _ in range(20):  # some noise so every seed gives different bytes
        draw.point((rng.randrange(120), rng.randrange(80)), fill=rng.randrange(256))
    return image


def make_pdf(pages: int = 1, marker: str = "") -> bytes:
    """A minimal valid PDF with ``pages`` empty pages (and a marker in a comment)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    for _ in range(pages):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 300] >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%" + marker.encode("utf-8") + b"\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    trailer = f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    out.write(trailer.encode())
    return out.getvalue()


def make_scan(fmt: str, seed: int = 0, pages: int = 1) -> bytes:
    """A valid file of ``fmt`` (pdf, tiff, jpeg, png, bmp) that differs per seed."""
    if fmt == "pdf":
        return make_pdf(pages, marker=f"seed {seed}")
    images = [_page(seed * 100 + i, f"page {i + 1} seed {seed}") for i in range(pages)]
    buf = io.BytesIO()
    pil_format = {"tiff": "TIFF", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}[fmt]
    if pages > 1 and fmt == "tiff":
        images[0].save(buf, pil_format, save_all=True, append_images=images[1:])
    else:
        images[0].save(buf, pil_format)
    return buf.getvalue()


def drop_scans(inbox: Path, count: int, seed: int = 0, folders: int = 2) -> list[str]:
    """Write ``count`` scans of every format into ``folders`` subfolders; return their paths."""
    paths = []
    for i in range(count):
        fmt = FORMATS[i % len(FORMATS)]
        rel = f"batch {i % folders}/scan {seed}-{i}{EXTENSIONS[fmt]}"
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(make_scan(fmt, seed=seed * 10_000 + i))
        paths.append(rel)
    return paths
