"""Compare segq's weight quantization with optimum-quanto's on the same checkpoint (dev-only; not needed to build segq).

For each model (default: the demo model, the tiny_a fixture, and a SegFormer-B0-shaped model with 150 classes and
random weights generated at run time from the demo's config, seed 0: "random-b0-150") and each weight level W in
qint8, qfloat8 (e4m3fn), qint4, qint2, the model is loaded in float32 with transformers, quantized with
optimum-quanto `quantize(model, weights=W)` + `freeze(model)` (no include/exclude: quanto replaces every nn.Linear
AND every nn.Conv2d; the script prints how many of each were replaced and checks that none was left float. Note
that transformers' `QuantoConfig(weights=...)` would only replace nn.Linear.) quanto's defaults apply: qint8/qfloat8
symmetric per output channel, qint4/qint2 affine min/max (MaxOptimizer) in groups of 128 (else 96, 64, 32 when that
divides the row, else per output channel). qint4 and qint2 also run with quanto's own HQQ optimizer
(`quantize(model, weights=W, optimizer=HqqOptimizer())`, rows "qint4+hqq", "qint2+hqq").

Metrics, identical for quanto and segq:
  weight_rel_error  sqrt(sum_l ||W_l - deq(Q(W_l))||_F^2) / sqrt(sum_l ||W_l||_F^2) over the weights of all
                    Linear and Conv2d layers (biases excluded); deq = quanto's QTensor.dequantize().
  logits_rel_error  ||L_q - L_f32||_F / ||L_f32||_F over the logits of all N images together (the images go
                    through SegformerImageProcessor with the model's preprocessor_config.json).
  pixel_agreement   fraction of logits-resolution pixels (all images) where argmax(L_q) == argmax(L_f32).
  agreement_miou    mean IoU of argmax(L_q) against argmax(L_f32) as ground truth, over the classes either predicts
                    (classes with an empty union are skipped, as evaluate's mean_iou does), all images together.
  bits_per_weight   storage bits of the quantized weights (data + scales + shifts, counted from the QTensors'
                    actual storage, float32 scales/shifts as quanto keeps them) / number of weights.

segq is then run through its CLI (binary: $SEGQ_BIN, else target/release/segq, else target/debug/segq):
  segq quantize --model DIR --quant f8,int8,int4,int2 --method rtn,hqq,gptq,awq,awq+gptq --calib LIST
      --calib-size N --error-report OUT.json --images I1 I2 ...
which must write {"recipes": [{"label", "level", "method", "bits_per_weight", "weight_rel_error",
"logits_rel_error", "pixel_agreement", "agreement_miou"}, ...]} with the definitions above. The calibrated methods
(gptq, awq, awq+gptq) calibrate on LIST, a list file of the demo images that are NOT among the compared images
(--calib-images to choose others), so no compared image is seen during calibration. If the binary is missing, the command
fails or its report is malformed, the script prints "segq: not available (<reason>)" and still prints quanto's
table. segq level "f8" is compared with quanto's qfloat8.

Output: one markdown table per model (rows: level x engine), then per level the best quanto row (lowest logits
error) against the best segq row at no more bits per weight, printed and written to docs/quanto-comparison.md with
a header (machine, versions, date, command). Takes a few minutes on 2 cores.

Run from the repository root:
  /work/venv/bin/python scripts/compare_quanto.py
  /work/venv/bin/python scripts/compare_quanto.py --model assets/demo/model --num-images 4 --out docs/quanto-comparison.md
(The script puts its interpreter's bin folder first on PATH, so quanto finds ninja for its qint4/qint2 extension.)
"""

import argparse
import datetime
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from report_env import ROOT, command_line, machine_info, package_versions, rel

# quanto JIT-builds a C++ extension for qint4/qint2 and needs ninja, which lives next to the venv's python.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

