"""Speed and memory of segq against the Python reference engines, per model and input size (issues 7 and 14; dev-only).

Cases (--cases, default: the demo checkpoint at --size): NAME@HxW, comma-separated, e.g.
  demo@512x512,b2@512x512,b5@640x640,b0@1024x1024
"demo" is --model (default: the demo model, SegFormer-B0 architecture). b0 .. b5 are SegFormer variants built at
run time from the published configurations (hidden sizes, depths, decode-head width of nvidia/mit-b0 .. mit-b5;
150 labels, random weights with seed 0, a processor at the case's size): speed and memory do not depend on the
weights. Those cases run --large-iters timed runs (default 3) and the --large-engines (default PyTorch and ONNX
Runtime: quanto takes minutes per pass there); segq runs --segq-large-iters (default --iters). 1024x1024 is a
Cityscapes-sized input: stage 1 then has 65,536 tokens, and segq's fused attention keeps its scores to one block of query rows (bounded memory).

Each case: same checkpoint, same input (1x3xHxW: the first demo JPEG through the model's SegformerImageProcessor
with the size overridden; random if there is no image), same thread count (--threads, default 2:
torch.set_num_threads, ONNX Runtime intra_op_num_threads, segq --threads; OMP/MKL/RAYON_NUM_THREADS are set too),
batch 1.

Engines, each in its own fresh subprocess (peak RSS = resource.getrusage(RUSAGE_SELF).ru_maxrss of that process,
so it includes the Python runtime and libraries each engine needs):
  torch-f32         PyTorch eager float32 (transformers SegformerForSemanticSegmentation, torch.no_grad)
  quanto-<W>        optimum-quanto quantize(model, weights=W) + freeze(model), W in qint8, qfloat8 (e4m3fn),
                    qint4, qint2; all Linear and Conv2d layers (quanto's default; QuantoConfig would do Linear only)
  ort-f32           ONNX Runtime, CPU provider, on a torch.onnx.export of the same model (opset 17; the
                    torch.export-based exporter, else the TorchScript one)
  ort-int8-dyn      onnxruntime.quantization.quantize_dynamic(weight_type=QInt8) of that export (default op
                    types: MatMul -> MatMulInteger, Conv -> ConvInteger; activations quantized per call)
Each Python engine: 2 warm-up runs (--warmup), then the timed runs; median and p95 (numpy percentile, linear) of
the per-run wall time. The script also reports each engine's logits relative error
||L - L_torch_f32||_F / ||L_torch_f32||_F on the benchmark input.

segq (binary: --segq-bin, $SEGQ_BIN, target/release/segq, else target/debug/segq) is run as
  segq bench --model DIR --quant f32,int8,int8-dyn,int4-dyn,int4,int2 --size HxW --threads 2 --warmup 2 --iters N --json
and must print {"levels": [{"label", "median_ms", "p95_ms", "images_per_s", "peak_rss_bytes"}, ...]} on stdout.
With --segq-per-level it is run once per level (--quant LEVEL) so that each level's peak RSS comes from a fresh
process (the script also reads the child's own ru_maxrss via os.wait4 and shows it). A level the binary does not
know, or a missing binary, is reported as a note and the other engines are still reported.

Printed per case: one table (ms/image, p95, images/s, peak RSS, speed vs PyTorch f32 and vs segq f32, RSS vs
PyTorch f32, logits error) and PASS/MISS per target:
  segq f32 at least 2x faster than PyTorch f32; segq f32 faster than ONNX Runtime f32 (issue 7)
  segq int8-dyn at least 2.0x faster than segq f32, and 1.15x with the AVX2-only kernels (issue 14)
  segq int4-dyn at least as fast as int8-dyn; weight-only int8, int4, int2 no slower than segq f32 (issue 14)
  segq f32 peak RSS below PyTorch f32's; for B5 and inputs of 1024x1024 or more, under 1.5 GB (issue 14)
  every quantized segq level's inference memory (weights + heap high-water mark of the passes, segq's
  inference_bytes) below segq f32's; peak RSS is shown too, but each segq process also holds the f32 model it
  quantizes from and the allocator's retained pages
With several cases, an overview table comes first. With --segq-avx2, segq f32 and int8-dyn are run again with
SEGQ_SIMD=avx2 (no VNNI), the instruction set of an AVX2-only machine.
--out FILE also writes the report as markdown, --json-out FILE the raw numbers.
Timings on shared 2-core machines are noisy: run nothing else meanwhile and read the ratios.

Run from the repository root (the demo case alone takes about 2-3 minutes; all four default cases about 20):
  /work/venv/bin/python scripts/bench_reference.py --size 512x512
  /work/venv/bin/python scripts/bench_reference.py --cases demo@512x512,b2@512x512,b5@640x640,b0@1024x1024 \
      --threads 2 --iters 10 --segq-per-level --segq-avx2 --out docs/bench-reference.md
Needs onnx, onnxruntime and onnxscript in the venv for the ORT engines (they are skipped, with a note, otherwise).
"""

