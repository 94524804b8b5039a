"""The Triton kernels compiled for GPU targets on a CPU-only machine, and what they use of each SM.

``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` runs the whole toolchain (the bundled ptxas
included) without a GPU; ``cuobjdump -res-usage`` (bundled too) reads registers, local memory (spills) and
shared memory from the cubin. ``launches(cap)`` lists every (kernel, dtype, tiles) the dispatch in
``head.py`` can choose on that architecture, so a test can check them all against the per-block
shared-memory limit. Compiled results land in Triton's cache (``~/.triton/cache``): reruns take seconds.

    python -m lowmem_vt.kernels.resources     # markdown table: every launch on every target

Nothing here is a timing: it is what the compiler reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import chunked_logprobs as _streaming
from . import fused_linear as _fused
from . import grpo_loss as _grpo
from .head import ARCHS, launch_config

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation as the dispatch launches it."""

    kernel: str  # a name in KERNELS
    dtype: torch.dtype  # of hidden / weight
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs if k not in ("DOT_PRECISION",))
        return f"{self.kernel} [{consts}] w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    local_bytes: int  # per thread: spills (these kernels use no local arrays)
    shared_bytes: int  # per block, static + dynamic as Triton launches it


def _signature(kernel: str, dtype: torch.dtype) -> tuple[object, dict[str, str], set[str]]:
    """(jit function, signature without constexprs, arguments divisible by 16 at the shapes the head runs)."""
    t = "*" + _TRITON_DTYPE[dtype]
    f32, i64 = "*fp32", "*i64"
    if kernel == "lse_partial":
        sig = dict(h_ptr=t, w_ptr=t, targets_ptr=i64, part_lse_ptr=f32, target_logit_ptr=f32, N="i32", V="i32",
                   H="i32", stride_hn="i32", stride_wv="i32", tiles_per_split="i32", inv_temperature="fp32")
        return _streaming._lse_partial_kernel, sig, {"H", "stride_hn", "stride_wv"}
    if kernel == "logprobs_backward":
        sig = dict(h_ptr=t, w_ptr=t, targets_ptr=i64, lse_ptr=f32, grad_ptr=f32, dh_ptr=f32, dw_ptr=f32, N="i32",
                   V="i32", H="i32", stride_hn="i32", stride_wv="i32", inv_temperature="fp32")
        return _streaming._logprobs_backward_kernel, sig, {"H", "stride_hn", "stride_wv"}
    if kernel == "logprobs_finish":
        sig = dict(part_lse_ptr=f32, target_logit_ptr=f32, lse_ptr=f32, logp_ptr=f32, N="i32", num_splits="i32")
        return _streaming._logprobs_finish_kernel, sig, set()
    if kernel == "grpo_finish":
        sig = {name: f32 for name in ("part_lse_ptr", "target_logit_ptr", "advantages_ptr", "old_logp_ptr", "ref_logp_ptr",
                                      "weights_ptr", "lse_ptr", "logp_ptr", "loss_ptr", "dlogp_ptr", "k3_ptr", "clipped_ptr")}
        sig.update(N="i32", T="i32", num_splits="i32", beta="fp32", ratio_low="fp32", ratio_high="fp32")
        return _grpo._grpo_finish_kernel, sig, set()
    if kernel == "grpo_rows":
        sig = dict(logits_ptr=f32, dlogits_ptr=t, targets_ptr=i64)
        sig.update({name: f32 for name in ("adv_ptr", "old_logp_ptr", "ref_logp_ptr", "weights_ptr", "lse_ptr", "logp_ptr",
                                            "loss_ptr", "dlogp_ptr", "k3_ptr", "clipped_ptr")})
        sig.update(V="i32", stride_logits="i32", stride_dlogits="i32", inv_temperature="fp32", beta="fp32",
                   ratio_low="fp32", ratio_high="fp32")
        return _fused._grpo_rows_kernel, sig, {"V", "stride_logits", "stride_dlogits"}
    raise KeyError(kernel)


KERNELS = ("lse_partial", "logprobs_finish", "logprobs_backward", "grpo_finish", "grpo_rows")


def dtypes_for(cap: int) -> tuple[torch.dtype, ...]:
    """The dtypes the head runs in on an architecture: bf16 needs compute capability 8.0."""
    return (torch.float16, torch.float32) if cap < 80 else (torch.bfloat16, torch.float16, torch.float32)


def launches(cap: int) -> list[Launch]:
    """Every kernel specialisation ``head.py`` can launch on this architecture (constexpr branches included)."""
    out = []
    for dtype in dtypes_for(cap):
        config = launch_config(cap, dtype)
        dot = "ieee" if dtype == torch.float32 else "tf32"
        for kernel, tiles, extra in (
            ("lse_partial", config.forward, {}),
            ("logprobs_backward", config.backward, {"COMPUTE_DH": True, "COMPUTE_DW": False}),
            ("logprobs_backward", config.backward, {"COMPUTE_DH": True, "COMPUTE_DW": True}),
            ("logprobs_backward", config.backward, {"COMPUTE_DH": False, "COMPUTE_DW": True}),
        ):
            consts = dict(BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_H=tiles.block_h, DOT_PRECISION=dot, **extra)
            out.append(Launch(kernel, dtype, tuple(consts.items()), tiles.num_warps, tiles.num_stages))
        for grpo, has_old, has_kl in ((False, False, False), (True, False, False), (True, True, False), (True, False, True), (True, True, True)):
            consts = dict(GRPO=grpo, HAS_OLD=has_old, HAS_KL=has_kl, BLOCK_V=config.rows.block_v)
            out.append(Launch("grpo_rows", dtype, tuple(consts.items()), config.rows.num_warps, 1))
    # the finishing kernels see only fp32 [N] vectors: one launch shape whatever the model's dtype
    block = _streaming._FINISH_BLOCK
    out.append(Launch("logprobs_finish", torch.float32, (("BLOCK", block),), 4, 1))
    for has_old in (False, True):
        for has_kl in (False, True):
            out.append(Launch("grpo_finish", torch.float32, (("HAS_OLD", has_old), ("HAS_KL", has_kl), ("BLOCK", block)), 4, 1))
    return out


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_launch(launch: Launch, cap: int) -> Resources:
    """Compile for sm_<cap> on this machine (no GPU) and read the cubin's resource use."""
    fn, signature, divisible = _signature(launch.kernel, launch.dtype)
    consts = dict(launch.constexprs)
    full = {name: ("constexpr" if name in consts else signature[name]) for name in fn.arg_names}
    index = {name: i for i, name in enumerate(fn.arg_names)}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name, kind in full.items()
             if kind.startswith("*") or name in divisible}
    src = ASTSource(fn, full, constexprs={(index[k],): v for k, v in consts.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", usage))
    # Triton allocates shared memory dynamically (metadata.shared); static SHARED is normally 0
    return Resources(int(fields["REG"]), int(fields["LOCAL"]), int(fields["SHARED"]) + compiled.metadata.shared)


def main() -> int:
    print("| target | limit KB | launch | dtype | registers | spill (local) bytes | shared KB |")
    print("|---|---:|---|---|---:|---:|---:|")
    for cap, (name, limit) in ARCHS.items():
        for launch in launches(cap):
            r = compile_launch(launch, cap)
            print(f"| sm_{cap} ({name}) | {limit // 1024} | {launch.label()} | {_TRITON_DTYPE[launch.dtype]} | "
                  f"{r.registers} | {r.local_bytes} | {r.shared_bytes / 1024:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
