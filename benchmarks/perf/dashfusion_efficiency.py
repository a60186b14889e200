"""DashFusion's efficiency claims, measured: hierarchical bottleneck fusion against concatenation +
self-attention, and the cost of building the neighbour index at MOSEI size.

    OMP_NUM_THREADS=1 python benchmarks/perf/dashfusion_efficiency.py

1. Fusion. The paper says its hierarchical bottleneck fusion (HBF) needs about 145M multiply-adds
   where concatenating the three sequences and running self-attention over them needs about 324M.
   Here both are msakit modules at the published widths (d = 128, 8 heads, FFN 256) on one sample
   of MOSI size (text 50 tokens as in MMSA's `text_bert`, audio 375 + CLS, vision 500 + CLS; MOSEI:
   audio and vision 500 + CLS, depth 3). The baseline concatenates aligned text, audio and vision
   and runs `depth` self-attention blocks of the same kind as HBF's own, reading the first token.
   Multiply-adds are `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2, counted with attention
   on its math kernel (the counter does not see the fused CPU kernel); matrix products and
   attention are counted, element-wise work is not. Parameters are the fusion modules' own; CPU
   milliseconds are one forward pass with the default kernels.
2. Neighbour index. `label_neighbours` over N training samples (384-d pooled features, labels
   uniform in [-3, 3]): wall time and the growth of the process's peak RSS, against the 4 N^2 bytes
   that a dense similarity matrix alone would need (the official code also keeps an N x N rank
   matrix and loops over N^2 pairs in Python).

Writes benchmarks/results/perf/dashfusion_efficiency.json and .md.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.models.dashfusion import DashFusionConfig, HierarchicalBottleneckFusion, NormedResidualBlock
from msakit.models.layers.neighbours import label_buckets, label_neighbours

SHAPES = {  # dataset -> (text tokens, audio frames, vision frames, fusion depth)
    "MOSI": (50, 375, 500, 2),
    "MOSEI": (50, 500, 500, 3),
}
MOSEI_TRAIN, MOSI_TRAIN = 16326, 1284


class ConcatSelfAttention(nn.Module):
    """The baseline: [aligned text; audio; vision] through `depth` self-attention blocks."""

    def __init__(self, config: DashFusionConfig, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            NormedResidualBlock(config.hidden, config.heads, config.fusion_ffn, config.fusion_dropout)
            for _ in range(depth)
        )

    def forward(self, aligned: torch.Tensor, states: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        x = torch.cat([aligned, states["audio"][0], states["vision"][0]], dim=1)
        for block in self.blocks:
            x = block(x)
        return x[:, 0]


def count(module: nn.Module, *inputs) -> dict:
    with torch.no_grad():
        module(*inputs)  # warm-up
        # the fused CPU attention kernel is invisible to the counter; its math version is not
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            module(*inputs)
        started = time.perf_counter()
        for _ in range(5):
            module(*inputs)
        ms = (time.perf_counter() - started) / 5 * 1000
    return {
        "params": sum(p.numel() for p in module.parameters()),
        "madds": counter.get_total_flops() // 2,
        "cpu_ms": round(ms, 2),
    }


def fusion_rows() -> list[dict]:
    rows = []
    for dataset, (text_len, audio_len, vision_len, depth) in SHAPES.items():
        config = DashFusionConfig(text_source="features", fusion_depth=depth)
        torch.manual_seed(0)
        d = config.hidden
        aligned, text = torch.randn(1, text_len, d), torch.randn(1, text_len, d)
        states = {
            "text": (text, torch.ones(1, text_len, dtype=torch.bool)),
            "audio": (torch.randn(1, audio_len + 1, d), torch.ones(1, audio_len + 1, dtype=torch.bool)),
            "vision": (torch.randn(1, vision_len + 1, d), torch.ones(1, vision_len + 1, dtype=torch.bool)),
        }
        shape = f"text {text_len}, audio {audio_len}+1, vision {vision_len}+1"
        hbf = HierarchicalBottleneckFusion(config).eval()
        name = f"HBF, depth {depth} ({' -> '.join(map(str, hbf.sizes))} tokens)"
        rows.append({"dataset": dataset, "shape": shape, "fusion": name,
                     **count(hbf, aligned, states["text"][1], states)})
        for layers in sorted({depth, 1}):
            baseline = ConcatSelfAttention(config, layers).eval()
            rows.append({"dataset": dataset, "shape": shape,
                         "fusion": f"concatenation + self-attention, {layers} layer(s)",
                         **count(baseline, aligned, states)})
    return rows


def fixed_mmap_threshold() -> bool:
    """Make glibc return every freed block of 64 KiB or more to the system at once.

    By default glibc raises its mmap threshold after large frees and keeps later blocks on its heap,
    so the process's peak RSS reports memory that was freed long ago; with the threshold fixed,
    the growth of the peak RSS is the search's real working set. False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, 64 * 1024))  # -3 = M_MMAP_THRESHOLD


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def index_row(n: int, dim: int = 384, k: int = 10, block: int = 1024) -> dict:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, dim, generator=generator)
    buckets = label_buckets(torch.rand(n, generator=generator) * 6 - 3)
    before = peak_rss_mb()
    started = time.perf_counter()
    index = label_neighbours(features, buckets, k, block_size=block)
    seconds = time.perf_counter() - started
    assert len(index) == n
    return {
        "samples": n, "feature_dim": dim, "k": k, "block": block, "seconds": round(seconds, 2),
        "peak_rss_growth_mb": round(peak_rss_mb() - before, 1),
        "dense_matrix_mb": round(4 * n * n / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/perf")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/perf/dashfusion_efficiency.py", *sys.argv[1:]])
    # the index first: peak RSS only grows, so its growth must be read before anything larger runs;
    # a small search first loads the kernels' code, which would count as growth otherwise
    fixed = fixed_mmap_threshold()
    index_row(1000)
    index = [index_row(MOSI_TRAIN), *(index_row(MOSEI_TRAIN, block=b) for b in (256, 1024, 4096))]
    fusion = fusion_rows()
    result = {
        "command": command,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   f"torch {torch.__version__}",
        "fusion": fusion,
        "neighbour_index": index,
        "fixed_mmap_threshold": fixed,
    }
    lines = [
        "# DashFusion efficiency", "",
        f"Command: `OMP_NUM_THREADS=1 {command}` ({result['machine']})", "",
        "## Fusion, one sample (multiply-adds from torch.utils.flop_counter: FLOPs / 2)", "",
        "| dataset | inputs | fusion | parameters | multiply-adds | CPU ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in fusion:
        lines.append(f"| {row['dataset']} | {row['shape']} | {row['fusion']} | {row['params'] / 1e6:.3f}M"
                     f" | {row['madds'] / 1e6:.1f}M | {row['cpu_ms']:.1f} |")
    lines += [
        "", "## Neighbour index (label_neighbours, 384-d features, k = 10)", "",
        "| training samples | block rows | seconds | peak RSS growth MB | a dense N x N float32 matrix "
        "alone, MB |",
        "|---|---|---|---|---|",
    ]
    for row in index:
        lines.append(f"| {row['samples']} | {row['block']} | {row['seconds']:.2f} | "
                     f"{row['peak_rss_growth_mb']:.1f} | {row['dense_matrix_mb']:.1f} |")
    if not fixed:
        lines += ["", "glibc's mmap threshold could not be fixed: RSS growth includes freed memory."]
    out = Path(args.output)
    atomic_write_json(out / "dashfusion_efficiency.json", result)
    atomic_write_text(out / "dashfusion_efficiency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
