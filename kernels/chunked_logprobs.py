"""Log-probabilities of chosen tokens straight from hidden states, without the [N, V] logits.

``logp[n] = log_softmax(hidden[n] @ weight.T / temperature)[targets[n]]``

For Qwen2-VL (V = 151,936) the fp32 logits of one 8k-token micro-batch take 5 GB; the kernels here keep
at most a [BLOCK_N, BLOCK_V] tile of them, in registers.

* Forward: programs on a grid (row blocks, vocabulary splits) stream their vocabulary range of ``weight``
  tile by tile, keeping an online log-sum-exp in fp32 and picking the target logit on the way; a tiny
  finishing kernel merges the per-split log-sum-exps into ``lse`` and ``logp``. Splitting the vocabulary
  gives the GPU enough programs when the micro-batch has few row blocks. With ``with_entropy`` (the entropy
  mask of ``grpo.top_entropy_quantile``; an ``ENTROPY`` constexpr, so the plain pass compiles without it) the
  same loop also carries sum exp(z - max) * (z - max) and each split's entropy, max and log-sum go to a
  [3, splits, N] buffer, which the finishing kernel merges into each row's entropy (the chain rule,
  ``_online_entropy_step``): per tile one more multiply-add and row sum, no further pass over W.
* Backward: one program per (row block, vocabulary tile) recomputes its logits tile, forms
  ``dlogits = g * (onehot(target) - softmax) / temperature`` and adds ``dlogits @ W_tile`` into an fp32
  ``dh`` with atomics (and ``dlogits.T @ h`` into ``dW`` when the head is trained). A row block cannot
  keep its whole ``dh`` in registers (BLOCK_N x H fp32 is 768 KB at H = 1536), so each vocabulary tile
  flushes its share; the order of those atomic adds makes ``dh`` reproducible only to rounding. Row
  blocks whose incoming gradient is all zero (completion padding) return before any matmul.

Matmuls run on ``tl.dot`` with the inputs' dtype (bf16 on the GPU) and fp32 accumulation; the softmax
arithmetic is fp32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
import triton.language as tl

from .interpreter import squeeze_interpreter_scalars

squeeze_interpreter_scalars()  # loop bounds that are kernel arguments, under the interpreter with NumPy >= 2.4


@dataclass(frozen=True)
class Tiles:
    """Launch shape of one streaming kernel. Tests use small tiles under the interpreter; the GPU big ones.

    block_n: rows per program; block_v: vocabulary columns per step; block_h: hidden columns per tl.dot
    (reduced to a divisor of H). v_splits: forward programs per row block along the vocabulary, None to
    give the GPU about two programs per SM. All block sizes are powers of two >= 16 (tl.dot's minimum).
    """

    block_n: int = 128
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    v_splits: int | None = None

    def as_list(self) -> list[int]:
        """The form torch custom ops take (v_splits None as 0)."""
        return [self.block_n, self.block_v, self.block_h, self.num_warps, self.num_stages, self.v_splits or 0]

    @classmethod
    def from_list(cls, values: list[int]) -> "Tiles":
        block_n, block_v, block_h, num_warps, num_stages, v_splits = values
        return cls(block_n, block_v, block_h, num_warps, num_stages, v_splits or None)


# The package defaults, used off CUDA (the interpreter, fake tensors); on a GPU ``head.launch_config``
# picks the tiles of its architecture (compiled and resource-checked on CPU, not timed).
FORWARD_TILES = Tiles(block_n=128, block_v=128, block_h=64)
BACKWARD_TILES = Tiles(block_n=128, block_v=128, block_h=64)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------


def chunked_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Plain-PyTorch log-probs of ``targets``, ``chunk_size`` rows of fp32 logits at a time.

    hidden: [N, H]; weight: [V, H]; targets: [N] long. Returns [N] float32 (float64 for float64 inputs, so
    that ``torch.autograd.gradcheck`` can run on it). Differentiable by autograd in hidden and weight.
    """
    if not (torch.compiler.is_compiling() or is_fake(targets)):  # values cannot be read while tracing
        check_targets(targets, weight.shape[0])
    compute_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    w = weight.to(compute_dtype)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size].to(compute_dtype)
        logits = (h @ w.T) / temperature
        logp = torch.log_softmax(logits, dim=-1)
        pieces.append(logp.gather(1, targets[start : start + chunk_size].unsqueeze(1)).squeeze(1))
    if not pieces:
        return hidden.new_zeros(0, dtype=compute_dtype)
    return torch.cat(pieces)


