"""Shared by the scripts that write PNG reports."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, out: Path, name: str, names: list[str]) -> None:
    """Lay out, write `out/name` (90 dpi), close the figure and record `name` in `names`
    (the report's list of plots)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    names.append(name)


def answer_lines(answer: str, pipeline_only: str | None = None) -> list[str]:
    """The lines that open every report, right under its title: the answer in one sentence,
    then, where the model cannot do the task or the mechanism is absent, the verdict that the
    numbers below are pipeline checks only (`pipeline_only` says why)."""
    lines = [f"**Answer.** {answer}", ""]
    if pipeline_only:
        lines += [f"**Verdict: pipeline check only.** {pipeline_only} The numbers below show that "
                  "the pipeline runs end to end; they say nothing about the mechanism.", ""]
    return lines
