"""benchmarks/gpu_bench.py's FSDP2 path at toy shapes on the CPU (gloo, one process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fsdp2_smoke_step_runs_and_counts_its_flops(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--steps", "1", "--warmup", "0",
         "--strategy", "fsdp2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parallel: fsdp2 on 1 processes" in proc.stdout
    result = json.loads(out.read_text())
    assert result["strategy"] == "fsdp2"
    assert result["summary"]["completion_len_min"] == 16
    record = result["records"][0]
    assert record["images_encoded"]["update"] == 1  # one encoding per distinct image per pass
    assert record["update_flops"]["vision_layers"] > 0
