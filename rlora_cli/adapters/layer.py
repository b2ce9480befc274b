"""One multi-head low-rank layer that LoRA, MultiLoRA, HydraLoRA and R-LoRA all configure.

y = base(x) + s · Σ_i gate_i · B_i · drop_i(A_i · drop(x))  [− s · B0 · A0 · x when compensated]

computed as one GEMM into rank space and one GEMM out of it:

    H = x · [A; W_router; A0]ᵀ          [T, n_A·r + n + r]    (one GEMM: same input)
    Z = gate ⊙ drop_heads(H_A viewed as [T, n, r])             (rank space, cheap)
    y = base(x) + s · [Z | −H_A0] · [B_cat | B0]ᵀ              (one GEMM out, added in place when eager)

Nothing of size T×n×d_out is ever built. Every adapter tensor is named `rlora_*`, so freezing,
saving and counting are one name test. The base module is wrapped, never edited.

A softmax router makes ΔW depend on each token. Fixing the gate to one head mixture ω̄ (a task's
mean routing weights) makes it static again: `fixed_mixture` replaces the softmax in forward, and
`static_factors(mixture)` folds the same ω̄ into B' = s·Σ_i ω̄_i·B_i (rank r: A is shared), with
R-LoRA's compensation block appended as for every other gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlora_cli.errors import UserError

PREFIX = "rlora_"
GATES = ("none", "scalar", "router", "uniform")
INITS = ("lora", "multilora", "hydralora", "random", "reference")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LayerSpec:
    """What one adapted linear computes; `methods.layer_spec` builds it from an AdapterConfig."""

    r: int
    num_heads: int
    scaling: float
    shared_a: bool
    """One A for every head (lora/hydralora/rlora) or one A_i per head (multilora)."""
    gate: str
    """none (one head) | scalar (learnable g_i) | router (softmax(W_r·x)) | uniform (1/n)."""
    input_dropout: float
    """One dropout mask on x, shared by all heads."""
    head_dropout: float
    """Independent dropout masks per head on the r-dim output of A (R-LoRA)."""
    init: str
    compensate: bool
    """Subtract the initial product s·B0·A0·x so a random start is exactly the base model."""
    gamma: float = 64.0

    def __post_init__(self) -> None:
        if self.gate not in GATES or self.init not in INITS:
            raise ValueError(f"bad LayerSpec gate={self.gate!r} init={self.init!r}")
        if self.r <= 0 or self.num_heads < 1:
            raise ValueError(f"bad LayerSpec r={self.r} num_heads={self.num_heads}")

    @property
    def a_heads(self) -> int:
        return 1 if self.shared_a else self.num_heads


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2-style Conv1D (whose weight is stored [d_in, d_out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    raise TypeError(f"cannot adapt {type(module).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2, GPT-J style) without importing transformers here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in fp32 over a half-precision base (as PEFT does); float64 stays float64."""
    return torch.float32 if base_dtype in _HALF else base_dtype


