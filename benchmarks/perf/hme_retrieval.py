"""Cost of HME's cross-sample retrieval over a memory bank of MOSEI size (16,326 training samples).

    OMP_NUM_THREADS=1 python benchmarks/perf/hme_retrieval.py

For one training batch (256 queries, d = 192, the published width) and one modality: `retrieve`
(blocked cosine search, `models/layers/neighbours.py`) against the whole bank, for top-32 and for
"every candidate above the threshold" (k = null), at two block sizes; the official in-batch rule
(256 x 256) for scale. A training step retrieves for 3 modalities; evaluation the same per batch.
Also the bank's size in a checkpoint (H for 3 modalities in float32, presence, id hashes).

Writes benchmarks/results/perf/hme_retrieval.json and .md.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.models.hme import id_hashes, retrieve

BANK, BATCH, DIM, THRESHOLD = 16326, 256, 192, 0.6


def timed(fn, repeats: int) -> float:
    """Median wall milliseconds of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/perf/hme_retrieval")
    args = parser.parse_args()
    torch.manual_seed(0)
    bank = torch.randn(BANK, DIM)
    bank_ids = id_hashes([f"train-{i}" for i in range(BANK)])
    bank_present = torch.rand(BANK) > 0.3
    queries = torch.randn(BATCH, DIM)
    query_ids = bank_ids[:BATCH]  # training queries: each is in the bank and must skip itself
    query_present = torch.ones(BATCH, dtype=torch.bool)
    rows = []
    for k in (32, None):
        for block in (256, 1024):
            ms = timed(lambda k=k, block=block: retrieve(
                queries, query_ids, query_present, bank, bank_ids, bank_present, THRESHOLD, k, block
            ), args.repeats)
            rows.append({"source": f"bank ({BANK})", "k": k, "block": block, "ms_per_modality": round(ms, 2)})
    ms = timed(lambda: retrieve(queries, query_ids, query_present, queries, query_ids, query_present,
                                THRESHOLD, None), args.repeats)
    rows.append({"source": f"in-batch ({BATCH})", "k": None, "block": 1024, "ms_per_modality": round(ms, 2)})
    bank_mb = BANK * (3 * DIM * 4 + 3 + 8) / 2**20
    result = {
        "command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "batch": BATCH, "dim": DIM, "bank": BANK, "threshold": THRESHOLD,
        "bank_checkpoint_mb": round(bank_mb, 1),
        "rows": rows,
    }
    lines = [
        "# HME retrieval cost (one modality, one batch of 256 queries, d = 192)",
        "",
        f"Command: `{result['command']}`; {result['machine']}. Median of {args.repeats} runs.",
        f"The bank of {BANK} samples adds {result['bank_checkpoint_mb']} MB to a checkpoint.",
        "",
        "| source | k | block | ms per modality |",
        "|---|---|---|---|",
        *(f"| {r['source']} | {r['k'] if r['k'] is not None else 'all >= 0.6'} | {r['block']} | "
          f"{r['ms_per_modality']} |" for r in rows),
        "",
    ]
    out = Path(args.output)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
