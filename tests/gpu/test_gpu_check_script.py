"""benchmarks/gpu_check.sh on a CPU machine: its dry run (bash syntax of it and gpu.sh,
the files it runs, their Python compiles) and (slow) its smoke mode, which runs the GPU
test tier (all skipped without CUDA: collection and imports are checked) and the
benchmark at toy shapes. The real run needs a GPU (docs/scaling.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str, out: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_checks_syntax_and_prints_the_plan():
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "compiled: tests/gpu/test_gpu.py, tests/gpu/conftest.py, benchmarks/gpu_bench.py" in proc.stdout
    assert "bash benchmarks/gpu.sh setup" in proc.stdout
    assert "SKIP_INSTALL=1 bash benchmarks/gpu.sh --steps 1 --warmup 1 --max-new-tokens 512" in proc.stdout
    assert "dry run ok" in proc.stdout
    bad = _run("--bogus")
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.slow
def test_smoke_mode_runs_the_tests_and_the_toy_benchmark(tmp_path):
    proc = _run("--smoke", out=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu tests: exit 0" in proc.stdout
    assert "SMOKE (toy shapes)" in proc.stdout
    assert (tmp_path / "gpu_tests.xml").is_file()
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["smoke"] and result["summary"]["measured_steps"] == 1
    assert result["dtype"] == "bfloat16"  # autocast over fp32 master weights, as on the GPU
    flops = result["summary"]["update_flops"]
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))
    assert 0 < flops["output_layer"] < flops["total"]