import argparse
import datetime
import glob
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from report_env import ROOT, command_line, machine_info, package_versions, rel

DEFAULT_MODEL = os.path.join(ROOT, "assets", "demo", "model")
DEMO_IMAGES = os.path.join(ROOT, "assets", "demo", "ade", "ADEChallengeData2016", "images", "validation")
QUANTO = ["qint8", "qfloat8", "qint4", "qint2"]
PY_ENGINES = ["torch-f32"] + [f"quanto-{q}" for q in QUANTO] + ["ort-f32", "ort-int8-dyn"]
SEGQ_LEVELS = ["f32", "int8", "int8-dyn", "int4-dyn", "int4", "int2"]
# SegFormer variants as published (nvidia/mit-b0 .. mit-b5): hidden sizes, depths, decode head width; heads 1/2/5/8,
# sr ratios 8/4/2/1, MLP ratio 4 throughout. Random weights (seed 0), 150 labels (ADE20K), generated at run time.
ARCHS = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}
DEFAULT_CASES = "demo@512x512,b2@512x512,b5@640x640,b0@1024x1024"


# ----------------------------------------------------------------------------------------------------------------
# Subprocess side: preparation (input + ONNX files) and one engine per process.

def set_thread_env(threads):
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[k] = str(threads)


def load_model(model_dir):
    from transformers import SegformerForSemanticSegmentation
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()


