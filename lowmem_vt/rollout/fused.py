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


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: normalise in float32, round to x's dtype, then scale by the weight. x [N, H]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_into_cache_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor, samples: int) -> torch.Tensor:
    """See ``rope_into_cache``; Hugging Face's ``apply_rotary_pos_emb`` arithmetic, in q's dtype."""
    P, kv_heads, _, d = k_cache.shape
    B, G = q.shape[0], samples
    heads = q.shape[1] // d
    cos, sin = cos[:, None], sin[:, None]
    qr = _rotate(q.view(B, heads, d), cos, sin)
    kr = _rotate(k.view(B, kv_heads, d), cos, sin)
    where = slot + torch.arange(G, device=slot.device)
    k_cache.index_copy_(2, where, kr.view(P, G, kv_heads, d).transpose(1, 2))
    v_cache.index_copy_(2, where, v.view(P, G, kv_heads, d).transpose(1, 2))
    group = heads // kv_heads
    return qr.view(P, G, kv_heads, group, d).permute(0, 2, 1, 3, 4).reshape(P, kv_heads, G * group, d)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_stride, out_stride, eps, H: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    # round to the input dtype before the weight, as Qwen2RMSNorm does
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=inside)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    N, H = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _rms_norm_kernel[(N,)](x, weight, out, x.stride(0), out.stride(0), eps, H=H, BLOCK=triton.next_power_of_2(H))
    return out


@triton.jit
def _rope_into_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, qo_ptr,
                            q_stride, k_stride, v_stride, cs_stride, kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)  # p * G + g
    head = tl.program_id(1)  # 0 .. HEADS-1: a query head; HEADS .. HEADS+KV_HEADS-1: a key/value head
    p = row // G
    g = row % G
    half = tl.arange(0, D // 2)
    c1 = tl.load(cos_ptr + row * cs_stride + half).to(tl.float32)
    c2 = tl.load(cos_ptr + row * cs_stride + D // 2 + half).to(tl.float32)
    s1 = tl.load(sin_ptr + row * cs_stride + half).to(tl.float32)
    s2 = tl.load(sin_ptr + row * cs_stride + D // 2 + half).to(tl.float32)
    if head < HEADS:
        src = q_ptr + row * q_stride + head * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        group = HEADS // KV_HEADS
        # query layout [P, kv_heads, G * group, D]: a kv head's queries of all G samples side by side
        dst = qo_ptr + ((p * KV_HEADS + head // group) * (G * group) + g * group + head % group) * D
        tl.store(dst + half, (x1 * c1 - x2 * s1).to(qo_ptr.dtype.element_ty))
        tl.store(dst + D // 2 + half, (x2 * c2 + x1 * s2).to(qo_ptr.dtype.element_ty))
    else:
        kh = head - HEADS
        slot = tl.load(slot_ptr) + g
        src = k_ptr + row * k_stride + kh * D
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        dst = kc_ptr + p * kc_s0 + kh * kc_s1 + slot * kc_s2
        tl.store(dst + half, (x1 * c1 - x2 * s1).to(kc_ptr.dtype.element_ty))
        tl.store(dst + D // 2 + half, (x2 * c2 + x1 * s2).to(kc_ptr.dtype.element_ty))
        vsrc = v_ptr + row * v_stride + kh * D
        vdst = vc_ptr + p * vc_s0 + kh * vc_s1 + slot * vc_s2
        tl.store(vdst + half, tl.load(vsrc + half))
        tl.store(vdst + D // 2 + half, tl.load(vsrc + D // 2 + half))


def rope_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slot, samples: int) -> torch.Tensor:
    P, kv_heads, _, d = k_cache.shape
    B = q.shape[0]
    heads = q.shape[1] // d
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rope_into_cache: the cache's last dimension must be contiguous")
    out = q.new_empty(P, kv_heads, samples * (heads // kv_heads), d)
    _rope_into_cache_kernel[(B, heads + kv_heads)](
        q, k, v, cos, sin, k_cache, v_cache, slot, out, q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, G=samples, D=d)
    return out


@torch.library.custom_op("lowmem_vt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of rows x [N, H] (Qwen2RMSNorm's arithmetic), one kernel on CUDA."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _(x, weight, eps):
    return rms_norm_triton(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lowmem_vt::rope_into_cache", mutates_args=("k_cache", "v_cache"))
def rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor, samples: int) -> torch.Tensor:
    """Rotary on one decode token per row, its K/V written to the cache, the queries laid out for attention.

    q [B, heads*d], k and v [B, kv_heads*d], cos and sin [B, d] (q's dtype); rows are ``p * samples + g``.
    Writes rotated k and v of row (p, g) to ``k_cache`` / ``v_cache`` [P, kv_heads, C, d] at slot ``slot + g``
    (``slot`` a [1] long tensor, so a CUDA graph replays it at any step). Returns the rotated queries
    [P, kv_heads, samples * group, d]: for each kv head, the group query heads of each sample in turn.
    """
    return rope_into_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slot, samples)


@rope_into_cache.register_kernel("cuda")
def _(q, k, v, cos, sin, k_cache, v_cache, slot, samples):
    return rope_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slot, samples)


@rope_into_cache.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slot, samples):
    P, kv_heads, _, d = k_cache.shape
    return q.new_empty(P, kv_heads, samples * (q.shape[1] // d // kv_heads), d)