RANDOM_B0 = "random-b0-150"
DEFAULT_MODELS = [
    os.path.join(ROOT, "assets", "demo", "model"),
    os.path.join(ROOT, "tests", "fixtures", "models", "tiny_a"),
    RANDOM_B0,
]
DEMO_IMAGES = os.path.join(ROOT, "assets", "demo", "ade", "ADEChallengeData2016", "images", "validation")
DEMO_MASKS = os.path.join(ROOT, "assets", "demo", "ade", "ADEChallengeData2016", "annotations", "validation")
# quanto row name -> segq level name
LEVELS = [("qint8", "int8"), ("qfloat8", "f8"), ("qint4", "int4"), ("qint4+hqq", "int4"), ("qint2", "int2"),
          ("qint2+hqq", "int2")]
SEGQ_METHODS = "rtn,hqq,gptq,awq,awq+gptq"
SEGQ_LEVEL_ALIASES = {"f8": "f8", "fp8": "f8", "float8": "f8", "f8e4m3": "f8", "int8": "int8", "int4": "int4",
                      "int2": "int2"}


def versions():
    return package_versions(["torch", "transformers", "optimum-quanto", "numpy"])


def error_line(text):
    """The most telling line of a failed command's output: the first 'error' line, else the last line."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("error"):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def find_segq(explicit):
    for cand in [explicit, os.environ.get("SEGQ_BIN"), os.path.join(ROOT, "target", "release", "segq"),
                 os.path.join(ROOT, "target", "debug", "segq")]:
        if cand:
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand, None
            if cand in (explicit, os.environ.get("SEGQ_BIN")):
                return None, f"{cand} is not an executable file"
    return None, "no binary at $SEGQ_BIN, target/release/segq or target/debug/segq"


def load_model(model_dir):
    from transformers import SegformerForSemanticSegmentation
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()


def pixel_values(model_dir, images):
    try:  # transformers 5 names the PIL backend explicitly (same processing, no torchvision warning)
        from transformers import SegformerImageProcessorPil as SegformerImageProcessor
    except ImportError:
        from transformers import SegformerImageProcessor
    proc = SegformerImageProcessor.from_pretrained(model_dir)
    pil = [Image.open(p).convert("RGB") for p in images]
    return proc(images=pil, return_tensors="pt")["pixel_values"]


def logits_of(model, pv):
    with torch.no_grad():  # not inference_mode: quanto's packed qint4/qint2 weights fail under it
        return torch.cat([model(pixel_values=pv[i:i + 1]).logits for i in range(pv.shape[0])]).float()


def storage_bits(t):
    """Bits actually stored by a (possibly nested) quanto QTensor: sum over its inner plain tensors."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return t.numel() * t.element_size() * 8
    names, _ = t.__tensor_flatten__()
    return sum(storage_bits(getattr(t, n)) for n in names)


def agreement_miou(pred, ref):
    """Mean IoU of `pred` against `ref` as ground truth over classes with a non-empty union (evaluate's nanmean)."""
    pred, ref = pred.flatten(), ref.flatten()
    n = int(max(pred.max(), ref.max())) + 1
    inter = torch.bincount(pred[pred == ref], minlength=n).double()
    union = torch.bincount(pred, minlength=n).double() + torch.bincount(ref, minlength=n).double() - inter
    keep = union > 0
    return float((inter[keep] / union[keep]).mean())


