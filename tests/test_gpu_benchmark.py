"""benchmarks/perf/gpu.py, the one-call GPU benchmark, checked on the CPU with --tiny (no GPU here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "gpu.py"
MEASURED = {"batch_size", "samples", "parameters", "train_samples_per_s", "eval_samples_per_s",
            "peak_memory_mb"}


def test_the_gpu_benchmark_runs_tiny_on_the_cpu_and_writes_every_section(tmp_path: Path):
    output = tmp_path / "gpu"
    subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--models", "lnln", "tfn", "--batches", "1",
                    "--output", str(output)], check=True, capture_output=True, timeout=300)
    report = json.loads(output.with_suffix(".json").read_text())
    assert {"device", "torch", "command", "tiny", "elapsed_s"} <= set(report) and report["tiny"]
    assert ("CPU" in report["device"]) == (not torch.cuda.is_available())
    rows = report["models"]
    assert {(r["model"], r["shape"], r["precision"]) for r in rows} == {
        (m, s, p) for m in ("lnln", "tfn") for s in ("mosi", "mosei") for p in ("fp32", "bf16")}
    for row in rows + report["bert_base"]:
        assert set(row) >= MEASURED, row
        assert row["train_samples_per_s"] > 0 and row["eval_samples_per_s"] > 0
        assert (row["peak_memory_mb"] is None) == (not torch.cuda.is_available())  # CUDA's allocator
    assert [(r["model"], r["precision"]) for r in report["bert_base"]] == [("lnln", "fp32"),
                                                                          ("lnln", "bf16")]
    sweep = report["lnln_intra_sweep"]
    assert [r["precision"] for r in sweep] == ["fp32", "bf16"]
    assert all(r["rates"] == 10 and r["sweep_s"] > 0 for r in sweep)
    table = output.with_suffix(".md").read_text()
    assert "LNLN's intra-modal sweep" in table and "BERT-base text encoder" in table
