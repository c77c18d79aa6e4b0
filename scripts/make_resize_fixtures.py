"""Make Pillow BILINEAR resize reference fixtures.

Writes tests/fixtures/resize/:
  in_37x53.png, in_203x97.png       random uint8 RGB inputs (width x height), PNG so they round-trip exactly
  <input stem>__to_<W>x<H>.npy      uint8 [H,W,3] = np.asarray(Image.resize((W, H), Image.BILINEAR))
  cases.json                        [{"input": png name, "in_w", "in_h", "out_w", "out_h", "file": npy name}]

Why: SegformerImageProcessor resizes the 8-bit image with Pillow's BILINEAR filter (libImaging/Resample.c:
support scaled by the downscale factor, fixed-point weights, horizontal pass rounded to 8 bits before the vertical
pass). segq must reproduce it bit-exactly; these cases cover up- and downscaling, non-square and mixed
(up in one axis, down in the other) targets. Pure uniform noise is the hardest case for rounding differences.

Run from the repository root:  /work/venv/bin/python scripts/make_resize_fixtures.py
"""

import json
import os

import numpy as np
import PIL
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "resize")
INPUTS = [(37, 53, 21), (203, 97, 22)]  # (width, height, seed)
TARGETS = [(64, 64), (40, 72), (17, 11), (300, 150)]  # (width, height)


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for w, h, seed in INPUTS:
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        stem = f"in_{w}x{h}"
        png = f"{stem}.png"
        Image.fromarray(arr, "RGB").save(os.path.join(OUT, png))
        img = Image.open(os.path.join(OUT, png)).convert("RGB")
        assert np.array_equal(np.asarray(img), arr)
        for tw, th in TARGETS:
            out = np.asarray(img.resize((tw, th), Image.BILINEAR))
            assert out.shape == (th, tw, 3) and out.dtype == np.uint8
            fname = f"{stem}__to_{tw}x{th}.npy"
            np.save(os.path.join(OUT, fname), np.ascontiguousarray(out))
            cases.append(dict(input=png, in_w=w, in_h=h, out_w=tw, out_h=th, file=fname))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(pillow_version=PIL.__version__, filter="BILINEAR", cases=cases), f, indent=1)
    print(f"{len(cases)} cases written to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