class MultiHeadLoRA(nn.Module):
    """Wraps a frozen Linear (or Conv1D) as `self.base` and adds the multi-head low-rank delta."""

    def __init__(self, base: nn.Module, spec: LayerSpec, *, init: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base = base
        self.spec = spec
        self.in_features, self.out_features = linear_shape(base)
        kw = {"device": base.weight.device, "dtype": dtype or adapter_dtype(base.weight.dtype)}
        n, r, d_in, d_out = spec.num_heads, spec.r, self.in_features, self.out_features
        self.rlora_A = nn.Parameter(torch.empty(spec.a_heads * r, d_in, **kw))
        self.rlora_B = nn.Parameter(torch.empty(d_out, n * r, **kw))  # [B_1 | … | B_n]
        if spec.gate == "scalar":
            self.rlora_gate = nn.Parameter(torch.empty(n, **kw))
        if spec.gate == "router":
            self.rlora_router = nn.Parameter(torch.empty(n, d_in, **kw))
        if spec.compensate:
            # Saved with the adapter: loading re-creates the exact function with no RNG.
            self.register_buffer("rlora_A0", torch.empty(r, d_in, **kw))
            self.register_buffer("rlora_B0", torch.empty(d_out, r, **kw))
        if init:
            self.reset_parameters()
        # A head mixture [n] used instead of the softmax router (a task's fold). A plain attribute,
        # never a parameter or buffer: it is no part of the saved adapter, and `.to()` leaves it alone.
        self.fixed_mixture: Tensor | None = None
        # Training telemetry of a softmax router (probe.RouteProbe, shared by the model's routed
        # layers, which also keeps their mutual-information terms; None: nothing recorded).
        self.route_probe: Any = None
        # The fused Triton path (fused.enable sets it): a function returning this layer's output,
        # or None where it cannot run (then the plain path below runs). A plain attribute.
        self.fused_forward: Any = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        spec, n, r = self.spec, self.spec.num_heads, self.spec.r
        d_in, d_out = self.in_features, self.out_features
        A, B = self.rlora_A, self.rlora_B
        if spec.init in ("lora", "multilora", "hydralora"):
            # kaiming_uniform(a=√5) on [., d_in] is U(±1/√d_in), nn.Linear's default.
            nn.init.uniform_(A, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
            if spec.init == "multilora":
                nn.init.uniform_(B, -1 / math.sqrt(r), 1 / math.sqrt(r))  # per head: fan_in = r
            else:
                B.zero_()
        elif spec.init == "random":
            # R-LoRA Multi-Head Random Init: c = d_out^{1/4} / √γ keeps ‖B_i A x‖ near ‖x‖·O(1).
            c = d_out ** 0.25 / math.sqrt(spec.gamma)
            A.normal_(0.0, c / math.sqrt(d_in))
            B.normal_(0.0, c / math.sqrt(d_out))
        else:  # "reference": the released code scales inside its per-head loop, so A gets c'^n.
            c = r ** 0.25 / math.sqrt(spec.gamma)
            A.normal_(0.0, 1 / math.sqrt(d_in)).mul_(c ** n)
            B.normal_(0.0, 1 / math.sqrt(d_out))
            B.view(d_out, n, r).mul_(torch.tensor([c ** (n - i) for i in range(n)],
                                                  dtype=B.dtype, device=B.device).view(1, n, 1))
        if spec.gate == "scalar":
            self.rlora_gate.zero_()  # MultiLoRA: Δ ≡ 0 at start through zero gates
        if spec.gate == "router":
            if spec.init == "random":
                self.rlora_router.zero_()  # ω ≡ 1/n, so the compensation cancels the heads exactly
            else:
                bound = 1 / math.sqrt(d_in)
                nn.init.uniform_(self.rlora_router, -bound, bound)
        if spec.compensate:
            self.rlora_A0.copy_(A)
            self.rlora_B0.copy_(B.view(d_out, n, r).mean(1))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_forward is not None and (out := self.fused_forward(self, x)) is not None:
            return out
        y = self.base(x)
        z, B = self._rank_space(x.reshape(-1, self.in_features))
        return _add_delta(y, z, B, self._alpha)

    @property
    def _alpha(self) -> float:
        return self.spec.scaling / (self.spec.num_heads if self.spec.gate == "uniform" else 1)

    def _rank_space(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(Z, B) with the delta = alpha · Z · Bᵀ: the gated, dropped-out head activations
        [T, n·r] against B_cat, and under compensation one more rank-r block, −A0·x against B0."""
        spec, n, r = self.spec, self.spec.num_heads, self.spec.r
        A = self.rlora_A
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        clean = [w for w in (getattr(self, "rlora_router", None), getattr(self, "rlora_A0", None))
                 if w is not None]  # rows that read the clean x
        if self.training and spec.input_dropout > 0:
            h = F.dropout(x, spec.input_dropout, True) @ A.t()
            rest = x @ torch.cat(clean).t() if clean else None
        else:
            H = x @ (torch.cat([A, *clean]) if clean else A).t()
            h, rest = H[:, : A.shape[0]], H[:, A.shape[0]:]
        h = h.view(-1, spec.a_heads, r)
        if spec.a_heads != n:
            h = h.expand(-1, n, r)
        if self.training and spec.head_dropout > 0:
            h = F.dropout(h, spec.head_dropout, True)  # one independent mask per head
        if spec.gate == "scalar":
            h = h * self.rlora_gate.to(h.dtype).view(1, n, 1)
        elif spec.gate == "router":
            weights = router_weights(rest[:, :n]) if self.fixed_mixture is None else \
                self.fixed_mixture.to(h.device).view(1, n)  # the same mixture for every token
            if self.route_probe is not None and self.fixed_mixture is None:
                self.route_probe.observe(self, weights)
            h = h * weights.to(h.dtype).unsqueeze(-1)
        z = h.reshape(-1, n * r)
        if not spec.compensate:
            return z, self.rlora_B
        # The compensation −s·B0·A0·x rides in the same GEMM out; alpha is s/n under a uniform
        # gate, so its block is scaled by n there.
        c = n if spec.gate == "uniform" else 1
        return torch.cat([z, rest[:, -r:].to(z.dtype) * -c], 1), torch.cat([self.rlora_B, self.rlora_B0], 1)

    def router_weights(self, x: Tensor) -> Tensor:
        """ω(x) [.., n] for inputs x [.., d_in] (analysis and tests; forward fuses this GEMM);
        the fixed mixture for every token while one is set."""
        n = self.spec.num_heads
        if self.spec.gate != "router":
            return torch.full((*x.shape[:-1], n), 1.0 / n, dtype=torch.float32, device=x.device)
        if self.fixed_mixture is not None:
            w = self.fixed_mixture.to(x.device, torch.promote_types(self.fixed_mixture.dtype, torch.float32))
            return w.expand(*x.shape[:-1], n)
        return router_weights(x.to(self.rlora_router.dtype) @ self.rlora_router.t())

    def static_factors(self, mixture: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B', A') with ΔW = B'·A' equal to the eval-mode delta, in float32 (or wider).

        The one formula for ΔW: merge, export, folding and analysis all call it. MultiLoRA becomes a
        plain LoRA of rank n·r with the gates folded into B; a uniform router gives B̄ = mean B_i;
        a softmax router needs a fixed head mixture ω̄ [n] (`mixture`, else `fixed_mixture`) and
        gives B̄ = Σ_i ω̄_i·B_i; the R-LoRA compensation is one more rank-r block [B̄ | −B0]·[A; A0].
        """
        spec, n, r = self.spec, self.spec.num_heads, self.spec.r
        if spec.gate != "router" and mixture is not None:
            raise ValueError(f"a head mixture replaces a softmax router; this layer's gate is {spec.gate}")
        mixture = self.fixed_mixture if mixture is None else mixture
        if spec.gate == "router" and mixture is None:
            raise UserError(
                "a softmax router makes ΔW depend on each token, so this adapter cannot be folded "
                "into one weight matrix without a fixed head mixture",
                "fold it for one task (rlora merge/export --task NAME), or train with adapter.router=off "
                "to make it mergeable")
        dt = torch.promote_types(self.rlora_A.dtype, torch.float32)
        A = self.rlora_A.detach().to(dt)
        B = self.rlora_B.detach().to(dt) * spec.scaling
        if spec.gate == "scalar":
            B = B * self.rlora_gate.detach().to(dt).repeat_interleave(r)
        elif spec.gate == "uniform":
            B = B.view(self.out_features, n, r).mean(1)
        elif spec.gate == "router":
            B = (B.view(self.out_features, n, r) * _checked_mixture(mixture, n).to(B).view(1, n, 1)).sum(1)
        if spec.compensate:
            A = torch.cat([A, self.rlora_A0.to(dt)])
            B = torch.cat([B, -spec.scaling * self.rlora_B0.to(dt)], dim=1)
        return B, A

    def delta_weight(self, mixture: Tensor | None = None) -> Tensor:
        """ΔW [d_out, d_in] in float32 (or wider); a softmax router needs a fixed mixture."""
        B, A = self.static_factors(mixture)
        return B @ A

    def extra_repr(self) -> str:
        s = self.spec
        return (f"r={s.r}, heads={s.num_heads}, gate={s.gate}, scaling={s.scaling:g}, "
                f"input_dropout={s.input_dropout}, head_dropout={s.head_dropout}, "
                f"init={s.init}, compensate={s.compensate}")


def _checked_mixture(mixture: Tensor, n: int) -> Tensor:
    """A detached head mixture of shape [n] with finite values (a wrong one is a caller's bug)."""
    mixture = torch.as_tensor(mixture).detach()
    if mixture.shape != (n,) or not torch.isfinite(mixture).all():
        raise ValueError(f"a head mixture must be {n} finite weights, got shape {tuple(mixture.shape)}")
    return mixture


def router_weights(logits: Tensor) -> Tensor:
    """Softmax over heads in float32 or wider (float64 stays float64)."""
    return torch.softmax(logits.float() if logits.dtype in _HALF else logits, dim=-1)


def _add_delta(y: Tensor, z: Tensor, B: Tensor, alpha: float) -> Tensor:
    """y + alpha · z · Bᵀ, where y [.., d_out] is the base layer's fresh output and z [tokens, n·r].

    Eager: one GEMM that accumulates into y in place (out-of-place addmm would first copy y, a
    [T, d_out] read and write per layer). Compiled, or with mixed dtypes outside autocast: a plain
    add in y's dtype and y's own shape, which the compiler fuses into whatever reads y next (RoPE,
    SwiGLU, the residual). Added as two [T, d_out] matrices instead, the sum of two matmuls is
    rewritten by the compiler into an out-of-place addmm, whose input copy showed in the GPU trace
    as a memcpy before 80 of a step's GEMMs (benchmarks/RESULTS.md, round 3). alpha scales the
    [T, n·r] activations, where it fuses into the rank-space kernel: on the [T, d_out] product it was
    a pass of its own over y's size (RESULTS.md, "alpha scales the rank-space activations").
    """
    if torch.compiler.is_compiling() or not _one_dtype(y, z, B):
        return y + ((z * alpha).to(B.dtype) @ B.t()).to(y.dtype).view(y.shape)
    flat = y.reshape(-1, y.shape[-1])  # a view of the fresh output (a copy only if it is not contiguous)
    return flat.addmm_(z.to(y.dtype), B.t().to(y.dtype), alpha=alpha).view(y.shape)


def _one_dtype(y: torch.Tensor, z: torch.Tensor, B: torch.Tensor) -> bool:
    # addmm_ in place needs one dtype; autocast casts for it.
    return y.dtype == z.dtype == B.dtype or torch.is_autocast_enabled(y.device.type)
