"""The Triton kernels compiled for GPU targets on a CPU-only machine, and what they use of each SM.

``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` runs the whole toolchain (the bundled ptxas
included) without a GPU; ``cuobjdump -res-usage`` (bundled too) reads registers, local memory (spills) and
shared memory from the cubin. ``launches(cap)`` lists every (kernel, dtype, tiles) the dispatch in
``head.py`` can choose on that architecture, so a test can check them all against the per-block
shared-memory limit. Results are kept in ``compiled_resources.json`` beside this file, keyed by Triton's version and each
kernel's source hash, so the compile test only compiles what changed (and Triton's own cache makes
repeated compiles on one machine fast).

    python -m lowmem_vt.kernels.resources     # refresh compiled_resources.json; print the markdown table

Nothing here is a timing: it is what the compiler reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .chunked_logprobs import _FINISH_BLOCK, _logprobs_backward_kernel, _logprobs_finish_kernel, _lse_partial_kernel
from .fused_linear import _grpo_rows_kernel
from .grpo_loss import _grpo_finish_kernel
from .policy_terms import BLOCK_T, _policy_terms_kernel
from .chunked_logprobs import Tiles
from .head import ARCHS, launch_config

_DEFAULT_WARPS, _DEFAULT_STAGES = 4, 3  # what Triton launches with when the launcher names none
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
    spill_bytes: int  # per thread: stack frame + local memory (these kernels keep no arrays there: spills)
    shared_bytes: int  # per block, static + dynamic as Triton launches it


def _signature(kernel: str, dtype: torch.dtype) -> tuple[object, dict[str, str], set[str]]:
    """(jit function, signature without constexprs, arguments divisible by 16 at the shapes the head runs)."""
    t = "*" + _TRITON_DTYPE[dtype]
    f32, i64 = "*fp32", "*i64"
    if kernel == "lse_partial":
        sig = dict(h_ptr=t, w_ptr=t, targets_ptr=i64, part_lse_ptr=f32, target_logit_ptr=f32, part_entropy_ptr=f32,
                   N="i32", V="i32", H="i32", stride_hn="i32", stride_wv="i32", tiles_per_split="i32", inv_temperature="fp32")
        return _lse_partial_kernel, sig, {"H", "stride_hn", "stride_wv"}
    if kernel == "logprobs_backward":
        sig = dict(h_ptr=t, w_ptr=t, targets_ptr=i64, lse_ptr=f32, grad_ptr=f32, dh_ptr=f32, dw_ptr=f32, N="i32",
                   V="i32", H="i32", stride_hn="i32", stride_wv="i32", inv_temperature="fp32", dlogits_scale="fp32")
        return _logprobs_backward_kernel, sig, {"H", "stride_hn", "stride_wv"}
    if kernel == "logprobs_finish":
        sig = dict(part_lse_ptr=f32, target_logit_ptr=f32, part_entropy_ptr=f32, lse_ptr=f32, logp_ptr=f32, entropy_ptr=f32,
                   N="i32", num_splits="i32")
        return _logprobs_finish_kernel, sig, set()
    if kernel == "grpo_finish":
        sig = {name: f32 for name in ("part_lse_ptr", "target_logit_ptr", "advantages_ptr", "old_logp_ptr", "ref_logp_ptr",
                                      "weights_ptr", "lse_ptr", "logp_ptr", "loss_ptr", "dlogp_ptr", "k3_ptr", "clipped_ptr")}
        sig.update(N="i32", T="i32", num_splits="i32", beta="fp32", ratio_low="fp32", ratio_high="fp32")
        return _grpo_finish_kernel, sig, set()
    if kernel == "grpo_rows":
        sig = dict(logits_ptr=f32, dlogits_ptr=t, targets_ptr=i64)
        sig.update({name: f32 for name in ("adv_ptr", "old_logp_ptr", "ref_logp_ptr", "weights_ptr", "lse_ptr", "logp_ptr",
                                            "loss_ptr", "dlogp_ptr", "k3_ptr", "clipped_ptr", "entropy_ptr")})
        sig.update(V="i32", stride_logits="i32", stride_dlogits="i32", inv_temperature="fp32", dlogits_scale="fp32", beta="fp32",
                   ratio_low="fp32", ratio_high="fp32")
        return _grpo_rows_kernel, sig, {"V", "stride_logits", "stride_dlogits"}
    if kernel == "policy_terms":
        sig = {name: f32 for name in ("logp_ptr", "old_ptr", "ref_ptr", "sampling_ptr", "mask_ptr", "weights_ptr",
                                      "token_weight_ptr", "adv_ptr", "loss_ptr", "dlogp_ptr", "k3_ptr", "clipped_ptr",
                                      "ratio_ptr", "is_ratio_ptr", "is_masked_ptr", "phi_ptr")}
        sig["T"] = "i32"
        sig.update({name: "fp32" for name in ("beta", "ratio_low", "ratio_high", "eps_high", "delta", "tau_pos", "tau_neg",
                                              "k_pos", "lam_pos", "k_neg", "lam_neg", "opm_threshold", "clip_min", "clip_max")})
        return _policy_terms_kernel, sig, set()
    raise KeyError(kernel)


KERNELS = ("lse_partial", "logprobs_finish", "logprobs_backward", "grpo_finish", "grpo_rows", "policy_terms")


def dtypes_for(cap: int) -> tuple[torch.dtype, ...]:
    """The dtypes the head runs in on an architecture: bf16 needs compute capability 8.0."""
    return (torch.float16, torch.float32) if cap < 80 else (torch.bfloat16, torch.float16, torch.float32)


def launches(cap: int) -> list[Launch]:
    """Every kernel specialisation ``head.py`` can launch on this architecture (constexpr branches included)."""
    out = []
    for dtype in dtypes_for(cap):
        config = launch_config(cap, dtype)
        out += streaming_launches(config.forward, config.backward, dtype)
        out += row_launches(config.rows.block_v, config.rows.num_warps, dtype)
    # the finishing kernels see only fp32 [N] vectors: one launch shape whatever the model's dtype
    block = _FINISH_BLOCK
    for entropy in (False, True):
        out.append(Launch("logprobs_finish", torch.float32, (("BLOCK", block), ("ENTROPY", entropy)), _DEFAULT_WARPS, _DEFAULT_STAGES))
    for has_old in (False, True):
        for has_kl in (False, True):
            out.append(Launch("grpo_finish", torch.float32, (("HAS_OLD", has_old), ("HAS_KL", has_kl), ("BLOCK", block)),
                              _DEFAULT_WARPS, _DEFAULT_STAGES))
    return out + policy_terms_launches()


def policy_terms_launches() -> list[Launch]:
    """The terms kernel (fp32 [N] vectors whatever the model's dtype): each policy form x level x correction level with
    every other option on (the most code and registers; truncate or mask alternating, so each correction level meets
    both), and the one with every option off. Not every combination of the 11 constexprs (thousands): the options
    only add straight-line code to the same loops."""
    out = []
    off = dict(LOSS=0, SEQUENCE=False, HAS_OLD=False, HAS_KL=False, HAS_DELTA=False, BIAS_KL=False, HAS_TOKEN_WEIGHT=False,
               OFF_POLICY_MASK=False, HAS_SAMPLING=False, CORRECTION=0, CORRECTION_MASKS=False, BLOCK_T=BLOCK_T)
    out.append(Launch("policy_terms", torch.float32, tuple(off.items()), _DEFAULT_WARPS, _DEFAULT_STAGES))
    for loss in range(4):
        for sequence in (False, True):
            for correction in (1, 2):
                consts = {**off, "LOSS": loss, "SEQUENCE": sequence, "HAS_OLD": True, "HAS_KL": True, "HAS_DELTA": True,
                          "BIAS_KL": True, "HAS_TOKEN_WEIGHT": True, "OFF_POLICY_MASK": True, "HAS_SAMPLING": True,
                          "CORRECTION": correction, "CORRECTION_MASKS": (loss + correction) % 2 == 0}
                out.append(Launch("policy_terms", torch.float32, tuple(consts.items()), _DEFAULT_WARPS, _DEFAULT_STAGES))
    return out


# the fused-linear row kernel's flag sets: (GRPO, HAS_OLD, HAS_KL, DLOGITS, ENTROPY). The reference pass; the paper
# loss fused (dlogits with its terms); the log-prob head of the rest of the menu (dlogits alone, with or without the
# entropy; the entropy alone when no dh is wanted)
ROW_FLAGS = ((False, False, False, False, False), (True, False, False, True, False), (True, True, False, True, False),
             (True, False, True, True, False), (True, True, True, True, False), (False, False, False, True, False),
             (False, False, False, True, True), (False, False, False, False, True))


def row_launches(block_v: int, num_warps: int, dtype: torch.dtype) -> list[Launch]:
    """The fused-linear row kernel's launches at one row tile, every flag set ``head.py`` uses (ROW_FLAGS)."""
    out = []
    for grpo, has_old, has_kl, dlogits, entropy in ROW_FLAGS:
        consts = dict(GRPO=grpo, HAS_OLD=has_old, HAS_KL=has_kl, BLOCK_V=block_v, DLOGITS=dlogits, ENTROPY=entropy)
        out.append(Launch("grpo_rows", dtype, tuple(consts.items()), num_warps, _DEFAULT_STAGES))
    return out


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_launch(launch: Launch, cap: int) -> Resources:
    """Compile for sm_<cap> on this machine (no GPU) and read the cubin's resource use."""
    fn, signature, divisible = _signature(launch.kernel, launch.dtype)
    return compile_jit(fn, signature, dict(launch.constexprs), cap, launch.num_warps, launch.num_stages, divisible)


def compile_jit(fn, signature: dict[str, str], consts: dict[str, object], cap: int, num_warps: int = _DEFAULT_WARPS,
                num_stages: int = _DEFAULT_STAGES, divisible: set[str] = frozenset()) -> Resources:
    """Any ``@triton.jit`` kernel compiled for sm_<cap> here (no GPU): ``signature`` maps each non-constexpr
    argument to its Triton type ("*bf16", "i32", ...), ``consts`` the constexprs; pointers and the ``divisible``
    integers are declared 16-divisible, as the launches pass them. Returns the cubin's resource use."""
    compiled = _compile(fn, signature, consts, cap, num_warps, num_stages, divisible)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}
    # Triton allocates shared memory dynamically (metadata.shared); static SHARED is normally 0
    return Resources(fields["REG"], fields["STACK"] + fields["LOCAL"], fields["SHARED"] + compiled.metadata.shared)


