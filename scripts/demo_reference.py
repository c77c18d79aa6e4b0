"""Reproduce the demo model's float32 reference metrics and write fixtures for segq's end-to-end tests.

Inputs (read-only): /work/shared/demo/model (SegFormer-B0 architecture, 20 classes, processor 256x256) and
/work/shared/demo/ade (12 synthetic ADE20K-layout validation examples; override the root with SEGQ_DEMO_DIR).
Protocol: image = Image.open(jpg).convert("RGB") -> SegformerImageProcessor -> model (eval, float32) ->
F.interpolate(logits, size=annotation size, bilinear, align_corners=False).argmax(1) -> the NumPy port of
evaluate's mean_iou (scripts/make_metric_fixtures.py) with num_labels=20, ignore_index=255, reduce_labels=True.
The script compares the result with /work/shared/demo/reference.json ("f32") and checks the parquet layout holds
the same bytes as the folder layout.

Writes tests/fixtures/demo/:
  reference_metrics.json          overall metrics, per-category arrays (NaN -> null), total_area_* arrays, and
                                  per-image areas (stem, size, area_intersect/union/pred_label/label, and the
                                  number of evaluated pixels whose top-2 logit margin is under 1e-3)
  SYN_val_00000001.logits.npy        float32 [20,64,64] model logits for it

Run from the repository root:  /work/venv/bin/python scripts/demo_reference.py
"""

import io
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_metric_fixtures import intersect_and_union, mean_iou, to_json_value  # noqa: E402

DEMO = os.environ.get("SEGQ_DEMO_DIR", "/work/shared/demo")
ADE = os.path.join(DEMO, "ade", "ADEChallengeData2016")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "demo")
NUM_LABELS, IGNORE, REDUCE = 20, 255, True


def check_parquet(stems):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        print("parquet check skipped (pyarrow missing)")
        return
    pdir = os.path.join(DEMO, "ade", "parquet", "scene_parsing", "validation")
    seen = []
    for f in sorted(os.listdir(pdir)):
        t = pq.read_table(os.path.join(pdir, f)).to_pylist()
        for row in t:
            stem = os.path.splitext(row["image"]["path"])[0]
            with open(os.path.join(ADE, "images", "validation", stem + ".jpg"), "rb") as fh:
                assert fh.read() == row["image"]["bytes"], stem
            with open(os.path.join(ADE, "annotations", "validation", stem + ".png"), "rb") as fh:
                assert fh.read() == row["annotation"]["bytes"], stem
            assert Image.open(io.BytesIO(row["annotation"]["bytes"])).mode == "L"
            seen.append(stem)
    assert seen == stems, (seen, stems)
    print(f"parquet check passed: {len(seen)} rows, same bytes and order as the folder layout")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    model_dir = os.path.join(DEMO, "model")
    model = SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()
    proc = SegformerImageProcessor.from_pretrained(model_dir)
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(ADE, "images", "validation")))
    check_parquet(stems)

    preds, labels, per_image = [], [], []
    for i, stem in enumerate(stems):
        img = Image.open(os.path.join(ADE, "images", "validation", stem + ".jpg")).convert("RGB")
        ann = np.asarray(Image.open(os.path.join(ADE, "annotations", "validation", stem + ".png")))
        pv = proc(images=img, return_tensors="pt")["pixel_values"].float()
        with torch.no_grad():
            logits = model(pixel_values=pv).logits
            up = F.interpolate(logits, size=ann.shape, mode="bilinear", align_corners=False)
        pred = up.argmax(1)[0].numpy()
        top2 = torch.topk(up[0], 2, dim=0).values
        margin = (top2[0] - top2[1]).numpy()
        evaluated = ~np.isin(ann, [0, 255])  # pixels that count after reduce_labels
        preds.append(pred)
        labels.append(ann)
        ai, au, ap, al = intersect_and_union(pred, ann, NUM_LABELS, IGNORE, None, REDUCE)
        per_image.append(dict(stem=stem, width=int(ann.shape[1]), height=int(ann.shape[0]),
                              area_intersect=ai.tolist(), area_union=au.tolist(),
                              area_pred_label=ap.tolist(), area_label=al.tolist(),
                              # evaluated pixels whose top-1/top-2 upsampled logit margin is under 1e-3, where
                              # an f32 re-implementation may legitimately predict the other class
                              near_tie_pixels_1e_3=int((evaluated & (margin < 1e-3)).sum())))
        if i == 0:
            np.save(os.path.join(OUT, f"{stem}.logits.npy"), np.ascontiguousarray(logits[0].numpy().astype("<f4")))
            print(stem, "pixel_values", tuple(pv.shape[1:]), "logits", tuple(logits.shape[1:]))

    r = mean_iou(preds, labels, NUM_LABELS, IGNORE, None, REDUCE)
    with open(os.path.join(DEMO, "reference.json")) as fh:
        ref = json.load(fh)["f32"]
    comparison = {k: dict(ours=r[k], reference=ref[k], exact=r[k] == ref[k], abs_diff=abs(r[k] - ref[k]))
                  for k in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    for k, v in comparison.items():
        print(f"{k:17s} ours {v['ours']!r:22s} reference.json {v['reference']!r:22s} exact={v['exact']}")

    doc = dict(
        protocol=dict(num_labels=NUM_LABELS, ignore_index=IGNORE, reduce_labels=REDUCE, label_map=None,
                      images="Image.open(jpg).convert('RGB'), SegformerImageProcessor from the model dir",
                      prediction="bilinear (align_corners=False) upsample of the logits to the annotation size, "
                                 "argmax"),
        model="/work/shared/demo/model", images=stems,
        **{k: to_json_value(v) for k, v in r.items()},
        matches_reference_json={k: v["exact"] for k, v in comparison.items()},
        per_image=per_image,
    )
    with open(os.path.join(OUT, "reference_metrics.json"), "w") as fh:
        json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
