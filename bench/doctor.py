"""The GPU check's second stage: ``lowmem-vt doctor`` (issue #21), the environment and the Triton loss heads at
Qwen2-VL-2B's head shape against the torch reference on this GPU, before the benchmarks measure anything.

    python bench/doctor.py --out DIR [--smoke]     # --smoke: CPU (what the doctor can check there, and what not)

Writes DIR/doctor.json (the markdown, the exit status) and DIR/doctor.md; exit 1 when a fast path failed its check.
"""

from __future__ import annotations

import argparse
import sys

import report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU: the environment, and the list of what needs a GPU")
    args = p.parse_args(argv)
    if report.fault():  # the GPU check's --fault: wrong Triton heads, which the doctor's head check must fail
        report.break_triton_heads()
    from lowmem_vt.selfcheck.doctor import run_doctor

    text, rc = run_doctor(None)
    print(text, flush=True)
    report.write(args.out, "doctor", {"rc": rc, "markdown": text}, text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