def make_random_b0(out_dir):
    """A SegFormer-B0-shaped model with 150 classes and random weights (seed 0), from the demo model's config."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    demo = os.path.join(ROOT, "assets", "demo", "model")
    config = SegformerConfig.from_pretrained(demo)
    config.num_labels = 150
    config.id2label = {i: f"class_{i}" for i in range(150)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    pre = os.path.join(demo, "preprocessor_config.json")
    if os.path.exists(pre):
        shutil.copy(pre, os.path.join(out_dir, "preprocessor_config.json"))
    return out_dir


def quanto_level(model_dir, qname, pv, ref_logits):
    from optimum.quanto import HqqOptimizer, QModuleMixin, freeze, qfloat8, qint2, qint4, qint8, quantize
    base, _, optimizer = qname.partition("+")
    qtype = {"qint8": qint8, "qfloat8": qfloat8, "qint4": qint4, "qint2": qint2}[base]
    model = load_model(model_dir)
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    t0 = time.perf_counter()
    if optimizer == "hqq":
        quantize(model, weights=qtype, optimizer=HqqOptimizer())
    else:
        quantize(model, weights=qtype)
    freeze(model)
    t_quant = time.perf_counter() - t0
    n_lin = n_conv = 0
    err2 = ref2 = 0.0
    bits = numel = 0
    group_sizes = {}
    for n, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            if n not in orig:
                raise RuntimeError(f"quanto replaced unexpected module {n} ({type(m).__name__})")
            n_conv += isinstance(m, torch.nn.Conv2d)
            n_lin += isinstance(m, torch.nn.Linear)
            w = orig.pop(n).double()
            d = m.weight.dequantize().detach().double()
            err2 += float(((w - d) ** 2).sum())
            ref2 += float((w ** 2).sum())
            bits += storage_bits(m.weight)
            numel += w.numel()
            gs = m.weight_group_size or "channel"
            group_sizes[gs] = group_sizes.get(gs, 0) + 1
    if orig:
        raise RuntimeError(f"{len(orig)} Linear/Conv2d layers were not quantized: {sorted(orig)[:5]}")
    lq = logits_of(model, pv)
    diff = (lq.double() - ref_logits.double()).norm() / ref_logits.double().norm()
    agree = (lq.argmax(1) == ref_logits.argmax(1)).double().mean()
    miou = agreement_miou(lq.argmax(1), ref_logits.argmax(1))
    return {
        "level": qname, "linear": n_lin, "conv": n_conv, "quantize_s": t_quant, "group_sizes": group_sizes,
        "bits_per_weight": bits / numel, "weight_rel_error": (err2 / ref2) ** 0.5,
        "logits_rel_error": float(diff), "pixel_agreement": float(agree), "agreement_miou": miou,
        "num_weights": numel,
    }


def calib_list(calib_images, path):
    """A segq list file (image<TAB>mask) of the calibration images; masks are the demo annotations."""
    with open(path, "w") as f:
        for img in calib_images:
            stem = os.path.splitext(os.path.basename(img))[0]
            mask = os.path.join(DEMO_MASKS, stem + ".png")
            f.write(f"{os.path.abspath(img)}\t{mask}\n")
    return path


def run_segq(segq, model_dir, images, timeout, extra, methods, calib_images, levels="f8,int8,int4,int2"):
    """Returns (recipes, command string, None) or (None, command string, reason)."""
    with tempfile.TemporaryDirectory(prefix="segq-cmp-") as tmp:
        report = os.path.join(tmp, "error-report.json")
        cmd = [segq, "quantize", "--model", model_dir, "--quant", levels, "--method", methods]
        calibrated = any(m in methods.split(",") for m in ("gptq", "awq", "awq+gptq"))
        if calibrated:
            listing = calib_list(calib_images, os.path.join(tmp, "calib.txt"))
            cmd += ["--calib", listing, "--calib-size", str(len(calib_images))]
        cmd += ["--error-report", report, "--images", *images] + extra
        shown = " ".join(shlex.quote(rel(c)) for c in cmd).replace(shlex.quote(report), "OUT.json")
        if calibrated:
            shown = shown.replace(shlex.quote(listing), "CALIB.txt")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            return None, shown, f"timed out after {timeout} s"
        except OSError as e:
            return None, shown, f"could not run: {e}"
        if r.returncode != 0:
            return None, shown, f"exit status {r.returncode}: {error_line(r.stderr + r.stdout)}"
        try:
            with open(report) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            return None, shown, f"no readable --error-report: {e}"
        recipes = data.get("recipes") if isinstance(data, dict) else None
        if not isinstance(recipes, list) or not recipes:
            return None, shown, "report has no non-empty 'recipes' list"
        need = ["label", "level", "method", "bits_per_weight", "weight_rel_error", "logits_rel_error",
                "pixel_agreement", "agreement_miou"]
        for rc in recipes:
            missing = [k for k in need if not isinstance(rc, dict) or k not in rc]
            if missing:
                return None, shown, f"recipe {rc.get('label') if isinstance(rc, dict) else rc!r} lacks {missing}"
        return recipes, shown, None


def fmt(v, kind):
    if v is None:
        return "n/a"
    if kind == "bits":
        return f"{v:.3f}"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    return f"{v:.3e}"


def row_line(lvl, engine, recipe, r):
    return (f"| {lvl} | {engine} | {recipe} | {fmt(r['bits_per_weight'], 'bits')} | {fmt(r['weight_rel_error'], 'e')} | "
            f"{fmt(r['logits_rel_error'], 'e')} | {fmt(r['pixel_agreement'], 'pct')} | "
            f"{fmt(r.get('agreement_miou'), 'pct')} |")


def segq_levels(recipes):
    by_level = {}
    for rc in recipes or []:
        lvl = SEGQ_LEVEL_ALIASES.get(str(rc["level"]).lower(), str(rc["level"]))
        by_level.setdefault(lvl, []).append(rc)
    return by_level


def table(quanto_rows, recipes, methods):
    head = ("| level | engine | recipe | bits/weight | weight rel. error | logits rel. error | pixel agreement | "
            "agreement mIoU |\n|---|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    by_level = segq_levels(recipes)
    ordered = []
    for _, s_ in LEVELS:
        if s_ not in ordered:
            ordered.append(s_)
    levels = ordered + [lvl for lvl in by_level if lvl not in ordered]
    for lvl in levels:
        for qname in [q for q, s_ in LEVELS if s_ == lvl]:
            q = quanto_rows.get(qname)
            if q:
                gs = ", ".join(f"{k}: {v}" for k, v in sorted(q["group_sizes"].items(), key=lambda kv: str(kv[0])))
                lines.append(row_line(lvl, "quanto", f"{qname} (groups {gs})", q))
            else:
                lines.append(f"| {lvl} | quanto | {qname}: n/a | n/a | n/a | n/a | n/a | n/a |")
        if recipes is None:  # segq not available: quanto's rows only
            continue
        for method in methods:
            rows = [rc for rc in by_level.get(lvl, []) if str(rc["method"]).lower() == method]
            for rc in rows:
                lines.append(row_line(lvl, f"segq {method}", rc["label"], rc))
    return "\n".join(lines)


def best_of(quanto_rows, recipes):
    """Per integer level: quanto's best row (lowest logits error) against segq's best at no more bits per weight."""
    lines = ["| level | quanto best | bits | logits err. | agreement mIoU | segq best (<= bits) | bits | logits err. | "
             "agreement mIoU | segq better on both |", "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    by_level = segq_levels(recipes)
    for lvl in ("int4", "int2"):
        qs = [(q, r) for q, r in quanto_rows.items() if dict(LEVELS).get(q) == lvl]
        if not qs or lvl not in by_level:
            continue
        qname, q = min(qs, key=lambda kv: kv[1]["logits_rel_error"])
        within = [rc for rc in by_level[lvl] if rc["bits_per_weight"] <= q["bits_per_weight"] + 1e-9]
        if not within:
            lines.append(f"| {lvl} | {qname} | {fmt(q['bits_per_weight'], 'bits')} | {fmt(q['logits_rel_error'], 'e')} "
                         f"| {fmt(q['agreement_miou'], 'pct')} | none at <= {q['bits_per_weight']:.3f} bits | | | | no |")
            continue
        best = min(within, key=lambda rc: rc["logits_rel_error"])
        wins = best["logits_rel_error"] < q["logits_rel_error"] and best["agreement_miou"] > q["agreement_miou"]
        lines.append(f"| {lvl} | {qname} | {fmt(q['bits_per_weight'], 'bits')} | {fmt(q['logits_rel_error'], 'e')} | "
                     f"{fmt(q['agreement_miou'], 'pct')} | {best['label']} | {fmt(best['bits_per_weight'], 'bits')} | "
                     f"{fmt(best['logits_rel_error'], 'e')} | {fmt(best['agreement_miou'], 'pct')} | "
                     f"{'yes' if wins else 'no'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=DEFAULT_MODELS, help="model folder(s) (default: demo + tiny_a)")
    ap.add_argument("--images", nargs="+", help="image files (default: the first --num-images demo JPEGs)")
    ap.add_argument("--num-images", type=int, default=4)
    ap.add_argument("--levels", default=",".join(q for q, _ in LEVELS), help="quanto rows to run")
    ap.add_argument("--methods", default=SEGQ_METHODS, help="segq methods (comma-separated)")
    ap.add_argument("--calib-images", nargs="+",
                    help="calibration images for segq's gptq/awq (default: the demo JPEGs not compared)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "quanto-comparison.md"),
                    help="markdown file to write ('' or '-' to skip)")
    ap.add_argument("--segq-bin", help="segq binary (default $SEGQ_BIN, target/release/segq, target/debug/segq)")
    ap.add_argument("--segq-timeout", type=int, default=600, help="seconds per segq run")
    ap.add_argument("--segq-extra", default="", help="extra arguments appended to the segq command (shell-split)")
    ap.add_argument("--no-segq", action="store_true", help="skip segq")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = args.images or sorted(glob.glob(os.path.join(DEMO_IMAGES, "*.jpg")))[: args.num_images]
    if not images:
        sys.exit(f"no images (looked in {DEMO_IMAGES})")
    images = [os.path.abspath(p) for p in images]
    calib_images = [os.path.abspath(p) for p in (args.calib_images or sorted(glob.glob(os.path.join(DEMO_IMAGES, "*.jpg"))))
                    if os.path.abspath(p) not in images]
    methods = [m for m in args.methods.split(",") if m]
    wanted = [q for q in args.levels.split(",") if q]
    for q in wanted:
        if q not in dict(LEVELS):
            sys.exit(f"unknown level {q}; choose from {[q_ for q_, _ in LEVELS]}")

    segq, segq_missing = (None, "--no-segq") if args.no_segq else find_segq(args.segq_bin)
    command = command_line()
    header = [
        "# segq vs optimum-quanto: weight quantization error",
        "",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine_info()}",
        f"- Versions: {versions()}; segq: {rel(segq) if segq else 'not available'}",
        f"- Command: `{command}` (from the repository root)",
        f"- Images ({len(images)}): {', '.join(os.path.basename(p) for p in images)}",
        f"- segq's calibrated methods (gptq, awq, awq+gptq) calibrate on {len(calib_images)} other images: "
        f"{', '.join(os.path.basename(p) for p in calib_images)}",
        "- quanto: `quantize(model, weights=W)` + `freeze(model)`, all Linear and Conv2d layers, default optimizers "
        "(qint8/qfloat8 e4m3fn symmetric per output channel; qint4/qint2 affine min/max in groups of 128/96/64/32 "
        "dividing the row, else per channel); rows `+hqq` pass `optimizer=HqqOptimizer()`; float32 scales and "
        "shifts.",
        "- weight rel. error = sqrt(sum ||W - deq(W)||_F^2) / sqrt(sum ||W||_F^2) over all Linear+Conv2d weights; "
        "logits rel. error = ||L_q - L_f32||_F / ||L_f32||_F over all images; pixel agreement = share of "
        "logits-resolution pixels whose argmax is unchanged; bits/weight = stored bits of data, scales and shifts "
        "per weight; agreement mIoU = mean IoU of the quantized argmax against the f32 argmax as ground truth.",
        "",
    ]
    body = []
    scratch = tempfile.mkdtemp(prefix="segq-cmp-models-")
    for model_dir in args.model:
        if model_dir == RANDOM_B0:
            model_dir = make_random_b0(os.path.join(scratch, RANDOM_B0))
        model_dir = os.path.abspath(model_dir)
        print(f"== {rel(model_dir)}", flush=True)
        pv = pixel_values(model_dir, images)
        ref = logits_of(load_model(model_dir), pv)
        print(f"   pixel_values {list(pv.shape)}, logits {list(ref.shape)}", flush=True)
        rows = {}
        for q in wanted:
            try:
                r = quanto_level(model_dir, q, pv, ref)
            except Exception as e:  # keep going: one broken level should not hide the others
                print(f"   quanto {q}: FAILED ({type(e).__name__}: {e})", flush=True)
                continue
            rows[q] = r
            print(f"   quanto {q}: replaced {r['linear']} Linear + {r['conv']} Conv2d (none left float), "
                  f"quantize {r['quantize_s']:.2f} s, bits/weight {r['bits_per_weight']:.3f}, "
                  f"weight err {r['weight_rel_error']:.3e}, logits err {r['logits_rel_error']:.3e}, "
                  f"pixel agreement {100 * r['pixel_agreement']:.2f}%", flush=True)
        recipes, segq_note = None, None
        if segq:
            extra = shlex.split(args.segq_extra)
            t0 = time.perf_counter()
            recipes, shown, why = run_segq(segq, model_dir, images, args.segq_timeout, extra, ",".join(methods),
                                           calib_images)
            if why:
                segq_note = f"segq: not available ({why}); command: `{shown}`"
            else:
                segq_note = f"segq command ({time.perf_counter() - t0:.1f} s): `{shown}`"
                # int2 with groups of 64 (2.5 bits + column scales), to compare with quanto's int2 at equal or fewer
                # bits per weight (quanto's groups of 128 spend 2.8).
                more, shown2, why2 = run_segq(segq, model_dir, images, args.segq_timeout, extra + ["--group-size", "64"],
                                              ",".join(m for m in methods if m != "rtn"), calib_images, "int2")
                if why2:
                    segq_note += f"; int2 g64: not available ({why2})"
                else:
                    recipes += more
                    segq_note += f"; and `{shown2}`"
        else:
            segq_note = f"segq: not available ({segq_missing})"
        print(f"   {segq_note}", flush=True)
        n_weights = next(iter(rows.values()))["num_weights"] if rows else 0
        counts = next(iter(rows.values())) if rows else None
        tbl = table(rows, recipes, methods)
        best = best_of(rows, recipes) if recipes else ""
        if best:
            tbl += "\n\nBest per level (quanto: lowest logits error of its rows; segq: lowest logits error at no more "\
                   "bits per weight):\n\n" + best
        name = RANDOM_B0 + " (B0 shape, 150 classes, random weights, seed 0)" if RANDOM_B0 in model_dir \
            else rel(model_dir)
        section = [f"## {name}", "",
                   f"pixel_values {list(pv.shape)}, logits {list(ref.shape)}; "
                   + (f"quanto replaced {counts['linear']} Linear + {counts['conv']} Conv2d layers "
                      f"({n_weights} weights); " if counts else "")
                   + segq_note, "", tbl, ""]
        print()
        print(tbl)
        print()
        body += section
    shutil.rmtree(scratch, ignore_errors=True)
    total = time.perf_counter() - t_start
    body.append(f"Total run time: {total:.1f} s.")
    if args.out and args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(header + body) + "\n")
        print(f"wrote {rel(args.out)} ({total:.1f} s)")


if __name__ == "__main__":
    main()
