"""The layer's delta as one autograd Function: few launches, nothing of size T×n×d_out.

    forward:  H = x̃·[A; W_r; A0]ᵀ (one GEMM)  →  Z = rank_forward(H)  →  out = y + s·Z·B_extᵀ (addmm)
    backward: dZ = s·dOut·B_ext, dB = s·dOutᵀ·Z, dH = rank_backward(dZ), dW_in = dHᵀ·x̃, dx = dH·W_in

Autograd on the plain formula launches a kernel per small op and per op's backward (expand,
dropout, softmax, casts, gating, their reductions), which at LLM sizes costs more than the FLOPs.
Here the rank-space work (per-head dropout, router softmax in float32, gating, the compensation
block) is two pure functions of [T, K]-sized tensors; on CUDA they are torch.compile'd into a
kernel or two each, and everything else is a GEMM. On the CPU they run eagerly, which is what
the float64 reference tests check.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def rank_forward(H: Tensor, gate: Tensor | None, mask: Tensor | None, *, n: int, r: int, a_heads: int,
                 gate_kind: str, keep: float, compensate: bool) -> Tensor:
    """Z_ext [T, n·r (+ r)]: gated, dropped-out head activations (and −A0·x for compensation)."""
    T = H.shape[0]
    h = H[:, : a_heads * r].reshape(T, a_heads, r).expand(T, n, r)
    if mask is not None:
        h = h * mask.to(h.dtype) * (1.0 / keep)
    if gate_kind == "scalar":
        h = h * gate.to(h.dtype).view(1, n, 1)
    elif gate_kind == "router":
        h = h * router_softmax(H[:, a_heads * r: a_heads * r + n]).to(h.dtype).unsqueeze(-1)
    elif gate_kind == "uniform":
        h = h * (1.0 / n)
    z = h.reshape(T, n * r)
    return torch.cat([z, -H[:, H.shape[1] - r:]], dim=1) if compensate else z


def rank_backward(dZ: Tensor, H: Tensor, gate: Tensor | None, mask: Tensor | None, *, n: int, r: int,
                  a_heads: int, gate_kind: str, keep: float, compensate: bool,
                  scale: float) -> tuple[Tensor, Tensor | None]:
    """dH [T, K] and the gate's gradient, from dZ_ext = dOut·B_ext (times `scale` here)."""
    T = H.shape[0]
    dz = dZ[:, : n * r].reshape(T, n, r) * scale
    h = H[:, : a_heads * r].reshape(T, a_heads, r).expand(T, n, r)
    if mask is not None:
        h = h * mask.to(h.dtype) * (1.0 / keep)
    parts, d_gate = [], None
    if gate_kind == "scalar":
        d_gate = (_wide(dz) * _wide(h)).sum((0, 2))
        dz = dz * gate.to(dz.dtype).view(1, n, 1)
    elif gate_kind == "router":
        w = router_softmax(H[:, a_heads * r: a_heads * r + n])
        dw = (_wide(dz) * _wide(h)).sum(-1)                       # ∂L/∂ω  [T, n]
        d_logits = w * (dw - (w * dw).sum(-1, keepdim=True))      # softmax backward
        dz = dz * w.to(dz.dtype).unsqueeze(-1)
    elif gate_kind == "uniform":
        dz = dz * (1.0 / n)
    if mask is not None:
        dz = dz * mask.to(dz.dtype) * (1.0 / keep)
    parts.append(dz.sum(1) if a_heads == 1 and n > 1 else dz.reshape(T, a_heads * r))
    if gate_kind == "router":
        parts.append(d_logits.to(dz.dtype))
    if compensate:
        parts.append(-dZ[:, n * r:] * scale)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], d_gate


def router_softmax(logits: Tensor) -> Tensor:
    """Softmax over heads in float32 or wider (float64 stays float64)."""
    return torch.softmax(_wide(logits), dim=-1)


def _wide(t: Tensor) -> Tensor:
    """float32 for half-precision tensors, unchanged otherwise: reductions and softmax stay exact."""
    return t.float() if t.dtype in _HALF else t


_compiled: dict[str, Any] = {}


