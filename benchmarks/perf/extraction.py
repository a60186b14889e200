"""Feature extraction speed on this machine, per extractor, and predict latency with a warm model.

    python benchmarks/perf/extraction.py --video ../shared/data/media/mosi_Oz06ZWiO20M_6.mp4

Needs the extract extra (`pip install -e '.[extract]'`). Measures, on one video:

1. each extractor of the default configuration (speech recognition on, as `msakit predict` runs it
   without --text) and of the optional settings (expression probabilities when the `fer` model is
   installed, librosa when it is), in one process with one thread, models already loaded: seconds
   of extraction per second of video, median of `--repeats` runs;
2. `msakit extract` on `--copies` copies of the clip with one worker process per CPU core, from a
   cold start (worker start-up and model loading included), in seconds per second of video;
3. `Predictor.predict` on the clip with a warm model (a TFN trained for one epoch on those copies):
   median latency from file to score, with and without a given transcript.

Writes benchmarks/results/perf/extraction.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from msakit import __version__, api
from msakit.features import FeaturePipeline, build_dataset, load_feature_config
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.inference import Predictor

RESULTS = Path(__file__).resolve().parents[1] / "results" / "perf"


def per_extractor(video: Path, overrides: list[str], repeats: int) -> dict[str, Any]:
    pipeline = FeaturePipeline(load_feature_config(overrides=overrides))
    pipeline.extract(video)  # loads every model once
    runs = [pipeline.extract(video) for _ in range(repeats)]
    duration = runs[0]["duration"]
    seconds = {name: statistics.median(r["seconds"][name] for r in runs) for name in runs[0]["seconds"]}
    return {"settings": overrides or ["default"], "video_seconds": duration,
            "seconds": seconds, "total": sum(seconds.values()),
            "per_video_second": {k: v / duration for k, v in seconds.items()},
            "total_per_video_second": sum(seconds.values()) / duration}


def dataset_build(video: Path, copies: int, workers: int, folder: Path) -> dict[str, Any]:
    clips = folder / "clips"
    clips.mkdir()
    lines = ["id,label,mode"]
    for i in range(copies):
        shutil.copy(video, clips / f"c{i}{video.suffix}")
        lines.append(f"c{i},{(i % 7) - 3},{('train', 'train', 'valid', 'test')[i % 4]}")
    (folder / "label.csv").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    report = build_dataset(clips, folder / "label.csv", folder / "ds.pkl", load_feature_config(),
                           workers=workers, progress=False)
    wall = time.perf_counter() - start
    return {"clips": copies, "workers": workers, "wall_seconds": wall,
            "video_seconds": report["media_seconds"], "per_video_second": wall / report["media_seconds"],
            "failed": report["failed"]}


def predict_latency(video: Path, folder: Path, repeats: int) -> dict[str, Any]:
    api.train("tfn", str(folder / "ds.pkl"), epochs=1, output=folder / "run", progress=False)
    start = time.perf_counter()
    predictor = Predictor(folder / "run" / "seed-1111.pt")
    load = time.perf_counter() - start
    out = {"model": "tfn", "load_seconds": load}
    for label, text in (("asr", None), ("given_text", "a really ambitious weird failure")):
        predictor.predict(video, text)  # warm-up: loads Whisper / MiniLM on first use
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.predict(video, text)
            times.append(time.perf_counter() - start)
        out[label] = {"median_seconds": statistics.median(times), "min_seconds": min(times)}
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(result: dict[str, Any]) -> str:
    video = result["per_extractor"][0]["video_seconds"]
    machine = result["machine"]
    lines = [f"# Feature extraction speed ({machine['cpus']} CPU cores, {machine['cpu']})",
             "", f"Command: `{result['command']}`", "",
             f"One {video:.1f} s MOSI clip (480x360, 30 fps). Seconds of extraction per second of video "
             f"(below 1 is faster than real time); one process, one thread, models loaded, median of "
             f"{result['repeats']} runs.", "",
             "| settings | " + " | ".join(result["per_extractor"][0]["seconds"]) + " | total |",
             "|---" * (len(result["per_extractor"][0]["seconds"]) + 2) + "|"]
    for row in result["per_extractor"]:
        cells = " | ".join(f"{v:.3f}" for v in row["per_video_second"].values())
        lines.append(f"| {', '.join(row['settings'])} | {cells} | {row['total_per_video_second']:.3f} |")
    build = result["dataset_build"]
    lines += ["", f"`msakit extract` of {build['clips']} copies ({build['video_seconds']:.0f} s of video) "
              f"with {build['workers']} worker processes, transcripts by speech recognition, cold start "
              f"included: {build['wall_seconds']:.1f} s wall, {build['per_video_second']:.3f} s per second "
              "of video.", ""]
    latency = result["predict"]
    lines += [f"`msakit predict` on the clip with a warm {latency['model']} model (checkpoint and "
              f"extractors built in {latency['load_seconds']:.1f} s; Whisper and MiniLM load on a first, "
              f"untimed call): {latency['asr']['median_seconds']:.2f} s with speech recognition, "
              f"{latency['given_text']['median_seconds']:.2f} s with a given transcript (median, file "
              "to score).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=Path("../shared/data/media/mosi_Oz06ZWiO20M_6.mp4"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = [["transcript.source=asr"]]
    if importlib.util.find_spec("fer"):
        settings.append(["transcript.source=asr", "visual.expression=true"])
    if importlib.util.find_spec("librosa"):
        settings.append(["transcript.source=asr", "acoustic.backend=librosa"])
    rows = [per_extractor(args.video, s, args.repeats) for s in settings]
    with tempfile.TemporaryDirectory() as tmp:
        build = dataset_build(args.video, args.copies, args.workers, Path(tmp))
        latency = predict_latency(args.video, Path(tmp), args.repeats)
    result = {
        "command": shlex.join(["python", "benchmarks/perf/extraction.py", *sys.argv[1:]]),
        "msakit_version": __version__,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_name(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "repeats": args.repeats, "per_extractor": rows, "dataset_build": build, "predict": latency,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "extraction.json", result)
    atomic_write_text(RESULTS / "extraction.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
