"""The matplotlib figures the notebooks show. Each returns its Figure; none changes global style."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .measure import MemoryTrace
from .memory import BYTES_PER_PARAM, COMMON_GPUS, GB, GPU, MiB, kv_cache_bytes, weights_bytes

_SERIES = {  # name -> (attribute of MemoryTrace, label, colour, line style)
    "anon": ("anon", "anonymous (private copies)", "tab:red", "-"),
    "file": ("file", "file-backed (mapped pages)", "tab:blue", "--"),
    "data": ("data", "reserved private memory (what RLIMIT_DATA counts)", "tab:purple", "-."),
    "cuda": ("cuda", "CUDA allocated", "tab:green", "-"),
}


def plot_memory_timeline(trace: MemoryTrace, *, title: str = "", reference_bytes: dict[str, float] | None = None,
                         series: tuple[str, ...] | None = None, baseline: str = "start", ax=None) -> Figure:
    """Memory over time, relative to the trace's first sample, with the phase marks as vertical lines.

    `series` picks the curves from "anon", "file", "data" and "cuda" (default: anon, file, and cuda
    when any was used). `reference_bytes` draws horizontal lines such as {"2 x model": 2 * n}.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 4))
    else:
        fig = ax.figure
    if series is None:
        series = ("anon", "file", "cuda") if any(trace.cuda) else ("anon", "file")
    for name in series:
        attribute, label, color, style = _SERIES[name]
        values = getattr(trace, attribute)
        start = 0 if name == "cuda" else values[0]
        ax.plot(trace.t, [(v - start) / MiB for v in values], label=label, color=color, linestyle=style)
    for i, (name, value) in enumerate((reference_bytes or {}).items()):  # labels alternate left and right
        ax.axhline(value / MiB, color="gray", linestyle=":", linewidth=1)
        ax.annotate(name, (0.01 if i % 2 == 0 else 0.99, value / MiB), xycoords=("axes fraction", "data"),
                    xytext=(0, 2), textcoords="offset points", color="gray", fontsize=8,
                    ha="left" if i % 2 == 0 else "right")
    marks = [(t, label) for t, label in trace.marks if label != baseline]
    merged: list[tuple[float, str]] = []
    for t, label in marks:  # marks closer than 3% of the time axis share one line and one label
        if merged and t - merged[-1][0] < 0.03 * max(trace.duration, 1e-9):
            merged[-1] = (merged[-1][0], merged[-1][1] + " / " + label)
        else:
            merged.append((t, label))
    top = ax.get_ylim()[1]
    for t, label in merged:
        ax.axvline(t, color="black", alpha=0.25, linewidth=1)
        ax.annotate(label, (t, top), xytext=(2, -4), textcoords="offset points", rotation=90, va="top",
                    fontsize=7, alpha=0.8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB above the start")
    ax.set_title(title)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _gpu_lines(ax: Axes, gpus: tuple[GPU, ...]) -> None:
    """Dotted horizontal lines at each GPU's memory (decimal GB), one label per distinct size."""
    sizes: dict[float, list[str]] = {}
    for gpu in gpus:
        sizes.setdefault(gpu.memory_gb, []).append(gpu.name)
    for gb, names in sizes.items():
        ax.axhline(gb, color="gray", linestyle=":", linewidth=1)
        ax.annotate(" / ".join(names), (1.0, gb), xycoords=("axes fraction", "data"), xytext=(4, 0),
                    textcoords="offset points", ha="left", va="center", color="dimgray", fontsize=8)


def plot_model_sizes(n_params: dict[str, int], gpus: tuple[GPU, ...] = COMMON_GPUS,
                     dtypes: tuple[str, ...] = tuple(BYTES_PER_PARAM), ax: Axes | None = None) -> Figure:
    """Weights of each model in each dtype (bars, decimal GB, log scale) against the memory of common GPUs."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 4.5))
    else:
        fig = ax.figure
    width = 0.8 / len(dtypes)
    for j, dtype in enumerate(dtypes):
        xs = [i + (j - (len(dtypes) - 1) / 2) * width for i in range(len(n_params))]
        gbs = [weights_bytes(n, dtype) / GB for n in n_params.values()]
        bars = ax.bar(xs, gbs, width, label=dtype)
        ax.bar_label(bars, labels=[f"{g:.0f}" if g >= 10 else f"{g:.1f}" for g in gbs], fontsize=7, padding=1)
    _gpu_lines(ax, gpus)
    ax.set_yscale("log")
    ax.set_xticks(range(len(n_params)), list(n_params))
    ax.set_ylabel("weights, GB (10^9 bytes, log scale)")
    ax.set_title("Weights only, per dtype, against the memory on the box")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_kv_cache(config, seq_lens: list[int], batch_sizes: list[int], dtype: str = "float16",
                  budgets: dict[str, float] | None = None, ax: Axes | None = None) -> Figure:
    """KV cache (GB, log-log) against context per batch size: grouped-query (solid) vs multi-head (dashed)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
    else:
        fig = ax.figure
    mha = copy.deepcopy(config)  # the same model with one K and V per query head
    mha.num_key_value_heads = config.num_attention_heads
    for k, batch in enumerate(batch_sizes):
        color = f"C{k}"
        ax.plot(seq_lens, [kv_cache_bytes(config, batch, t, dtype) / GB for t in seq_lens], color=color,
                marker="o", label=f"batch {batch}, {config.num_key_value_heads} KV heads (GQA)")
        ax.plot(seq_lens, [kv_cache_bytes(mha, batch, t, dtype) / GB for t in seq_lens], color=color,
                linestyle="--", linewidth=2.5, alpha=0.6,
                label=f"batch {batch}, {config.num_attention_heads} KV heads (MHA)")
    for name, value in (budgets or {}).items():
        ax.axhline(value / GB, color="gray", linestyle=":", linewidth=1)
        ax.annotate(name, (seq_lens[0], value / GB), xytext=(2, 2), textcoords="offset points", color="dimgray",
                    fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(seq_lens, [f"{t:,}" for t in seq_lens])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache, GB ({dtype}, log scale)")
    ax.set_title("KV cache grows with batch x tokens; grouped-query attention divides it")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


# --- what accelerate's hooks did during a forward pass (notebook 06) ------------------------------

_SPAN_COLOURS = {"compute": "tab:blue", "load": "tab:orange", "free": "tab:red"}


def _short(name: str) -> str:
    return name.removeprefix("model.") or "<model>"


def _memory_points(events, memory: str) -> tuple[list[float], list[float]]:
    """(ms, MiB) at the start and end of every hook call: host or CUDA memory above the first call's start."""
    base = events[0].host_before if memory == "host" else events[0].cuda_before
    ts, values = [], []
    for e in events:
        before, after = (e.host_before, e.host_after) if memory == "host" else (e.cuda_before, e.cuda_after)
        ts += [e.start * 1e3, e.end * 1e3]
        values += [(before - base) / MiB, (after - base) / MiB]
    return ts, values


def plot_hook_timeline(trace, *, memory: str = "host", block: str | None = None, title: str = "",
                       reference_bytes: dict[str, float] | None = None) -> Figure:
    """One forward pass as the hooks saw it: a row per device-map block (or, with `block`, per module inside it)
    showing when weights were loaded, computed with and freed, above memory on the same time axis.

    `memory` is "host" (anonymous host memory) or "cuda" (torch.cuda.memory_allocated), both relative to the
    first hook call shown.
    `reference_bytes` draws labelled horizontal lines on the memory panel, in the plotted quantity's bytes.
    """
    events = [e for e in trace.events if block is None or trace.block_of(e.module) == block]
    rows: list[tuple[str, list[tuple[str, float, float]]]] = []  # label -> [(kind, start, end)]
    if block is None:
        for row in trace.summary():
            spans = [("compute", row.start, row.end)]
            spans += [(e.kind, e.start, e.end) for e in events
                      if trace.block_of(e.module) == row.block and e.kind != "align"]
            rows.append((f"{_short(row.block)} ({row.placed})", spans))
    else:
        pending: dict[str, object] = {}
        by_module: dict[str, list[tuple[str, float, float]]] = {}
        for e in events:
            if not e.weight_bytes or e.module == block:
                continue
            if e.phase == "pre_forward":
                pending[e.module] = e
                continue
            pre = pending.pop(e.module)
            spans = by_module.setdefault(e.module, [])
            spans.append(("compute", pre.end, e.start))
            spans += [(x.kind, x.start, x.end) for x in (pre, e) if x.kind != "align"]
        whole = [e for e in events if e.module == block] or events
        rows = [(f"{_short(block)} (whole block)", [("compute", whole[0].start, whole[-1].end)])]
        rows += [(name.removeprefix(block + "."), spans) for name, spans in by_module.items()]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 0.8 + 0.25 * len(rows) + 2.4), sharex=True,
                                      gridspec_kw={"height_ratios": [0.25 * len(rows) + 0.6, 2.0]})
    for y, (_, spans) in enumerate(rows):
        for kind, start, end in spans:
            alpha = 0.35 if kind == "compute" else 1.0
            width = max((end - start) * 1e3, 1e-3)
            top.barh(y, width, left=start * 1e3, height=0.7, color=_SPAN_COLOURS[kind], alpha=alpha, linewidth=0)
    top.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    top.invert_yaxis()
    top.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.35 if k == "compute" else 1.0)
               for k, c in _SPAN_COLOURS.items()]
    labels = ["forward (compute)", "pre_forward: load weights", "post_forward: free weights"]
    top.legend(handles, labels, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.suptitle(title or ("One forward pass, hook by hook" if block is None else f"Inside {block}"))

    ts, values = _memory_points(events, memory)
    bottom.plot(ts, values, color="tab:green" if memory == "cuda" else "tab:red", linewidth=1)
    for name, value in (reference_bytes or {}).items():
        bottom.axhline(value / MiB, color="gray", linestyle=":", linewidth=1)
        bottom.annotate(name, (0.99, value / MiB), xycoords=("axes fraction", "data"), xytext=(0, 2),
                        textcoords="offset points", ha="right", color="dimgray", fontsize=8)
    top_value = max([*values, *((v / MiB) for v in (reference_bytes or {}).values())])
    bottom.set_ylim(min(0, min(values)), top_value * 1.15 + 0.1)
    bottom.set_ylabel(("CUDA allocated" if memory == "cuda" else "host memory (anonymous)") + ",\nMiB above the start",
                      fontsize=8)
    bottom.set_xlabel("ms since the trace began")
    bottom.grid(alpha=0.3)
    if block is not None:
        bottom.set_xlim(events[0].start * 1e3, events[-1].end * 1e3)
    fig.tight_layout()
    return fig
