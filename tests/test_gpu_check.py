"""benchmarks/gpu_check.sh dry-runs on CPU: set-up, then each step's log in $OUT as the step ends, results packed."""

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *steps, python=sys.executable):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": python}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *steps], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _log(tmp_path, name):
    return gzip.decompress((tmp_path / f"{name}.log.gz").read_bytes()).decode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU half; on a GPU run the script itself")
def test_dry_run_writes_each_steps_log(tmp_path):
    r = _run(tmp_path, "pytest_gpu", "bench_layernorm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch" in _log(tmp_path, "setup") and "no GPU: a dry run" in _log(tmp_path, "setup")
    assert "exit status 0" in _log(tmp_path, "pytest_gpu")
    assert _log(tmp_path, "bench_layernorm").startswith("skipped: needs a GPU")
    assert (tmp_path / "results.tgz").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_layernorm.log.gz", "pytest_gpu.log.gz", "results.tgz", "setup.log.gz"]


def test_failed_setup_fails_the_run(tmp_path):
    r = _run(tmp_path, "aot", python="false")
    assert r.returncode == 1 and "SETUP FAILED" in r.stdout
    assert (tmp_path / "setup.log.gz").exists() and not (tmp_path / "aot.log.gz").exists()


def test_unknown_step_fails_the_run(tmp_path):
    r = _run(tmp_path, "no_such_step")
    assert r.returncode == 1 and "unknown step no_such_step" in r.stdout


def test_every_call_the_header_names_fits_nine_minutes():
    """Each call the header suggests must end within the device tool's limit even if every step
    runs to its timeout: set-up's timeout plus its steps' add up to at most 9 minutes."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    timeouts = {name: int(t) for name, t in re.findall(r'^\s+\[(\w+)\]="(\d+) ', script, re.M)}
    setup = int(re.search(r"^SETUP_TIMEOUT=(\d+)", script, re.M)[1])
    calls = [line.split() for line in re.findall(r"^#\s+bash benchmarks/gpu_check.sh ([^#\n]*)", script, re.M)]
    assert len(calls) > 10
    for steps in calls:
        assert all(step in timeouts for step in steps), steps
        assert setup + sum(timeouts[step] for step in steps) <= 9 * 60, steps
