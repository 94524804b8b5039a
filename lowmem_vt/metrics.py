"""metrics.jsonl: one JSON line per step, appended, flushed and fsynced, never duplicated on resume."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

from .errors import UserError


class LogWriteError(UserError, RuntimeError):
    """A run's log could not be written (no space left, a file-size limit); the message says where and at which step."""


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
        try:
            self._f.write(json.dumps(clean) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise LogWriteError(f"cannot write step {record.get('step')} to {self.path}: {write_problem(exc, self.path.parent)}; "
                                "the last checkpoint is intact: free space, then continue with --resume latest") from None

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All complete lines (a torn last line from a crash is ignored)."""
    out = []
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(row, dict):  # a line that is JSON but not a record is no step
            out.append(row)
    return out


SUMMARY_KEYS = [("reward", "reward"), ("format_rate", "format rate"), ("accuracy", "accuracy"),
                ("completion_length_mean", "completion length"),
                # CUDA only (null on CPU: no line): a held figure that rises from the first steps to the last is a leak
                ("peak_gpu_mem_gib", "peak GPU memory (GiB)"), ("mem_held_gib", "held between steps (GiB)")]


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


def write_problem(exc: BaseException, folder) -> str:
    """Why a write into ``folder`` failed, in words: "no space left on <folder>", a file-size limit, or the error.
    torch's C++ writer loses the errno (``basic_ios::clear: iostream error``): then the disk and limits are asked."""
    e, seen = exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on {folder}"
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            return f"a file reached the file-size limit (ulimit -f) in {folder}"
        e = e.__cause__ or e.__context__
    text = str(exc)
    if "No space left" in text or "os error 28" in text:
        return f"no space left on {folder}"
    if "File too large" in text or "os error 27" in text:
        return f"a file reached the file-size limit (ulimit -f) in {folder}"
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 64 << 20:
            return f"no space left on {folder} ({st.f_bavail * st.f_frsize >> 20} MiB free)"
    except OSError:
        pass
    try:
        import resource

        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return f"a file reached the file-size limit (ulimit -f) in {folder}"
    except (ImportError, ValueError, OSError):
        pass
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"writing into {folder} failed ({type(exc).__name__}: {first[:200]})"
