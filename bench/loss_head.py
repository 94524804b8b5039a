"""Benchmark of the LM head + GRPO loss, forward + backward, on one GPU.

    python bench/loss_head.py                      # B=8, T=1024, H=1536, V=151,936, bf16
    python bench/loss_head.py --bwd-block-v 256    # try other tiles
    python bench/loss_head.py --out DIR [--smoke]  # also write DIR/loss_head.json + .md; --smoke: tiny, CPU

Compares (a) naive PyTorch with the full fp32 logits, (b) the chunked PyTorch reference (backend "torch"),
(c) Liger-Kernel's LigerFusedLinearGRPOLoss when liger_kernel imports, (d) ours (backend "triton").
Time: median over --repeats of forward + backward after --warmup runs, with cuda synchronize. Memory: peak
of torch.cuda.max_memory_allocated during one forward + backward, minus what was allocated before it (the
inputs), so it counts logits, saved activations, workspaces and the gradient of the hidden states.
The LM head is frozen, as under LoRA: only the hidden states get a gradient.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from typing import Callable

import torch

from lowmem_vt.grpo import LossCounts, grpo_loss
from lowmem_vt.kernels import Tiles, chunked_logprobs_reference, fused_grpo_loss

import report

EPSILON_LOW, EPSILON_HIGH, BETA = 0.2, 0.28, 0.04


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="completions per micro-batch (B)")
    p.add_argument("--seq", type=int, default=1024, help="completion length (T)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (H)")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (V)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--loss-type", choices=["grpo", "dr_grpo", "bnpo"], default="grpo")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=4096, help="rows per chunk of the PyTorch reference")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block-n", type=int, default=128, help="forward rows per program")
    p.add_argument("--block-v", type=int, default=128, help="forward vocabulary tile")
    p.add_argument("--block-h", type=int, default=64, help="hidden chunk per tl.dot (both passes)")
    p.add_argument("--v-splits", type=int, default=None, help="forward vocabulary splits (default: fill the GPU)")
    p.add_argument("--bwd-block-n", type=int, default=128, help="backward rows per program")
    p.add_argument("--bwd-block-v", type=int, default=128, help="backward vocabulary tile")
    p.add_argument("--num-warps", type=int, default=8)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["naive", "torch", "liger", "ours"], help="methods to leave out")
    p.add_argument("--out", default=None, help="write loss_head.json / loss_head.md here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32 (ours under TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.smoke:  # Liger compiles with torch.compile: minutes on CPU, so it is left to the GPU run
        args.batch, args.seq, args.hidden, args.vocab, args.dtype, args.chunk = 2, 16, 32, 100, "float32", 8
        args.repeats, args.warmup, args.skip = 2, 1, [*args.skip, "liger"]
        args.block_n = args.block_v = args.bwd_block_n = args.bwd_block_v = 32
        args.block_h = 16
        if os.environ.get("TRITON_INTERPRET") != "1":
            args.skip.append("ours")
    return args


def make_inputs(args: argparse.Namespace, device: torch.device) -> dict:
    B, T, H, V = args.batch, args.seq, args.hidden, args.vocab
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=device, generator=g) * 3.0 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
    with torch.no_grad():  # old / ref log-probs near the policy's, so that the clip and the KL act as in training
        logp = chunked_logprobs_reference(hidden.view(B * T, H), weight, targets.view(-1), args.temperature, args.chunk).view(B, T)
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=mask,
        advantages=torch.randn(B, device=device, generator=g),
        old_logp=logp + 0.1 * torch.randn(B, T, device=device, generator=g),
        ref_logp=logp + 0.1 * torch.randn(B, T, device=device, generator=g),
        counts=LossCounts(num_sequences=B, num_tokens=float(mask.sum()), max_completion_length=T),
    )


def naive_loss(x: dict, args: argparse.Namespace, hidden: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ x["weight"].T).float() / args.temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)
    loss, _ = grpo_loss(
        logp, x["mask"], x["advantages"], x["old_logp"], x["ref_logp"],
        beta=BETA, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, loss_type=args.loss_type, counts=x["counts"],
    )
    return loss


def chunked_loss(x: dict, args: argparse.Namespace, hidden: torch.Tensor) -> torch.Tensor:
    B, T, H = hidden.shape
    flat_targets = x["targets"].reshape(B * T)
    logp = chunked_logprobs_reference(hidden.reshape(B * T, H), x["weight"], flat_targets, args.temperature, args.chunk)
    loss, _ = grpo_loss(
        logp.view(B, T), x["mask"], x["advantages"], x["old_logp"], x["ref_logp"],
        beta=BETA, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, loss_type=args.loss_type, counts=x["counts"],
    )
    return loss


def ours_loss(x: dict, args: argparse.Namespace, hidden: torch.Tensor) -> torch.Tensor:
    forward_tiles = Tiles(args.block_n, args.block_v, args.block_h, args.num_warps, args.num_stages, args.v_splits)
    backward_tiles = Tiles(args.bwd_block_n, args.bwd_block_v, args.block_h, args.num_warps, args.num_stages)
    loss, _, _ = fused_grpo_loss(
        hidden, x["weight"], x["targets"], x["mask"], x["advantages"], x["old_logp"], x["ref_logp"],
        beta=BETA, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, loss_type=args.loss_type, counts=x["counts"],
        temperature=args.temperature, backend="triton", forward_tiles=forward_tiles, backward_tiles=backward_tiles,
    )
    return loss


def liger_loss_fn(args: argparse.Namespace) -> tuple[Callable | None, str]:
    """A closure running Liger's fused GRPO loss, or None and why not."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:  # not installed, or broken against this torch
        return None, f"liger_kernel does not import ({type(exc).__name__}: {exc})"
    wanted = dict(
        beta=BETA, epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, temperature=args.temperature,
        use_ref_model=True, loss_type=args.loss_type, max_completion_length=args.seq,
    )
    accepted = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
    module = LigerFusedLinearGRPOLoss(**{k: v for k, v in wanted.items() if k in accepted})
    note = "" if "loss_type" in accepted else " (this version has no loss_type: its own default)"

    def run(x: dict, _args: argparse.Namespace, hidden: torch.Tensor) -> torch.Tensor:
        # positional: _input, lin_weight, selected_token_ids, attention_mask, advantages, bias, ref_logps, old_logps
        out = module(hidden, x["weight"], x["targets"], x["mask"], x["advantages"], None, x["ref_logp"], x["old_logp"])
        return out[0] if isinstance(out, tuple) else out

    return run, note


