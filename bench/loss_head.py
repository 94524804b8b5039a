"""Benchmark of the LM head + GRPO loss on one GPU: forward and backward timed apart, peak extra memory.

    python bench/loss_head.py --out DIR            # B=8, T=1024, H=1536, V=151,936, the GPU's dtype (auto)
    python bench/loss_head.py --out DIR --smoke    # tiny sizes on CPU (Triton interpreter), seconds

Methods, in one run on the same inputs: naive PyTorch (full fp32 logits), the chunked PyTorch reference
(backend "torch"), Liger-Kernel's LigerFusedLinearGRPOLoss when it imports, and both Triton heads
(``triton_fused_linear`` and ``triton_streaming``) at the launch table's tiles; then sweeps: streaming
tiles (``--tiles``), fused-linear scratch budgets (``--scratch-mib``, which set the rows per chunk) and
row-kernel widths (``--row-block-v``). Streaming tiles are compiled for this GPU's architecture first and
refused, with the reason, when they do not fit its shared memory.

Time: CUDA events around the forward (loss) and around ``loss.backward()``, median over --repeats after
--warmup runs. Memory: peak of torch.cuda.max_memory_allocated over one forward + backward minus what was
allocated before it (inputs), so it counts logits, saved tensors, scratch and the gradient of the hidden
states. The LM head is frozen, as under LoRA: only the hidden states get a gradient.

Writes DIR/loss_head.json and DIR/loss_head.md after every row.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import report as bench_report

EPSILON_LOW, EPSILON_HIGH, BETA = 0.2, 0.28, 0.04
# Correctness, the self-check's rule (lowmem_vt/selfcheck/compare.py): every row against the float64 head on the same
# inputs, each error (relative norm: loss, log-probs over real tokens, dh) within compare.MULTIPLE x the torch
# head's own error there; and each Triton head at its default launch on every case of the self-check (recipe, KL
# only, advantage only, temperature 0.7, dW on W[:16384]), the "cases" table.
OURS = ("triton_fused_linear", "triton_streaming")  # checked; torch is the floor; naive and Liger are peers, reported only
# LOWMEM_BENCH_FAULT (the GPU check's --fault, and tests): the fused-linear head made wrong on purpose.
# "1": loss x 1.01; "grad": dh x 1.01; "dw": dW x 1.01; "kl": the KL term dropped from loss and gradient (the KL it
# reports unchanged); "temperature": the temperature ignored.
FAULTS = ("1", "grad", "dw", "kl", "temperature")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for loss_head.json and loss_head.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under the Triton interpreter (checks the script runs)")
    p.add_argument("--batch", type=int, default=8, help="completions per micro-batch (B)")
    p.add_argument("--seq", type=int, default=1024, help="completion length (T)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (H)")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (V)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="auto: bfloat16 on GPUs that have it, float16 on older ones (model.dtype: auto)")
    p.add_argument("--loss-type", choices=["grpo", "dr_grpo", "bnpo"], default="grpo")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--skip-timing", action="store_true", help="only the correctness checks (the cases table and one row per method)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiles", nargs="*", default=["128x256x64x8x3", "64x128x64x4x3", "128x128x64x8x4", "128x128x32x8x3"],
                   help="streaming tiles to sweep, BLOCK_N x BLOCK_V x BLOCK_H x warps x stages (forward and backward)")
    p.add_argument("--scratch-mib", nargs="*", type=int, default=[64, 128, 512],
                   help="fused-linear scratch budgets to sweep (the default 256 MiB runs in the main rows)")
    p.add_argument("--row-block-v", nargs="*", type=int, default=[1024, 4096], help="fused-linear row-kernel widths to sweep")
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out: naive torch liger triton_fused_linear triton_streaming sweeps")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.hidden, args.vocab = 2, 8, 32, 300
        args.repeats, args.warmup = 1, 0
        args.tiles, args.scratch_mib, args.row_block_v = ["16x32x16x4x1"], [1], [64]
    return args


def make_inputs(args: argparse.Namespace, device, dtype) -> dict:
    import torch

    from lowmem_vt.grpo import LossCounts
    from lowmem_vt.kernels.chunked_logprobs import chunked_logprobs_reference

    B, T, H, V = args.batch, args.seq, args.hidden, args.vocab
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) * 3.0 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
    with torch.no_grad():  # old / ref log-probs near the policy's, so that the clip and the KL act as in training
        logp = chunked_logprobs_reference(hidden.view(B * T, H), weight, targets.view(-1), args.temperature).view(B, T)
    return dict(
        hidden=hidden, weight=weight, targets=targets, mask=mask,
        advantages=torch.randn(B, device=device, generator=g),
        old_logp=logp + 0.1 * torch.randn(B, T, device=device, generator=g),
        ref_logp=logp + 0.1 * torch.randn(B, T, device=device, generator=g),
        counts=LossCounts(num_sequences=B, num_tokens=float(mask.sum()), max_completion_length=T),
    )


def loss_kwargs(args: argparse.Namespace, x: dict) -> dict:
    return dict(beta=BETA, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, loss_type=args.loss_type, counts=x["counts"])


def naive_loss(x: dict, args: argparse.Namespace, hidden):
    import torch

    from lowmem_vt.grpo import grpo_loss

    logits = (hidden @ x["weight"].T).float() / args.temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)
    loss, _ = grpo_loss(logp, x["mask"], x["advantages"], x["old_logp"], x["ref_logp"], **loss_kwargs(args, x))
    return loss


def head_loss(backend: str, **launch) -> Callable:
    def run(x: dict, args: argparse.Namespace, hidden):
        from lowmem_vt.kernels.head import fused_grpo_loss

        loss, _, logp = fused_grpo_loss(hidden, x["weight"], x["targets"], x["mask"], x["advantages"], x["old_logp"],
                                        x["ref_logp"], temperature=args.temperature, backend=backend, **loss_kwargs(args, x),
                                        **launch)
        return loss, logp

    return run


def liger_loss_fn(args: argparse.Namespace) -> tuple[Callable | None, str]:
    """A closure running Liger's fused GRPO loss, or None and why not."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:  # not installed, or broken against this torch
        return None, f"liger_kernel does not import ({type(exc).__name__}: {str(exc)[:80]})"
    wanted = dict(beta=BETA, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, temperature=args.temperature,
                  use_ref_model=True, loss_type=args.loss_type, max_completion_length=args.seq)
    if args.smoke:  # on CPU torch.compile of each chunk takes ~40 s; the smoke checks the call, not Liger's speed
        wanted["compiled"] = False
    accepted = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
    module = LigerFusedLinearGRPOLoss(**{k: v for k, v in wanted.items() if k in accepted})
    note = "" if "loss_type" in accepted else " (this version has no loss_type: its own default)"

    def run(x: dict, _args: argparse.Namespace, hidden):
        # positional: _input, lin_weight, selected_token_ids, attention_mask, advantages, bias, ref_logps, old_logps
        out = module(hidden, x["weight"], x["targets"], x["mask"], x["advantages"], None, x["ref_logp"], x["old_logp"])
        return out[0] if isinstance(out, tuple) else out

    return run, note


