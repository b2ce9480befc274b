"""What the layer and fused-path tests share (CPU, interpreter and GPU): the method cases and the
float64 reference, the per-head loop written out plainly with the dropout masks given."""

from __future__ import annotations

import torch

from rlora_cli.adapters import MultiHeadLoRA

# Every method, routers softmax and off, and R-LoRA's init switches: the layer tests' cases too.
METHOD_CASES = [
    dict(type="lora", num_heads=1),
    dict(type="multilora"),
    dict(type="hydralora", router="softmax"),
    dict(type="hydralora", router="off"),
    dict(type="hydralora", random_init=True),
    dict(type="rlora", router="softmax"),
    dict(type="rlora", router="off"),
    dict(type="rlora", init="reference"),
]
# The fused path also serves a routed layer folded to one fixed head mixture.
CASES = [*METHOD_CASES, dict(type="rlora", mixture=True), dict(type="hydralora", mixture=True)]


def randomize(layer: MultiHeadLoRA, std: float, gate_std: float | None = None) -> MultiHeadLoRA:
    """Random values in every adapter tensor, so no term hides behind a zero init: N(0, std), the
    scalar gates N(0, gate_std) when given, the compensation pair too."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("rlora_"):
                p.normal_(0, gate_std if gate_std is not None and name == "rlora_gate" else std)
        if layer.spec.compensate:
            layer.rlora_A0.normal_(0, std)
            layer.rlora_B0.normal_(0, std)
    return layer


def case_id(case: dict) -> str:
    return "-".join(f"{v}" if k == "type" else f"{k}={v}" for k, v in case.items())


def tensors(layer: MultiHeadLoRA) -> dict[str, torch.Tensor | float]:
    """The reference's inputs by name: the layer's own adapter parameters and buffers (gradients
    reach the layer through them), its base weight "W" and bias (0.0 without one)."""
    out: dict[str, torch.Tensor | float] = {k: v for k, v in layer.named_parameters()
                                            if k.startswith("rlora_")}
    out.update(layer.named_buffers())
    out["W"] = layer.base.weight
    out["bias"] = layer.base.bias if layer.base.bias is not None else 0.0
    return out


def float64(layer: MultiHeadLoRA) -> dict[str, torch.Tensor | float]:
    """`tensors` as float64, the trainable ones as new leaves (the reference's gradients come from these)."""
    return {k: v if isinstance(v, float) else
            v.detach().double().requires_grad_(k.startswith("rlora_") and isinstance(v, torch.nn.Parameter))
            for k, v in tensors(layer).items()}


def reference(layer: MultiHeadLoRA, t: dict, x: torch.Tensor, in_mask=None, head_mask=None) -> torch.Tensor:
    """The per-head loop in float64, with the dropout masks given (1 kept, 0 dropped)."""
    spec = layer.spec
    n, r, s = spec.num_heads, spec.r, spec.scaling
    y = x @ t["W"].t() + t["bias"]
    x_in = x if in_mask is None else x * in_mask.double() / (1 - spec.input_dropout)
    if layer.fixed_mixture is not None:
        omega = layer.fixed_mixture.to(x).expand(x.shape[0], n)
    elif spec.gate == "router":
        omega = torch.softmax(x @ t["rlora_router"].t(), dim=-1)
    for i in range(n):
        A_i = t["rlora_A"] if spec.shared_a else t["rlora_A"][i * r:(i + 1) * r]
        h = x_in @ A_i.t()
        if head_mask is not None:
            h = h * head_mask[:, i].double() / (1 - spec.head_dropout)
        gate = {"none": 1.0, "uniform": 1.0 / n}.get(spec.gate)
        if spec.gate == "scalar":
            gate = t["rlora_gate"][i]
        elif spec.gate == "router":
            gate = omega[:, i:i + 1]
        y = y + s * gate * (h @ t["rlora_B"][:, i * r:(i + 1) * r].t())
    if spec.compensate:
        y = y - s * (x @ t["rlora_A0"].t()) @ t["rlora_B0"].t()
    return y


def trainable(layer: MultiHeadLoRA) -> list[str]:
    """The layer's trainable adapter tensors, by name (a fixed mixture freezes no router: it is kept)."""
    return [k for k, p in layer.named_parameters() if k.startswith("rlora_") and p.requires_grad]


def run_float64(layer: MultiHeadLoRA, x: torch.Tensor, up: torch.Tensor, masks=(None, None)):
    """The reference's output for x [T, d_in] and its gradients (trainable tensors, then x) for the
    output gradient `up`, in float64, with the dropout masks given."""
    t = float64(layer)
    x64 = x.detach().double().requires_grad_()
    out = reference(layer, t, x64, *masks)
    grads = torch.autograd.grad(out, [t[k] for k in trainable(layer)] + [x64], up.double(), allow_unused=True)
    return out, grads


def err(a: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """Largest absolute error relative to the float64 tensor's largest entry (NaN stays NaN)."""
    if ref is None:  # the router under a fixed mixture: zeros, as eager autograd gives
        return 0.0 if a is None else a.abs().max().item()
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
