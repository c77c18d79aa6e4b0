"""Make reference fixtures for segq's mean-IoU metric: tests/fixtures/metrics/cases.json.

Contains a NumPy port of Hugging Face `evaluate`'s `mean_iou` metric (metrics/mean_iou/mean_iou.py, itself
taken from mmsegmentation) with the same semantics, step by step, per image:
  1. label_map: every pixel whose ORIGINAL label is a key gets the mapped value (all lookups use the original);
  2. reduce_labels: label 0 -> 255, then label - 1, then 254 -> 255 (so 0 and 255 both end up 255);
  3. drop the pixels whose (mapped, reduced) label == ignore_index, from both prediction and label;
  4. histograms over classes 0..num_labels-1 of intersect (pred == label), pred and label; values outside that
     range are not counted (a prediction outside the range still leaves its pixel in the label histogram);
     area_union = area_pred + area_label - area_intersect.
Totals are summed over images in float64. overall_accuracy = sum(intersect) / sum(label); per-class
IoU = intersect / union, accuracy = intersect / label (0/0 -> NaN); mean_iou / mean_accuracy are nanmeans.
NaN is written to JSON as null.

Each case in cases.json: name, description, num_labels, ignore_index, reduce_labels, label_map ({"old": new} or
null), preds and labels (lists of 2D int lists; images in one case may differ in size), expected {mean_iou,
mean_accuracy, overall_accuracy, per_category_iou, per_category_accuracy, total_area_intersect, total_area_union,
total_area_pred_label, total_area_label}.

Cross-check: if `evaluate` is installed and a copy of the upstream metric script is available (env var
SEGQ_EVALUATE_MEAN_IOU, default /work/evaluate_metrics/mean_iou/mean_iou.py; the Hub copy needs network), every
case is also run through `evaluate.load(script).compute(...)` (which round-trips the maps through datasets'
Image feature as uint8 PNGs) and must agree exactly. Otherwise the cross-check is skipped with a message.

Run from the repository root:  /work/venv/bin/python scripts/make_metric_fixtures.py
"""

import json
import math
import os
import warnings

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "metrics")


# ---------------------------------------------------------------------------------------------------------------
# NumPy port of evaluate's mean_iou
# ---------------------------------------------------------------------------------------------------------------

def _class_histogram(values, num_labels):
    """Counts of each integer class 0..num_labels-1 (np.histogram(bins=n, range=(0, n-1)) on integer input)."""
    values = np.asarray(values).astype(np.int64).ravel()
    values = values[(values >= 0) & (values < num_labels)]
    return np.bincount(values, minlength=num_labels).astype(np.int64)


def intersect_and_union(pred, label, num_labels, ignore_index, label_map=None, reduce_labels=False):
    pred = np.asarray(pred).astype(np.int64)
    original = np.asarray(label).astype(np.int64)
    label = original.copy()
    if label_map is not None:
        for old_id, new_id in label_map.items():
            label[original == int(old_id)] = int(new_id)
    if reduce_labels:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    keep = label != ignore_index
    pred = pred[keep]
    label = label[keep]
    intersect = pred[pred == label]
    area_intersect = _class_histogram(intersect, num_labels)
    area_pred = _class_histogram(pred, num_labels)
    area_label = _class_histogram(label, num_labels)
    area_union = area_pred + area_label - area_intersect
    return area_intersect, area_union, area_pred, area_label


def mean_iou(preds, labels, num_labels, ignore_index, label_map=None, reduce_labels=False):
    totals = [np.zeros(num_labels, dtype=np.float64) for _ in range(4)]
    for p, l in zip(preds, labels):
        for t, a in zip(totals, intersect_and_union(p, l, num_labels, ignore_index, label_map, reduce_labels)):
            t += a
    inter, union, pred_area, label_area = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        overall = inter.sum() / label_area.sum()
        iou = inter / union
        acc = inter / label_area
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        miou = np.nanmean(iou)
        macc = np.nanmean(acc)
    return dict(
        mean_iou=float(miou), mean_accuracy=float(macc), overall_accuracy=float(overall),
        per_category_iou=iou, per_category_accuracy=acc,
        total_area_intersect=inter, total_area_union=union,
        total_area_pred_label=pred_area, total_area_label=label_area,
    )


