"""MultiHeadLoRA's forward on fused Triton kernels, with a hand-written backward.

    supported(layer, x)      None when the fused path can run, else the reason
    fused_forward(layer, x)  what layer(x) returns (same math, dtypes and gradients)

Forward (fused_kernels.py has the kernels):
    Z, H, P = rank_forward(x)                      one pass over x: H = drop(x)·Aᵀ, router logits and
                                                   A0·x, then head masks, gates, softmax, alpha
    y = gemm_lowrank(x, W, bias, Z·[B | B0]ᵀ)      the base GEMM with the delta in its epilogue
Backward:
    G = rank_backward(dy)                          one pass over dy: dZ = dy·[B | B0], then the mask,
                                                   gate and softmax backward → [dH | dL | dH0]
    dB = dyᵀ·Z                                     (torch)
    [dA; dW_r] = weight_grads(G, x)                x tiles read once, the input mask regenerated
    dx = gemm_lowrank(dy, Wᵀ, G·[A; W_r; A0])      the input-dropout mask applied in the epilogue

No dropout mask is stored: each is regenerated from two seeds drawn from torch's generator on
the input's device (`dropout_masks` replays them). Saved for backward: x, Z, H [T, ra], the router's P.
Switches, read at each call: RLORA_FUSED_AUTOTUNE=0 (one fixed tile config per kernel),
RLORA_FUSED_TMA=0 (pointer loads, not Hopper's tensor descriptors). CPU tests run the kernels in
Triton's interpreter (TRITON_INTERPRET=1, tests/adapters/test_fused.py).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .layer import MultiHeadLoRA

try:  # triton is optional: without it the package imports and `supported` says why not
    from . import fused_kernels as K
except ImportError:
    K = None

MAX_COLUMNS = 256  # n·r: the rank-space tile a program holds in registers
_HALF = (torch.bfloat16, torch.float16)


def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter indexes a loop bound with int() of a 1-element array: NumPy 2.4 refuses."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "rlora_fixed", False):
        return

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.rlora_fixed = True
    interpreter._patch_lang_tensor = patched


if K is not None and K.INTERPRETED:
    _interpreter_index_fix()


@dataclass(frozen=True)
class RankPlan:
    """The static choices of one call: the rank space's shape, the gate, scales and dropout."""

    n: int
    r: int
    shared: bool
    gate: int  # 0: none or uniform (folded into alpha) | 1: a fixed vector per head | 2: router
    compensate: bool
    alpha: float
    comp_scale: float
    """Z's compensation block is comp_scale·A0·x (−s)."""
    p_in: float
    p_head: float
    dtype: torch.dtype

    @property
    def ra(self) -> int:  # columns of H = x·Aᵀ
        return self.r if self.shared else self.n * self.r

    @property
    def nl(self) -> int:  # router logits among G's columns
        return self.n if self.gate == 2 else 0


# ------------------------------------------------------------------------------------ entry points

def supported(layer: MultiHeadLoRA, x: Tensor) -> str | None:
    """None when `fused_forward(layer, x)` can run, else the reason it cannot."""
    if K is None:
        return "triton not installed"
    if x.device.type != "cuda" and not K.INTERPRETED:
        return "not CUDA"
    reason = layer_reason(layer)
    if reason is not None:
        return reason
    base = layer.base
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (the fused path runs eagerly)"
    if x.shape[-1] != layer.in_features or x.numel() == 0:
        return f"input of shape {tuple(x.shape)} for {layer.in_features} features"
    if max(x.numel() // layer.in_features * max(layer.in_features, layer.out_features),
           base.weight.numel()) >= 2**31:
        return "a tensor of 2^31 elements or more (the kernels use 32-bit offsets)"
    if any(t.device != x.device for t in (base.weight, layer.rlora_A, layer.rlora_B)):
        return "input and layer on different devices"
    dtype = _compute_dtype(layer, x)
    return dtype if isinstance(dtype, str) else None


