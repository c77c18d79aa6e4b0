"""End-to-end sweep: the Python pipeline against `segq eval`, same data, same levels, same machine (issue 14; dev-only).

What users run today, per quantization level, in its own Python process (as a script per level would):
  datasets.load_dataset("parquet", ...)                 the same Parquet files segq reads
  SegformerForSemanticSegmentation.from_pretrained(M, quantization_config=QuantoConfig(weights=W))
                                                        W = float8 / int8 / int4 / int2 (transformers' QuantoConfig
                                                        quantizes the nn.Linear layers only); f16 loads with
                                                        dtype=torch.float16; f32 loads plainly
  for each batch of --py-batch rows (ds.iter):          SegformerImageProcessor(images) -> model -> torch.no_grad()
                                                        -> processor.post_process_semantic_segmentation(target_sizes)
  evaluate.load("mean_iou").add_batch(...)              then compute(num_labels, ignore_index=255, reduce_labels=True)
Each level's wall time is the whole process (interpreter start, imports, model load and quantization, the loop,
the metric), as the user waits for it; the script also records the in-process split (load, loop, metric).

segq: `segq eval --model M --dataset D --quant L --threads T --out DIR` per level (same processes-per-level
shape), and the whole default sweep as one command (`--quant f32,f16,f8,int8,int4,int2`, segq's default; segq
also runs its default methods, rtn and hqq, draws plots and overlays, runs a bootstrap and writes W&B offline
folders; nothing is turned off), then once more with `--method rtn`: the same six models the Python side runs
(segq's default also runs hqq, nine models in all). segq's per-level rows are read from its results.json (the `rtn`
row where a level has several methods); each per-level segq run also evaluates f32, for agreement.

Data: --dataset DIR (a folder of Parquet files in Scene Parse 150's schema), or by default a Parquet file of
--images rows (default 200) built at run time from the 12 demo validation images: each image and its annotation
cropped identically (the whole image, then 18 crops of 90% and 80% of each side; then repeats), JPEG re-encoded at quality 92.
--model DIR (default: the demo model, SegFormer-B0 architecture, 20 classes, 256x256 processor).
mean_iou: `evaluate.load("mean_iou")` needs the Hub once; offline, pass --mean-iou DIR, a folder holding
evaluate's metrics/mean_iou/mean_iou.py (from the huggingface/evaluate repository).

Threads: --threads (default 2): torch.set_num_threads, OMP/MKL_NUM_THREADS, segq --threads.
Output: a markdown table (per level: Python s, segq s, speed-up, both mIoU; then the whole sweep), --out FILE
writes it, --json-out FILE the raw numbers.

Run from the repository root (about 10 minutes with the defaults on 2 cores):
  SEGQ_BIN=target/release/segq PATH=/work/venv/bin:$PATH /work/venv/bin/python scripts/sweep_python_vs_segq.py \
      --mean-iou /tmp/evaluate_metrics/mean_iou --out /tmp/sweep.md
Needs torch, transformers, optimum-quanto, datasets, evaluate, pillow in the venv (qint4/qint2 also need ninja on
PATH for quanto's extension).
"""

import argparse
import datetime
import glob
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from report_env import ROOT, command_line, machine_info, package_versions, rel

DEMO_MODEL = os.path.join(ROOT, "assets", "demo", "model")
DEMO_ADE = os.path.join(ROOT, "assets", "demo", "ade", "ADEChallengeData2016")
DEFAULT_LEVELS = ["f32", "f16", "f8", "int8", "int4", "int2"]
QUANTO_WEIGHTS = {"f8": "float8", "int8": "int8", "int4": "int4", "int2": "int2"}


# ----------------------------------------------------------------------------------------------------------------
# The dataset both sides read.

