"""The decoder's linears as a decode step applies them: LoRA on the training weights in few, larger matmuls.

``FusedLinears`` runs the linears that read one input (q/k/v, a linear-attention layer's in_proj_qkv/z/b/a,
gate/up, or one alone) with their peft LoRA
adapters: the adapters' A matrices in one matmul, their B matrices (block-diagonal, scaled, biases folded in)
in another, then the base weights. ``lay_out_adjacent`` gives a group's base weights one storage, so the base
is one matmul over a view as well. ``DecodeWeights``: every layer's, built at the start of each rollout.
Layers come as their family names their parts (``families.base.QwenVLFamily.engine_layer``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _active_adapters(linear) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A [r, in], B [out, r], scaling) of each LoRA adapter peft would apply in ``linear`` now."""
    if not hasattr(linear, "lora_A") or linear.disable_adapters or linear.merged:
        return []
    out = []
    for name in linear.active_adapters:
        if name not in linear.lora_A:
            continue
        if linear.use_dora.get(name, False):
            raise NotImplementedError("rollout.backend: engine does not apply DoRA adapters; use rollout.backend: hf")
        out.append((linear.lora_A[name].weight, linear.lora_B[name].weight, linear.scaling[name]))
    return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata  # works on fake tensors too (no data_ptr)


