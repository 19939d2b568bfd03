"""Where results go and how they look: JSON + markdown + PNG under benchmarks/results/<device>/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path

import torch

# BENCH_RESULTS_DIR redirects output (the smoke tests use it to leave committed results alone).
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", Path(__file__).resolve().parent / "results"))


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu {line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def device_slug(device: torch.device | str) -> str:
    if torch.device(device).type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device | str) -> dict:
    env = {"device": device_name(device),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, device: torch.device | str, rows: list[dict], columns: list[str],
                  extra: dict | None = None, notes: str = "") -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under results/<device>/; returns the directory."""
    out = RESULTS / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    payload = {"device": env["device"], "environment": env, **(extra or {}), "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    header = "\n".join(f"- {k}: {v}" for k, v in {**env, **(extra or {})}.items())
    md = f"# {name}\n\n{header}\n\n{notes}\n\n{markdown_table(rows, columns)}\n"
    (out / f"{name}.md").write_text(md)
    return out


def bar_plot(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    """Grouped bars: one group per label, one bar per series. Skipped quietly without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