def make_model(arch, size, out_dir):
    """Writes a random-weight SegFormer of a published variant (ARCHS) with 150 labels and a processor at `size`."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor
    hidden, depths, decoder = ARCHS[arch]
    config = SegformerConfig(hidden_sizes=hidden, depths=depths, decoder_hidden_size=decoder, num_labels=150,
                             id2label={i: f"class_{i}" for i in range(150)},
                             label2id={f"class_{i}": i for i in range(150)})
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    h, w = size
    SegformerImageProcessor(size={"height": h, "width": w}).save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    print("MODEL " + json.dumps({"params": params}), flush=True)


def prep(args):
    """Writes input.npy [1,3,H,W] f32, model.onnx and model.int8-dyn.onnx into the work folder."""
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    h, w = args.size
    work = args.work
    images = sorted(glob.glob(os.path.join(DEMO_IMAGES, "*.jpg")))
    info = {}
    if images:
        from PIL import Image
        try:
            from transformers import SegformerImageProcessorPil as Proc
        except ImportError:
            from transformers import SegformerImageProcessor as Proc
        proc = Proc.from_pretrained(args.model)
        x = proc(images=[Image.open(images[0]).convert("RGB")], size={"height": h, "width": w},
                 return_tensors="pt")["pixel_values"].float()
        info["input"] = f"{os.path.basename(images[0])} processed to {h}x{w}"
    else:
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, h, w), dtype=np.float32))
        info["input"] = f"random normal 1x3x{h}x{w} (no demo image found)"
    assert tuple(x.shape) == (1, 3, h, w), x.shape
    np.save(os.path.join(work, "input.npy"), x.numpy())
    if args.skip_ort:
        info["onnx"] = "skipped (--skip-ort)"
        print("PREP " + json.dumps(info), flush=True)
        return
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        info["onnx"] = f"skipped (onnxruntime missing: {e})"
        print("PREP " + json.dumps(info), flush=True)
        return

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    # eval() on the wrapper too: the exporter restores the wrapper's training flag recursively afterwards.
    wrapped = Logits(load_model(args.model)).eval()
    f32 = os.path.join(work, "model.onnx")
    errors = []
    for dynamo in (True, False):
        kw = dict(opset_version=17, input_names=["pixel_values"], output_names=["logits"], dynamo=dynamo)
        if dynamo:
            kw["external_data"] = False
        try:
            with torch.no_grad():
                torch.onnx.export(wrapped, (x,), f32, **kw)
            info["exporter"] = "torch.export-based (dynamo=True)" if dynamo else "TorchScript (dynamo=False)"
            break
        except Exception as e:  # fall back to the other exporter
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {str(e)[:300]}")
    else:
        info["onnx"] = "export failed: " + " | ".join(errors)
        print("PREP " + json.dumps(info), flush=True)
        return
    import onnx
    info["opset"] = [o.version for o in onnx.load(f32, load_external_data=False).opset_import if o.domain in ("", "ai.onnx")]
    info["ort"] = onnxruntime.__version__
    try:
        quantize_dynamic(f32, os.path.join(work, "model.int8-dyn.onnx"), weight_type=QuantType.QInt8)
    except Exception as e:
        info["int8"] = f"quantize_dynamic failed: {type(e).__name__}: {str(e)[:300]}"
    print("PREP " + json.dumps(info), flush=True)


def timed(fn, warmup, iters):
    import numpy as np
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    return out, {"median_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)),
                 "min_ms": float(t.min()), "times_ms": [round(v, 3) for v in times]}


def worker(args):
    import numpy as np
    engine, work = args.worker, args.work
    x = np.load(os.path.join(work, "input.npy"))
    t_load = time.perf_counter()
    if engine.startswith("ort-"):
        import onnxruntime as ort
        path = os.path.join(work, "model.onnx" if engine == "ort-f32" else "model.int8-dyn.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        load_s = time.perf_counter() - t_load
        out, stats = timed(lambda: sess.run(None, {name: x})[0], args.warmup, args.iters)
    else:
        import torch
        torch.set_num_threads(args.threads)
        model = load_model(args.model)
        if engine.startswith("quanto-"):
            from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize
            qtype = {"qint8": qint8, "qfloat8": qfloat8, "qint4": qint4, "qint2": qint2}[engine[len("quanto-"):]]
            quantize(model, weights=qtype)
            freeze(model)
        xt = torch.from_numpy(x)
        load_s = time.perf_counter() - t_load

        def run():
            with torch.no_grad():  # not inference_mode: quanto's packed qint4/qint2 weights fail under it
                return model(pixel_values=xt).logits

        out, stats = timed(run, args.warmup, args.iters)
        out = out.numpy()
    np.save(os.path.join(work, f"logits.{engine}.npy"), np.asarray(out, dtype=np.float32))
    stats["load_s"] = load_s
    stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print("RESULT " + json.dumps(stats), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Parent side.

def versions():
    return package_versions(["torch", "transformers", "optimum-quanto", "onnx", "onnxruntime", "onnxscript", "numpy"])


def run_child(cmd, timeout, env=None):
    """Runs cmd; returns (returncode, stdout, stderr, child's ru_maxrss in bytes or None)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        deadline = time.monotonic() + timeout
        rss = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                rss = ru.ru_maxrss * 1024
                p.returncode = rc
                break
            if time.monotonic() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                p.returncode = None
                rc = None
                break
            time.sleep(0.05)
        fo.seek(0)
        fe.seek(0)
        return rc, fo.read(), fe.read(), rss


def error_line(text):
    """The most telling line of a failed command's output: the first 'error' line, else the last line."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("error"):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def find_segq(explicit):
    env = os.environ.get("SEGQ_BIN")
    for cand in [explicit, env, os.path.join(ROOT, "target", "release", "segq"),
                 os.path.join(ROOT, "target", "debug", "segq")]:
        if cand:
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand, None
            if cand in (explicit, env):
                return None, f"{cand} is not an executable file"
    return None, "no binary at $SEGQ_BIN, target/release/segq or target/debug/segq"


def parse_segq_json(text):
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    start = text.find("{")  # tolerate log lines around the JSON object
    end = text.rfind("}")
    if start >= 0 and end > start:
        return json.loads(text[start:end + 1])
    raise ValueError("no JSON object on stdout")


def run_segq(args, segq, env):
    """Returns (rows by label, list of shown commands, reason or None)."""
    h, w = args.size
    base = [segq, "bench", "--model", args.model]
    tail = ["--size", f"{h}x{w}" if h != w else f"{h}x{w}", "--threads", str(args.threads), "--warmup",
            str(args.warmup), "--iters", str(args.segq_iters), "--json"] + shlex.split(args.segq_extra)
    groups = [[lv] for lv in args.segq_levels] if args.segq_per_level else [args.segq_levels]
    rows, shown, notes = {}, [], []
    for g in groups:
        cmd = base + ["--quant", ",".join(g)] + tail
        shown.append(" ".join(shlex.quote(rel(c)) for c in cmd))
        rc, out, err, rss = run_child(cmd, args.segq_timeout, env)
        if rc != 0:
            why = "timed out" if rc is None else f"exit status {rc}"
            notes.append(f"{','.join(g)}: {why}: {error_line(err + out)}")
            continue
        try:
            data = parse_segq_json(out)
            levels = data["levels"]
            for lv in levels:
                for k in ("label", "median_ms", "p95_ms", "images_per_s", "peak_rss_bytes"):
                    if k not in lv:
                        raise ValueError(f"level {lv.get('label')!r} lacks {k!r}")
                lv = dict(lv)
                lv["process_rss_bytes"] = rss
                rows[str(lv["label"])] = lv
        except (ValueError, KeyError, TypeError) as e:
            notes.append(f"{','.join(g)}: bad JSON on stdout: {e}")
    if not rows:
        return None, shown, "; ".join(notes) or "no levels reported"
    return rows, shown, ("; ".join(notes) if notes else None)


def mib(b):
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def ratio(a, b, fmt="{:.2f}x"):
    return "n/a" if a is None or b is None or b == 0 else fmt.format(a / b)


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        sys.exit(f"size must be HxW, got {text!r}")
    return h, w


def parse_cases(text):
    """'demo@512x512,b2@512x512' -> [(name, (h, w))]; name: demo (the --model checkpoint) or an ARCHS key."""
    cases = []
    for item in [c.strip() for c in text.split(",") if c.strip()]:
        name, _, size = item.partition("@")
        if name != "demo" and name not in ARCHS:
            sys.exit(f"unknown case {item!r}: the model is 'demo' (--model) or one of {sorted(ARCHS)}")
        cases.append((name, parse_size(size or "512x512")))
    return cases


def run_case(args, env, work):
    """Runs every engine and segq on one model and input size; returns the case's report pieces and numbers."""
    h, w = args.size
    engines = list(args.engine_list)
    header = [
        f"- Model: {args.model_note}; input 1x3x{h}x{w}; threads {args.threads}; warm-up {args.warmup}, "
        f"{args.iters} timed runs ({args.segq_iters} for segq); each engine in its own process "
        f"(peak RSS = its ru_maxrss)",
    ]
    print(header[-1], flush=True)
    me = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--size", f"{h}x{w}",
          "--threads", str(args.threads), "--warmup", str(args.warmup), "--iters", str(args.iters), "--work", work]
    results, notes = {}, []
    need_ort = any(e.startswith("ort-") for e in engines)
    rc, out, err, _ = run_child(me + ["--prep"] + ([] if need_ort else ["--skip-ort"]), args.timeout, env)
    prep_line = [ln for ln in out.splitlines() if ln.startswith("PREP ")]
    if rc != 0 or not prep_line:
        sys.exit(f"preparation failed (exit {rc}):\n{err[-3000:]}")
    info = json.loads(prep_line[-1][5:])
    note = f"- Input: {info.get('input')}"
    if need_ort:
        note += (f"; ONNX: {info.get('onnx') or 'exported with the ' + info.get('exporter', '?') + ' exporter, opset '}"
                 f"{info.get('opset', '') if not info.get('onnx') else ''}"
                 f"{'; ' + info['int8'] if 'int8' in info else ''}")
    print(note, flush=True)
    header.append(note)
    for e in engines:
        if e.startswith("ort-") and not os.path.exists(
                os.path.join(work, "model.onnx" if e == "ort-f32" else "model.int8-dyn.onnx")):
            notes.append(f"{e}: skipped (no ONNX file: {info.get('onnx') or info.get('int8')})")
            print(notes[-1], flush=True)
            continue
        rc, out, err, child_rss = run_child(me + ["--worker", e], args.timeout, env)
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if rc != 0 or not line:
            tail = err.strip().splitlines()[-1:] or [""]
            notes.append(f"{e}: FAILED (exit {rc}): {tail[0][:300]}")
            print(notes[-1], flush=True)
            continue
        r = json.loads(line[-1][7:])
        r["process_rss_bytes"] = child_rss
        results[e] = r
        print(f"{e}: median {r['median_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, peak RSS {mib(r['peak_rss_bytes'])}"
              f" (load {r['load_s']:.1f} s)", flush=True)
    # logits error vs torch f32 on the benchmark input
    import numpy as np
    ref_path = os.path.join(work, "logits.torch-f32.npy")
    if os.path.exists(ref_path):
        ref = np.load(ref_path).astype(np.float64)
        for e, r in results.items():
            p = os.path.join(work, f"logits.{e}.npy")
            if os.path.exists(p):
                lg = np.load(p).astype(np.float64)
                r["logits_rel_error"] = float(np.linalg.norm(lg - ref) / np.linalg.norm(ref)) \
                    if lg.shape == ref.shape else None

    segq_rows, segq_note = None, None
    segq, why = (None, "--no-segq") if args.no_segq else find_segq(args.segq_bin)
    if segq and os.path.basename(os.path.dirname(os.path.abspath(segq))) == "debug":
        notes.append(f"segq binary {rel(segq)} is a debug build: its timings are not representative")
        print(notes[-1], flush=True)
    if segq:
        segq_rows, shown, why = run_segq(args, segq, env)
        for s in shown:
            print(f"- segq command: `{s}`", flush=True)
            header.append(f"- segq command: `{s}`")
        if why and segq_rows:
            segq_note = f"segq: some levels failed ({why})"
        if args.segq_avx2 and segq_rows:
            avx2_args = argparse.Namespace(**vars(args))
            avx2_args.segq_levels = ["f32", "int8-dyn"]
            avx2_rows, avx2_shown, avx2_why = run_segq(avx2_args, segq, dict(env, SEGQ_SIMD="avx2"))
            for s in avx2_shown:
                header.append(f"- segq command (AVX2 kernels only): `SEGQ_SIMD=avx2 {s}`")
            for lbl, r in (avx2_rows or {}).items():
                segq_rows[f"{lbl} [avx2]"] = r
            if avx2_why:
                notes.append(f"segq SEGQ_SIMD=avx2: {avx2_why}")
    if not segq_rows:
        segq_note = f"segq: not available ({why})"
    if segq_note:
        print(segq_note, flush=True)
        notes.append(segq_note)

    # one table
    torch_ms = results.get("torch-f32", {}).get("median_ms")
    torch_rss = results.get("torch-f32", {}).get("peak_rss_bytes")
    segq_f32 = (segq_rows or {}).get("f32")
    segq_ms = segq_f32["median_ms"] if segq_f32 else None
    rows = []
    for e, r in results.items():
        rows.append((e, r["median_ms"], r["p95_ms"], 1e3 / r["median_ms"], r["peak_rss_bytes"],
                     r.get("logits_rel_error"), None))
    for lbl, r in (segq_rows or {}).items():
        if r.get("process_rss_bytes"):
            notes.append(f"segq {lbl}: its process's ru_maxrss (os.wait4) {mib(r['process_rss_bytes'])}"
                         f" vs reported peak_rss_bytes {mib(r['peak_rss_bytes'])}")
        rows.append((f"segq {lbl}", r["median_ms"], r["p95_ms"], r["images_per_s"], r["peak_rss_bytes"], None,
                     r.get("inference_bytes")))
    table = ["| engine | ms/image (median) | p95 ms | images/s | peak RSS | inference memory | speed vs PyTorch f32 "
             "| speed vs segq f32 | RSS vs PyTorch f32 | logits rel. error vs PyTorch f32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, med, p95, ips, rss, lerr, infer in rows:
        table.append(f"| {name} | {med:.1f} | {p95:.1f} | {ips:.2f} | {mib(rss)} | {mib(infer)} | "
                     f"{ratio(torch_ms, med)} | {ratio(segq_ms, med)} | {ratio(rss, torch_rss)} | "
                     f"{'n/a' if lerr is None else f'{lerr:.2e}'} |")

    # targets
    def level(lbl):
        # segq labels carry the method (int8-rtn, int4-rtn-g64): match the level name as a prefix.
        rows = segq_rows or {}
        if lbl in rows:
            return rows[lbl]
        for name, row in rows.items():
            rest = name[len(lbl):]
            if name.startswith(lbl + "-") and not rest.startswith("-dyn") and not name.endswith("]"):
                return row
        return None

    def verdict(ok, detail):
        return ("n/a " if ok is None else ("PASS" if ok else "MISS")) + f"  {detail}"

    targets = []
    ort_ms = results.get("ort-f32", {}).get("median_ms")
    if segq_f32 and torch_ms:
        sp = torch_ms / segq_ms
        targets.append(verdict(sp >= 2.0, f"segq f32 >= 2x faster than PyTorch f32: {sp:.2f}x"))
    if segq_f32 and ort_ms:
        targets.append(verdict(segq_ms < ort_ms, f"segq f32 faster than ORT f32: {segq_ms:.1f} vs {ort_ms:.1f} ms "
                                                 f"({ort_ms / segq_ms:.2f}x)"))
    dyn = level("int8-dyn")
    if segq_f32 and dyn:
        sp = segq_ms / dyn["median_ms"]
        targets.append(verdict(sp >= 2.0, f"segq int8-dyn >= 2.0x faster than segq f32 (issue 14; issue 7 asked "
                                          f"1.3x): {sp:.2f}x"))
    avx2_f32 = (segq_rows or {}).get("f32 [avx2]")
    avx2_dyn = next((r for n, r in (segq_rows or {}).items() if n.startswith("int8-dyn") and n.endswith("[avx2]")), None)
    if avx2_f32 and avx2_dyn:
        sp = avx2_f32["median_ms"] / avx2_dyn["median_ms"]
        targets.append(verdict(sp >= 1.15, f"segq int8-dyn >= 1.15x faster than segq f32, AVX2 kernels only "
                                           f"(SEGQ_SIMD=avx2): {sp:.2f}x"))
    dyn4 = level("int4-dyn")
    if dyn and dyn4:
        targets.append(verdict(dyn4["median_ms"] <= dyn["median_ms"] * (1 + args.slack),
                               f"segq int4-dyn at least as fast as int8-dyn: {dyn4['median_ms']:.1f} vs "
                               f"{dyn['median_ms']:.1f} ms"))
    for lbl in ("int8", "int4", "int2"):
        r = level(lbl)
        if segq_f32 and r:
            targets.append(verdict(r["median_ms"] <= segq_ms * (1 + args.slack),
                                   f"segq {lbl} (weight-only) no slower than segq f32: {r['median_ms']:.1f} vs "
                                   f"{segq_ms:.1f} ms ({segq_ms / r['median_ms']:.2f}x)"))
    if segq_f32 and torch_rss:
        targets.append(verdict(segq_f32["peak_rss_bytes"] < torch_rss,
                               f"segq f32 peak RSS below PyTorch f32's: {mib(segq_f32['peak_rss_bytes'])} vs "
                               f"{mib(torch_rss)}"))
    if segq_f32 and args.memory_target:
        targets.append(verdict(segq_f32["peak_rss_bytes"] < 1.5e9,
                               f"segq f32 peak RSS under 1.5 GB (issue 14, large models and inputs): "
                               f"{segq_f32['peak_rss_bytes'] / 1e9:.2f} GB"))
    for lbl in [lv for lv in args.segq_levels if lv != "f32"]:
        r = level(lbl)
        if segq_f32 and r and r.get("inference_bytes") and segq_f32.get("inference_bytes"):
            targets.append(verdict(r["inference_bytes"] < segq_f32["inference_bytes"],
                                   f"segq {lbl} inference memory below segq f32's: {mib(r['inference_bytes'])} vs "
                                   f"{mib(segq_f32['inference_bytes'])} (peak RSS {mib(r['peak_rss_bytes'])} vs "
                                   f"{mib(segq_f32['peak_rss_bytes'])})"))
    summary = {
        "torch-f32": torch_ms, "ort-f32": ort_ms, "ort-int8-dyn": results.get("ort-int8-dyn", {}).get("median_ms"),
        "segq f32": segq_ms, "segq int8-dyn": dyn["median_ms"] if dyn else None,
        "segq int4-dyn": dyn4["median_ms"] if dyn4 else None,
        "segq int4": (level("int4") or {}).get("median_ms"),
        "torch rss": torch_rss, "ort rss": results.get("ort-f32", {}).get("peak_rss_bytes"),
        "segq f32 rss": segq_f32["peak_rss_bytes"] if segq_f32 else None,
    }
    return {"header": header, "table": table, "targets": targets, "notes": notes, "python": results,
            "segq": segq_rows, "summary": summary}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the checkpoint of the 'demo' case")
    ap.add_argument("--size", default="512x512", help="HxW of the input when --cases is not given (default 512x512)")
    ap.add_argument("--cases", help=f"models and sizes to run, e.g. {DEFAULT_CASES} (demo = --model; b0..b5 = random "
                                    f"weights from the published configs, 150 labels, generated at run time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--large-iters", type=int, default=3,
                    help="timed runs of the Python engines for the b0..b5 cases (default 3)")
    ap.add_argument("--segq-large-iters", type=int, default=0,
                    help="timed runs of segq for the b0..b5 cases (default: --iters; segq is fast enough for the "
                         "medians to need no shortcut, and 3 runs swing by 30%% on a shared machine)")
    ap.add_argument("--engines", default=",".join(PY_ENGINES), help="Python engines to run (comma-separated)")
    ap.add_argument("--large-engines", default="torch-f32,ort-f32,ort-int8-dyn",
                    help="Python engines for the b0..b5 cases (default: no quanto, which takes minutes per run there)")
    ap.add_argument("--skip-ort", action="store_true", help="no ONNX export / ORT engines")
    ap.add_argument("--segq-bin")
    ap.add_argument("--segq-levels", default=",".join(SEGQ_LEVELS))
    ap.add_argument("--segq-per-level", action="store_true", help="one segq process per level (fair peak RSS)")
    ap.add_argument("--segq-extra", default="", help="extra arguments appended to segq bench (shell-split)")
    ap.add_argument("--segq-timeout", type=int, default=600)
    ap.add_argument("--segq-avx2", action="store_true",
                    help="also run segq f32 and int8-dyn with SEGQ_SIMD=avx2 (the AVX2-only kernels)")
    ap.add_argument("--no-segq", action="store_true")
    ap.add_argument("--slack", type=float, default=0.0,
                    help="tolerance of the 'no slower than' targets: pass if median <= reference x (1 + slack)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per Python engine subprocess")
    ap.add_argument("--work-dir", help="keep input/ONNX/logits here (default: a temporary folder)")
    ap.add_argument("--out", help="also write the report as markdown to this file")
    ap.add_argument("--json-out", help="also write the raw numbers as JSON to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prep", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--make-model", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = parse_size(args.size)
    args.model = os.path.abspath(args.model)
    set_thread_env(args.threads)
    if args.make_model:
        return make_model(args.make_model, args.size, args.work)
    if args.prep:
        return prep(args)
    if args.worker:
        return worker(args)

    t_start = time.perf_counter()
    args.segq_levels = [lv for lv in args.segq_levels.split(",") if lv]
    cases = parse_cases(args.cases) if args.cases else [("demo", args.size)]
    for flag in ("engines", "large_engines"):
        for e in [e for e in getattr(args, flag).split(",") if e]:
            if e not in PY_ENGINES:
                sys.exit(f"unknown engine {e}; choose from {PY_ENGINES}")
    command = command_line()
    header = [
        "# segq speed and memory vs the Python reference engines (issues 7 and 14)",
        "",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine_info()}",
        f"- Versions: {versions()}",
        f"- Command: `{command}` (from the repository root)",
        "- Load average at start (1/5/15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg()),
    ]
    for line in header:
        print(line, flush=True)

    tmp = None
    root = args.work_dir
    if not root:
        tmp = tempfile.mkdtemp(prefix="segq-bench-")
        root = tmp
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja for quanto
    sections = []
    try:
        for name, size in cases:
            h, w = size
            case = argparse.Namespace(**vars(args))
            case.size = size
            case.segq_iters = args.iters
            work = os.path.join(root, f"{name}-{h}x{w}")
            os.makedirs(work, exist_ok=True)
            title = f"{'demo model' if name == 'demo' else name.upper() + ' (random weights, 150 labels)'} @ {h}x{w}"
            print(f"\n## {title}", flush=True)
            if name == "demo":
                case.model_note = rel(args.model)
                engines = args.engines
            else:
                case.model = os.path.join(work, "model")
                rc, out, err, _ = run_child([sys.executable, os.path.abspath(__file__), "--make-model", name,
                                             "--size", f"{h}x{w}", "--work", case.model], args.timeout, env)
                line = [ln for ln in out.splitlines() if ln.startswith("MODEL ")]
                if rc != 0 or not line:
                    sys.exit(f"building the {name} model failed (exit {rc}):\n{err[-3000:]}")
                params = json.loads(line[-1][6:])["params"]
                case.model_note = (f"SegFormer-{name.upper()} published configuration, random weights (seed 0), "
                                   f"150 labels, {params / 1e6:.1f} M parameters, generated at run time")
                case.iters = args.large_iters
                case.segq_iters = args.segq_large_iters or args.iters
                engines = args.large_engines
            case.engine_list = [e for e in engines.split(",") if e and not (args.skip_ort and e.startswith("ort-"))]
            case.memory_target = name != "demo" and (name == "b5" or h * w >= 1024 * 1024)
            r = run_case(case, env, work)
            r["title"] = title
            sections.append(r)
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    total = time.perf_counter() - t_start
    header.append("- Load average at end (1/5/15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg())
                  + " (above ~0.5 the timings are disturbed by other work)")
    print(header[-1])

    def ms(v):
        return "n/a" if v is None else f"{v:.0f}"

    overview = []
    if len(sections) > 1:
        overview = ["| case | PyTorch f32 ms | ORT f32 ms | ORT int8 ms | segq f32 ms | segq int8-dyn ms | "
                    "segq int4-dyn ms | int8-dyn / f32 | segq f32 vs PyTorch | peak RSS PyTorch / ORT / segq f32 |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for sec in sections:
            s = sec["summary"]
            overview.append(
                f"| {sec['title']} | {ms(s['torch-f32'])} | {ms(s['ort-f32'])} | {ms(s['ort-int8-dyn'])} | "
                f"{ms(s['segq f32'])} | {ms(s['segq int8-dyn'])} | {ms(s['segq int4-dyn'])} | "
                f"{ratio(s['segq f32'], s['segq int8-dyn'])} | {ratio(s['torch-f32'], s['segq f32'])} | "
                f"{mib(s['torch rss'])} / {mib(s['ort rss'])} / {mib(s['segq f32 rss'])} |")
    lines = header + [""] + overview + ([""] if overview else [])
    for sec in sections:
        if len(sections) > 1:
            lines += [f"## {sec['title']}", ""]
        lines += sec["header"] + [""] + sec["table"] + ["", "Targets:", ""] + [f"- {t}" for t in sec["targets"]]
        lines += [""] + [f"- {n}" for n in sec["notes"]] + [""]
    lines += [f"Total run time: {total:.0f} s."]
    print()
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"header": header, "cases": sections}, f, indent=1)


if __name__ == "__main__":
    main()
