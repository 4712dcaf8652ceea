"""benchmarks/gpu_check: its Python entry runs the CPU path end to end (the code a GPU machine runs,
minus CUDA), and the shell script exits 0 saying so where there is no CUDA."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow  # a benchmark's every row, trainings included: `make test` runs it, `make unit` does not
def test_the_entry_runs_every_row_on_cpu():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--model", "po-tiny-rn",
                          "--steps", "2", "--warmup", "1", "--n-pairs", "32", "--batch-size", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line for line in out.stdout.splitlines()}
    for what in ("PO step po-tiny-rn fp32", "PO step po-tiny-rn bf16", "input path (records → device)"):
        images_per_s = float(rows[what][len(what):].split()[0])
        assert images_per_s > 0, rows[what]
    assert "skipped: needs 2 GPUs" in rows["DDP 2 workers"]
    assert "NOT FINITE" not in out.stdout


def test_cuda_is_refused_by_the_entry_where_torch_has_none():
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine may have CUDA: the script is then the real check")
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cuda"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no CUDA device" in out.stderr


def test_the_script_exits_0_saying_there_is_no_cuda():
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine may have CUDA: the script is then the real check")
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device here" in out.stdout
