"""Make tiny SegFormer model fixtures, test images and transformers reference outputs.

Writes, under tests/fixtures/:
  models/tiny_a/        square 64x64 processor, 150 labels, config.json + model.safetensors
  models/tiny_b_bin/    non-square 72x40 processor, 12 labels, config.json + pytorch_model.bin ONLY
                        (torch.save zip of the dict read back from the safetensors that save_pretrained wrote,
                        so the keys keep the Hub spelling; transformers 5 renames SegFormer internals)
  models/tiny_c/        non-square 50x70 processor, 7 labels, non-default sr ratios
  models/tiny_a_keys.txt  the safetensors key list of tiny_a (name, dtype, shape)
  images/odd_37x53.png, wide_101x45.png, small_23x19.png   smooth random RGB PNGs (width x height)
  images/photo_61x47.jpg (+ .decoded.npy)                  JPEG q85 4:2:0 and Pillow's decoded uint8 HxWx3
  reference/<model>__<stem>.pixel_values.npy  float32 [3,H,W] from SegformerImageProcessor
  reference/<model>__<stem>.logits.npy        float32 [num_labels,h,w] from the model in eval mode
  reference/<model>__<stem>.mask.npy          uint8 [img_h,img_w]: bilinear (align_corners=False) upsample
                                              of the logits to the image size, then argmax over classes
  reference/summary.json                      shapes, the smallest top-1/top-2 logit margin per mask, and the
                                              [y, x] pixels whose margin is under 1e-3 (near ties)

Why: segq re-implements SegFormer inference, the preprocessing and the mask upsampling in Rust; these are the
ground truth its tests compare against. Weights are random but perturbed (non-zero biases, LayerNorm/BatchNorm
affine params away from 1/0, BatchNorm running stats away from 0/1, weights at ~1/sqrt(fan_in)) so that every
tensor matters to the output.

Run from the repository root:  /work/venv/bin/python scripts/make_model_fixtures.py
"""

import json
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODELS = os.path.join(ROOT, "models")
IMAGES = os.path.join(ROOT, "images")
REF = os.path.join(ROOT, "reference")

MODEL_SPECS = {
    "tiny_a": dict(
        seed=1,
        config=dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4],
                    sr_ratios=[8, 4, 2, 1], decoder_hidden_size=32, num_labels=150),
        size=(64, 64), bin_only=False),
    "tiny_b_bin": dict(
        seed=2,
        config=dict(hidden_sizes=[16, 16, 32, 32], depths=[2, 1, 1, 2], num_attention_heads=[2, 1, 4, 2],
                    sr_ratios=[4, 2, 2, 1], decoder_hidden_size=24, num_labels=12),
        size=(72, 40), bin_only=True),
    "tiny_c": dict(
        seed=3,
        config=dict(hidden_sizes=[8, 16, 16, 24], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 2, 3],
                    sr_ratios=[2, 2, 1, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
                    decoder_hidden_size=16, num_labels=7),
        size=(50, 70), bin_only=False),
}

# (file name, width, height, seed)
PNG_IMAGES = [("odd_37x53.png", 37, 53, 11), ("wide_101x45.png", 101, 45, 12), ("small_23x19.png", 23, 19, 13)]