def _adjacent(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``torch.cat(tensors)`` as a view, when they are contiguous slices of one storage in this order; else None."""
    t0 = tensors[0]
    at = t0.storage_offset()
    for t in tensors:
        if not (t.is_contiguous() and t.dtype == t0.dtype and _same_storage(t, t0) and t.storage_offset() == at
                and t.shape[1:] == t0.shape[1:]):
            return None
        at += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return t0.as_strided((rows, *t0.shape[1:]), t0.stride())


def lay_out_adjacent(linears) -> bool:
    """Give the base weights of ``linears`` (q/k/v, or gate/up) one storage, in this order, and their biases another,
    so one matmul computes them all (``FusedLinears``). Each Parameter keeps its identity and values, only its
    storage moves (the old one is freed): nothing is held twice, and training, merging and the optimizer see the
    same parameters. Quantized weights (NF4) are left as they are. Returns whether the weights are adjacent now.
    """
    bases = [getattr(m, "base_layer", m) for m in linears]
    weights = [b.weight for b in bases]
    w0 = weights[0]
    if not all(w.dtype.is_floating_point and w.dtype == w0.dtype and w.device == w0.device and w.dim() == 2
               and w.shape[1] == w0.shape[1] for w in weights):
        return False
    biases = [b.bias for b in bases]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return False  # a fused matmul would need a copied bias; these stay separate
    for group in (weights, biases if biases[0] is not None else []):
        if group and _adjacent(group) is None:
            one = torch.cat([t.detach() for t in group])
            at = 0
            for t in group:
                t.data = one[at : at + t.shape[0]]
                at += t.shape[0]
    return True


class FusedLinears:
    """Linears that read one input (q/k/v, gate/up, or one alone), with their LoRA adapters, for decoding.

    The adapters' A matrices are stacked into one [R, in] matrix and their B matrices (scaled) into one
    block-diagonal [sum out, R] matrix covering every linear's outputs (zero rows where a linear has no adapter),
    with the linears' biases: copied once per rollout in the base dtype, two matmuls for all adapters. When the
    base weights are adjacent slices of one storage (``lay_out_adjacent``), one matmul over their
    concatenation (a view, no copy) adds all base outputs onto that; otherwise each base matmul adds onto its
    slice. A base weight stored in another dtype (NF4) is applied by its own module, which adds its bias.
    """

    def __init__(self, modules, dtype: torch.dtype):
        self.bases = [getattr(m, "base_layer", m) for m in modules]
        self.outs = [base.out_features for base in self.bases]
        self.quantized = [base.weight.dtype != dtype for base in self.bases]
        fusable = len(self.bases) > 1 and not any(self.quantized)
        biases = [base.bias for base in self.bases]
        self.weight = _adjacent([base.weight for base in self.bases]) if fusable else None
        self.weight_bias = None  # the biases as one view, for the fused matmul without adapters
        if self.weight is not None and biases[0] is not None:
            self.weight_bias = _adjacent(biases)
            if self.weight_bias is None:
                self.weight = None
        parts = [_active_adapters(m) for m in modules]
        self.A = self.B = self.bias = None
        if any(parts):
            self.A = torch.cat([a.detach().to(dtype) for p in parts for a, _, _ in p])
            self.B = torch.zeros(sum(self.outs), self.A.shape[0], dtype=dtype, device=self.A.device)
            row = col = 0
            for p, out in zip(parts, self.outs):
                for a, b_, scale in p:
                    self.B[row : row + out, col : col + a.shape[0]] = b_.detach() * scale
                    col += a.shape[0]
                row += out
            if any(b is not None for b in biases):  # a quantized module adds its own bias: zeros here
                self.bias = torch.cat([b.detach().to(dtype) if b is not None and not q else
                                       torch.zeros(out, dtype=dtype, device=self.A.device)
                                       for b, q, out in zip(biases, self.quantized, self.outs)])
        self.dtype = dtype

    def tensors(self) -> list[torch.Tensor]:
        """What this object allocated (the fused weight and its bias are views of the model's storage)."""
        return [t for t in (self.A, self.B, self.bias) if t is not None]

    def _base(self, i: int, x: torch.Tensor, onto: torch.Tensor | None, bias: bool) -> torch.Tensor:
        """onto + base_i(x); ``bias``: add the float base's bias (not yet in ``onto``)."""
        base = self.bases[i]
        if self.quantized[i]:  # the module dequantizes and adds its bias
            y = base(x)
            return y if onto is None else onto + y
        b = base.bias if bias else None
        if onto is None:
            return F.linear(x, base.weight, b)
        if b is not None:
            onto = onto + b
        return torch.addmm(onto, x, base.weight.t())

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each linear's output for x [N, in]; with ``residual`` (one linear), residual + its output."""
        if self.A is None:
            if self.weight is not None:
                return list(F.linear(x, self.weight, self.weight_bias).split(self.outs, dim=1))
            return [self._base(i, x, residual, bias=True) for i in range(len(self.bases))]
        lora = x @ self.A.t()
        if residual is not None:
            lora = torch.addmm(residual if self.bias is None else residual + self.bias, lora, self.B.t())
        elif self.bias is not None:
            lora = torch.addmm(self.bias, lora, self.B.t())
        else:
            lora = lora @ self.B.t()
        if self.weight is not None:
            return list(torch.addmm(lora, x, self.weight.t()).split(self.outs, dim=1))
        return [self._base(i, x, part, bias=False) for i, part in enumerate(lora.split(self.outs, dim=1))]


def _input_groups(p) -> list[list]:
    """The linears of one layer that read one input: the token mixer's (q/k/v, or a linear-attention layer's
    in_proj_qkv/z/b/a), and gate/up."""
    mixer = [p.in_qkv, p.in_z, p.in_b, p.in_a] if p.kind == "linear_attention" else [p.q, p.k, p.v]
    return [mixer, [p.gate, p.up]]


def lay_out_projections(layers) -> int:
    """``lay_out_adjacent`` for every decoder layer's input groups; returns how many groups are adjacent."""
    return sum(lay_out_adjacent(group) for p in layers for group in _input_groups(p))


class DecodeWeights:
    """Per layer: its parts, with the linears fused (``FusedLinears``), built at the start of each rollout.
    ``layers``: each decoder layer's parts (``engine_layer``): an attention layer's ``qkv`` and ``o``, or a
    linear-attention layer's ``in_proj`` (qkv, z, b, a) and ``out``; both have ``gate_up`` and ``down``.
    ``dtype``: the model's (the adapter's decode copies take it)."""

    def __init__(self, layers, dtype: torch.dtype):
        self.layers = []
        for p in layers:
            (mixer, gate_up) = _input_groups(p)
            w = SimpleNamespace(**vars(p))  # the norms, activation, scaling, ...; the linears replaced by fused ones
            w.gate_up, w.down = FusedLinears(gate_up, dtype), FusedLinears([p.down], dtype)
            if p.kind == "linear_attention":
                w.in_proj, w.out = FusedLinears(mixer, dtype), FusedLinears([p.out], dtype)
            else:
                w.qkv, w.o = FusedLinears(mixer, dtype), FusedLinears([p.o], dtype)
            self.layers.append(w)

    def tensors(self) -> list[torch.Tensor]:
        return [t for w in self.layers for f in vars(w).values() if isinstance(f, FusedLinears) for t in f.tensors()]
