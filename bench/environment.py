"""The GPU check's first stage: what Triton needs from the machine (C compiler, Python.h, libcuda) and one
trivial Triton launch, so that a bare machine stops here with one line naming what is missing instead of
failing every later stage at its first kernel.

    python bench/environment.py --out DIR [--smoke]     # --smoke: CPU, the launch in the interpreter

Writes DIR/environment.json and .md; exit 1 (one line on stderr per missing thing) when something is missing.
"""

from __future__ import annotations

import argparse
import os
import sys

import report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU: no libcuda check, the launch in Triton's interpreter")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from lowmem_vt.kernels.environment import check_triton_environment, trivial_launch

    cuda = torch.cuda.is_available() and not args.smoke
    findings = check_triton_environment(cuda)
    if all(f.ok for f in findings):  # a launch is only worth trying once its build can work
        findings.append(trivial_launch("cuda" if cuda else "cpu", add=1.01 if report.fault() else 1.0))  # --fault: a wrong kernel
    rows = [[f.what, "ok" if f.ok else "MISSING", f.detail] for f in findings]
    report.write(args.out, "environment", {"cuda": cuda, "findings": [f.__dict__ for f in findings]},
                 report.table(["needed by Triton", "", "detail"], rows))
    for f in findings:
        print(f.line(), file=sys.stdout if f.ok else sys.stderr, flush=True)
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
