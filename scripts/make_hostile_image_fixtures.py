#!/usr/bin/env python3
"""Writes tests/fixtures/images/hostile/: small images in every colour layout and EXIF orientation segq must read as
Pillow does, each with the array Pillow gives for it (`<name>.npy`, uint8):

- images: ``np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))`` (H, W, 3), which is what
  `datasets`' Image feature and transformers' `load_image` hand to the model;
- masks (``mask_*``): ``np.asarray(ImageOps.exif_transpose(Image.open(f)))`` (H, W), the stored values turned upright.

Run once with Pillow and numpy installed (python3 -m venv /tmp/v && /tmp/v/bin/pip install pillow numpy); the files
are a few KB and committed. tests/hostile_images.rs compares segq's decoding with them bit for bit.
"""

import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "images", "hostile")


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width, height, color_type, bit_depth, rows, before_idat=b"", after_idat=b""):
    """A PNG written by hand, for layouts Pillow cannot save (16-bit grey+alpha, out-of-range palette indices...)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + before_idat
        + chunk(b"IDAT", zlib.compress(raw))
        + after_idat
        + chunk(b"IEND", b"")
    )


def exif_orientation(value: int, big_endian: bool = False) -> bytes:
    """A minimal TIFF block holding IFD0 with one SHORT Orientation entry."""
    e = ">" if big_endian else "<"
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8)
    entry = struct.pack(e + "HHIHH", 0x0112, 3, 1, value, 0)
    return head + struct.pack(e + "H", 1) + entry + struct.pack(e + "I", 0)


def save(name: str, data: bytes, mask: bool = False):
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        f.write(data)
    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)
    expected = np.asarray(im if mask else im.convert("RGB"), dtype=np.uint8)
    np.save(path + ".npy", expected)
    print(f"{name}: {Image.open(io.BytesIO(data)).mode} {expected.shape}")


def pillow_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(12)
    # A non-square picture with a distinct value per pixel, so every transposition is told apart.
    w, h = 7, 5
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 0] = np.arange(w)[None, :] * 30
    base[..., 1] = np.arange(h)[:, None] * 50
    base[..., 2] = rng.integers(0, 256, (h, w))
    picture = Image.fromarray(base, "RGB")
    big = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")

    # EXIF orientation 1..8, in JPEG (APP1 Exif) and PNG (eXIf chunk), little- and big-endian TIFF.
    for n in range(1, 9):
        exif = b"Exif\x00\x00" + exif_orientation(n, big_endian=n % 2 == 0)
        save(f"orient_{n}.jpg", pillow_bytes(big, "JPEG", quality=90, exif=exif))
        save(f"orient_{n}.png", pillow_bytes(picture, "PNG", exif=exif))
    # eXIf after the image data (Pillow reads it when the image is loaded).
    rows = [base[y].tobytes() for y in range(h)]
    save("orient_6_exif_after_idat.png", png(w, h, 2, 8, rows, after_idat=chunk(b"eXIf", exif_orientation(6))))
    # Orientation only in XMP (Pillow's fallback when EXIF has none).
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    save("xmp_orient_8.jpg", pillow_bytes(big, "JPEG", quality=90, xmp=xmp))
    # A mask stored sideways with its orientation: `datasets` transposes annotation columns too.
    mask = Image.fromarray((np.arange(35).reshape(5, 7) % 6).astype(np.uint8), "L")
    save("mask_orient_6.png", pillow_bytes(mask, "PNG", exif=b"Exif\x00\x00" + exif_orientation(6)), mask=True)

    # CMYK JPEG as Pillow writes it (Adobe marker, inverted), and the same data marked YCCK (Adobe transform 2).
    cmyk = Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "CMYK")
    cmyk_jpeg = pillow_bytes(cmyk, "JPEG", quality=95)
    save("cmyk.jpg", cmyk_jpeg)
    adobe = cmyk_jpeg.find(b"Adobe")
    assert adobe > 0 and cmyk_jpeg[adobe - 4 : adobe - 2] == b"\xff\xee", "Pillow wrote no Adobe segment"
    transform = adobe + 11  # "Adobe", version, flags0, flags1, then the transform byte
    ycck = cmyk_jpeg[:transform] + b"\x02" + cmyk_jpeg[transform + 1 :]
    save("ycck.jpg", ycck)

    # PNG colour layouts, through Pillow's convert("RGB").
    grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    save("grey8.png", pillow_bytes(Image.fromarray(grey, "L"), "PNG"))
    save("grey8_trns.png", pillow_bytes(Image.fromarray(grey, "L"), "PNG", transparency=int(grey[0, 0])))
    save("grey_alpha8.png", pillow_bytes(Image.fromarray(rng.integers(0, 256, (6, 9, 2), dtype=np.uint8), "LA"), "PNG"))
    save("rgba8.png", pillow_bytes(Image.fromarray(rng.integers(0, 256, (6, 9, 4), dtype=np.uint8), "RGBA"), "PNG"))
    grey16 = np.array([[0, 1, 127, 255, 256, 300], [1000, 4095, 40000, 65535, 254, 2]], dtype=">u2")
    save("grey16.png", png(6, 2, 0, 16, [r.tobytes() for r in grey16]))
    save("grey16_trns.png", png(6, 2, 0, 16, [r.tobytes() for r in grey16], chunk(b"tRNS", struct.pack(">H", 300))))
    la16 = rng.integers(0, 65536, (3, 4, 2)).astype(">u2")
    save("grey_alpha16.png", png(4, 3, 4, 16, [r.tobytes() for r in la16]))
    rgb16 = rng.integers(0, 65536, (3, 4, 3)).astype(">u2")
    save("rgb16.png", png(4, 3, 2, 16, [r.tobytes() for r in rgb16]))
    save("rgb16_trns.png", png(4, 3, 2, 16, [r.tobytes() for r in rgb16], chunk(b"tRNS", rgb16[0, 0].tobytes())))
    rgba16 = rng.integers(0, 65536, (3, 4, 4)).astype(">u2")
    save("rgba16.png", png(4, 3, 6, 16, [r.tobytes() for r in rgba16]))
    palette = bytes(rng.integers(0, 256, 3 * 16, dtype=np.uint8))
    indices = rng.integers(0, 16, (5, 8), dtype=np.uint8)
    save("palette8.png", png(8, 5, 3, 8, [r.tobytes() for r in indices], chunk(b"PLTE", palette)))
    save(
        "palette8_trns.png",
        png(8, 5, 3, 8, [r.tobytes() for r in indices], chunk(b"PLTE", palette) + chunk(b"tRNS", bytes([0, 90, 255]))),
    )
    # Indices past the palette's end (Pillow shows them black).
    short = bytes(rng.integers(0, 256, 3 * 4, dtype=np.uint8))
    save("palette8_short.png", png(8, 5, 3, 8, [r.tobytes() for r in indices], chunk(b"PLTE", short)))
    for bits in (1, 2, 4):
        width = 13  # not a multiple of the samples per byte: the last byte of each row is padded
        values = rng.integers(0, 1 << bits, (3, width), dtype=np.uint8)

        def pack(row):
            out, acc, n = bytearray(), 0, 0
            for v in row:
                acc = (acc << bits) | int(v)
                n += bits
                if n == 8:
                    out.append(acc)
                    acc, n = 0, 0
            if n:
                out.append(acc << (8 - n))
            return bytes(out)

        rows = [pack(r) for r in values]
        save(f"grey{bits}bit.png", png(width, 3, 0, bits, rows))
        save(f"palette{bits}bit.png", png(width, 3, 3, bits, rows, chunk(b"PLTE", palette[: 3 * (1 << bits)])))
    # Interlaced (Adam7) RGB.
    save("rgb8_interlaced.png", interlaced(big))


def interlaced(im: Image.Image) -> bytes:
    """An Adam7-interlaced RGB PNG, written by hand (Pillow does not write interlaced PNGs)."""
    a = np.asarray(im)
    height, width = a.shape[:2]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = a[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


if __name__ == "__main__":
    sys.exit(main())
