"""What Triton needs from the machine before its first kernel runs, checked up front.

At a kernel's first launch Triton builds a small C launcher: it needs a C compiler (``$CC``, else gcc or clang),
``Python.h`` of the running Python, and, on NVIDIA GPUs, ``libcuda.so.1`` (found through ``ldconfig -p``,
``$LD_LIBRARY_PATH`` or ``$TRITON_LIBCUDA_PATH``). A bare machine (a container, a fresh cloud image) often lacks
one of them, and the error then comes from deep inside the first training step. ``check_triton_environment``
names what is missing in one line each; ``trivial_launch`` then runs one tiny kernel and checks its result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    what: str  # "C compiler", "Python.h", "libcuda.so.1", "Triton launch"
    ok: bool
    detail: str  # where it was found, or what is missing and what to do

    def line(self) -> str:
        return f"{self.what}: {'ok' if self.ok else 'MISSING'} ({self.detail})"


def c_compiler() -> Finding:
    cc = os.environ.get("CC")
    if cc is not None:
        found = shutil.which(cc)
        return Finding("C compiler", found is not None,
                       f"CC={cc}" + (f" -> {found}" if found else " is not an executable; fix CC or unset it"))
    found = shutil.which("gcc") or shutil.which("clang")
    return Finding("C compiler", found is not None,
                   found or "no gcc or clang on PATH; install one (apt-get install gcc) or set CC")


def python_header() -> Finding:
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme  # as Triton does on Debian's Python
    header = Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"
    return Finding("Python.h", header.is_file(),
                   str(header) if header.is_file() else f"{header} does not exist; install python3-dev (or pythonX.Y-dev)")


def libcuda() -> Finding:
    if path := os.environ.get("TRITON_LIBCUDA_PATH"):
        ok = (Path(path) / "libcuda.so.1").is_file()
        return Finding("libcuda.so.1", ok, f"TRITON_LIBCUDA_PATH={path}" + ("" if ok else " holds no libcuda.so.1"))
    found = []
    if Path("/sbin/ldconfig").is_file():
        listing = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
        found = [line.split()[-1] for line in listing.splitlines() if "libcuda.so.1" in line]
    if not found:
        for d in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
            if (Path(d) / "libcuda.so.1").is_file():
                found.append(str(Path(d) / "libcuda.so.1"))
    return Finding("libcuda.so.1", bool(found), found[0] if found else
                   "not in `ldconfig -p` nor on LD_LIBRARY_PATH; install the NVIDIA driver, run ldconfig, or set "
                   "TRITON_LIBCUDA_PATH to the folder holding it")


def check_triton_environment(cuda: bool) -> list[Finding]:
    """The launcher's build requirements; libcuda only where kernels will run on an NVIDIA GPU."""
    return [c_compiler(), python_header(), *([libcuda()] if cuda else [])]


def trivial_launch(device: str, add: float = 1.0) -> Finding:
    """One tiny kernel (x + ``add`` over 1000 floats) on ``device``, its result checked against x + 1. On CPU this
    needs TRITON_INTERPRET=1 (read when the kernel is defined, here). ``add`` other than 1 is the GPU check's
    ``--fault``: a kernel that runs but computes the wrong thing must read as a failure."""
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, out_ptr, n, add, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + add, mask=offs < n)

        x = torch.arange(1000, dtype=torch.float32, device=device)
        out = torch.empty_like(x)
        add_one[(triton.cdiv(1000, 256),)](x, out, 1000, add, BLOCK=256)
        ok = torch.equal(out.cpu(), x.cpu() + 1)
        return Finding("Triton launch", ok, f"x + 1 on {device}: " + ("correct" if ok else "WRONG result"))
    except Exception as exc:  # noqa: BLE001 -- whatever the build or the driver raises is the finding
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return Finding("Triton launch", False, f"on {device}: {type(exc).__name__}: {first}")