def layer_reason(layer: MultiHeadLoRA) -> str | None:
    """Why this layer can never take the fused path, whatever its input (None: it can)."""
    base = layer.base
    if type(base) is not nn.Linear:
        return "base is not a plain nn.Linear"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "base weight or bias is trainable"
    if layer.spec.num_heads * layer.spec.r > MAX_COLUMNS:
        return f"rank space of {layer.spec.num_heads * layer.spec.r} columns (at most {MAX_COLUMNS})"
    probe = layer.route_probe
    if probe is not None and probe.aux_weight > 0 and layer.fixed_mixture is None:
        return "adapter.router_aux_weight needs the router's weights with their gradient (the plain path)"
    return None


def fused_forward(layer: MultiHeadLoRA, x: Tensor) -> Tensor:
    """layer.forward(x) on the fused kernels; `supported(layer, x)` must be None."""
    if (reason := supported(layer, x)) is not None:
        raise ValueError(f"the fused adapter path cannot run here: {reason}")
    return _run(layer, x)


def _run(layer: MultiHeadLoRA, x: Tensor) -> Tensor:
    plan = _plan(layer, x)
    seeds = draw_seeds(x.device) if plan.p_in > 0 or plan.p_head > 0 else None
    gate = getattr(layer, "rlora_gate", None)
    if plan.gate == 1 and gate is None:  # a router replaced by a fixed head mixture
        gate = layer.fixed_mixture.to(x.device, torch.float32)
    base = layer.base
    out, weights = _FusedDelta.apply(
        x.reshape(-1, layer.in_features), base.weight, base.bias, layer.rlora_A, layer.rlora_B, gate,
        getattr(layer, "rlora_router", None), getattr(layer, "rlora_A0", None),
        getattr(layer, "rlora_B0", None), seeds, plan)
    if plan.gate == 2 and layer.route_probe is not None:
        layer.route_probe.observe(layer, weights)  # telemetry only: supported() declines a router loss
    return out.reshape(*x.shape[:-1], layer.out_features)


def maybe_forward(layer: MultiHeadLoRA, x: Tensor) -> Tensor | None:  # None: the plain path runs
    return _run(layer, x) if supported(layer, x) is None else None  # checked once per call


def enable(model: nn.Module, on: bool = True) -> tuple[int, dict[str, int]]:
    """Route every MultiHeadLoRA of `model` through the fused path where it can run (`on=False`:
    back to the plain path); returns (layers switched, {reason: layers that never can})."""
    reasons = {m: layer_reason(m) for m in model.modules() if isinstance(m, MultiHeadLoRA)}
    for layer, reason in reasons.items():
        layer.fused_forward = maybe_forward if on and reason is None else None
    never = Counter(reason for reason in reasons.values() if reason is not None)
    return len(reasons) - sum(never.values()), dict(never)


def draw_seeds(device: torch.device) -> Tensor:
    """The two dropout seeds of one call (input, heads), drawn from torch's generator on `device`."""
    return torch.randint(0, 2**31 - 1, (2,), device=device, dtype=torch.int64)


def dropout_masks(layer: MultiHeadLoRA, rows: int, seeds: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The keep masks (1 kept, 0 dropped, before the 1/(1 − p) scale) that `seeds` give a training
    call over `rows` tokens: on x [rows, d_in] and per head [rows, n, r]; None where that dropout is
    off. The fused path stores no mask; tests replay them with this."""
    spec = layer.spec
    inp = heads = None
    if spec.input_dropout > 0:
        inp = _keep(seeds[0:1], rows, layer.in_features, spec.input_dropout)
    if spec.head_dropout > 0:
        cols = spec.num_heads * spec.r
        heads = _keep(seeds[1:2], rows, cols, spec.head_dropout).view(rows, spec.num_heads, spec.r)
    return inp, heads


def _compute_dtype(layer: MultiHeadLoRA, x: Tensor) -> torch.dtype | str:
    """The GEMM operands' dtype (autocast's, else the one dtype of input, base and adapters), or why none."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if dtype in _HALF else f"autocast to {dtype}"
    dtypes = {x.dtype, layer.base.weight.dtype, layer.rlora_A.dtype}
    if len(dtypes) > 1:
        return "input, base and adapter dtypes differ outside autocast"
    dtype = dtypes.pop()
    return dtype if dtype in (torch.float32, *_HALF) else f"{dtype} (float32, bfloat16 or float16 only)"


