"""`skutag demo`: a generated sample catalog tagged end to end on this machine (SQLite, the tiny
model on the CPU, no server, no network), with a few deliberately bad rows."""

from __future__ import annotations

import csv
import random
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

# (sku, garment drawn, width, height, format): several sizes and aspect ratios, as catalogs have.
PRODUCTS = [
    ("DRESS-001", "dress", 1200, 1600, "JPEG"),
    ("DRESS-002", "dress", 800, 1200, "PNG"),
    ("TEE-001", "tshirt", 1600, 1200, "JPEG"),
    ("TEE-002", "tshirt", 1000, 1000, "WEBP"),
    ("SHIRT-001", "tshirt", 1500, 2000, "JPEG"),
    ("PANTS-001", "trousers", 900, 1600, "JPEG"),
    ("PANTS-002", "trousers", 1200, 1800, "PNG"),
    ("SKIRT-001", "skirt", 1400, 1400, "JPEG"),
    ("COAT-001", "coat", 1600, 2000, "JPEG"),
    ("SHOE-001", "shoe", 1920, 1080, "JPEG"),
    ("SHOE-002", "shoe", 600, 400, "PNG"),
    ("BAG-001", "bag", 1200, 1200, "JPEG"),
    ("BAG-002", "bag", 2000, 1500, "WEBP"),
    ("HAT-001", "hat", 800, 800, "JPEG"),
    ("HAT-002", "hat", 240, 180, "JPEG"),
    ("DRESS-003", "dress", 1000, 1500, "JPEG"),
]
COLORS = [(200, 30, 40), (30, 60, 160), (20, 20, 20), (240, 240, 235), (230, 170, 190), (60, 120, 60), (190, 150, 90)]


def _outline(kind: str, w: int, h: int) -> list[tuple[float, float]]:
    shapes = {
        "dress": [(0.4, 0.1), (0.6, 0.1), (0.62, 0.35), (0.8, 0.9), (0.2, 0.9), (0.38, 0.35)],
        "tshirt": [(0.3, 0.15), (0.7, 0.15), (0.9, 0.3), (0.8, 0.4), (0.72, 0.35), (0.72, 0.9), (0.28, 0.9),
                   (0.28, 0.35), (0.2, 0.4), (0.1, 0.3)],
        "trousers": [(0.3, 0.08), (0.7, 0.08), (0.75, 0.92), (0.55, 0.92), (0.5, 0.35), (0.45, 0.92), (0.25, 0.92)],
        "skirt": [(0.35, 0.25), (0.65, 0.25), (0.85, 0.8), (0.15, 0.8)],
        "coat": [(0.3, 0.1), (0.7, 0.1), (0.88, 0.35), (0.8, 0.95), (0.2, 0.95), (0.12, 0.35)],
        "shoe": [(0.15, 0.45), (0.4, 0.45), (0.55, 0.6), (0.88, 0.65), (0.88, 0.75), (0.15, 0.75)],
        "bag": [(0.2, 0.35), (0.8, 0.35), (0.85, 0.85), (0.15, 0.85)],
        "hat": [(0.3, 0.55), (0.35, 0.3), (0.65, 0.3), (0.7, 0.55), (0.9, 0.62), (0.1, 0.62)],
    }  # fmt: skip
    return [(x * w, y * h) for x, y in shapes[kind]]


def product_image(kind: str, width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (247, 246, 244))
    draw = ImageDraw.Draw(image)
    color = rng.choice(COLORS)
    draw.polygon(_outline(kind, width, height), fill=color)
    if rng.random() < 0.5:  # a pattern: stripes or dots
        accent = rng.choice([c for c in COLORS if c != color])
        step = max(6, width // 40)
        for y in range(0, height, step * 2):
            draw.line([(width * 0.1, y), (width * 0.9, y)], fill=accent, width=max(1, step // 3))
        image = Image.composite(image, Image.new("RGB", image.size, (247, 246, 244)), _mask(kind, width, height))
    return image


def _mask(kind: str, width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(_outline(kind, width, height), fill=255)
    return mask


def decompression_bomb_png() -> bytes:
    """A valid PNG header declaring 30000 x 30000 pixels over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def write_sample_catalog(directory: Path) -> Path:
    """Images and catalog.csv under directory; returns the CSV path. Paths in the CSV are relative
    to directory (the demo makes it the image root)."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for index, (sku, kind, width, height, fmt) in enumerate(PRODUCTS):
        name = f"{sku.lower()}.{ {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp'}[fmt] }"
        product_image(kind, width, height, seed=index).save(images / name, fmt, quality=88)
        rows.append({"sku": sku, "image_uri": f"images/{name}", "title": f"{kind} {sku}", "category_hint": kind})
    (images / "notes.jpg").write_text("a text file with an image name")
    (images / "bomb.png").write_bytes(decompression_bomb_png())
    rows += [
        {"sku": "BAD-MISSING", "image_uri": "images/missing.jpg", "title": "file not there", "category_hint": ""},
        {"sku": "BAD-NOT-IMAGE", "image_uri": "images/notes.jpg", "title": "not an image", "category_hint": ""},
        {"sku": "BAD-BOMB", "image_uri": "images/bomb.png", "title": "decompression bomb", "category_hint": ""},
        {"sku": "BAD-ESCAPE", "image_uri": "../../etc/passwd", "title": "path escape", "category_hint": ""},
        {"sku": "BAD-NO-URI", "image_uri": "", "title": "a row without an image", "category_hint": ""},
        {"sku": "BAD-FTP", "image_uri": "ftp://example.com/a.jpg", "title": "unsupported scheme", "category_hint": ""},
    ]
    catalog = directory / "catalog.csv"
    with catalog.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sku", "image_uri", "title", "category_hint"])
        writer.writeheader()
        writer.writerows(rows)
    return catalog
