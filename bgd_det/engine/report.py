"""Compression report: per-layer sizes and errors, totals, metrics side by side (markdown, json, PNG)."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from ..quantization.plan import Unquantized
from ..quantization.size import SizeReport

logger = logging.getLogger(__name__)

__all__ = ["REPORT_JSON", "format_report", "format_unquantized", "write_report"]

REPORT_JSON = "report.json"


def _layer_rows(size: SizeReport, records: Sequence) -> List[list]:
    rec = {r.name: r for r in records}
    rows = []
    for layer in size.layers:
        r = rec.get(layer.name)
        rows.append([layer.name, layer.kind, layer.block_size or "-", layer.n_centroids or "-",
                     f"{layer.dense_bytes / 1024:.1f}", f"{layer.bytes / 1024:.1f}", f"{layer.ratio:.1f}",
                     f"{r.rel_error:.4f}" if r else "-",
                     f"{r.output_error:.4f}" if r and r.output_error == r.output_error else "-"])
    return rows


def format_unquantized(unquantized: Sequence[Unquantized], limit: int = 20) -> str:
    """Markdown section listing the weights left in fp32 with their reasons ("" when there are none)."""
    if not unquantized:
        return ""
    rows = [[u.name, u.numel, u.reason] for u in unquantized[:limit]]
    more = len(unquantized) - limit
    if more > 0:
        rows.append([f"... {more} more", sum(u.numel for u in unquantized[limit:]), ""])
    return "## Weights left in fp32\n\n" + tabulate(rows, headers=["weight", "elements", "why"],
                                                    tablefmt="github") + "\n"


def format_report(size: SizeReport, records: Sequence = (), metrics: Optional[Dict[str, Dict]] = None,
                  timings: Optional[Dict[str, float]] = None, unquantized: Sequence[Unquantized] = ()) -> str:
    """Markdown report: per-layer table, then uncompressed vs compressed size/ratio/metrics, then the weights left
    in fp32 with their reasons.

    Per layer: "rel. err" is ``||W_hat - W||^2 / ||W||^2``; "out. err" the refined layer's squared output error on
    the captured rows relative to its target's energy, without the damping (QUANT.REFINE), "-" where the layer was
    not refined.
    """
    per_layer = tabulate(_layer_rows(size, records),
                         headers=["layer", "kind", "d", "K", "dense KiB", "compressed KiB", "ratio", "rel. err",
                                  "out. err"],
                         tablefmt="github")
    metrics = metrics or {}
    keys = sorted({k for m in metrics.values() for k in m if k != "n_images"})
    summary = [["uncompressed", f"{size.dense_mib:.2f}", "1.0x"] + [_fmt(metrics.get("uncompressed"), k) for k in keys],
               ["compressed", f"{size.compressed_mib:.2f}", f"{size.ratio:.1f}x"]
               + [_fmt(metrics.get("compressed"), k) for k in keys]]
    table = tabulate(summary, headers=["model", "size (MiB)", "ratio"] + keys, tablefmt="github")
    text = f"## Per-layer sizes\n\n{per_layer}\n\n## Summary\n\n{table}\n"
    if timings:
        text += "\n" + ", ".join(f"{k}: {v:.0f} MiB" if k.endswith("_mib") else f"{k}: {v:.1f}s"
                                  for k, v in timings.items()) + "\n"
    if unquantized:
        text += "\n" + format_unquantized(unquantized)
    return text


def _fmt(m: Optional[Dict], key: str) -> str:
    return f"{m[key]:.2f}" if m and key in m else "-"


def write_report(output_dir: str, size: SizeReport, records: Sequence = (),
                 metrics: Optional[Dict[str, Dict]] = None, timings: Optional[Dict[str, float]] = None,
                 unquantized: Sequence[Unquantized] = ()) -> str:
    """Write ``report.md``, :data:`REPORT_JSON` and ``layer_sizes.png`` to ``output_dir``; returns the markdown."""
    text = format_report(size, records, metrics, timings, unquantized)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(text)
    data = {"compressed_mib": size.compressed_mib, "dense_mib": size.dense_mib, "ratio": size.ratio,
            "metrics": metrics or {}, "timings": timings or {},
            "layers": [vars(layer) for layer in size.layers],
            "records": [vars(r) for r in records], "unquantized": [vars(u) for u in unquantized]}
    with open(os.path.join(output_dir, REPORT_JSON), "w") as f:
        json.dump(data, f, indent=1)
    _plot(size, os.path.join(output_dir, "layer_sizes.png"))
    return text


def _plot(size: SizeReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [layer for layer in size.layers if layer.kind == "pq" or layer.dense_bytes > 64 * 1024]
    names = [layer.name for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [layer.dense_bytes / 1024 for layer in layers], 0.4, label="dense fp32")
    ax.bar([i + 0.2 for i in x], [layer.bytes / 1024 for layer in layers], 0.4, label="compressed")
    ax.set_yscale("log")
    ax.set_ylabel("KiB")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_title(f"{size.dense_mib:.2f} MiB -> {size.compressed_mib:.2f} MiB ({size.ratio:.1f}x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
