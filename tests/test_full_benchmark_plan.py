"""benchmarks/full_benchmark_plan.py, the sizing table of docs/cluster.md: hours from exported study
records and a GPU benchmark file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "full_benchmark_plan.py"
SYNTHETIC_TRAIN = 1284


def record(model: str, label: str, seconds: float, epochs_run: int) -> str:
    return json.dumps({"job": f"{label}-{seconds}", "model": model, "label": label, "seconds": seconds,
                       "train": {"epochs_run": epochs_run}, "evaluations": {}}) + "\n"


def test_the_plan_turns_recorded_seconds_and_gpu_speeds_into_hours(tmp_path: Path):
    records = tmp_path / "records.jsonl"
    records.write_text(record("tfn", "tfn", 0.01 * 2 * SYNTHETIC_TRAIN, 2)
                       + record("tfn", "tfn", 0.05 * 4 * SYNTHETIC_TRAIN, 4)
                       + record("tfn", "tfn", 0.02 * 3 * SYNTHETIC_TRAIN, 3)
                       + record("tfn", "tfn-own", 99.0, 1))  # another label's execution: not counted
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"models": [
        {"model": "tfn", "shape": "mosi", "precision": "fp32", "train_samples_per_s": 100.0},
        {"model": "tfn", "shape": "mosei", "precision": "fp32", "train_samples_per_s": 50.0},
        {"model": "tfn", "shape": "mosi", "precision": "bf16", "train_samples_per_s": 1e9}]}))
    output = tmp_path / "plan"
    subprocess.run([sys.executable, str(SCRIPT), "--records", str(records), str(tmp_path / "absent.jsonl"),
                    "--gpu", str(gpu), "--output", str(output)], check=True, capture_output=True, timeout=300)
    plan = json.loads(output.with_suffix(".json").read_text())
    rows = {row["model"]: row for row in plan["rows"]}
    assert plan["jobs"] == sum(row["jobs"] for row in rows.values()) == 20 * len(rows)
    tfn = rows["tfn"]
    assert abs(tfn["cpu_hours"] - tfn["training_samples"] * 0.02 / 3600) < 1e-9  # the median job
    epochs = tfn["epochs"]
    sizes = {"mosi": 1284, "mosei": 16326, "sims": 1368, "simsv2": 2722}
    expected_gpu = sum(epochs[f] * sizes[f] * 5 / (50.0 if f == "mosei" else 100.0) for f in sizes) / 3600
    assert abs(tfn["gpu_hours"] - expected_gpu) < 1e-9
    assert "cpu_hours" not in rows["lnln"] and "gpu_hours" not in rows["lnln"]
    table = output.with_suffix(".md").read_text()
    assert "| GPU hours |" in table and f"| {tfn['cpu_hours']:.0f} | {expected_gpu:.1f} |" in table
