#!/usr/bin/env bash
# GPU check: benchmark.speed's engine against the paper's loop on CUDA, in fp32 and bf16, sized to finish
# within 8 minutes on one GPU. Per dtype: 32 queries x 5 candidates (loop timed on 4) and every original a
# candidate at 16 x 16 (loop timed on 2). The projection comparison runs on the CPU whatever the device, so it
# is left to the CPU benchmark. Writes $OUT/speed-<dtype>.json and $OUT/fullset-<dtype>.json (OUT defaults to
# ./gpu-check) with each run's log beside it, and prints one line per figure, the aten-call proxy included (ops per
# pair, capture's calls over a plain batched forward+backward, tokens/s of both). DEVICE, DTYPES, QUERIES,
# OPS_QUERIES, FULLSET, MODEL, TIMEOUT (seconds per run) and PYTHON override the defaults.
# TIMEOUT's default leaves room for the engine part of benchmark.speed at 32 queries on an H200-class GPU
# (docs/benchmarks.md#on-a-gpu); every part of it at once takes several times longer.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
py="${PYTHON:-python}"
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# convert and cache the embedded model first, so no run's time limit pays for it
[ -n "${MODEL:-}" ] || "$py" -c "from selproj_plugin.models import default_model_dir; default_model_dir()" || exit 1
status=0
speed() {  # speed <json> <args...>: one benchmark.speed run under the time limit
    local json=$1
    shift
    if ! timeout "${TIMEOUT:-110}" "$py" -m benchmark.speed --device "${DEVICE:-cuda}" ${MODEL:+--model "$MODEL"} \
            --json "$json" "$@" >"${json%.json}.log" 2>&1; then
        echo "$(basename "$json" .json): benchmark.speed failed or ran out of time; last line: $(tail -n 1 "${json%.json}.log")"
        status=1
        return 1
    fi
}
for dtype in ${DTYPES:-float32 bfloat16}; do
    speed "$out/speed-$dtype.json" --only engine --dtype "$dtype" --queries "${QUERIES:-32}" --loop-queries 4 \
            --ops-queries "${OPS_QUERIES:-16}" \
        && "$py" - "$out/speed-$dtype.json" <<'PY' || status=1
import json, sys

from benchmark.speed import print_ops

r = json.load(open(sys.argv[1]))
tag = f"{r['dtype']} on {r['device']}"
t = r["engine_timings"]
print(f"{tag}: engine {r['engine_seconds']:.1f} s for {r['queries']}x{r['k']} (capture {t['capture_s']:.1f} s, "
      f"dots {t['dots_s']:.1f} s, of which storing {t['store_s']:.1f} s), "
      + (f"peak GPU {r['engine_peak_gpu_mb']:.0f} MiB" if r["engine_peak_gpu_mb"] is not None else "no GPU"))
print(f"{tag}: paper loop {r['loop_seconds_extrapolated']:.1f} s extrapolated, speedup_vs_loop {r['speedup_vs_loop']:.2f}x")
print(f"{tag}: largest relative difference to {r['reference']} {r['max_rel_error']:.2e} (self dots "
      f"{r['max_rel_error_self']:.2e}); the loop's own {r['loop_max_rel_error']:.2e} ({r['loop_max_rel_error_self']:.2e})")
if r.get("ops"):  # the cost proxy: aten calls a pair, capture's against a plain forward+backward, both tokens/s
    print(f"{tag}: ", end="")
    print_ops(r["ops"])
else:
    print(f"{tag}: no aten-call count (OPS_QUERIES=0)")
PY
    speed "$out/fullset-$dtype.json" --only fullset --dtype "$dtype" --fullset-queries "${FULLSET:-16}" \
            --fullset-loop-queries 2 \
        && "$py" - "$out/fullset-$dtype.json" "$dtype" "${DEVICE:-cuda}" <<'PY' || status=1
import json, sys

f = json.load(open(sys.argv[1]))["fullset"]
print(f"{sys.argv[2]} on {sys.argv[3]}: every original a candidate ({f['queries']}x{f['candidates']}, {f['dot_order']} "
      f"order): engine {f['engine_seconds']:.1f} s, speedup_vs_loop_fullset {f['speedup_vs_loop_fullset']:.1f}x, "
      f"largest relative difference to {f['reference']} {f['max_rel_error']:.2e}")
PY
done
exit $status
