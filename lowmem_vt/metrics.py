"""metrics.jsonl: one JSON line per step, appended, flushed and fsynced, never duplicated on resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsWriter:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop lines of steps after the checkpoint: they will be run again.
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All complete lines (a torn last line from a crash is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


SUMMARY_KEYS = [("reward", "reward"), ("format_rate", "format rate"), ("accuracy", "accuracy"),
                ("completion_length_mean", "completion length")]


def run_summary(out_dir: str | Path, n: int = 5) -> dict:
    """First-``n`` vs last-``n`` step means of reward, format rate, accuracy and completion length, the first
    and last logged sample, and where the plots are: what a user wants to see when a run ends."""
    out = Path(out_dir)
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []

    def mean(part: list[dict], key: str) -> float | None:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    first, last = rows[:n], rows[-n:]
    start = {k: rows[0].get(k) for k, _ in SUMMARY_KEYS} if rows else {}
    samples = read_metrics(out / "samples.jsonl") if (out / "samples.jsonl").is_file() else []
    return {
        "steps": [rows[0]["step"], rows[-1]["step"]] if rows else [],
        "n": n,
        "start": start,
        "first": {k: mean(first, k) for k, _ in SUMMARY_KEYS},
        "last": {k: mean(last, k) for k, _ in SUMMARY_KEYS},
        "sample_before": samples[0] if samples else None,
        "sample_after": samples[-1] if len(samples) > 1 else None,
        "plots": str(out / "plots") if (out / "plots").is_dir() else None,
    }


def format_summary(summary: dict) -> str:
    """The summary as a few lines of text."""
    if not summary["steps"]:
        return "no steps logged"
    n = summary["n"]
    first, last = summary["steps"]
    lines = [f"{'steps %d-%d' % (first, last):<30}{'step %d' % first:>9} {'first %d' % n:>9}    {'last %d' % n:>7}  (means)"]
    for key, name in SUMMARY_KEYS:
        s, a, b = summary["start"][key], summary["first"][key], summary["last"][key]
        if a is not None and b is not None:
            lines.append(f"  {name:<28} {s:9.3f} {a:9.3f} -> {b:7.3f}")
    for label, s in (("before", summary["sample_before"]), ("after", summary["sample_after"])):
        if s:
            lines.append(f"  sample {label} (step {s['step']}, answer {s['answer']!r}, reward {s['reward']:.1f}): "
                         f"<think>{s['completion'][:200]}")
    if summary["plots"]:
        lines.append(f"  plots: {summary['plots']}")
    return "\n".join(lines)
