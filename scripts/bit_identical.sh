#!/usr/bin/env bash
# Refactor check: two segq binaries must give byte-identical outputs for every level and method.
# Usage: scripts/bit_identical.sh OLD_SEGQ NEW_SEGQ [WORK_DIR]
# For the embedded demo model and the tiny fixtures, each binary writes a quantized checkpoint per level x method
# (compared byte for byte), loads it and saves logits for the demo and fixture images (compared byte for byte), and
# runs `segq eval` on the demo (confusion matrices and agreement counts of every level compared exactly).
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2")
work=${3:-$(mktemp -d)}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$work"
images=(../shared/demo/ade/ADEChallengeData2016/images/validation/SYN_val_00000001.jpg
        ../shared/demo/ade/ADEChallengeData2016/images/validation/SYN_val_00000007.jpg
        tests/fixtures/images/photo_61x47.jpg tests/fixtures/images/odd_37x53.png)
[ -e "${images[0]}" ] || images=("${images[@]:2}")
levels="f16 bf16 f8 f8e5m2 int8 int8-dyn int4 int2"
methods="rtn hqq"
fail=0
for model in embedded tests/fixtures/models/tiny_a tests/fixtures/models/tiny_c; do
  tag=$(basename "$model")
  for which in old new; do
    bin=${!which}
    "$bin" -q --threads 2 predict --model "$model" --save-logits --out "$work/$which/$tag/f32" "${images[@]}"
    for level in $levels; do
      for method in $methods; do
        [ "$level" = f16 ] || [ "$level" = bf16 ] && [ "$method" = hqq ] && continue
        ck="$work/$which/$tag/ckpt-$level-$method"
        if "$bin" -q --threads 2 quantize --model "$model" --quant "$level" --method "$method" --out "$ck" 2>"$ck.err"; then
          "$bin" -q --threads 2 predict --model "$ck" --save-logits --out "$work/$which/$tag/$level-$method" "${images[@]}"
        else
          echo "($which $tag $level-$method: $(tail -1 "$ck.err"))"
        fi
      done
    done
  done
  # Writers may order the metadata and lay tensors out differently, so checkpoints are compared by parsed metadata
  # and by each tensor's dtype, shape and bytes.
  if ! diff -r -q -x '*.safetensors' -x '*.err' "$work/old/$tag" "$work/new/$tag"; then fail=1; fi
  for ck in "$work/old/$tag"/ckpt-*/model.safetensors; do
    other="$work/new/$tag/${ck#"$work/old/$tag/"}"
    python3 - "$ck" "$other" <<'PY' || fail=1
import json, struct, sys
def read(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = {k: json.loads(v) if v[:1] in "{[" else v for k, v in header.pop("__metadata__", {}).items()}
    body = data[8 + n:]
    tensors = {name: (t["dtype"], t["shape"], body[t["data_offsets"][0]:t["data_offsets"][1]])
               for name, t in header.items()}
    return meta, tensors
a, b = read(sys.argv[1]), read(sys.argv[2])
if a != b:
    print(f"{sys.argv[1]} and {sys.argv[2]} differ")
    sys.exit(1)
PY
  done
done
for which in old new; do
  bin=${!which}
  "$bin" -q --threads 2 eval --quant f32,f16,bf16,f8,f8e5m2,int8,int8-dyn,int4,int2 --method rtn,hqq \
    --wandb disabled --out "$work/$which/eval" >/dev/null
  python3 - "$work/$which/eval/results.json" > "$work/$which/eval/metrics.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keep = {k: r[k] for k in ("counts", "complete")}
# Everything but timings and memory (which vary run to run).
keep["levels"] = [{k: l.get(k) for k in ("label", "level", "method", "group_size", "bits_per_weight", "status",
                   "confusion", "agreement", "weight_bytes_memory", "weight_bytes_disk")}
                  | {k: (l.get("summary") or {}).get(k) for k in ("metrics", "agreement")}
                  for l in r["levels"]]
print(json.dumps(keep, indent=1, sort_keys=True))
PY
done
if ! cmp "$work/old/eval/metrics.json" "$work/new/eval/metrics.json"; then fail=1; fi
n=$(find "$work/new" -name '*.npy' | wc -l)
if [ $fail = 0 ]; then echo "bit-identical: $n logits files, checkpoints and eval metrics ($work)"; else echo "DIFFERENT ($work)"; exit 1; fi