def _plan(layer: MultiHeadLoRA, x: Tensor) -> RankPlan:
    spec, n = layer.spec, layer.spec.num_heads
    routed = 2 if layer.fixed_mixture is None else 1  # a fixed mixture gates like a vector of scalars
    gate = {"none": 0, "uniform": 0, "scalar": 1, "router": routed}[spec.gate]
    # the compensation keeps its full scale s, also where a uniform gate makes alpha s/n
    return RankPlan(n=n, r=spec.r, shared=spec.shared_a, gate=gate, compensate=spec.compensate,
                    alpha=layer._alpha, comp_scale=-spec.scaling,
                    p_in=spec.input_dropout if layer.training else 0.0,
                    p_head=spec.head_dropout if layer.training else 0.0, dtype=_compute_dtype(layer, x))


# ------------------------------------------------------------------------------------ autograd

class _FusedDelta(torch.autograd.Function):
    """y = x·Wᵀ (+ bias) + Z(x)·[B | B0]ᵀ; gradients for x and the adapter tensors (W is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                gate: Tensor | None, router: Tensor | None, A0: Tensor | None, B0: Tensor | None,
                seeds: Tensor | None, plan: RankPlan) -> Tensor:
        Z, H, P = rank_forward(x, A, router, A0, gate, seeds, plan)
        E = plan.n * plan.r
        terms = ((Z[:, :E], B, 1.0),) + (((Z[:, E:], B0, 1.0),) if plan.compensate else ())
        out = gemm_lowrank(x, W, bias, terms, dtype=plan.dtype)
        ctx.save_for_backward(x, W, A, B, gate, router, A0, B0, seeds, Z, H, P)
        ctx.plan = plan
        # The router's weights also come out (no gradient through them): a route probe reads them.
        weights = P if P is not None else out.new_empty(0)
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor, _: Tensor | None = None) -> tuple[Tensor | None, ...]:
        x, W, A, B, gate, router, A0, B0, seeds, Z, H, P = ctx.saved_tensors
        plan, need = ctx.plan, ctx.needs_input_grad
        dA = dB = d_router = dx = None
        with torch.autocast(dy.device.type, enabled=False):
            G, d_gate = rank_backward(dy, B, B0, H, P, gate, seeds, plan, gate_grad=need[5])
            if need[4]:
                dB = torch.mm(dy.t(), Z[:, : plan.n * plan.r]).to(B.dtype)
            if need[3] or (plan.gate == 2 and need[6]):
                grads = weight_grads(G, x, seeds, plan, with_router=plan.gate == 2 and need[6])
                dA = grads[: plan.ra].to(A.dtype) if need[3] else None
                d_router = grads[plan.ra:].to(router.dtype) if plan.gate == 2 and need[6] else None
            if need[0]:
                dx = _input_grad(dy, x, W, A, router, A0, G, seeds, plan)
        if router is not None and plan.gate != 2 and need[6]:
            d_router = torch.zeros_like(router)  # a fixed mixture replaced it: eager autograd gives zeros too
        d_gate = d_gate.to(gate.dtype) if d_gate is not None else None
        return dx, None, None, dA, dB, d_gate, d_router, None, None, None, None


def _input_grad(dy: Tensor, x: Tensor, W: Tensor, A: Tensor, router: Tensor | None, A0: Tensor | None,
                G: Tensor, seeds: Tensor | None, plan: RankPlan) -> Tensor:
    """dx = dy·W + drop_in_bwd(dH·A) + dL·W_r + dH0·A0: one GEMM with three low-rank epilogue terms."""
    ra, nl = plan.ra, plan.nl
    terms = [(G[:, :ra], A.t(), 1.0)]
    if nl:
        terms.append((G[:, ra:ra + nl], router.t(), 1.0))
    if plan.compensate:
        terms.append((G[:, ra + nl:], A0.t(), 1.0))
    return gemm_lowrank(dy, W.t(), None, tuple(terms), seeds=seeds, p=plan.p_in, dtype=plan.dtype,
                        out_dtype=x.dtype)


# ------------------------------------------------------------------------------------ launching

def _cdiv(a: int, b: int) -> int:  # ceil(a / b)
    return -(-a // b)


def _pad(n: int) -> int:
    """Tile width for n columns: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, 1 << (n - 1).bit_length())


