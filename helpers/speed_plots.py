"""Figures for notebook 08 (offload speed): seconds per token against what is offloaded, and against the bound.

Each function returns its Figure and changes no global style.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .paths import RESULTS_DIR
from .streaming import BELOW_BOUND

_COLORS = {"accelerate": "tab:red", "streamer": "tab:green", "bound": "black", "resident": "tab:blue"}


def plot_seconds_vs_fraction(fractions: Sequence[float], series: dict[str, Sequence[float]],
                             bound: Sequence[float], *, title: str = "", unit: str = "s") -> Figure:
    """Seconds per step against the fraction of decoder layers offloaded, one line per method, and the bound."""
    fig, ax = plt.subplots(figsize=(8, 4))
    scale = 1e3 if unit == "ms" else 1.0
    for label, values in series.items():
        points = [(f, v) for f, v in zip(fractions, values, strict=True) if v is not None]
        ax.plot([f for f, _ in points], [v * scale for _, v in points], "o-", label=label,
                color=_COLORS.get(label.split()[0], None))
    ax.plot(fractions, [b * scale for b in bound], "--", color="black", label="bound: max(resident, bytes / bandwidth)")
    ax.set_xlabel("fraction of decoder layers offloaded")
    ax.set_ylabel(f"{unit} per decode step")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_against_bound(rows: Sequence[tuple[str, float, float]], *, title: str = "", unit: str = "s") -> Figure:
    """Horizontal bars: each measured time, its bound as a black tick, and the ratio written beside it.

    A ratio under 1 is marked with * and the figure says why (BELOW_BOUND), so no bare ratio under 1 is shown.
    """
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    scale = 1e3 if unit == "ms" else 1.0
    labels = [r[0] for r in rows][::-1]
    values = [r[1] * scale for r in rows][::-1]
    bounds = [r[2] * scale for r in rows][::-1]
    colors = [_COLORS["accelerate"] if "accelerate" in label else _COLORS["streamer"] for label in labels]
    ax.barh(labels, values, color=colors, alpha=0.8)
    below = False
    for y, (value, bound) in enumerate(zip(values, bounds, strict=True)):
        ax.plot([bound, bound], [y - 0.4, y + 0.4], color="black", linewidth=2)
        mark = "*" if value < bound else ""
        below = below or bool(mark)
        ax.annotate(f"{value / bound:.2f}x{mark}", (value, y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    note = "\n" + textwrap.fill(f"* {BELOW_BOUND}", 100) if below else ""
    ax.set_xlabel(f"{unit} per step (black tick: the bound){note}", fontsize=9)
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


#: the other benchmarks' files in data/results/ (benchmarks/capstone_70b.py, multi_gpu_pipeline.py,
#: quantization_speed.py, int8_streaming.py)
OTHER_BENCHMARKS = ("capstone-70b-", "multi-gpu-", "quantization-", "int8-streaming-")


def offload_result_paths(folder: str | Path = RESULTS_DIR) -> list[Path]:
    """The files of data/results/ that benchmarks/offload_benchmark.py wrote (one per card)."""
    return [p for p in sorted(Path(folder).glob("*.json")) if not p.name.startswith(OTHER_BENCHMARKS)]


def committed_results(folder: str | Path = RESULTS_DIR) -> list[dict]:
    """Every offload-benchmark GPU result committed under data/results/ (benchmarks/offload_benchmark.py)."""
    return [json.loads(p.read_text()) for p in offload_result_paths(folder)]


def plot_gpu_results(results: dict) -> Figure:
    """A committed GPU run: accelerate, the streamer and the bound per placement, for decode and a long prefill."""
    placements = list(results["placements"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, step in zip(axes, ("decode", "prefill"), strict=True):
        x = range(len(placements))
        acc = [results["placements"][p]["accelerate"].get(step) for p in placements]
        stream = [results["placements"][p]["streamer"].get(step) for p in placements]
        # the bound with the disk read in it for placements with disk layers (bound_tiered), else the PCIe bound
        bound = [results["placements"][p].get("bound_tiered", results["placements"][p]["bound"])[step]
                 for p in placements]
        ax.bar([i - 0.2 for i in x], acc, width=0.4, color=_COLORS["accelerate"], label="accelerate")
        ax.bar([i + 0.2 for i in x], stream, width=0.4, color=_COLORS["streamer"], label="streamer")
        for i, b in enumerate(bound):
            ax.plot([i - 0.45, i + 0.45], [b, b], color="black", linewidth=2, label="bound" if i == 0 else None)
        ax.axhline(results["resident"][step], color=_COLORS["resident"], linestyle=":",
                   label="every weight on the GPU")
        ax.set_xticks(list(x), [p.replace("_", " ") for p in placements], fontsize=8)
        ax.set_yscale("log")
        tokens = results["model"].get("prefill_tokens", 512)
        ax.set_title(f"{step}" + (f" ({tokens} tokens)" if step == "prefill" else " (1 token, batch 1)"))
        ax.set_ylabel("seconds (log scale)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['card']}, measured {results['date']} (torch {results['versions']['torch']}, "
                 f"accelerate {results['versions']['accelerate']})", fontsize=10)
    fig.tight_layout()
    return fig