def to_json_value(v):
    """NaN -> None, numpy -> python; integral float totals stay floats written as e.g. 12.0."""
    if isinstance(v, np.ndarray):
        return [to_json_value(x) for x in v.tolist()]
    if isinstance(v, list):
        return [to_json_value(x) for x in v]
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return None if math.isnan(v) else v
    return v


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------

def make_cases():
    rng = np.random.default_rng(31)

    def rand(h, w, lo, hi):
        return rng.integers(lo, hi, size=(h, w))

    def noisy_copy(label, lo, hi, p=0.3):
        """Prediction that agrees with `label` on about 1-p of the pixels."""
        pred = label.copy()
        flip = rng.random(label.shape) < p
        pred[flip] = rng.integers(lo, hi, size=int(flip.sum()))
        return pred

    cases = []

    def add(name, description, num_labels, preds, labels, ignore_index=255, reduce_labels=False, label_map=None):
        cases.append(dict(name=name, description=description, num_labels=num_labels, ignore_index=ignore_index,
                          reduce_labels=reduce_labels, label_map=label_map,
                          preds=[np.asarray(p).astype(int).tolist() for p in preds],
                          labels=[np.asarray(l).astype(int).tolist() for l in labels]))

    # basic: all classes present, nothing ignored
    labels = [rand(7, 9, 0, 5) for _ in range(3)]
    preds = [noisy_copy(l, 0, 5) for l in labels]
    add("basic", "5 classes, 3 images 7x9, no ignored pixels", 5, preds, labels)

    # ignore_index 255 in the labels; predictions there are arbitrary (some even equal 255)
    labels, preds = [], []
    for shape in [(7, 9), (6, 5), (7, 9)]:
        l = rand(*shape, 0, 4)
        p = noisy_copy(l, 0, 4)
        ign = rng.random(shape) < 0.25
        l[ign] = 255
        p[ign & (rng.random(shape) < 0.3)] = 255
        labels.append(l)
        preds.append(p)
    labels.append(np.full((3, 4), 255))  # an image that is entirely ignored
    preds.append(rand(3, 4, 0, 4))
    add("ignore_index_255", "4 classes; ~25% of label pixels are 255; last image fully ignored; mixed sizes",
        4, preds, labels)

    # reduce_labels: ADE20K style, label 0 = background (ignored), label k -> class k-1, 255 stays ignored
    labels, preds = [], []
    for _ in range(3):
        l = rand(7, 9, 0, 7)  # 0..6 -> classes -1(ignored)..5
        l[rng.random(l.shape) < 0.1] = 255
        p = noisy_copy(np.where((l == 0) | (l == 255), 0, l - 1), 0, 6)
        labels.append(l)
        preds.append(p)
    add("reduce_labels", "reduce_labels=True, 6 classes; labels hold 0 (background), 1..6 and 255", 6, preds,
        labels, reduce_labels=True)

    # predicted classes absent from the ground truth: IoU 0 (counted in the mean), accuracy NaN
    labels = [rand(7, 9, 0, 4) for _ in range(2)]
    preds = [noisy_copy(l, 0, 6, p=0.4) for l in labels]
    preds[0][0, 0] = 4
    preds[1][1, 1] = 5
    add("predicted_not_in_gt", "6 classes; labels only use 0..3, predictions use 0..5", 6, preds, labels)

    # classes absent from both: IoU and accuracy NaN, left out of the means
    labels = [rand(7, 9, 0, 5) for _ in range(2)]
    preds = [noisy_copy(l, 0, 5) for l in labels]
    add("absent_from_both", "8 classes; labels and predictions only use 0..4, so 5..7 are NaN", 8, preds, labels)

    # predictions outside [0, num_labels): not counted as predictions, but their pixels stay in the label area
    labels = [rand(7, 9, 0, 4) for _ in range(3)]
    preds = [noisy_copy(l, 0, 4) for l in labels]
    for p in preds:
        m = rng.random(p.shape) < 0.2
        p[m] = rng.choice([4, 7, 200, 255], size=int(m.sum()))
    add("preds_out_of_range", "4 classes; ~20% of predictions are 4, 7, 200 or 255", 4, preds, labels)

    # label_map: swap 1 <-> 3 (mappings use the original labels, so no chaining), 4 -> 255 (ignored)
    labels = [rand(7, 9, 0, 5) for _ in range(3)]
    swap = np.array([0, 3, 2, 1, 0])  # mapped label as prediction basis (4 is ignored anyway)
    preds = [noisy_copy(swap[l], 0, 4) for l in labels]
    add("label_map", "label_map {1:3, 3:1, 4:255} on labels 0..4; 4 classes", 4, preds, labels,
        label_map={"1": 3, "3": 1, "4": 255})

    # label_map then reduce_labels
    labels = [rand(6, 8, 0, 6) for _ in range(2)]
    mapped = np.array([0, 1, 0, 3, 4, 1])  # after label_map {5:1, 2:0}
    preds = [noisy_copy(np.maximum(mapped[l] - 1, 0), 0, 5) for l in labels]
    add("label_map_and_reduce_labels", "label_map {5:1, 2:0} applied before reduce_labels; 5 classes", 5, preds,
        labels, reduce_labels=True, label_map={"5": 1, "2": 0})

    # ignore_index other than 255 (0): class 0 pixels are dropped, 255 counts as an out-of-range label
    labels = [rand(7, 9, 0, 4) for _ in range(2)]
    labels[0][0, :3] = 255
    preds = [noisy_copy(l, 0, 4) for l in labels]
    add("ignore_index_0", "ignore_index=0; labels 0..3 plus a few 255 (out of range, counted in no class)",
        4, preds, labels, ignore_index=0)

    return cases


