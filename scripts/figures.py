"""Shared by the scripts that write PNG reports."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, out: Path, name: str, names: list[str]) -> None:
    """Lay out, write `out/name` (90 dpi), close the figure and record `name` in `names`
    (the report's list of plots)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    names.append(name)
