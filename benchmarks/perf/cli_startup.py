"""How long the `msakit` command takes to start: wall time of `msakit --help`, `msakit models` and
`msakit datasets` as subprocesses, with `python -c pass` and `python -c "import torch"` for reference.

    python benchmarks/perf/cli_startup.py                                     # this checkout
    PYTHONPATH=/tmp/before/src python benchmarks/perf/cli_startup.py --label before   # an older one

Each command runs once unmeasured (to write its bytecode caches), then `--runs` times, the commands
interleaved so that other load on the machine falls on all of them alike; a row is the median, min
and max wall time. Rows are kept per label in benchmarks/results/perf/cli_startup.{json,md}, so the
table shows before and after. The parent process imports nothing heavy of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from msakit.fileio import atomic_write_json, atomic_write_text

OUTPUT = Path("benchmarks/results/perf/cli_startup")


def _msakit() -> list[str]:
    """The installed `msakit` script beside this Python, else the module it runs."""
    script = Path(sys.executable).parent / "msakit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "msakit.cli"]


def commands() -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "msakit --help": [*_msakit(), "--help"],
        "msakit models": [*_msakit(), "models"],
        "msakit datasets": [*_msakit(), "datasets"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }


def machine() -> str:
    """CPU model and core count, and Python's version: what start-up time depends on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(runs: int) -> list[dict]:
    todo = commands()
    for argv in todo.values():
        wall_time(argv)
    seconds: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(runs):
        for name, argv in todo.items():
            seconds[name].append(wall_time(argv))
    return [{"command": name, "argv": todo[name], "median_s": statistics.median(times),
             "min_s": min(times), "max_s": max(times), "runs": times} for name, times in seconds.items()]


def msakit_source() -> str:
    """Which checkout the subprocesses import (PYTHONPATH may point at an older one)."""
    probe = subprocess.run([sys.executable, "-c", "import msakit; print(msakit.__file__)"],
                           check=True, capture_output=True, text=True)
    return str(Path(probe.stdout.strip()).parent)


def this_command() -> str:
    """The command line that made these rows, with the PYTHONPATH that chose the checkout."""
    command = shlex.join(["python", "benchmarks/perf/cli_startup.py", *sys.argv[1:]])
    path = os.environ.get("PYTHONPATH")
    return f"PYTHONPATH={shlex.quote(path)} {command}" if path else command


def table(results: list[dict]) -> str:
    lines = ["| label | command | median s | min s | max s | runs |", "|---|---|---:|---:|---:|---:|"]
    for result in results:
        for row in result["rows"]:
            lines.append(f"| {result['label']} | `{row['command']}` | {row['median_s']:.3f} | "
                         f"{row['min_s']:.3f} | {row['max_s']:.3f} | {len(row['runs'])} |")
    commands_run = "; ".join(f"{r['label']}: `{r['command']}` on {r['machine']}, load average "
                             f"{r['load_average']}" for r in results)
    return "\n".join(lines) + f"\n\nSubprocess wall time. {commands_run}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="measured runs of each command")
    parser.add_argument("--label", default="after", help="this row set's name (before, after, ...)")
    parser.add_argument("--output", default=str(OUTPUT), help="writes OUTPUT.json and OUTPUT.md")
    args = parser.parse_args()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = measure(args.runs)
    result = {"label": args.label, "machine": machine(), "load_average": load,
              "msakit": msakit_source(), "rows": rows,
              "command": this_command()}
    json_path, md_path = Path(f"{args.output}.json"), Path(f"{args.output}.md")
    kept = json.loads(json_path.read_text())["results"] if json_path.is_file() else []
    results = [r for r in kept if r["label"] != args.label] + [result]
    atomic_write_json(json_path, {"results": results})
    text = table(results)
    atomic_write_text(md_path, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
