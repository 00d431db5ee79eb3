#!/usr/bin/env bash
# One short device check, under 8 minutes on one GPU: the GPU test tier (tests/gpu,
# marker `gpu`), then the Qwen2.5-VL-3B-shape throughput table of gpu_bench.py (one
# warm-up + one measured step of 8 x 512 tokens instead of 3 x 1,024).
#
#   bash benchmarks/gpu.sh fetch              # once, where a package index is reachable: wheels -> .whl/
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # any machine: syntax, files, python compiles, prints the plan
#   bash benchmarks/gpu_check.sh --smoke      # any machine (CPU): the same steps, toy benchmark shapes
#
# Through the device tool (.whl/ is git-ignored, so it has to be carried):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# No network is needed on the GPU machine. The wheels in .whl/ (transformers 5.24 and
# what the image lacks, pytest included) are installed once by `gpu.sh setup` into
# /tmp/site, which goes first on PYTHONPATH with the repository (no pip install of
# vlreason); the benchmark then runs through gpu.sh with SKIP_INSTALL=1. With $OUT set,
# the test report (gpu_tests.xml, gpu_tests.log) and gpu_bench.json land there.
# Environment: LIMIT_S (whole script, default 450 s), TESTS_S (test tier, default 240 s).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=gpu
case "${1:-}" in
    "") ;;
    --dry-run) MODE=dry ;;
    --smoke) MODE=smoke ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --smoke]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"
SITE="${SITE:-/tmp/site}"
LIMIT_S="${LIMIT_S:-450}"
TESTS_S="${TESTS_S:-240}"
REPORT="${OUT:-${TMPDIR:-/tmp}/gpu_check}"
BENCH_ARGS=(--steps 1 --warmup 1 --max-new-tokens 512)
SMOKE_BENCH_ARGS=(--smoke --steps 1 --warmup 0 --compute-dtype bfloat16)  # the GPU run computes in bf16 too
TESTS=(tests/gpu/test_gpu.py)
start=$(date +%s)

plan() {
    echo "gpu_check plan ($MODE):"
    echo "  1. bash benchmarks/gpu.sh setup   (install .whl/ into $SITE, check imports; gpu mode only)"
    echo "  2. $PY -m pytest -m gpu ${TESTS[*]}   (limit ${TESTS_S} s; report in $REPORT)"
    if [[ "$MODE" == smoke ]]; then
        echo "  3. $PY benchmarks/gpu_bench.py ${SMOKE_BENCH_ARGS[*]}"
    else
        echo "  3. SKIP_INSTALL=1 bash benchmarks/gpu.sh ${BENCH_ARGS[*]}   (the rest of ${LIMIT_S} s)"
    fi
}

if [[ "$MODE" == dry ]]; then
    bash -n benchmarks/gpu.sh
    bash -n benchmarks/gpu_check.sh
    files=("${TESTS[@]}" tests/gpu/conftest.py benchmarks/gpu_bench.py benchmarks/memory_plan.py)
    for f in "${files[@]}"; do
        [[ -f "$f" ]] || { echo "missing: $f" >&2; exit 1; }
    done
    "$PY" - "${files[@]}" <<'EOF'
import sys
for path in sys.argv[1:]:
    compile(open(path, encoding="utf-8").read(), path, "exec")
print(f"compiled: {', '.join(sys.argv[1:])}")
EOF
    plan
    echo "gpu_check: dry run ok"
    exit 0
fi

plan
mkdir -p "$REPORT"
if [[ "$MODE" == gpu ]]; then
    LIMIT_S="$LIMIT_S" bash benchmarks/gpu.sh setup
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
"$PY" -c "import pytest" || { echo "gpu_check: pytest is not importable (bash benchmarks/gpu.sh fetch carries it)" >&2; exit 3; }

echo "== GPU tests =="
set +e
timeout --signal=INT --kill-after=20 "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA -s \
    --junitxml "$REPORT/gpu_tests.xml" "${TESTS[@]}" 2>&1 | tee "$REPORT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
echo "gpu tests: exit $tests_rc"

echo "== GRPO throughput, Qwen2.5-VL-3B shape =="
set +e
if [[ "$MODE" == smoke ]]; then
    "$PY" benchmarks/gpu_bench.py "${SMOKE_BENCH_ARGS[@]}" --out "$REPORT/gpu_bench.json"
    bench_rc=$?
else
    left=$(( LIMIT_S - ($(date +%s) - start) ))
    if (( left < 150 )); then
        echo "gpu_check: only $left s left of LIMIT_S=$LIMIT_S; benchmark skipped" >&2
        bench_rc=124
    else
        SKIP_INSTALL=1 SITE="$SITE" LIMIT_S="$left" bash benchmarks/gpu.sh "${BENCH_ARGS[@]}"
        bench_rc=$?
    fi
fi
set -e
echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc, $(( $(date +%s) - start )) s"
(( tests_rc == 0 && bench_rc == 0 ))
