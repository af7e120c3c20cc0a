"""Printing a results table and appending it to benchmarks/RESULTS.md (date, card, commit)."""
from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def git_commit() -> str:
    """HEAD's short hash (+dirty); ROLLOUT_COMMIT overrides it (the GPU machine's copy of the tree has no .git)."""
    import os

    if os.environ.get("ROLLOUT_COMMIT"):
        return os.environ["ROLLOUT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    import os
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, device: str, table: str, notes: str = "", path: Path = RESULTS) -> None:
    """Append one dated section; creates the file with a header if missing."""
    if not path.exists():
        path.write_text("# Benchmark results\n\nEach section: date, card, commit, the figures and the baseline "
                        "measured in the same run. Newest last.\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {title}\n\n{stamp} · {card_name(device)} · commit `{git_commit()}`\n\n{table}\n"
    if notes:
        section += f"\n{notes.strip()}\n"
    with path.open("a") as f:
        f.write(section)
