"""Benchmark records: timings turned into throughput, memory, FLOP and speed-up figures; table and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.timing import Timing, paired_speedup

MB = 2**20
GIGA = 1e9


def record(
    key: str,
    title: str,
    unit: str,
    items: int,
    timings: dict[str, Timing],
    *,
    flops: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One benchmark: per-variant medians, ``items`` per second, peak memory and FLOPs.

    ``items`` is what one call processes (images or tokens). With two variants the first is the
    fast one and ``speedup`` is the paired ratio of the second's time to the first's.
    """
    variants: dict[str, dict[str, Any]] = {}
    for name, timing in timings.items():
        figures = {"median_s": timing.median, "per_s": items / timing.median, "seconds": timing.seconds,
                   "peak_mb": timing.peak_bytes / MB}
        if flops is not None:
            figures["gflop_per_item"] = flops[name] / items / GIGA
            figures["gflop_per_s"] = flops[name] / timing.median / GIGA
        variants[name] = figures
    result: dict[str, Any] = {"key": key, "title": title, "unit": unit, "items": items, "variants": variants}
    if len(timings) == 2:
        fast, slow = timings
        result["speedup"] = paired_speedup(timings[fast], timings[slow])
        result["speedup_of"] = f"{fast} over {slow}"
    return result | (extra or {})


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table: one row per variant, the speed-up on the fast variant's row."""
    header = ("benchmark", "variant", "throughput", "median s", "peak MB", "GFLOP/item", "GFLOP/s", "speed-up")
    rows = [header]
    for result in results:
        for i, (name, v) in enumerate(result["variants"].items()):
            speedup = result.get("speedup") if i == 0 else None
            rows.append((
                result["title"] if i == 0 else "",
                name,
                f"{v['per_s']:.1f} {result['unit']}",
                _number(v["median_s"], 3),
                _number(v["peak_mb"], 0),
                _number(v.get("gflop_per_item"), 2),
                _number(v.get("gflop_per_s"), 1),
                "" if speedup is None else f"{speedup:.2f}x",
            ))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_targets(targets: list[dict[str, Any]]) -> str:
    lines = []
    for target in targets:
        verdict = "met" if target["met"] else "MISSED"
        if not target["at_target_size"]:
            verdict += " (smaller than the target setting)"
        lines.append(f"target: {target['name']}: {target['value']:.2f}x (need >= {target['need']}x) -> {verdict}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def print_and_save(report: dict[str, Any], notes: list[str], out: Path | None) -> None:
    """Print a report's table, targets and ``notes``; write it as JSON to ``out`` when given."""
    print(format_table(report["results"]))
    print(format_targets(report["targets"]))
    for note in notes:
        print(f"note: {note}")
    if out is not None:
        write_json(report, out)
        print(f"wrote {out}")
