#!/usr/bin/env bash
# GRPO step throughput at Qwen2.5-VL-3B's shape on one GPU (benchmarks/gpu_bench.py).
#
#   bash benchmarks/gpu.sh fetch [DIR]     # where a package index is reachable: wheels -> DIR (.whl)
#   bash benchmarks/gpu.sh [ARGS...]       # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --smoke         # toy shapes; any machine, CPU is fine
#   bash benchmarks/gpu.sh setup           # only the install + import check (benchmarks/gpu_check.sh)
#
# The GPU image has torch, transformers, accelerate, peft and pillow but not datasets,
# qwen-vl-utils or math-verify, and its transformers (5.17) predates the
# `mm_encoder_outputs` / `cache` arguments vlreason's multimodal forward uses. So the run
# installs the wheels carried in .whl/ (no index, no dependencies) into /tmp/site, puts
# /tmp/site and the repository first on PYTHONPATH (vlreason importable without pip
# install), checks the imports, then runs the benchmark under a hard time limit.
# ARGS go to gpu_bench.py (e.g. --steps 3, -G 8, --max-new-tokens 1024, --peak-tflops 989).
# With $OUT set (the device tool's output folder) the JSON lands in $OUT/gpu_bench.json.
# SKIP_INSTALL=1 keeps what an earlier run put in $SITE (gpu_check.sh installs once).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="${WHEELS:-$ROOT/.whl}"
SITE="${SITE:-/tmp/site}"
LIMIT_S="${LIMIT_S:-450}"  # the whole script must end within 8 minutes

if [[ "${1:-}" == "fetch" ]]; then
    dest="${2:-$WHEELS}"
    mkdir -p "$dest"
    # What the GPU image lacks. transformers 5.24.0 is the version vlreason is tested with;
    # it needs huggingface_hub >= 1.31 (the image's 1.x may be older).
    pip download --no-deps --only-binary=:all: -d "$dest" \
        "datasets>=3.0" "qwen-vl-utils>=0.0.8" "math-verify>=0.7" \
        "transformers==5.24.0" "huggingface_hub>=1.31,<2" \
        "pytest>=8" "pluggy>=1.5" "iniconfig>=1" "pygments>=2.7"  # tests/gpu (gpu_check.sh)
    ls -1 "$dest"
    exit 0
fi

start=$(date +%s)
if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
    echo "SKIP_INSTALL=1: using $SITE as installed earlier"
elif compgen -G "$WHEELS/*.whl" > /dev/null; then
    # A carried wheel goes in unless the same distribution is already installed at that
    # version or newer (so the carried huggingface_hub never shadows a newer one).
    mapfile -t pick < <(python - "$WHEELS" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import Version

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, ver = wheel.name.split("-")[:2]
    try:
        if Version(version(name)) >= Version(ver):
            print(f"keeping the installed {name} {version(name)} (carried: {ver})", file=sys.stderr)
            continue
    except PackageNotFoundError:
        pass
    print(wheel)
PY
)
    rm -rf "$SITE"
    mkdir -p "$SITE"
    if (( ${#pick[@]} )); then
        pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "${pick[@]}"
        echo "installed into $SITE: $(for w in "${pick[@]}"; do basename "$w"; done | tr '\n' ' ')"
    fi
else
    echo "no wheels in $WHEELS: using the installed packages (bash benchmarks/gpu.sh fetch fills it)"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'EOF'
import importlib, sys
missing = []
# torchvision: transformers 5.24's Qwen2-VL image / video processors need it
for name in ("torch", "torchvision", "transformers", "tokenizers", "PIL", "numpy", "yaml", "packaging", "vlreason"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{name}: {err}")
import torch, transformers
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}) | transformers {transformers.__version__} from {transformers.__file__}")
if missing:
    sys.exit("missing imports:\n  " + "\n  ".join(missing))
EOF

if [[ "${1:-}" == "setup" ]]; then
    exit 0
fi
left=$(( LIMIT_S - ($(date +%s) - start) ))
timeout --signal=INT --kill-after=20 "$left" python benchmarks/gpu_bench.py --time-limit $(( left - 60 )) "$@"
echo "gpu.sh: done in $(( $(date +%s) - start )) s"