@torch.no_grad()
def chunked_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 4096) -> torch.Tensor:
    """Entropy (nats) of softmax(hidden @ weight.T / temperature) per row, ``chunk_rows`` rows of fp32 logits at a time.

    hidden: [N, H]; weight: [V, H]. Returns [N] float32 (float64 for float64 inputs), no gradient (the entropy mask
    of ``top_entropy_quantile`` selects tokens, it is not differentiated). The torch backend's entropy and the
    reference the Triton heads' fused entropy is tested against; a -inf logit (probability 0) adds nothing.
    """
    compute_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    w = weight.to(compute_dtype)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[start : start + chunk_rows].to(compute_dtype) @ w.T) / temperature
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        pieces.append(-torch.where(probs > 0, probs * logp, 0.0).sum(-1))
    if not pieces:
        return hidden.new_zeros(0, dtype=compute_dtype)
    return torch.cat(pieces)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    h_block, w_block, n_valid, v_valid, H, stride_hn, stride_wv, inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 tile of hidden @ weight.T / temperature.

    h_block points at the block's first row of hidden, w_block at the tile's first row of weight. Rows past
    n_valid and columns past v_valid repeat the last valid one (finite values the caller masks out), so the
    loads in the hot loop need no predicates.
    """
    offs_n = tl.minimum(tl.arange(0, BLOCK_N), n_valid - 1)
    offs_v = tl.minimum(tl.arange(0, BLOCK_V), v_valid - 1)
    offs_k = tl.arange(0, BLOCK_H)
    h_ptrs = h_block + offs_n[:, None] * stride_hn + offs_k[None, :]
    w_ptrs = w_block + offs_k[:, None] + offs_v[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for _ in range(0, H, BLOCK_H):
        acc = tl.dot(tl.load(h_ptrs), tl.load(w_ptrs), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc * inv_temperature


@triton.jit
def _lse_partial_kernel(
    h_ptr, w_ptr, targets_ptr, part_lse_ptr, target_logit_ptr, part_entropy_ptr,
    N, V, H, stride_hn, stride_wv, tiles_per_split, inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    """Log-sum-exp of one row block over one vocabulary split; the target logit from the split holding it;
    with ENTROPY, into part_entropy_ptr [3, splits, N]: the entropy of the softmax restricted to the split
    (``_online_entropy_step``), the split's max logit and the log of its sum of exp(z - max), kept apart so that
    the merge sees differences of log-sum-exps exactly where fp32 rounds their sum (ulp 5e-4 at |z| ~ 6000).

    Grid (row blocks, splits) with row blocks fastest, so programs running together walk the same tiles
    of W and share them through L2.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_start = pid_n * BLOCK_N
    rows = row_start + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_v = tl.arange(0, BLOCK_V)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    # 64-bit block offsets: N * H and V * H pass 2**31 for long micro-batches and big heads
    h_block = h_ptr + row_start.to(tl.int64) * stride_hn
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    running_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)  # ENTROPY: sum of exp(z - max) * (z - max)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w_block = w_ptr + v_begin.to(tl.int64) * stride_wv
    for v0 in range(v_begin, v_end, BLOCK_V):
        logits = _logits_tile(h_block, w_block, N - row_start, v_end - v0, H,
                              stride_hn, stride_wv, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        w_block += BLOCK_V * stride_wv
        logits = tl.where((offs_v < v_end - v0)[None, :], logits, float("-inf"))
        # every tile holds at least one real column, so new_max is finite and exp(-inf - finite) = 0
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        exps = tl.exp(logits - new_max[:, None])
        if ENTROPY:
            running_dot = _online_entropy_step(running_max, running_sum, running_dot, new_max,
                                               tl.sum(exps * tl.where(exps > 0.0, logits - new_max[:, None], 0.0), axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(exps, axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(offs_v[None, :] == (targets - v0)[:, None], logits, 0.0), axis=1)

    tl.store(part_lse_ptr + pid_s * N + rows, running_max + tl.log(running_sum), mask=row_mask)
    if ENTROPY:
        log_sum = tl.log(running_sum)
        part = part_entropy_ptr + pid_s * N + rows
        split_stride = tl.num_programs(1) * N
        tl.store(part, log_sum - running_dot / running_sum, mask=row_mask)
        tl.store(part + split_stride, running_max, mask=row_mask)
        tl.store(part + 2 * split_stride, log_sum, mask=row_mask)
    holds_target = (targets >= v_begin) & (targets < v_end)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & holds_target)


@triton.jit
def _online_entropy_step(running_max, running_sum, running_dot, new_max, new_dot):
    """The entropy's running sum, ``dot = sum_i exp(a_i - max) * (a_i - max - h_i)``, after the running max moves
    to ``new_max`` and terms ``new_dot`` (already relative to new_max) join it.

    With ``s = sum_i exp(a_i - max)`` (the log-sum-exp's running sum) the entropy of softmax(a) is
    ``log(s) - dot / s``. The logits of a row are terms with h_i = 0: H = lse - sum(p * z), z = logits / T. Vocabulary
    splits are terms with a_s their log-sum-exp and h_s their own entropy: H = sum_s w_s * h_s + H(w), the chain rule,
    w the splits' shares of the mass. Relative to the running max every term is of the order of log V whatever |z|,
    where lse - sum(p * z) in fp32 subtracts two numbers of the size of z (at |z| ~ 6000, ulp 5e-4). Callers zero
    (a - max) where exp(a - max) is 0 (masked columns, -inf logits) before multiplying: no 0 * -inf. Moving the max,
    ``a - max_old = (a - new_max) + (max_old - new_max)``: the old terms shift by s * (max_old - new_max) and scale by
    exp(max_old - new_max), as the log-sum-exp's sum does (s = 0 at the start, when max_old is -inf: no shift).
    """
    shift = running_sum * tl.where(running_sum > 0.0, running_max - new_max, 0.0)
    return (running_dot + shift) * tl.exp(running_max - new_max) + new_dot


@triton.jit
def _merge_splits(part_lse_ptr, offs, mask, N, num_splits):
    """Log-sum-exp over the vocabulary splits of the per-split log-sum-exps at rows ``offs``."""
    running_max = tl.full(offs.shape, float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros(offs.shape, dtype=tl.float32)
    for s in range(0, num_splits):
        x = tl.load(part_lse_ptr + s * N + offs, mask=mask, other=0.0)
        new_max = tl.maximum(running_max, x)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max)
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _merge_split_entropies(part_entropy_ptr, offs, mask, N, num_splits):
    """Entropy over the vocabulary splits at rows ``offs``, merged online as the log-sum-exp is (``_merge_splits``),
    from each split's entropy h, max m and log-sum ls (``_lse_partial_kernel``): the split is a term of log-weight
    a = m + ls, taken relative to the running max of the m (a - max <= log V: exp cannot overflow) and summed with
    ``_online_entropy_step`` (the chain rule)."""
    running_max = tl.full(offs.shape, float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros(offs.shape, dtype=tl.float32)
    running_dot = tl.zeros(offs.shape, dtype=tl.float32)
    for s in range(0, num_splits):
        part = part_entropy_ptr + s * N + offs
        h = tl.load(part, mask=mask, other=0.0)
        split_max = tl.load(part + num_splits * N, mask=mask, other=0.0)
        log_sum = tl.load(part + 2 * num_splits * N, mask=mask, other=0.0)
        new_max = tl.maximum(running_max, split_max)
        a = (split_max - new_max) + log_sum  # the split's log-sum-exp relative to new_max
        share = tl.exp(a)
        running_dot = _online_entropy_step(running_max, running_sum, running_dot, new_max,
                                           share * tl.where(share > 0.0, a - h, 0.0))
        running_sum = running_sum * tl.exp(running_max - new_max) + share
        running_max = new_max
    return tl.log(running_sum) - running_dot / running_sum


@triton.jit
def _logprobs_finish_kernel(part_lse_ptr, target_logit_ptr, part_entropy_ptr, lse_ptr, logp_ptr, entropy_ptr, N, num_splits,
                            BLOCK: tl.constexpr, ENTROPY: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    lse = _merge_splits(part_lse_ptr, offs, mask, N, num_splits)
    target_logit = tl.load(target_logit_ptr + offs, mask=mask, other=0.0)
    tl.store(lse_ptr + offs, lse, mask=mask)
    tl.store(logp_ptr + offs, target_logit - lse, mask=mask)
    if ENTROPY:
        tl.store(entropy_ptr + offs, _merge_split_entropies(part_entropy_ptr, offs, mask, N, num_splits), mask=mask)


@triton.jit
def _logprobs_backward_kernel(
    h_ptr, w_ptr, targets_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr,
    N, V, H, stride_hn, stride_wv, inv_temperature, dlogits_scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    """dh += dlogits @ W_tile and dW_tile += dlogits.T @ h for one (row block, vocabulary tile).

    grad_ptr holds d loss / d logp per row; dlogits = g * (onehot(target) - softmax) / temperature.
    dh [N, H] and dW [V, H] are fp32, contiguous, zero-initialised.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    row_start = pid_n * BLOCK_N
    v_start = pid_v * BLOCK_V
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_H)
    row_mask = offs_n < N - row_start
    col_mask = offs_v < V - v_start
    grad = tl.load(grad_ptr + row_start + offs_n, mask=row_mask, other=0.0)
    # padding at the end of each completion gives whole row blocks of zero gradient: skip their matmuls
    if tl.max(tl.abs(grad), axis=0) == 0.0:
        return

    h_block = h_ptr + row_start.to(tl.int64) * stride_hn
    w_block = w_ptr + v_start.to(tl.int64) * stride_wv
    logits = _logits_tile(h_block, w_block, N - row_start, V - v_start, H, stride_hn, stride_wv,
                          inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    # rows past N repeat the last real row's logits: an lse of +inf gives them probability 0, not exp(logit)
    lse = tl.load(lse_ptr + row_start + offs_n, mask=row_mask, other=float("inf"))
    targets = tl.load(targets_ptr + row_start + offs_n, mask=row_mask, other=-1).to(tl.int32)
    probs = tl.exp(logits - lse[:, None])
    onehot = tl.where(offs_v[None, :] == (targets - v_start)[:, None], 1.0, 0.0)
    # the second matmul runs in W's dtype (bf16 / fp16 on the GPU) like the first, accumulating in fp32. Its
    # operand is d logp / d logits (<= 1 / temperature) times dlogits_scale (the host's
    # ``dlogits_scale(dtype)``: 256 for fp16); the row's gradient g (the aggregation weight ~1 / tokens, times the loss scale) and
    # 1 / dlogits_scale multiply the fp32 product, so fp16 never holds g * p
    dunit = tl.where(row_mask[:, None] & col_mask[None, :], (onehot - probs) * (inv_temperature * dlogits_scale), 0.0)
    dunit = dunit.to(w_ptr.dtype.element_ty)
    row_factor = grad / dlogits_scale

    # rows / columns past the end read the last valid one: finite, and multiplied by dlogits = 0
    offs_n_read = tl.minimum(offs_n, N - row_start - 1)
    offs_v_read = tl.minimum(offs_v, V - v_start - 1)
    for k0 in range(0, H, BLOCK_H):
        if COMPUTE_DH:
            w_tile = tl.load(w_block + offs_v_read[:, None] * stride_wv + (k0 + offs_k)[None, :])
            dh_part = tl.dot(dunit, w_tile, input_precision=DOT_PRECISION) * row_factor[:, None]
            dh_ptrs = dh_ptr + row_start.to(tl.int64) * H + offs_n[:, None] * H + (k0 + offs_k)[None, :]
            tl.atomic_add(dh_ptrs, dh_part, mask=row_mask[:, None], sem="relaxed")
        if COMPUTE_DW:
            h_tile = tl.load(h_block + offs_n_read[:, None] * stride_hn + (k0 + offs_k)[None, :])
            h_tile = (h_tile.to(tl.float32) * grad[:, None]).to(h_tile.dtype)
            dw_part = tl.dot(tl.trans(dunit), h_tile, input_precision=DOT_PRECISION) / dlogits_scale
            dw_ptrs = dw_ptr + v_start.to(tl.int64) * H + offs_v[:, None] * H + (k0 + offs_k)[None, :]
            tl.atomic_add(dw_ptrs, dw_part, mask=col_mask[:, None], sem="relaxed")


# ----------------------------------------------------------------------------------------------------
# Launchers (shared with grpo_loss.py)
# ----------------------------------------------------------------------------------------------------

_FINISH_BLOCK = 1024


def check_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """hidden [N, H] and weight [V, H] of one dtype, targets [N]; raises ValueError otherwise (both heads)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N = {hidden.shape[0]}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tiles: Tiles) -> int:
    """Validate shapes; return the hidden chunk per tl.dot (a divisor of H)."""
    check_shapes(hidden, weight, targets)
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden and weight must be contiguous along H")
    H = hidden.shape[1]
    block_h = min(tiles.block_h, H & -H)  # largest power of two dividing H, capped by the tile
    if block_h < 16:
        raise ValueError(f"the Triton kernels need H to be a multiple of 16 (tl.dot's minimum), got H = {H}")
    return block_h


def dlogits_scale(dtype: torch.dtype) -> float:
    """Factor on d logp / d logits (magnitude <= 1 / temperature) before it is rounded to ``dtype``.

    fp16 has 5 exponent bits: probabilities below 6e-5 would be subnormal (fewer bits) and below 6e-8
    zero, and over a 151,936-token vocabulary most of the softmax mass can sit there. 256 lifts them by 8
    binades and leaves 1 / temperature * 256 far below fp16's maximum (65,504) for any temperature >= 0.04.
    The fp32 matmul result is divided by it again. bf16 and fp32 have fp32's exponent range: 1.
    """
    return 256.0 if dtype == torch.float16 else 1.0


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run in tf32 on the GPU; the reference does exact fp32
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_v_splits(row_blocks: int, v_tiles: int, tiles: Tiles, device: torch.device) -> int:
    if tiles.v_splits is not None:
        return max(1, min(tiles.v_splits, v_tiles))
    if device.type != "cuda":
        return 1
    target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, triton.cdiv(target_programs, row_blocks)))


def lse_and_target_logits(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, tiles: Tiles,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Streaming forward pass. Returns (per-split lse [splits, N] fp32, target logit / temperature [N] fp32, splits,
    with ``with_entropy`` the per-split entropy, max logit and log-sum [3, splits, N] fp32, else None)."""
    block_h = _check_inputs(hidden, weight, targets, tiles)
    N, H = hidden.shape
    V = weight.shape[0]
    row_blocks = triton.cdiv(N, tiles.block_n)
    v_tiles = triton.cdiv(V, tiles.block_v)
    splits = _num_v_splits(row_blocks, v_tiles, tiles, hidden.device)
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
    part_lse = torch.empty(splits, N, device=hidden.device, dtype=torch.float32)
    part_entropy = torch.empty(3, splits, N, device=hidden.device, dtype=torch.float32) if with_entropy else None
    target_logit = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    if N == 0:
        return part_lse, target_logit, splits, part_entropy
    _lse_partial_kernel[(row_blocks, splits)](
        hidden, weight, targets, part_lse, target_logit, part_lse if part_entropy is None else part_entropy,
        N, V, H, hidden.stride(0), weight.stride(0), tiles_per_split, 1.0 / temperature,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_H=block_h, DOT_PRECISION=_dot_precision(hidden.dtype),
        ENTROPY=with_entropy, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return part_lse, target_logit, splits, part_entropy


def logprobs_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, tiles: Tiles,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32 or None) of softmax(hidden [N, H] @ weight [V, H].T /
    temperature); the entropy (nats) from the same streaming pass, with ``with_entropy``."""
    N = hidden.shape[0]
    part_lse, target_logit, splits, part_entropy = lse_and_target_logits(hidden, weight, targets, temperature, tiles, with_entropy)
    lse = torch.empty_like(target_logit)
    logp = torch.empty_like(target_logit)
    entropy = torch.empty_like(target_logit) if with_entropy else None
    if N == 0:
        return logp, lse, entropy
    _logprobs_finish_kernel[(triton.cdiv(N, _FINISH_BLOCK),)](
        part_lse, target_logit, part_lse if part_entropy is None else part_entropy, lse, logp,
        lse if entropy is None else entropy, N, splits, BLOCK=_FINISH_BLOCK, ENTROPY=with_entropy,
    )
    return logp, lse, entropy


def logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    tiles: Tiles,
    compute_dh: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Streaming backward pass: (dh [N, H] in hidden's dtype or None, dW [V, H] in weight's dtype or None).

    grad_logp: [N] fp32, d loss / d logp per row.
    """
    block_h = _check_inputs(hidden, weight, targets, tiles)
    N, H = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(N, H, device=hidden.device, dtype=torch.float32) if compute_dh else None
    dw = torch.zeros(V, H, device=weight.device, dtype=torch.float32) if compute_dw else None
    if N > 0 and (compute_dh or compute_dw):
        grid = (triton.cdiv(N, tiles.block_n), triton.cdiv(V, tiles.block_v))
        _logprobs_backward_kernel[grid](
            hidden, weight, targets, lse, grad_logp.float().contiguous(),
            dh if compute_dh else lse, dw if compute_dw else lse,  # unused pointers when not computed
            N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature, dlogits_scale(hidden.dtype),
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_H=block_h, DOT_PRECISION=_dot_precision(hidden.dtype),
            COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    return (dh.to(hidden.dtype) if compute_dh else None), (dw.to(weight.dtype) if compute_dw else None)


# ----------------------------------------------------------------------------------------------------
# torch custom ops (fake implementations for FakeTensorMode / torch.compile) and their autograd
# ----------------------------------------------------------------------------------------------------


def check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every target lies in [0, vocab_size). Reads the values: one host sync.

    A kernel would silently return -lse for an out-of-range target (and torch.gather a device assert on
    CUDA), so the Triton ops and the reference check first.
    """
    if targets.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(targets))
    if lo < 0 or hi >= vocab_size:
        bad = targets[(targets < 0) | (targets >= vocab_size)]
        raise ValueError(
            f"targets must be token ids in [0, {vocab_size}) (the LM head's vocabulary), got values in [{lo}, {hi}] "
            f"({bad.numel()} out of range, e.g. {bad[:5].tolist()}); check the tokenizer / completion ids against "
            "the model's vocabulary and the padding id"
        )


def _empty_like_rows(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("lowmem_vt::streaming_logprobs", mutates_args=())
def streaming_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
    forward_tiles: list[int], backward_tiles: list[int], with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N] fp32, lse [N] fp32, entropy [N] fp32 with ``with_entropy``, else [0]) by the streaming forward
    kernels. logp is differentiable in hidden and weight (backward_tiles is for that pass); the entropy is not (it
    selects tokens). Tiles are passed as ``Tiles.as_list()``: custom ops take no dataclasses."""
    check_targets(targets, weight.shape[0])
    logp, lse, entropy = logprobs_forward(hidden, weight, targets, temperature, Tiles.from_list(forward_tiles), with_entropy)
    return logp, lse, (hidden.new_empty(0, dtype=torch.float32) if entropy is None else entropy)


@streaming_logprobs_op.register_fake
def _(hidden, weight, targets, temperature, forward_tiles, backward_tiles, with_entropy=False):
    _check_inputs(hidden, weight, targets, Tiles.from_list(forward_tiles))
    entropy = _empty_like_rows(hidden) if with_entropy else hidden.new_empty(0, dtype=torch.float32)
    return _empty_like_rows(hidden), _empty_like_rows(hidden), entropy


@torch.library.custom_op("lowmem_vt::streaming_logprobs_backward", mutates_args=())
def streaming_logprobs_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
    temperature: float, tiles: list[int], compute_dh: bool, compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh [N, H], dW [V, H]) by the streaming backward kernel; an empty [0] tensor for one not computed."""
    dh, dw = logprobs_backward(hidden, weight, targets, lse, grad_logp, temperature, Tiles.from_list(tiles), compute_dh, compute_dw)
    return (hidden.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@streaming_logprobs_backward_op.register_fake
def _(hidden, weight, targets, lse, grad_logp, temperature, tiles, compute_dh, compute_dw):
    return (torch.empty_like(hidden) if compute_dh else hidden.new_empty(0)), (torch.empty_like(weight) if compute_dw else weight.new_empty(0))


def streaming_input_grads(ctx, grad_logp: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dh, dW) from a ctx holding hidden, weight, targets, lse, temperature, backward_tiles; None where not needed."""
    hidden, weight, targets, lse = ctx.saved_tensors[:4]
    compute_dh, compute_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (compute_dh or compute_dw):
        return None, None
    dh, dw = streaming_logprobs_backward_op(
        hidden, weight, targets, lse, grad_logp.float().contiguous(), ctx.temperature, ctx.backward_tiles, compute_dh, compute_dw,
    )
    return (dh if compute_dh else None), (dw if compute_dw else None)


def _streaming_logprobs_setup(ctx, inputs, output):
    hidden, weight, targets, temperature, _forward_tiles, backward_tiles, _with_entropy = inputs
    _logp, lse, entropy = output
    ctx.save_for_backward(hidden, weight, targets, lse)
    ctx.temperature = temperature
    ctx.backward_tiles = backward_tiles
    ctx.mark_non_differentiable(lse, entropy)


def _streaming_logprobs_backward(ctx, grad_logp, _grad_lse, _grad_entropy):
    dh, dw = streaming_input_grads(ctx, grad_logp)
    return dh, dw, None, None, None, None, None


streaming_logprobs_op.register_autograd(_streaming_logprobs_backward, setup_context=_streaming_logprobs_setup)


# ----------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------


def _prepare(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden in weight's dtype with unit stride along H (autograd sees the cast); targets contiguous long."""
    hidden = hidden.to(weight.dtype)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    return hidden, targets.contiguous().long()


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "triton",
    *,
    forward_tiles: Tiles = FORWARD_TILES,
    backward_tiles: Tiles = BACKWARD_TILES,
) -> torch.Tensor:
    """Log-probs of ``targets`` under ``softmax(hidden @ weight.T / temperature)``, never forming [N, V].

    hidden: [N, H] (cast to weight's dtype); weight: [V, H]; targets: [N] long in [0, V).
    Returns [N] float32, differentiable in hidden and weight. backend: "triton" / "triton_streaming"
    (streaming kernels; needs CUDA or TRITON_INTERPRET=1, and H a multiple of 16) or "torch"
    (``chunked_logprobs_reference``). The fused-linear head has no such entry: it forms the gradient of a
    loss it knows (``fused_grpo_loss``).
    """
    if backend == "torch":
        return chunked_logprobs_reference(hidden, weight, targets, temperature)
    if backend not in ("triton", "triton_streaming"):
        raise ValueError(f"unknown backend {backend!r} for chunked_logprobs; expected 'triton', 'triton_streaming' or 'torch'")
    hidden, targets = _prepare(hidden, weight, targets)
    logp, _, _ = streaming_logprobs_op(hidden, weight, targets, float(temperature), forward_tiles.as_list(), backward_tiles.as_list())
    return logp