def smooth_image(w, h, seed):
    """Low-frequency colour noise (bicubic-upsampled 4x4 grid) plus a few filled shapes and mild pixel noise."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1 + 2, y1 + 2], fill=color)
        else:
            draw.rectangle([x0, y0, x1 + 1, y1 + 1], fill=color)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # LayerNorm / BatchNorm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
        bn = model.decode_head.batch_norm
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
        bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))


def build_model(name, spec, out_dir):
    torch.manual_seed(spec["seed"])
    n = spec["config"]["num_labels"]
    id2label = {i: f"class_{i}" for i in range(n)}
    cfg = SegformerConfig(**spec["config"], id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = SegformerForSemanticSegmentation(cfg)
    perturb(model, spec["seed"])
    model.eval()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        st = os.path.join(tmp, "model.safetensors")
        state = load_file(st)
        check_keys(name, state)
        if spec["bin_only"]:
            torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
        else:
            shutil.copyfile(st, os.path.join(out_dir, "model.safetensors"))
        shutil.copyfile(os.path.join(tmp, "config.json"), os.path.join(out_dir, "config.json"))
    h, w = spec["size"]
    SegformerImageProcessor(size={"height": h, "width": w}).save_pretrained(out_dir)
    return model, state


def check_keys(name, state):
    expected = [
        "segformer.encoder.patch_embeddings.0.proj.weight",
        "segformer.encoder.patch_embeddings.0.layer_norm.weight",
        "segformer.encoder.block.0.0.layer_norm_1.weight",
        "segformer.encoder.block.0.0.attention.self.query.weight",
        "segformer.encoder.block.0.0.attention.self.key.weight",
        "segformer.encoder.block.0.0.attention.self.value.weight",
        "segformer.encoder.block.0.0.attention.output.dense.weight",
        "segformer.encoder.block.0.0.mlp.dense1.weight",
        "segformer.encoder.block.0.0.mlp.dwconv.dwconv.weight",
        "segformer.encoder.block.0.0.mlp.dense2.weight",
        "segformer.encoder.layer_norm.0.weight",
        "decode_head.linear_c.0.proj.weight",
        "decode_head.linear_fuse.weight",
        "decode_head.batch_norm.running_var",
        "decode_head.classifier.bias",
    ]
    missing = [k for k in expected if k not in state]
    assert not missing, f"{name}: keys missing from save_pretrained output: {missing}"


def main():
    for d in (MODELS, IMAGES, REF):
        os.makedirs(d, exist_ok=True)

    # Images
    for fname, w, h, seed in PNG_IMAGES:
        smooth_image(w, h, seed).save(os.path.join(IMAGES, fname))
    photo = smooth_image(61, 47, 14)
    jpg = os.path.join(IMAGES, "photo_61x47.jpg")
    photo.save(jpg, quality=85, subsampling=2)  # 2 = 4:2:0 (Pillow's default)
    decoded = np.asarray(Image.open(jpg).convert("RGB"))
    assert decoded.shape == (47, 61, 3) and decoded.dtype == np.uint8
    np.save(os.path.join(IMAGES, "photo_61x47.decoded.npy"), np.ascontiguousarray(decoded))

    summary = {}
    for name, spec in MODEL_SPECS.items():
        out_dir = os.path.join(MODELS, name)
        model, state = build_model(name, spec, out_dir)
        if name == "tiny_a":
            with open(os.path.join(MODELS, "tiny_a_keys.txt"), "w") as f:
                for k in sorted(state):
                    f.write(f"{k}\t{str(state[k].dtype).replace('torch.', '')}\t{list(state[k].shape)}\n")

        # Reload from disk exactly as a user would (also proves the .bin loads in transformers), and check
        # the reloaded model is the one we built (no key silently left at a fresh random init).
        built = model
        model = SegformerForSemanticSegmentation.from_pretrained(out_dir).eval()
        probe = torch.randn(1, 3, *spec["size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(built(pixel_values=probe).logits, model(pixel_values=probe).logits), name
        proc = SegformerImageProcessor.from_pretrained(out_dir)
        for fname, w, h, _ in PNG_IMAGES:
            stem = fname[:-4]
            img = Image.open(os.path.join(IMAGES, fname)).convert("RGB")
            pv = proc(images=img, return_tensors="pt")["pixel_values"].float()
            with torch.no_grad():
                logits = model(pixel_values=pv).logits.float()
                up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            mask = up.argmax(1)[0].numpy().astype(np.uint8)
            top2 = torch.topk(up[0], 2, dim=0).values
            margin = (top2[0] - top2[1]).numpy()
            base = os.path.join(REF, f"{name}__{stem}")
            np.save(base + ".pixel_values.npy", np.ascontiguousarray(pv[0].numpy().astype("<f4")))
            np.save(base + ".logits.npy", np.ascontiguousarray(logits[0].numpy().astype("<f4")))
            np.save(base + ".mask.npy", np.ascontiguousarray(mask))
            summary[f"{name}__{stem}"] = dict(
                image=fname, image_w=w, image_h=h,
                pixel_values_shape=list(pv.shape[1:]), logits_shape=list(logits.shape[1:]),
                logits_min=float(logits.min()), logits_max=float(logits.max()),
                mask_classes_used=int(len(np.unique(mask))),
                min_top2_margin=float(margin.min()), pixels_margin_below_1e_4=int((margin < 1e-4).sum()),
                # [y, x] of mask pixels whose top-1/top-2 upsampled logit margin is under 1e-3: an f32
                # re-implementation may legitimately pick the other class there.
                near_tie_pixels_1e_3=[[int(y), int(x)] for y, x in zip(*np.nonzero(margin < 1e-3))],
            )
            print(name, stem, {k: v for k, v in summary[f"{name}__{stem}"].items() if k != "near_tie_pixels_1e_3"})
    with open(os.path.join(REF, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
