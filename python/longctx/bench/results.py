"""Benchmark results: bench/results/<gpu>/<name>.json and a markdown table beside it.

JSON format (docs/design.md): {"gpu", "torch", "date", "copy_gbps", "matmul_tflops",
"rows": [{"case": {...}, "ours_ms", "peers": {name: ms}, "tflops" or "gbps", ...}]}.
"""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def gpu_short_name(device_name: Optional[str] = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' without a GPU."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        device_name = torch.cuda.get_device_name()
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", device_name)
    return (m.group(1) if m else re.sub(r"\W+", "_", device_name)).lower()


class Results:
    """Collects rows for one benchmark and writes them as JSON + markdown."""

    def __init__(self, name: str, *, gpu: Optional[str] = None, copy_gbps: Optional[float] = None,
                 matmul_tflops: Optional[float] = None, extra: Optional[Dict[str, Any]] = None):
        import torch

        self.name = name
        self.meta: Dict[str, Any] = {
            "gpu": gpu or gpu_short_name(),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_gbps": copy_gbps,
            "matmul_tflops": matmul_tflops,
        }
        self.meta.update(extra or {})
        self.rows: List[Dict[str, Any]] = []

    def add(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)

    def as_dict(self) -> Dict[str, Any]:
        return {**self.meta, "rows": self.rows}

    def write(self, root: Path | str, columns: Sequence[tuple[str, str]]) -> Path:
        """Writes <root>/<gpu>/<name>.json and .md; columns are (header, dotted key into a row)."""
        out = Path(root) / self.meta["gpu"]
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        (out / f"{self.name}.md").write_text(self.markdown(columns))
        return path

    def markdown(self, columns: Sequence[tuple[str, str]]) -> str:
        m = self.meta
        head = [f"# {self.name} on {m['device_name']}",
                "",
                f"torch {m['torch']}, {m['date']}. Copy bandwidth {_fmt(m['copy_gbps'])} GB/s "
                f"(read + write), bf16 matmul {_fmt(m['matmul_tflops'])} TFLOP/s, measured in "
                "the same run.",
                "",
                "| " + " | ".join(h for h, _ in columns) + " |",
                "|" + "---|" * len(columns)]
        for r in self.rows:
            head.append("| " + " | ".join(_fmt(_get(r, k)) for _, k in columns) + " |")
        return "\n".join(head) + "\n"


def _get(row: Dict[str, Any], dotted: str):
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