def _rank_fns(device: torch.device) -> tuple[Any, Any]:
    """The rank-space functions, compiled once per process on CUDA (RLORA_COMPILE=0 turns it off)."""
    if device.type != "cuda" or os.environ.get("RLORA_COMPILE", "1") == "0":
        return rank_forward, rank_backward
    if not _compiled:
        _compiled["fwd"] = torch.compile(rank_forward, dynamic=True, fullgraph=True)
        _compiled["bwd"] = torch.compile(rank_backward, dynamic=True, fullgraph=True)
    return _compiled["fwd"], _compiled["bwd"]


class LowRankDelta(torch.autograd.Function):
    """out = y + s·Z(x)·B_extᵀ with a hand-written backward (see the module docstring).

    `cfg` holds the layer's static choices (n, r, a_heads, gate, scaling, compensate) and the
    dropout probabilities in force for this call (0 outside training).
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, x: Tensor, A: Tensor, router: Tensor | None, A0: Tensor | None,
                B: Tensor, B0: Tensor | None, gate: Tensor | None, cfg: dict[str, Any]) -> Tensor:
        dev = x.device
        autocast = torch.is_autocast_enabled(dev.type)
        dt = torch.get_autocast_dtype(dev.type) if autocast else A.dtype
        fwd, _ = _rank_fns(dev)
        clean = [w for w in (router, A0) if w is not None]  # rows that read the clean x
        p_in, p_head, n, r = cfg["input_dropout"], cfg["head_dropout"], cfg["n"], cfg["r"]
        with torch.autocast(dev.type, enabled=False):
            x = x.to(dt)
            W_in = torch.cat([A, *clean]).to(dt) if clean else A.to(dt)
            x_mask = None
            if p_in > 0:  # A reads a dropped-out x; the router and A0 read the clean x
                x_drop, x_mask = torch.native_dropout(x, p_in, True)
                H = x_drop @ W_in[: A.shape[0]].t()
                if clean:
                    H = torch.cat([H, x @ W_in[A.shape[0]:].t()], 1)
            else:
                H = x @ W_in.t()
            mask = None
            if p_head > 0:  # independent element-wise masks per head, on A·x
                mask = torch.native_dropout(torch.ones(H.shape[0], n, r, device=dev, dtype=dt), p_head, True)[1]
            Z = fwd(H, gate, mask, **_kw(cfg))
            B_ext = (torch.cat([B, B0], 1) if B0 is not None else B).to(dt)
            same = y.dtype == dt
            out = torch.addmm(y if same else y.to(dt), Z, B_ext.t(), alpha=cfg["scaling"])
            out = out if same else out.to(y.dtype)
        ctx.save_for_backward(x, x_mask, W_in, B_ext, H, Z, mask, gate)
        ctx.cfg, ctx.dt = cfg, dt
        return out

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Any, ...]:
        x, x_mask, W_in, B_ext, H, Z, mask, gate = ctx.saved_tensors
        cfg, dt = ctx.cfg, ctx.dt
        _, bwd = _rank_fns(x.device)
        s, n, r, k_a = cfg["scaling"], cfg["n"], cfg["r"], cfg["a_heads"] * cfg["r"]
        with torch.autocast(x.device.type, enabled=False):
            g = d_out.to(dt)
            dH, d_gate = bwd(g @ B_ext, H, gate, mask, **_kw(cfg), scale=s)
            dB = torch.mm(g.t(), Z[:, : n * r]).mul_(s)  # B0 is a frozen buffer: no gradient
            if x_mask is None:
                dx = dH @ W_in
                x_a = x
            else:
                keep = 1.0 / (1.0 - cfg["input_dropout"])
                dx = (dH[:, :k_a] @ W_in[:k_a]) * x_mask.to(dt) * keep
                if W_in.shape[0] > k_a:
                    dx = torch.addmm(dx, dH[:, k_a:], W_in[k_a:])
                x_a = x * x_mask.to(dt) * keep
            dA = dH[:, :k_a].t() @ x_a
            d_router = dH[:, k_a: k_a + n].t() @ x if cfg["gate"] == "router" else None
        return d_out, dx, dA, d_router, None, dB, None, d_gate, None


def _kw(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"n": cfg["n"], "r": cfg["r"], "a_heads": cfg["a_heads"], "gate_kind": cfg["gate"],
            "keep": 1.0 - cfg["head_dropout"], "compensate": cfg["compensate"]}