def _compile(fn, signature: dict[str, str], consts: dict[str, object], cap: int, num_warps: int, num_stages: int,
             divisible: set[str]):
    full = {name: ("constexpr" if name in consts else signature[name]) for name in fn.arg_names}
    index = {name: i for i, name in enumerate(fn.arg_names)}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name, kind in full.items()
             if kind.startswith("*") or name in divisible}
    src = ASTSource(fn, full, constexprs={(index[k],): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def _ptx(launch: Launch, cap: int) -> str:
    fn, signature, divisible = _signature(launch.kernel, launch.dtype)
    return _compile(fn, signature, dict(launch.constexprs), cap, launch.num_warps, launch.num_stages, divisible).asm["ptx"]


def launch_ptx(launch: Launch, cap: int) -> str:
    """The PTX Triton generates for ``launch`` on sm_<cap> (no GPU needed): what the code review of a kernel reads."""
    (ptx,) = _compile_all([launch], cap, workers=1, compile_one=_ptx)
    return ptx


# the source files each kernel's code comes from: its own and those of the @triton.jit helpers it calls
_KERNEL_FILES = {"lse_partial": ("chunked_logprobs.py",), "logprobs_backward": ("chunked_logprobs.py",),
                 "logprobs_finish": ("chunked_logprobs.py",), "grpo_finish": ("grpo_loss.py", "chunked_logprobs.py"),
                 "grpo_rows": ("fused_linear.py", "grpo_loss.py", "chunked_logprobs.py"),
                 "policy_terms": ("policy_terms.py",)}


def _cache_key(launch: Launch, cap: int) -> str:
    """What a compile result depends on: Triton's version, the source files holding the kernel and the
    helpers it calls (any edit there invalidates: conservative, and readable without compiling), the target
    and the launch."""
    here = Path(__file__).resolve().parent
    source = b"".join((here / name).read_bytes() for name in _KERNEL_FILES[launch.kernel])
    digest = hashlib.sha256(source).hexdigest()[:16]
    return f"triton {triton.__version__} | {digest} | sm_{cap} | {launch.label()} | {_TRITON_DTYPE[launch.dtype]}"


def _compile_or_error(launch: Launch, cap: int) -> Resources | str:
    try:
        return compile_launch(launch, cap)
    except Exception as exc:  # Triton refuses some shapes outright (e.g. out of resources at compile time)
        return f"does not compile ({type(exc).__name__}: {str(exc)[:200]})"


def _compile_all(launches_: list[Launch], cap: int, workers: int, compile_one=None) -> list:
    """``compile_one(launch, cap)`` (default: the resources, or why not) for each launch, in ``workers`` spawned
    processes with TRITON_INTERPRET unset: under the interpreter (the kernel tests) ``triton.jit`` gives
    functions that only interpret, so this process cannot compile."""
    compile_one = compile_one or _compile_or_error
    if not launches_:
        return []
    if workers <= 1 and os.environ.get("TRITON_INTERPRET") != "1":
        return [compile_one(launch, cap) for launch in launches_]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:  # the workers start inside this window and inherit the environment without it
        with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(compile_one, launches_, [cap] * len(launches_)))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def check_launches(cap: int, launches_: list[Launch], workers: int = 1, cache: dict | None = None) -> list[tuple[Launch, Resources]]:
    """Compile each launch for sm_<cap> (in ``workers`` processes); [(launch, resources)] in order.

    ``cache``: {key: [registers, spill bytes, shared bytes]} from earlier compiles of the same sources and
    Triton version (RESOURCES_FILE); only launches missing from it are compiled, and they are added to it.
    Raises RuntimeError naming the launches that do not compile.
    """
    cache = {} if cache is None else cache
    missing = [launch for launch in launches_ if _cache_key(launch, cap) not in cache]
    compiled = _compile_all(missing, cap, workers)
    failed = [f"{launch.label()}: {res}" for launch, res in zip(missing, compiled) if isinstance(res, str)]
    if failed:
        raise RuntimeError(f"sm_{cap}: " + "; ".join(failed))
    for launch, res in zip(missing, compiled):
        cache[_cache_key(launch, cap)] = [res.registers, res.spill_bytes, res.shared_bytes]
    return [(launch, Resources(*cache[_cache_key(launch, cap)])) for launch in launches_]


# Compile results of every launch on every target, for the current kernel sources (written by ``main``):
# the compile test reads them and compiles only what changed, so it stays fast after the first run.
RESOURCES_FILE = Path(__file__).resolve().parent / "compiled_resources.json"


def load_cache() -> dict:
    return json.loads(RESOURCES_FILE.read_text()) if RESOURCES_FILE.is_file() else {}


def streaming_launches(forward: Tiles, backward: Tiles, dtype: torch.dtype) -> list[Launch]:
    """The streaming kernels' launches at the given tiles (what the bench checks before timing a tile)."""
    dot = "ieee" if dtype == torch.float32 else "tf32"
    out = [Launch("lse_partial", dtype, (("BLOCK_N", forward.block_n), ("BLOCK_V", forward.block_v), ("BLOCK_H", forward.block_h),
                                         ("DOT_PRECISION", dot), ("ENTROPY", entropy)), forward.num_warps, forward.num_stages)
           for entropy in (False, True)]
    for dh, dw in ((True, False), (True, True), (False, True)):
        consts = (("BLOCK_N", backward.block_n), ("BLOCK_V", backward.block_v), ("BLOCK_H", backward.block_h),
                  ("DOT_PRECISION", dot), ("COMPUTE_DH", dh), ("COMPUTE_DW", dw))
        out.append(Launch("logprobs_backward", dtype, consts, backward.num_warps, backward.num_stages))
    return out


def tile_problems(forward: Tiles, backward: Tiles, cap: int, dtype: torch.dtype) -> list[str]:
    """Why these streaming tiles cannot run on sm_<cap> (shared memory past the per-block limit, or a
    compile failure); [] when they fit. Compiles on the CPU, seconds per kernel."""
    limit = ARCHS[cap][1] if cap in ARCHS else None
    launches_ = streaming_launches(forward, backward, dtype)
    problems = []
    for launch, res in zip(launches_, _compile_all(launches_, cap, workers=1)):
        if isinstance(res, str):
            problems.append(f"{launch.label()}: {res}")
        elif limit is not None and res.shared_bytes > limit:
            problems.append(f"{launch.label()}: {res.shared_bytes / 1024:.0f} KB of shared memory > {limit // 1024} KB on sm_{cap}")
    return problems


def main() -> int:
    """Compile every launch on every target (cached ones are read), rewrite RESOURCES_FILE with exactly
    the current entries, and print the markdown table for bench/RESULTS.md."""
    old, rows = load_cache(), []
    # entries of other Triton versions stay while their sources are today's: the suite also runs on the GPU
    # machine's Triton (make test-min, make gpu-rehearsal), which would otherwise compile every launch afresh
    current = {_cache_key(launch, cap).split(" | ", 1)[1] for cap in ARCHS for launch in launches(cap)}
    cache = {k: v for k, v in old.items() if k.split(" | ", 1)[1] in current}
    for cap, (name, limit) in ARCHS.items():
        launches_ = launches(cap)
        for launch, r in check_launches(cap, launches_, workers=max(1, min(4, os.cpu_count() or 1)), cache=cache):
            fits = "yes" if r.shared_bytes <= limit else "**NO**"
            rows.append(f"| sm_{cap} ({name}) | {launch.label()} | {_TRITON_DTYPE[launch.dtype]} | {r.registers} | "
                        f"{r.spill_bytes} | {r.shared_bytes / 1024:.1f} | {limit // 1024} | {fits} |")
    RESOURCES_FILE.write_text(json.dumps(cache, indent=0, sort_keys=True) + "\n")
    print(f"Compiled on CPU with Triton {triton.__version__} (GPUTarget(\"cuda\", cap, 32)), not timed.\n")
    print("| target | kernel [constexprs] warps stages | dtype | registers | spill bytes | shared KB | limit KB | fits |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