def measure(loss_fn: Callable, x: dict, args: argparse.Namespace) -> dict:
    """Median forward and backward ms, extra peak MiB (CUDA), the loss and the gradient of the hidden states."""
    import torch

    cuda = x["hidden"].is_cuda

    def step(timed: bool):
        hidden = x["hidden"].detach().requires_grad_(True)
        if cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
        t0 = time.perf_counter()
        out = loss_fn(x, args, hidden)
        loss, logp = out if isinstance(out, tuple) else (out, None)
        if cuda:
            marks[1].record()
        t1 = time.perf_counter()
        loss.backward()
        if cuda:
            marks[2].record()
            torch.cuda.synchronize()
            times = (marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2]))
        else:
            times = ((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
        return loss.detach(), hidden.grad, times, logp

    for _ in range(args.warmup):
        step(False)
    fwd, bwd = [], []
    for _ in range(args.repeats):
        _, _, (f, b), _ = step(True)
        fwd.append(f)
        bwd.append(b)
    extra = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    loss, grad, _, logp = step(False)
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return dict(fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd), extra_mib=extra, loss=loss, grad=grad, logp=logp)


def settings_for(args: argparse.Namespace):
    from lowmem_vt.selfcheck.head import HeadSettings

    return HeadSettings(beta=BETA, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, loss_type=args.loss_type,
                        temperature=args.temperature, with_old=True)


def faulty(real: Callable, kind: str) -> Callable:
    """``fused_grpo_loss`` with the fused-linear head made wrong as LOWMEM_BENCH_FAULT says (FAULTS)."""
    def run(hidden, weight, *rest, backend, **kwargs):
        if backend != "triton_fused_linear":
            return real(hidden, weight, *rest, backend=backend, **kwargs)
        if kind == "temperature":
            kwargs = {**kwargs, "temperature": 1.0}
        if kind == "grad" and hidden.requires_grad:
            hidden.register_hook(lambda g: g * 1.01)
        if kind == "dw" and weight.requires_grad:
            weight.register_hook(lambda g: g * 1.01)
        loss, stats, logp = real(hidden, weight, *rest, backend=backend, **kwargs)
        if kind == "kl":
            loss, _, _ = real(hidden, weight, *rest, backend=backend, **{**kwargs, "beta": 0.0})
        if kind == "1":
            loss = loss * 1.01
        return loss, stats, logp

    return run


def install_fault(kind: str) -> None:
    import lowmem_vt.kernels.head as kernels_head
    import lowmem_vt.selfcheck.head as check_head

    if kind not in FAULTS:
        raise SystemExit(f"LOWMEM_BENCH_FAULT={kind!r}: expected one of {FAULTS}")
    for module in (kernels_head, check_head):
        module.fused_grpo_loss = faulty(module.fused_grpo_loss, kind)


def disagreement(r: dict, x: dict, args: argparse.Namespace, torch_runs: dict) -> tuple[dict, list[str]]:
    """One row's errors against the float64 head and the problems beyond the bound: the self-check's own rule on its
    recipe case (``head.judge_cases``; the float64 and torch runs there taken from ``torch_runs``, or added to it)."""
    from lowmem_vt.selfcheck import head

    run = {"loss": r["loss"], "dh": r["grad"], "logp": r.get("logp")}
    figures, problems, _ = head.judge_cases(x, settings_for(args), "row", run, x["hidden"].device, torch_runs, only=("recipe",))
    return {q: v["error"] for q, v in figures.get("recipe", {}).items()}, [p.removeprefix("recipe: ") for p in problems]


def cases_table(x: dict, args: argparse.Namespace, names: list[str], torch_runs: dict) -> tuple[list[dict], list[str]]:
    """Each of our heads at its default launch on every case of the self-check: rows and failures (the float64 and
    torch runs of each case added to ``torch_runs``)."""
    from lowmem_vt.selfcheck import head

    settings = settings_for(args)
    device = x["hidden"].device
    rows, failures = [], []
    for name in names:
        try:
            first = head._run_once(name, x, settings, device)
            figures, problems, torch_runs = head.judge_cases(x, settings, name, first, device, torch_runs)
        except Exception as exc:  # ours: a failure, with its reason
            figures, problems = {}, [f"raised {type(exc).__name__}: {str(exc)[:160]}"]
        for case, quantities in figures.items():
            rows.append({"method": name, "case": case, **{q: v["error"] for q, v in quantities.items()},
                         "worst": min(v["margin"] for v in quantities.values())})
        failures += [f"{name} (cases): {p}" for p in problems]
    return rows, failures


class Report:
    """Rows of the result table, rewritten to DIR/loss_head.{json,md} after each one."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header, self.rows = out, header, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, **row) -> None:
        self.rows.append(row)
        print(self._line(row), flush=True)
        self.add_summary()

    def add_summary(self) -> None:
        (self.out / "loss_head.json").write_text(json.dumps({**self.header, "rows": self.rows}, indent=1) + "\n")
        lines = [f"Loss head, {self.header['setting']}", "",
                 "| method | launch | fwd ms | bwd ms | fwd+bwd ms | extra peak MiB | error vs float64 | note |",
                 "|---|---|---:|---:|---:|---:|---|---|"]
        tail = []
        if self.header.get("cases"):
            keys = ["loss", "kl", "logp", "ref_pass", "dh", "dw"]
            tail += ["", f"Every case, errors against float64 (bound: {self.header['bound']}):", "",
                     bench_report.table(["method", "case", *keys, "worst bound/error"],
                                        [[c["method"], c["case"], *[c.get(k) for k in keys], c["worst"]] for c in self.header["cases"]])]
        if self.header.get("failures"):
            tail += ["", "**FAILED**: " + "; ".join(self.header["failures"])]
        (self.out / "loss_head.md").write_text("\n".join(lines + [self._line(r) for r in self.rows] + tail) + "\n")

    @staticmethod
    def _line(r: dict) -> str:
        def num(v, fmt):
            return "" if v is None else format(v, fmt)

        total = None if r.get("fwd_ms") is None else r["fwd_ms"] + r["bwd_ms"]
        return (f"| {r['method']} | {r.get('launch', '')} | {num(r.get('fwd_ms'), '.2f')} | {num(r.get('bwd_ms'), '.2f')} | "
                f"{num(total, '.2f')} | {num(r.get('extra_mib'), ',.0f')} | {r.get('agreement', '')} | {r.get('note', '')} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU
    import torch

    from lowmem_vt.kernels.head import ARCHS, launch_config
    from lowmem_vt.kernels.fused_linear import RowTiles, rows_per_chunk
    from lowmem_vt.kernels.chunked_logprobs import Tiles

    if not torch.cuda.is_available() and not args.smoke:
        print("bench/loss_head.py needs a CUDA GPU (or --smoke for a CPU check); nothing measured.")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cap, gpu = 10 * major + minor, torch.cuda.get_device_name(device)
    else:
        cap, gpu = None, "CPU (Triton interpreter; --smoke: sizes tiny, times meaningless)"
    if args.dtype == "auto":
        dtype = torch.float32 if cap is None else (torch.bfloat16 if cap >= 80 else torch.float16)
    else:
        dtype = getattr(torch, args.dtype)
    x = make_inputs(args, device, dtype)
    N, V, H = args.batch * args.seq, args.vocab, args.hidden
    floor_tflop = 2 * 2 * N * V * H / 1e12  # logits forward + dh: the two matmuls nothing can avoid
    report = Report(Path(args.out), dict(
        setting=f"B={args.batch} T={args.seq} (N={N}) H={H} V={V}, {str(dtype).removeprefix('torch.')}, loss_type "
                f"{args.loss_type}, {gpu}; matmul floor {floor_tflop:.2f} TFLOP (logits + dh)",
        device=gpu, capability=cap, dtype=str(dtype), N=N, H=H, V=V, floor_tflop=floor_tflop, smoke=args.smoke,
    ))

    config = launch_config(cap, dtype) if cap is not None else None
    small = dict(forward_tiles=Tiles(16, 32, 16, 4, 1), backward_tiles=Tiles(16, 32, 16, 4, 1)) if args.smoke else {}
    small_rows = dict(row_tiles=RowTiles(64, 4), chunk_rows=16) if args.smoke else {}
    liger_fn, liger_note = liger_loss_fn(args)
    methods: list[tuple[str, str, Callable | None, str]] = [
        ("torch", "chunked reference", head_loss("torch"), ""),
        ("naive", "full fp32 logits", naive_loss, ""),
        ("liger", "LigerFusedLinearGRPOLoss", liger_fn, liger_note if liger_fn else liger_note),
        ("triton_fused_linear", f"{rows_per_chunk(V)} rows/chunk" if not args.smoke else "16 rows/chunk",
         head_loss("triton_fused_linear", **small_rows), ""),
        ("triton_streaming", "launch table" if config else "interpreter tiles", head_loss("triton_streaming", **small), ""),
    ]
    if not args.smoke and "sweeps" not in args.skip:
        for spec in args.tiles:
            bn, bv, bh, w, st = (int(v) for v in spec.split("x"))
            tiles = Tiles(bn, bv, bh, w, st)
            methods.append(("triton_streaming", f"tiles {spec}", head_loss("triton_streaming", forward_tiles=tiles, backward_tiles=tiles), ""))
        for mib in args.scratch_mib:
            rows = rows_per_chunk(V, mib * 2**20)
            methods.append(("triton_fused_linear", f"scratch {mib} MiB = {rows} rows/chunk", head_loss("triton_fused_linear", chunk_rows=rows), ""))
        for block_v in args.row_block_v:
            methods.append(("triton_fused_linear", f"row block_v {block_v}", head_loss("triton_fused_linear", row_tiles=RowTiles(block_v, 8)), ""))
    elif args.smoke:
        methods.append(("triton_streaming", f"tiles {args.tiles[0]}", head_loss("triton_streaming", **small), ""))
        methods.append(("triton_fused_linear", "1 MiB scratch", head_loss("triton_fused_linear", chunk_rows=rows_per_chunk(V, 2**20),
                                                                         row_tiles=RowTiles(args.row_block_v[0], 4)), ""))

    fault = os.environ.get("LOWMEM_BENCH_FAULT")
    if fault:
        install_fault(fault)
    from lowmem_vt.selfcheck.compare import MULTIPLE

    report.header["bound"] = f"{MULTIPLE:g} x the torch head's own error against float64"
    failures = []
    torch_runs: dict = {}  # the float64 head's and the torch head's runs by case, shared by the table and the rows
    case_rows, case_failures = cases_table(x, args, [m for m in OURS if m not in args.skip], torch_runs)
    report.header["cases"] = case_rows
    failures += case_failures
    if args.skip_timing:  # one row per method, one untimed run each
        first_of_each = {}
        for m in methods:
            first_of_each.setdefault(m[0], m)
        methods = list(first_of_each.values())
        args.warmup, args.repeats = 0, 1
    for key, launch, fn, why_not in methods:
        if key in args.skip:
            report.add(method=key, launch=launch, note="skipped (--skip)")
            continue
        if fn is None:
            report.add(method=key, launch=launch, note=f"skipped: {why_not}")
            continue
        if key == "triton_streaming" and launch.startswith("tiles ") and cap is not None:
            from lowmem_vt.kernels.resources import tile_problems

            bn, bv, bh, w, st = (int(v) for v in launch.removeprefix("tiles ").split("x"))
            problems = tile_problems(Tiles(bn, bv, bh, w, st), Tiles(bn, bv, bh, w, st), cap, dtype)
            if problems:
                limit = ARCHS.get(cap, ("", 0))[1] // 1024
                report.add(method=key, launch=launch, note=f"refused (does not fit sm_{cap}, {limit} KB/block): " + "; ".join(problems)[:300])
                continue
        try:
            r = measure(fn, x, args)
        except Exception as exc:  # a peer's API mismatch should not hide the other rows; ours is a failure
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            if key in OURS:
                failures.append(f"{key} ({launch}): {note}")
            report.add(method=key, launch=launch, note=note)
            continue
        err, over = disagreement(r, x, args, torch_runs)
        agreement = ", ".join(f"{k} {v:.1e}" for k, v in err.items())
        note = ""
        if key == "torch":
            note = "the floor (the bound's unit)"
        elif key in OURS:
            if over:
                failures.append(f"{key} ({launch}): " + ", ".join(over))
                note = "FAILED: " + ", ".join(over)
        else:
            note = "a peer: reported, not checked"
        report.add(method=key, launch=launch, fwd_ms=r["fwd_ms"], bwd_ms=r["bwd_ms"], extra_mib=r["extra_mib"],
                   agreement=agreement, errors=err, note=note)
    report.header["failures"] = failures
    report.add_summary()
    if failures:
        print("FAILED (beyond the bound against the float64 head, or raised):\n  " + "\n  ".join(failures), flush=True)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
