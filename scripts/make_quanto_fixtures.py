#!/usr/bin/env python3
"""Makes tests/fixtures/quanto/: the tiny fixture model tests/fixtures/models/tiny_a quantized by the real
optimum-quanto and saved the documented way, with the logits quanto's model computes, for tests/quanto.rs.

Each fixture folder holds what a quanto user saves:
  model.safetensors          save_file(model.state_dict()) of the quantized model (quanto's tensor names:
                             weight._data[._data], weight._scale, weight._shift, input_scale, output_scale)
  quantization_map.json      optimum.quanto.quantization_map(model)
  config.json, preprocessor_config.json   copied from tiny_a
  logits.npy                 float32 [num_labels, h, w]: the quanto model's logits for input.pixel_values.npy
  dequantized.safetensors    float32: quanto's own dequantization (`module.weight.dequantize()`) of three layers
                             (a grouped conv, a per-channel conv, a Linear), under Hub names, for the bit-exact check

The state dict of a transformers 5 model uses its in-memory module names (segformer.stages.0.blocks.0.attention.
q_proj); fixtures marked "hub" are renamed to the Hub checkpoint names (segformer.encoder.block.0.0.attention.self.
query) with transformers' own conversion table, so both spellings are covered.

Needs torch (CPU), transformers 5 and optimum-quanto:
  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers optimum-quanto safetensors numpy pillow
  /tmp/venv/bin/python scripts/make_quanto_fixtures.py
"""

import json
import os
import re
import shutil

import numpy as np
import torch
from optimum.quanto import (
    HqqOptimizer,
    freeze,
    qfloat8_e4m3fn,
    qfloat8_e5m2,
    qint2,
    qint4,
    qint8,
    quantization_map,
    quantize,
)
from safetensors.torch import save_file
from transformers import SegformerForSemanticSegmentation

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "models", "tiny_a")
OUT = os.path.join(ROOT, "quanto")
# The input: the top-left 32x32 of SegformerImageProcessor's pixels for odd_37x53.png (tiny_a's smallest input
# side is 29), so that the logits stay small: [150, 8, 8].
PIXELS = os.path.join(ROOT, "reference", "tiny_a__odd_37x53.pixel_values.npy")

# Layers whose dequantized weights are kept (Hub names): stage 0's spatial reduction (512 inputs: groups of 128 for
# int4/int2), its patch embedding (147 inputs: per channel) and its first Mix-FFN Linear.
DEQUANTIZED = [
    "segformer.encoder.block.0.0.attention.self.sr",
    "segformer.encoder.patch_embeddings.0.proj",
    "segformer.encoder.block.0.0.mlp.dense1",
]

CONVS = ["*patch_embeddings.proj", "*sequence_reduction.sequence_reduction", "*dwconv.dwconv", "*linear_fuse",
         "*classifier"]

# name -> (list of quantize() calls as (weights, optimizer, include, exclude), names: "memory" or "hub").
# quantize() on the whole model replaces every Linear and Conv2d (transformers' QuantoConfig replaces Linear only).
FIXTURES = {
    "qint8": ([(qint8, None, None, None)], "memory"),
    "qfloat8_e4m3fn": ([(qfloat8_e4m3fn, None, None, None)], "hub"),
    "qfloat8_e5m2": ([(qfloat8_e5m2, None, None, None)], "memory"),
    "qint4": ([(qint4, None, None, None)], "memory"),
    "qint2": ([(qint2, None, None, None)], "hub"),
    # Linear layers int4 with the HQQ optimizer, convolutions int8: a mixed checkpoint.
    "mixed_hqq": ([(qint4, "hqq", None, CONVS), (qint8, None, CONVS, None)], "hub"),
}


# transformers 5's conversion table for SegFormer (conversion_mapping.py, "SegformerModel" and
# "SegformerForSemanticSegmentation"), reversed: in-memory name pattern -> Hub checkpoint name.
TO_HUB = [
    (r"segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"segformer\.stages\.(\d+)\.blocks\.", r"segformer.encoder.block.\1."),
    (r"segformer\.stages\.(\d+)\.layer_norm", r"segformer.encoder.layer_norm.\1"),
    (r"attention\.q_proj", "attention.self.query"),
    (r"attention\.k_proj", "attention.self.key"),
    (r"attention\.v_proj", "attention.self.value"),
    (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
    (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "mlp.dense1"),
    (r"mlp\.fc2", "mlp.dense2"),
    (r"layernorm_before", "layer_norm_1"),
    (r"layernorm_after", "layer_norm_2"),
    (r"decode_head\.linear_projections", "decode_head.linear_c"),
]


def hub_name(name):
    for pattern, replacement in TO_HUB:
        name = re.sub(pattern, replacement, name)
    return name


def check_hub_names():
    """The renaming must turn the float model's in-memory names into exactly the names of tiny_a's checkpoint."""
    from safetensors import safe_open

    model = SegformerForSemanticSegmentation.from_pretrained(MODEL)
    renamed = {hub_name(k) for k in model.state_dict()}
    with safe_open(os.path.join(MODEL, "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert renamed == stored, sorted(renamed ^ stored)


def main():
    torch.manual_seed(0)
    check_hub_names()
    pixels = torch.from_numpy(np.load(PIXELS))[:, :32, :32].contiguous()
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    np.save(os.path.join(OUT, "input.pixel_values.npy"), pixels.numpy().astype("<f4"))
    for name, (calls, spelling) in FIXTURES.items():
        model = SegformerForSemanticSegmentation.from_pretrained(MODEL).eval()
        for weights, optimizer, include, exclude in calls:
            opt = HqqOptimizer() if optimizer == "hqq" else None
            quantize(model, weights=weights, optimizer=opt, include=include, exclude=exclude)
        freeze(model)
        with torch.no_grad():
            logits = model(pixel_values=pixels[None]).logits[0]
        qmap = quantization_map(model)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if spelling == "hub":
            state = {hub_name(k): v for k, v in state.items()}
            qmap = {hub_name(k): v for k, v in qmap.items()}
        folder = os.path.join(OUT, name)
        os.makedirs(folder)
        save_file(state, os.path.join(folder, "model.safetensors"))
        os.chmod(os.path.join(folder, "model.safetensors"), 0o644)
        with open(os.path.join(folder, "quantization_map.json"), "w") as f:
            json.dump(qmap, f, indent=1, sort_keys=True)
        for cfg in ("config.json", "preprocessor_config.json"):
            shutil.copy(os.path.join(MODEL, cfg), os.path.join(folder, cfg))
        np.save(os.path.join(folder, "logits.npy"), np.ascontiguousarray(logits.numpy().astype("<f4")))
        modules = {hub_name(n): m for n, m in model.named_modules()}
        dequantized = {f"{n}.weight": modules[n].weight.dequantize().detach().contiguous() for n in DEQUANTIZED}
        save_file(dequantized, os.path.join(folder, "dequantized.safetensors"))
        kinds = sorted({v["weights"] for v in qmap.values()})
        print(f"{name}: {len(qmap)} quantized modules ({', '.join(kinds)}), {spelling} names")


if __name__ == "__main__":
    main()
