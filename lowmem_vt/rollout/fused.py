"""The decode step's two fused operators: RMSNorm, and rotary + KV-cache write. Triton on CUDA, PyTorch elsewhere.

A decode step on a few rows is bound by the number of kernels it launches, not by arithmetic: Hugging Face's
RMSNorm is 8 kernels in bf16 and rotary with the cache writes 12 per layer. Each operator here is one
``torch.library`` custom op, so it is one kernel on CUDA, one operator to a dispatch counter, and one node to
``torch.compile``. The PyTorch implementations are the references the Triton kernels are tested against
(``tests/test_rollout_engine.py`` runs the kernels under ``TRITON_INTERPRET=1`` in float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.interpreter import squeeze_interpreter_scalars

squeeze_interpreter_scalars()  # loop bounds that are kernel arguments, under the interpreter with NumPy >= 2.4


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    """RMSNorm of x [N, H] in float32. Qwen2RMSNorm: round to x's dtype, then scale by the weight; zero-centred
    (Qwen3.5, whose weights start at 0): scale by 1 + weight in float32, then round."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centred:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half layout, as the models' ``apply_rotary_pos_emb``) of x by cos, sin (broadcast).
    Partial rotary (Qwen3.5: a quarter of the head): cos and sin cover the first dims, the rest pass unchanged."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((rotate(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_into_cache_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor, sample: torch.Tensor,
                              width: int) -> torch.Tensor:
    """See ``rope_into_cache``; Hugging Face's ``apply_rotary_pos_emb`` arithmetic, in q's dtype."""
    kv_heads, d = k_cache.shape[1], k_cache.shape[3]
    B = q.shape[0]
    P, heads = B // width, q.shape[1] // d
    cos, sin = cos[:, None], sin[:, None]
    qr = rotate(q.view(B, heads, d), cos, sin)
    kr = rotate(k.view(B, kv_heads, d), cos, sin)
    prompt = torch.arange(P, device=q.device).repeat_interleave(width)[:, None]
    where = (slot + sample)[:, None]
    head = torch.arange(kv_heads, device=q.device)[None]
    k_cache.index_put_((prompt, head, where), kr)
    v_cache.index_put_((prompt, head, where), v.view(B, kv_heads, d))
    group = heads // kv_heads
    return qr.view(P, width, kv_heads, group, d).permute(0, 2, 1, 3, 4).reshape(P, kv_heads, width * group, d)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_stride, out_stride, eps, H: tl.constexpr, BLOCK: tl.constexpr,
                     ZERO_CENTRED: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if ZERO_CENTRED:  # scale by 1 + w in float32, then round (Qwen3.5)
        y = y * (1.0 + w)
    else:  # round to the input dtype before the weight, as Qwen2RMSNorm does
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=inside)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    N, H = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _rms_norm_kernel[(N,)](x, weight, out, x.stride(0), out.stride(0), eps, H=H, BLOCK=triton.next_power_of_2(H),
                           ZERO_CENTRED=zero_centred)
    return out


