#!/usr/bin/env bash
# GPU check: benchmark.speed on CUDA in fp32 and bf16, sized to finish within 8 minutes on one GPU.
# Writes $OUT/speed-<dtype>.json (OUT defaults to ./gpu-check) with each run's log beside it, and
# prints one line per figure. DEVICE, DTYPES, QUERIES, MODEL, TIMEOUT (seconds per dtype) and PYTHON
# override the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
py="${PYTHON:-python}"
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
status=0
for dtype in ${DTYPES:-float32 bfloat16}; do
    json="$out/speed-$dtype.json"
    if ! timeout "${TIMEOUT:-230}" "$py" -m benchmark.speed --device "${DEVICE:-cuda}" --dtype "$dtype" \
            --queries "${QUERIES:-32}" --loop-queries 4 --proj-queries 4 --proj-seeds 1 \
            ${MODEL:+--model "$MODEL"} --json "$json" >"$out/speed-$dtype.log" 2>&1; then
        echo "$dtype: benchmark.speed failed or ran out of time; last line: $(tail -n 1 "$out/speed-$dtype.log")"
        status=1
        continue
    fi
    "$py" - "$json" <<'PY' || status=1
import json, sys

r = json.load(open(sys.argv[1]))
tag = f"{r['dtype']} on {r['device']}"
print(f"{tag}: engine {r['engine_seconds']:.1f} s for {r['queries']}x{r['k']} "
      f"(capture {r['engine_timings']['capture_s']:.1f} s, dots {r['engine_timings']['dots_s']:.1f} s), "
      + (f"peak GPU {r['engine_peak_gpu_mb']:.0f} MiB" if r["engine_peak_gpu_mb"] is not None else "no GPU"))
print(f"{tag}: paper loop {r['loop_seconds_extrapolated']:.1f} s extrapolated, speedup_vs_loop {r['speedup_vs_loop']:.2f}x")
print(f"{tag}: largest relative difference to the loop {r['max_rel_error']:.2e} (self dots {r['max_rel_error_self']:.2e})")
if "fullset" in r:
    f = r["fullset"]
    print(f"{tag}: every original a candidate ({f['queries']}x{f['candidates']}, {f['dot_order']} order): engine "
          f"{f['engine_seconds']:.1f} s, speedup_vs_loop_fullset {f['speedup_vs_loop_fullset']:.1f}x")
for dim, ratio in r["distortion_vs_dense_jl"].items():
    print(f"{tag}: distortion_vs_dense_jl at {dim}: {ratio:.3f}")
PY
done
exit $status