def _prec(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's matmul setting: full precision unless TF32 is allowed.
    return "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"


def gemm_lowrank(a: Tensor, b: Tensor, bias: Tensor | None = None, terms: tuple = (), *,
                 seeds: Tensor | None = None, p: float = 0.0, dtype: torch.dtype | None = None,
                 out_dtype: torch.dtype | None = None, tma: bool | None = None) -> Tensor:
    """out [M, N] = a·bᵀ (+ bias) + Σ s·z·cᵀ over terms (z [M, R], c [N, R], s), at most three.

    Any strides (b = Wᵀ is a view). Operands are cast to `dtype` (default a's) tile by tile and
    accumulate in fp32; the output is written once, in out_dtype (default dtype). With p > 0 the
    first term is masked by seeds[0]'s dropout mask over [M, N] and scaled by 1/(1 − p). `tma`:
    load a and b through tensor descriptors (default: where the layouts allow it, on Hopper).
    """
    M, N = a.shape[0], b.shape[0]
    dtype = dtype or a.dtype
    out = torch.empty((M, N), device=a.device, dtype=out_dtype or dtype)
    slots = list(terms) + [(a, b, 1.0)] * (3 - len(terms))  # unused slots: never read
    kernel, meta = K.GEMM.pick()
    b_t = b.stride(0) == 1 and b.stride(1) != 1  # b is Wᵀ, a view of a row-major W
    tma = _tma_ok(a, b.t() if b_t else b) if tma is None else tma
    a_arg, b_arg = (K.descriptor(a), K.descriptor(b.t() if b_t else b)) if tma else (a, b)
    if tma and meta:  # fixed tiles; the autotuner sets each config's itself
        K.tma_blocks({**meta, "TMA": True, "B_T": b_t, "a_ptr": a_arg, "b_ptr": b_arg})
    grid = lambda m: (_cdiv(M, m["BLOCK_M"]) * _cdiv(N, m["BLOCK_N"]),)  # noqa: E731
    kernel[grid](a_arg, b_arg, a if bias is None else bias, out, a if seeds is None else seeds,
                 *(t for z, c, _ in slots for t in (z, c)), M, N, a.shape[1],
                 *(z.shape[1] for z, _, _ in slots),
                 *a.stride(), *b.stride(), *out.stride(),
                 *(st for z, c, _ in slots for st in (*z.stride(), *c.stride())), *(s for _, _, s in slots),
                 p, 1.0 / (1.0 - p), HAS_BIAS=bias is not None, TERMS=len(terms),
                 DIRECT0=slots[0][2] == 1.0 and p == 0, DIRECT1=slots[1][2] == 1.0,
                 DIRECT2=slots[2][2] == 1.0,
                 DROP0=p > 0, **{f"BR{i}": _pad(min(z.shape[1], 64)) for i, (z, _, _) in enumerate(slots)},
                 DT=K.DTYPES[dtype], PREC=_prec(dtype), TMA=tma, B_T=b_t, **meta)
    return out


def _tma_ok(*tensors: Tensor) -> bool:
    """Tensor descriptors need Hopper (or the interpreter), rows that start on 16 bytes, and
    contiguous rows; RLORA_FUSED_TMA=0 turns them off."""
    if os.environ.get("RLORA_FUSED_TMA", "1") == "0":
        return False
    dev = tensors[0].device
    if not K.INTERPRETED and (dev.type != "cuda" or _capability(dev.index or 0) < (9, 0)):
        return False
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _flags(plan: RankPlan) -> dict[str, Any]:
    return {"N_HEADS": plan.n, "R": plan.r, "SHARED": plan.shared, "GATE": plan.gate, "COMP": plan.compensate,
            "DROP_HEAD": plan.p_head > 0, "BE": _pad(plan.n * plan.r), "BH": _pad(plan.n), "BR": _pad(plan.r),
            "DT": K.DTYPES[plan.dtype], "PREC": _prec(plan.dtype)}


def rank_forward(x: Tensor, A: Tensor, router: Tensor | None, A0: Tensor | None, gate: Tensor | None,
                 seeds: Tensor | None, plan: RankPlan) -> tuple[Tensor, Tensor, Tensor | None]:
    """(Z [T, n·r (+ r)], H [T, ra], P [T, n] fp32 or None) from one pass over x [T, d_in]."""
    T, D = x.shape
    E, dev = plan.n * plan.r, x.device
    Z = torch.empty((T, E + plan.r * plan.compensate), device=dev, dtype=plan.dtype)
    H = torch.empty((T, plan.ra), device=dev, dtype=plan.dtype)
    P = torch.empty((T, plan.n), device=dev, dtype=torch.float32) if plan.gate == 2 else None
    w, a0 = (router if plan.gate == 2 else A), (A0 if plan.compensate else A)
    kernel, meta = K.RANK_FWD.pick()
    kernel[lambda m: (_cdiv(T, m["BLOCK_M"]),)](
        x, A, w, a0, A if gate is None else gate, x if seeds is None else seeds, Z, H, Z if P is None else P,
        T, D, *x.stride(), *A.stride(), *w.stride(), *a0.stride(), plan.alpha, plan.comp_scale,
        plan.p_in, 1.0 / (1.0 - plan.p_in), plan.p_head, 1.0 / (1.0 - plan.p_head),
        DROP_IN=plan.p_in > 0, **_flags(plan), **meta)
    return Z, H, P


def rank_backward(dy: Tensor, B: Tensor, B0: Tensor | None, H: Tensor, P: Tensor | None, gate: Tensor | None,
                  seeds: Tensor | None, plan: RankPlan, gate_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(G [T, ra + nl (+ r)], the scalar gates' gradient [n] fp32 or None) from one pass over dy."""
    T, DO = dy.shape
    G = torch.empty((T, plan.ra + plan.nl + plan.r * plan.compensate), device=dy.device, dtype=plan.dtype)
    gate_grad = gate_grad and plan.gate == 1
    sums = torch.empty((_cdiv(T, K.SUM_ROWS), _pad(plan.n)), device=dy.device, dtype=torch.float32) \
        if gate_grad else G  # the scalar gates' gradient, summed per SUM_ROWS tokens
    b0 = B0 if plan.compensate else B
    kernel, meta = K.RANK_BWD.pick()
    kernel[lambda m: (_cdiv(T, m["BLOCK_M"]),)](
        dy, B, b0, H, H if P is None else P, H if gate is None else gate, H if seeds is None else seeds,
        G, sums, T, DO, *dy.stride(), *B.stride(), *b0.stride(), plan.alpha, plan.comp_scale,
        plan.p_head, 1.0 / (1.0 - plan.p_head), GATE_GRAD=gate_grad, SUM_ROWS=K.SUM_ROWS, **_flags(plan),
        **meta)
    return G, (sums[:, : plan.n].sum(0) if gate_grad else None)


def _splits(T: int, D: int, device: torch.device) -> int:
    """Token chunks for the weight gradients: about two programs per multiprocessor."""
    if K.INTERPRETED:
        return min(_cdiv(T, 32), 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_cdiv(T, 128), 2 * sms // _cdiv(D, 128)))


def weight_grads(G: Tensor, x: Tensor, seeds: Tensor | None, plan: RankPlan, with_router: bool) -> Tensor:
    """[dA; dW_r] in fp32, [ra (+ n), d_in]: G's first columns against drop(x), the router's against x."""
    T, D = x.shape
    nl = plan.nl if with_router else 0
    split = _splits(T, D, x.device)
    part = torch.empty((split, plan.ra + nl, D), device=x.device, dtype=torch.float32)
    kernel, meta = K.WEIGHT_GRAD.pick()
    kernel[lambda m: (_cdiv(D, m["BLOCK_N"]), split)](
        G, x, x if seeds is None else seeds, part, T, D, split, G.stride(0), *x.stride(),
        plan.p_in, 1.0 / (1.0 - plan.p_in), RA=plan.ra, NL=nl, DROP_IN=plan.p_in > 0, BRA=_pad(plan.ra),
        BNL=_pad(nl), DT=K.DTYPES[plan.dtype], PREC=_prec(plan.dtype), **meta)
    return part.sum(0) if split > 1 else part[0]


def _keep(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The keep mask [rows, cols] (1.0 kept, 0.0 dropped) the kernels draw from seed[0]."""
    out = torch.empty((rows, cols), device=seed.device, dtype=torch.float32)
    K.MASK[(_cdiv(rows, 32), _cdiv(cols, 32))](seed, out, rows, cols, p, BLOCK=32)
    return out