@triton.jit
def _rope_into_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, sample_ptr, qo_ptr,
                            q_stride, k_stride, v_stride, cs_stride, kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
                            ROT: tl.constexpr, PASS_BLOCK: tl.constexpr):
    row = tl.program_id(0)  # p * W + i: the prompt's i-th row
    head = tl.program_id(1)  # 0 .. HEADS-1: a query head; HEADS .. HEADS+KV_HEADS-1: a key/value head
    p = row // W
    i = row % W
    # the first ROT dims rotate (all of them, or a quarter of the head in Qwen3.5); dims ROT.. D pass unchanged
    half = tl.arange(0, ROT // 2)
    c1 = tl.load(cos_ptr + row * cs_stride + half).to(tl.float32)
    c2 = tl.load(cos_ptr + row * cs_stride + ROT // 2 + half).to(tl.float32)
    s1 = tl.load(sin_ptr + row * cs_stride + half).to(tl.float32)
    s2 = tl.load(sin_ptr + row * cs_stride + ROT // 2 + half).to(tl.float32)
    if head < HEADS:
        src = q_ptr + row * q_stride + head * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + ROT // 2 + half).to(tl.float32)
        group = HEADS // KV_HEADS
        # query layout [P, kv_heads, W * group, D]: a kv head's queries of the prompt's W rows side by side
        dst = qo_ptr + ((p * KV_HEADS + head // group) * (W * group) + i * group + head % group) * D
        tl.store(dst + half, (x1 * c1 - x2 * s1).to(qo_ptr.dtype.element_ty))
        tl.store(dst + ROT // 2 + half, (x2 * c2 + x1 * s2).to(qo_ptr.dtype.element_ty))
        if PASS_BLOCK > 0:
            rest = ROT + tl.arange(0, PASS_BLOCK)
            tl.store(dst + rest, tl.load(src + rest, mask=rest < D), mask=rest < D)
    else:
        kh = head - HEADS
        slot = tl.load(slot_ptr) + tl.load(sample_ptr + row)
        src = k_ptr + row * k_stride + kh * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + ROT // 2 + half).to(tl.float32)
        dst = kc_ptr + p * kc_s0 + kh * kc_s1 + slot * kc_s2
        tl.store(dst + half, (x1 * c1 - x2 * s1).to(kc_ptr.dtype.element_ty))
        tl.store(dst + ROT // 2 + half, (x2 * c2 + x1 * s2).to(kc_ptr.dtype.element_ty))
        if PASS_BLOCK > 0:
            rest = ROT + tl.arange(0, PASS_BLOCK)
            tl.store(dst + rest, tl.load(src + rest, mask=rest < D), mask=rest < D)
        vsrc = v_ptr + row * v_stride + kh * D
        vdst = vc_ptr + p * vc_s0 + kh * vc_s1 + slot * vc_s2
        tl.store(vdst + half, tl.load(vsrc + half))
        tl.store(vdst + ROT // 2 + half, tl.load(vsrc + ROT // 2 + half))
        if PASS_BLOCK > 0:
            rest = ROT + tl.arange(0, PASS_BLOCK)
            tl.store(vdst + rest, tl.load(vsrc + rest, mask=rest < D), mask=rest < D)


def rope_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slot, sample, width: int) -> torch.Tensor:
    kv_heads, d = k_cache.shape[1], k_cache.shape[3]
    B = q.shape[0]
    P, heads = B // width, q.shape[1] // d
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rope_into_cache: the cache's last dimension must be contiguous")
    out = q.new_empty(P, kv_heads, width * (heads // kv_heads), d)
    _rope_into_cache_kernel[(B, heads + kv_heads)](
        q, k, v, cos, sin, k_cache, v_cache, slot, sample, out, q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, W=width, D=d, ROT=cos.shape[-1],
        PASS_BLOCK=triton.next_power_of_2(d - cos.shape[-1]) if d > cos.shape[-1] else 0)
    return out


@torch.library.custom_op("lowmem_vt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    """RMSNorm of rows x [N, H] (Qwen2RMSNorm's arithmetic, or Qwen3.5's zero-centred one), one kernel on CUDA."""
    return rms_norm_reference(x, weight, eps, zero_centred)


@rms_norm.register_kernel("cuda")
def _(x, weight, eps, zero_centred=False):
    return rms_norm_triton(x, weight, eps, zero_centred)


@rms_norm.register_fake
def _(x, weight, eps, zero_centred=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lowmem_vt::rope_into_cache", mutates_args=("k_cache", "v_cache"))
def rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor, sample: torch.Tensor,
                    width: int) -> torch.Tensor:
    """Rotary on one decode token per row, its K/V written to the cache, the queries laid out for attention.

    q [B, heads*d], k and v [B, kv_heads*d], cos and sin [B, r] (q's dtype; r = d, or the rotated part of a
    partial rotary: dims r.. d pass unchanged); rows are ``p * width + i``: the
    cache's prompt p has ``width`` rows, and row i decodes sample ``sample[p * width + i]`` of that prompt.
    Writes rotated k and v of each row to ``k_cache`` / ``v_cache`` [P', kv_heads, C, d] (P' >= B / width) of
    its prompt at slot ``slot + sample`` (``slot`` a [1] long tensor, so a CUDA graph replays it at any step).
    Returns the rotated queries [B / width, kv_heads, width * group, d]: for each kv head, the group query
    heads of each of the prompt's rows in turn.
    """
    return rope_into_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slot, sample, width)


@rope_into_cache.register_kernel("cuda")
def _(q, k, v, cos, sin, k_cache, v_cache, slot, sample, width):
    return rope_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slot, sample, width)


@rope_into_cache.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slot, sample, width):
    kv_heads, d = k_cache.shape[1], k_cache.shape[3]
    return q.new_empty(q.shape[0] // width, kv_heads, width * (q.shape[1] // d // kv_heads), d)