def cross_check(cases):
    script = os.environ.get("SEGQ_EVALUATE_MEAN_IOU", "/work/evaluate_metrics/mean_iou/mean_iou.py")
    try:
        import evaluate  # noqa: F401
    except ImportError:
        print("cross-check skipped: `evaluate` is not installed")
        return False
    if not os.path.exists(script):
        print(f"cross-check skipped: no copy of evaluate's mean_iou.py at {script} (set SEGQ_EVALUATE_MEAN_IOU)")
        return False
    import evaluate
    metric = evaluate.load(script)
    keys = ["mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"]
    for c in cases:
        lm = None if c["label_map"] is None else {int(k): v for k, v in c["label_map"].items()}
        got = metric.compute(predictions=[np.array(p, dtype=np.uint8) for p in c["preds"]],
                             references=[np.array(l, dtype=np.uint8) for l in c["labels"]],
                             num_labels=c["num_labels"], ignore_index=c["ignore_index"],
                             reduce_labels=c["reduce_labels"], label_map=lm)
        for k in keys:
            a = np.asarray(got[k], dtype=np.float64)
            b = np.asarray([np.nan if x is None else x for x in np.atleast_1d(c["expected"][k])], dtype=np.float64)
            assert np.array_equal(np.atleast_1d(a), b, equal_nan=True), (c["name"], k, a, b)
    print(f"cross-check passed: all {len(cases)} cases equal evaluate.load({script!r}).compute(...) exactly")
    return True


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = make_cases()
    for c in cases:
        r = mean_iou(c["preds"], c["labels"], c["num_labels"], c["ignore_index"], c["label_map"], c["reduce_labels"])
        c["expected"] = {k: to_json_value(v) for k, v in r.items()}
        print(f'{c["name"]:28s} mIoU {r["mean_iou"]:.6f} mAcc {r["mean_accuracy"]:.6f} '
              f'aAcc {r["overall_accuracy"]:.6f}')
    checked = cross_check(cases)
    doc = dict(
        source="NumPy port of huggingface/evaluate metrics/mean_iou (see scripts/make_metric_fixtures.py)",
        cross_checked_against_evaluate=checked,
        cases=cases,
    )
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(doc, f, indent=None, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
