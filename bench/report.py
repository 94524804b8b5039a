"""Results of a bench script, as the GPU check reads them: ``DIR/NAME.json`` and ``DIR/NAME.md``.

Every ``bench/X.py`` takes ``--out DIR`` and calls :func:`write` whenever it has something new, so a run cut
off by a timeout still leaves what it had measured. A script that cannot run here (no GPU, a package missing)
calls :func:`skip`: the JSON then holds ``"skipped": reason`` and the GPU check reports the stage as skipped
with that reason instead of failed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader (the GPU check polls) never sees half a file


def write(out: str | os.PathLike | None, name: str, data: dict, markdown: str) -> None:
    """Write ``out/name.json`` (``data``) and ``out/name.md``; a no-op without ``out``."""
    if out is None:
        return
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / f"{name}.json", json.dumps(data, indent=1, default=str) + "\n")
    _atomic_write(d / f"{name}.md", markdown.rstrip() + "\n")


def skip(out: str | os.PathLike | None, name: str, reason: str) -> int:
    """Record that the script could not run here, print why; returns 0 (a skip is not a failure)."""
    print(f"skipped: {reason}", flush=True)
    write(out, name, {"skipped": reason}, f"skipped: {reason}")
    return 0


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; numbers right-aligned, floats with 3 significant digits unless already strings."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    align = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fault() -> bool:
    """Whether the GPU check's ``--fault`` handed this stage a deliberately wrong method (tests: a stage that
    cannot fail checks nothing)."""
    return os.environ.get("LOWMEM_BENCH_FAULT") == "1"


def break_triton_heads() -> None:
    """The GPU check's ``--fault`` for the doctor and the CUDA tests: every Triton head's loss and log-probs x1.01
    (the torch reference left right). Patched into ``lowmem_vt.kernels.head`` before the checks import it by name."""
    import inspect

    import lowmem_vt.kernels.head as head

    def wrong(right, outputs):
        sig = inspect.signature(right)

        def call(*args, **kwargs):
            got = right(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            if head.resolve_backend(bound.arguments["backend"], bound.arguments["hidden"].device) not in head.TRITON_BACKENDS:
                return got
            return outputs(got)

        return call

    head.fused_grpo_loss = wrong(head.fused_grpo_loss, lambda got: (got[0] * 1.01, got[1], got[2] * 1.01))
    head.token_logprobs = wrong(head.token_logprobs, lambda logp: logp * 1.01)
