#!/usr/bin/env python3
"""Checks a checkpoint written by `segq quantize --format quanto --out DIR` with the real optimum-quanto: builds the
model from DIR/config.json (transformers 5, on the meta device), reloads DIR/model.safetensors with quanto's
`requantize` and DIR/quantization_map.json, checks that every stored tensor was taken and every model tensor given,
runs the pixels of INPUT.npy ([3, H, W] float32) and compares the logits with SEGQ_LOGITS.npy ([classes, h, w],
segq's logits for the same model and input): max |quanto - segq| <= TOL * max |segq| (default 1e-4).

  check_quanto_export.py DIR INPUT.npy SEGQ_LOGITS.npy [TOL]

Exits 0 when they agree, 1 with the reason otherwise. tests/quanto.rs runs it when SEGQ_QUANTO_PYTHON names a
Python with torch, transformers and optimum-quanto.
"""

import json
import os
import sys

import numpy as np
import torch
from optimum.quanto import requantize
from safetensors.torch import load_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation


def main():
    folder, input_path, segq_path = sys.argv[1:4]
    tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-4
    config = SegformerConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = SegformerForSemanticSegmentation(config)
    state = load_file(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "quantization_map.json")) as f:
        qmap = json.load(f)
    requantize(model, state, qmap, device=torch.device("cpu"))
    model.eval()
    # requantize loads with strict=False: check the names both ways here.
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    stored = set(load_file(os.path.join(folder, "model.safetensors")).keys())
    if expected != stored:
        print(f"state dict names differ: missing {sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}")
        return 1
    pixels = torch.from_numpy(np.load(input_path))[None]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits[0].numpy()
    segq = np.load(segq_path)
    if logits.shape != segq.shape:
        print(f"logits shape {logits.shape} (quanto) vs {segq.shape} (segq)")
        return 1
    diff = float(np.abs(logits - segq).max())
    bound = tol * float(np.abs(segq).max())
    kinds = sorted({v["weights"] for v in qmap.values()})
    print(f"{folder}: {len(qmap)} quanto modules ({', '.join(kinds)}), max |quanto - segq| = {diff:.3g}, bound {bound:.3g}")
    return 0 if diff <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