def measure(loss_fn: Callable, x: dict, args: argparse.Namespace) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(median fwd+bwd ms, extra peak MiB, loss, grad of hidden) for one method."""

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        hidden = x["hidden"].detach().requires_grad_(True)
        loss = loss_fn(x, args, hidden)
        loss.backward()
        return loss.detach(), hidden.grad

    cuda = x["hidden"].is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    if not cuda:
        loss, grad = step()
        return statistics.median(times), float("nan"), loss, grad

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss, grad = step()
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return statistics.median(times), extra_mib, loss, grad


def main() -> int:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        return report.skip(args.out, "loss_head", "bench/loss_head.py needs a CUDA GPU (--smoke runs it on CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    x = make_inputs(args, device)
    N = args.batch * args.seq
    tflop = 3 * 2 * N * args.vocab * args.hidden / 1e12  # logits forward, recomputed logits, dh
    head = (f"N={N} (B={args.batch}, T={args.seq}), H={args.hidden}, V={args.vocab}, {args.dtype}, loss_type={args.loss_type}, "
            f"{'cpu (smoke)' if args.smoke else torch.cuda.get_device_name(device)}; {tflop:.1f} TFLOP of matmul in fwd+bwd "
            "with recomputation")
    print(head)
    results: list[dict] = []
    header = "| method | fwd+bwd ms (median) | extra peak MiB | rel. error vs first row |\n|---|---:|---:|---|"

    def save() -> None:
        report.write(args.out, "loss_head", {"shapes": vars(args), "methods": results}, "\n".join([head, "", header, *rows]))

    liger_fn, liger_note = liger_loss_fn(args)
    methods: list[tuple[str, str, Callable | None, str]] = [
        ("naive", "naive PyTorch (full fp32 logits)", naive_loss, ""),
        ("torch", f"PyTorch reference, chunks of {args.chunk} rows", chunked_loss, ""),
        ("liger", "Liger LigerFusedLinearGRPOLoss" + (liger_note if liger_fn else ""), liger_fn, liger_note),
        ("ours", "ours (Triton, backend='triton')", ours_loss, ""),
    ]

    rows = []
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    for key, name, fn, why_not in methods:
        if key in args.skip:
            rows.append(f"| {name} | skipped (--skip{' or --smoke' if args.smoke else ''}) | | |")
            results.append({"method": key, "status": "skipped"})
            continue
        if fn is None:
            rows.append(f"| {name} | skipped: {why_not} | | |")
            results.append({"method": key, "status": "skipped", "reason": why_not})
            save()
            continue
        try:
            ms, mib, loss, grad = measure(fn, x, args)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(f"| {name} | out of memory | | |")
            results.append({"method": key, "status": "out of memory"})
            save()
            continue
        except Exception as exc:  # a third-party API mismatch should not hide the other rows
            rows.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | | |")
            results.append({"method": key, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]})
            save()
            continue
        if reference is None:
            reference = (loss, grad)
            agreement = "reference"
        else:
            loss_err = float((loss - reference[0]).abs() / reference[0].abs().clamp(min=1e-12))
            grad_err = float((grad.float() - reference[1].float()).abs().max() / reference[1].float().abs().max())
            agreement = f"loss {loss_err:.1e}, dh {grad_err:.1e}"
        rows.append(f"| {name} | {ms:.2f} | {mib:,.0f} | {agreement} |")
        results.append({"method": key, "status": "ok", "ms": ms, "extra_mib": None if mib != mib else mib, "agreement": agreement})
        save()
        print(rows[-1], flush=True)

    save()
    print()
    print(header)
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
