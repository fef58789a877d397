"""What the federated benchmarks share: a metric's spread over repeats, and writing the result."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def spread(values: list[float], digits: int = 3) -> dict:
    """Median, min, max and every value of a metric over the repeats."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "values": [round(v, digits) for v in values]}


def write_result(result: dict, out: str) -> None:
    """The result as JSON at ``out`` and as the last stdout line."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