def build_dataset(out_dir, rows):
    """Writes out_dir/validation/0000.parquet with `rows` examples derived from the demo images."""
    from PIL import Image
    import datasets

    images = sorted(glob.glob(os.path.join(DEMO_ADE, "images", "validation", "*.jpg")))
    if not images:
        sys.exit(f"no demo images under {DEMO_ADE}")
    # Crops keep the scenes' statistics; the demo model saw no mirrored or rotated scenes in training (mirroring
    # alone takes its mIoU from 91 to 50), so the variants are crops only.
    boxes = [(0, 0, 1, 1)] + [(x0, y0, x0 + f, y0 + f) for f in (0.9, 0.8) for x0 in (0, 1 - f, (1 - f) / 2)
                              for y0 in (0, 1 - f, (1 - f) / 2)]
    variants = [(f"crop{b}", box, False) for b, box in enumerate(boxes)]
    recs = {"image": [], "annotation": [], "scene_category": []}
    for i in range(rows):
        path = images[i % len(images)]
        name, box, mirror = variants[(i // len(images)) % len(variants)]
        ann_path = path.replace("/images/", "/annotations/").replace(".jpg", ".png")
        img, ann = Image.open(path).convert("RGB"), Image.open(ann_path)
        w, h = img.size
        px = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
        img, ann = img.crop(px), ann.crop(px)
        if mirror:
            img, ann = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ann.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        jb, pb = io.BytesIO(), io.BytesIO()
        img.save(jb, format="JPEG", quality=92)
        ann.save(pb, format="PNG")
        stem = f"SWEEP_val_{i:06d}_{name}"
        recs["image"].append({"bytes": jb.getvalue(), "path": stem + ".jpg"})
        recs["annotation"].append({"bytes": pb.getvalue(), "path": stem + ".png"})
        recs["scene_category"].append(0)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                  "scene_category": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(recs, features=features)
    os.makedirs(os.path.join(out_dir, "validation"), exist_ok=True)
    ds.to_parquet(os.path.join(out_dir, "validation", "0000.parquet"))


# ----------------------------------------------------------------------------------------------------------------
# One Python level, in its own process.

def python_level(args):
    t0 = time.perf_counter()
    import numpy as np
    import torch
    import datasets
    import evaluate
    from transformers import QuantoConfig, SegformerForSemanticSegmentation
    try:
        from transformers import SegformerImageProcessorPil as Proc
    except ImportError:
        from transformers import SegformerImageProcessor as Proc
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    t_import = time.perf_counter()

    level = args.py_level
    kw = {}
    if level in QUANTO_WEIGHTS:
        kw["quantization_config"] = QuantoConfig(weights=QUANTO_WEIGHTS[level])
    elif level == "f16":
        kw["dtype"] = torch.float16
    elif level != "f32":
        sys.exit(f"no Python equivalent for level {level}")
    model = SegformerForSemanticSegmentation.from_pretrained(args.model, **kw).eval()
    processor = Proc.from_pretrained(args.model)
    num_labels = model.config.num_labels
    files = sorted(glob.glob(os.path.join(args.dataset, "**", "*.parquet"), recursive=True))
    ds = datasets.load_dataset("parquet", data_files={"validation": files}, split="validation")
    metric = evaluate.load(args.mean_iou or "mean_iou")
    t_load = time.perf_counter()

    dtype = next(model.parameters()).dtype
    images_done = 0
    for batch in ds.iter(batch_size=args.py_batch):
        images = [im.convert("RGB") for im in batch["image"]]
        inputs = processor(images=images, return_tensors="pt")
        with torch.no_grad():
            out = model(pixel_values=inputs["pixel_values"].to(dtype))
        out.logits = out.logits.float()
        preds = processor.post_process_semantic_segmentation(out, target_sizes=[im.size[::-1] for im in images])
        metric.add_batch(predictions=[p.numpy() for p in preds],
                         references=[np.array(a) for a in batch["annotation"]])
        images_done += len(images)
    t_loop = time.perf_counter()
    res = metric.compute(num_labels=num_labels, ignore_index=255, reduce_labels=True)
    t_end = time.perf_counter()
    print("RESULT " + json.dumps({
        "images": images_done, "mean_iou": float(res["mean_iou"]), "import_s": t_import - t0,
        "load_s": t_load - t_import, "loop_s": t_loop - t_load, "metric_s": t_end - t_loop,
        "in_process_s": t_end - t0}), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Parent side.

def run(cmd, env, timeout):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def last_line(text):
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def segq_rows(results_json):
    """Label -> (level, method, mean_iou, wall_time_s) from a segq results.json."""
    with open(results_json) as f:
        r = json.load(f)
    out = {}
    for lv in r["levels"]:
        m = (lv.get("summary") or {}).get("metrics") or {}
        out[lv["label"]] = (lv["level"], lv.get("method"), m.get("mean_iou"), lv.get("wall_time_s"))
    return out


def pick(rows, level):
    """The level's rtn row (or its only row)."""
    cands = [(lbl, v) for lbl, v in rows.items() if v[0] == level]
    for lbl, v in cands:
        if v[1] in ("rtn", "none", None):
            return lbl, v
    return cands[0] if cands else (None, None)


def versions():
    return package_versions(["torch", "transformers", "optimum-quanto", "datasets", "evaluate", "numpy"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--dataset", help="folder of Parquet files (default: built from the demo images)")
    ap.add_argument("--images", type=int, default=200, help="rows of the built dataset (default 200)")
    ap.add_argument("--levels", default=",".join(DEFAULT_LEVELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--py-batch", type=int, default=8, help="Python batch size (default 8)")
    ap.add_argument("--mean-iou", help="local folder of evaluate's mean_iou metric (offline)")
    ap.add_argument("--segq-bin", default=os.environ.get("SEGQ_BIN", os.path.join(ROOT, "target", "release", "segq")))
    ap.add_argument("--segq-extra", default="", help="extra arguments for every segq eval (shell-split)")
    ap.add_argument("--skip-python", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--work-dir")
    ap.add_argument("--out")
    ap.add_argument("--json-out")
    ap.add_argument("--py-level", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[k] = str(args.threads)
    args.model = os.path.abspath(args.model)
    if args.py_level:
        return python_level(args)

    levels = [lv for lv in args.levels.split(",") if lv]
    work = args.work_dir or tempfile.mkdtemp(prefix="segq-sweep-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja for quanto
    env["HF_HUB_OFFLINE"] = "1"
    t_start = time.perf_counter()
    try:
        if args.dataset:
            data = os.path.abspath(args.dataset)
            data_note = rel(data)
        else:
            data = os.path.join(work, "data")
            build_dataset(data, args.images)
            data_note = (f"{args.images} rows built from the 12 demo validation images (whole and cropped; "
                         f"JPEG q92), one Parquet file")
        header = [
            "# End-to-end sweep: Python (transformers + optimum-quanto + datasets + evaluate) vs segq eval",
            "",
            f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- Machine: {machine_info()}; threads {args.threads}",
            f"- Versions: {versions()}",
            f"- Command: `{command_line()}`",
            f"- Model: {rel(args.model)}; data: {data_note}; levels: {', '.join(levels)}; Python batch "
            f"{args.py_batch}",
            "- Load average at start (1/5/15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg()),
        ]
        for line in header:
            print(line, flush=True)

        py = {}
        if not args.skip_python:
            me = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--dataset", data,
                  "--threads", str(args.threads), "--py-batch", str(args.py_batch)]
            if args.mean_iou:
                me += ["--mean-iou", os.path.abspath(args.mean_iou)]
            for lv in levels:
                rc, out, err, wall = run(me + ["--py-level", lv], env, args.timeout)
                line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
                if rc != 0 or not line:
                    py[lv] = {"error": f"exit {rc}: {last_line(err)}", "wall_s": wall}
                    print(f"python {lv}: FAILED {py[lv]['error']}", flush=True)
                    continue
                py[lv] = dict(json.loads(line[-1][7:]), wall_s=wall)
                print(f"python {lv}: {wall:.1f} s (load {py[lv]['load_s']:.1f}, loop {py[lv]['loop_s']:.1f}), "
                      f"mIoU {py[lv]['mean_iou']:.4f}", flush=True)

        segq = args.segq_bin
        if not (os.path.isfile(segq) and os.access(segq, os.X_OK)):
            sys.exit(f"segq binary not found: {segq} (build with cargo build --release, or pass --segq-bin)")
        base = [segq, "eval", "--model", args.model, "--dataset", data, "--threads", str(args.threads)]
        base += shlex.split(args.segq_extra)
        sq = {}
        for lv in levels:
            out_dir = os.path.join(work, f"segq-{lv}")
            cmd = base + ["--quant", lv, "--out", out_dir]
            rc, out, err, wall = run(cmd, env, args.timeout)
            if rc != 0:
                sq[lv] = {"error": f"exit {rc}: {last_line(err)}", "wall_s": wall}
                print(f"segq {lv}: FAILED {sq[lv]['error']}", flush=True)
                continue
            rows = segq_rows(os.path.join(out_dir, "results.json"))
            lbl, v = pick(rows, lv)
            sq[lv] = {"wall_s": wall, "label": lbl, "mean_iou": v[2] if v else None,
                      "methods": sorted(rows)}
            print(f"segq {lv}: {wall:.1f} s ({', '.join(sorted(rows))}), mIoU {sq[lv]['mean_iou']:.4f}",
                  flush=True)

        def one_command(name, extra, what):
            """Runs the whole sweep as one segq command; returns (command, wall seconds, rows by label)."""
            out_dir = os.path.join(work, name)
            cmd = base + ["--quant", ",".join(levels)] + extra + ["--out", out_dir]
            rc, out, err, wall = run(cmd, env, args.timeout)
            if rc != 0:
                print(f"{what} FAILED: exit {rc}: {last_line(err)}", flush=True)
                return cmd, wall, {}
            rows = segq_rows(os.path.join(out_dir, "results.json"))
            print(f"{what} (one command, {len(rows)} rows): {wall:.1f} s", flush=True)
            return cmd, wall, rows

        sweep_cmd, sweep_wall, sweep_rows = one_command("segq-sweep", [], "segq sweep")
        # The same models as the Python side (one method per level, rtn: what QuantoConfig does), in one command.
        rtn_cmd, rtn_wall, rtn_rows = one_command("segq-sweep-rtn", ["--method", "rtn"], "segq sweep, rtn only")
        header.append("- segq per level: `" + " ".join(shlex.quote(rel(c)) for c in base) + " --quant LEVEL --out DIR`")
        header.append("- segq whole sweep: `" + " ".join(shlex.quote(rel(c)) for c in sweep_cmd[:-2]) + " --out DIR`")
        header.append("- segq whole sweep, the Python side's models: `"
                      + " ".join(shlex.quote(rel(c)) for c in rtn_cmd[:-2]) + " --out DIR`")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    def ratio(a, b):
        return "n/a" if not a or not b else f"{a / b:.1f}x"

    def miou(v):
        return "n/a" if v is None else f"{100 * v:.2f}"

    table = ["| level | Python s (load + loop) | Python mIoU % | segq s | segq row | segq mIoU % | segq faster |",
             "|---|---:|---:|---:|---|---:|---:|"]
    py_total, sq_total = 0.0, 0.0
    for lv in levels:
        p, s = py.get(lv, {}), sq.get(lv, {})
        p_wall = None if "error" in p or not p else p["wall_s"]
        s_wall = None if "error" in s or not s else s["wall_s"]
        if p_wall and s_wall:  # totals over the levels both sides completed
            py_total += p_wall
            sq_total += s_wall
        p_cell = ("failed: " + p["error"]) if "error" in p else (
            "n/a" if not p else f"{p['wall_s']:.1f} ({p['load_s']:.1f} + {p['loop_s']:.1f})")
        table.append(f"| {lv} | {p_cell} | {miou(p.get('mean_iou'))} | "
                     f"{'failed' if 'error' in s else (f'{s_wall:.1f}' if s_wall else 'n/a')} | {s.get('label', '')} | "
                     f"{miou(s.get('mean_iou'))} | {ratio(p_wall, s_wall)} |")
    table.append(f"| **all, one process per level** (levels both completed) | **{py_total:.1f}** | | **{sq_total:.1f}** | | | "
                 f"**{ratio(py_total, sq_total)}** |")
    py_failed = [lv for lv in levels if "error" in py.get(lv, {}) or not py.get(lv)]
    if sweep_rows and not py_failed:
        table.append(f"| **all, segq's one command** ({len(sweep_rows)} rows: {', '.join(sorted(sweep_rows))}) | "
                     f"**{py_total:.1f}** | | **{sweep_wall:.1f}** | | | **{ratio(py_total, sweep_wall)}** |")
    if rtn_rows and not py_failed:
        table.append(f"| **all, segq's one command, rtn only** ({len(rtn_rows)} rows, the models the Python side runs: "
                     f"{', '.join(sorted(rtn_rows))}) | **{py_total:.1f}** | | **{rtn_wall:.1f}** | | | "
                     f"**{ratio(py_total, rtn_wall)}** |")
    total = time.perf_counter() - t_start
    header.append("- Load average at end (1/5/15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    text = "\n".join(header + [""] + table + ["", f"Total run time: {total:.0f} s."])
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"header": header, "python": py, "segq": sq, "segq_sweep_s": sweep_wall,
                       "segq_sweep_rows": {k: list(v) for k, v in sweep_rows.items()},
                       "segq_sweep_rtn_s": rtn_wall,
                       "segq_sweep_rtn_rows": {k: list(v) for k, v in rtn_rows.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
