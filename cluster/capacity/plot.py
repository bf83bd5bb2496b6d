"""The plan's two charts (matplotlib, Agg: no display needed), each saved as PNG and SVG:
p95 time per note against fleet size, and cost per day against volume, fleet and API."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(
            path, dpi=120, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None
        )
        paths.append(path)
    plt.close(fig)
    return paths


def p95_vs_fleet(
    series: dict[str, Sequence[tuple[int, float]]],
    sla_s: float,
    bounds: dict[str, float],
    out_dir: Path,
    title: str,
    stem: str = "capacity-p95",
) -> list[Path]:
    """series: profile -> [(nodes, p95 seconds)] (inf = notes refused); bounds: profile -> single-note p95 bound."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    top = sla_s * 2
    for name, points in series.items():
        pts = sorted(points)
        xs = [n for n, _ in pts]
        ys = [v for _, v in pts]
        finite = [v for v in ys if math.isfinite(v)]
        top = max([top] + finite)
        (line,) = ax.plot(
            xs, [v if math.isfinite(v) else float("nan") for v in ys], marker="o", label=name
        )
        refused = [n for n, v in pts if not math.isfinite(v)]
        if refused:
            ax.plot(
                refused, [top] * len(refused), marker="x", linestyle="none", color=line.get_color()
            )
        if name in bounds and math.isfinite(bounds[name]):
            ax.axhline(
                bounds[name],
                color=line.get_color(),
                linestyle=":",
                linewidth=1,
                label=f"{name}: single-note bound (p95 note)",
            )
    ax.axhline(sla_s, color="black", linestyle="--", linewidth=1, label=f"target p95 {sla_s:g} s")
    ax.set_xlabel("nodes in the fleet")
    ax.set_ylabel("p95 time per note (s)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, stem)


def cost_vs_volume(
    volumes: Sequence[float],
    api_usd_day: Sequence[float],
    fleets: dict[str, Sequence[float]],
    out_dir: Path,
    title: str,
    marks: dict[str, tuple[float, float]] | None = None,
    stem: str = "capacity-cost",
) -> list[Path]:
    """fleets: label -> $/day at each volume; marks: label -> (notes/day, $/day) reference points."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(volumes, api_usd_day, label="hosted API", color="black")
    for label, costs in fleets.items():
        ax.step(volumes, costs, where="pre", marker=".", label=label)  # sized at each volume
    for label, (x, y) in (marks or {}).items():
        ax.plot([x], [y], marker="D", linestyle="none", label=label)
    ax.set_xlabel("notes per day")
    ax.set_ylabel("$ per day")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, stem)
