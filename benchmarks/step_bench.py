"""Full training steps of rlora's methods against PEFT LoRA, with and without Liger, on one GPU.

    python -m benchmarks.step_bench                   # llama-1b, qwen-0.5b; 8x1024, 8x512
    python -m benchmarks.step_bench --compile --scale --json runs/step_bench.json
    python -m benchmarks.step_bench --smoke           # tiny model on the CPU, seconds: it still runs

One step is what a training loop does per micro-batch: zero_grad(set_to_none), forward under bf16
autocast, next-token cross-entropy, backward, AdamW over the trainable tensors. Every variant is
built over one random-init bf16 base (the frozen weight tensors are shared; each variant's modules,
adapters and Liger patches are its own) and timed in interleaved rounds, so clock drift hits all
alike. Ratios are against the anchor: the fastest PEFT LoRA (r = 8) variant of the same shape and
batch in the same run (each table row of it says so), so rlora is measured against the best PEFT
set-up a user can switch on (fp32 or bf16 adapters, eager or compiled, with or without Liger).
A variant that fails (import, OOM, compile) is recorded with its error and the run goes on.

Variant names are a kind and flags: `+liger` (Liger's RoPE, RMSNorm, SwiGLU and fused linear
cross-entropy), `+ce` (only the fused cross-entropy), `+bf16` (bf16 adapter weights; for PEFT
`autocast_adapter_dtype=False`, which keeps them in the base's bf16), `+compile`
(each decoder block torch.compile'd in place, as `train.compile` does), `+graphs` (those compiled
blocks replayed as CUDA graphs: compile mode reduce-overhead, for this variant alone), `+rN` and
`+nN` (rank N, N heads; the anchor stays PEFT at r = 8). Every row keeps its kernels by name with
their calls and GPU time (`top_kernels`), so a ratio can be read against the trace that explains it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import logging
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import busy_ms, cuda_kernels, environment, time_ms, write_json
from benchmarks.layer_bench import ReferenceRLoRA
from benchmarks.shapes import config
from rlora_cli.adapters import AdapterConfig, find_targets, fused, inject_adapters, parameter_counts
from rlora_cli.config import COMPILE_MODES
from rlora_cli.training.kernels import compile_model

log = logging.getLogger("step_bench")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora", "multilora", "hydralora", "rlora")
KINDS = ("base", "peft-lora", "peft-lora-r32", *METHODS, "reference")
ANCHOR_KIND = "peft-lora"  # the anchor is the fastest variant of this kind at r = 8


@dataclass(frozen=True)
class Spec:
    """What one variant is: base model alone, PEFT LoRA, an rlora method, or the reference loop."""

    kind: str
    liger: bool = False
    """Liger's RoPE, RMSNorm and SwiGLU kernels and its fused linear cross-entropy."""
    compiled: bool = False
    bf16: bool = False
    """Adapter weights in bf16 (no fp32->bf16 casts under autocast) instead of fp32."""
    r: int = 8
    heads: int = 4
    """B heads of multilora/hydralora/rlora/reference (lora and PEFT have 1)."""
    ce: bool = False
    """Liger's fused linear cross-entropy only: RoPE, RMSNorm and SwiGLU stay the model's own, so
    inside compiled blocks the compiler fuses them (Liger's Triton kernels would break the graph)."""
    nodrop: bool = False
    """Adapter dropout 0 instead of 0.05: a diagnostic that shows what the dropout costs."""
    fused: bool = False
    """rlora methods: the fused Triton adapter kernels (adapters/fused.py) wherever they run."""
    graphs: bool = False
    """Compiled blocks replay as CUDA graphs (torch.compile mode reduce-overhead)."""

    @property
    def fused_ce(self) -> bool:
        return self.liger or self.ce

    @property
    def num_heads(self) -> int:
        return self.heads if self.kind in ("multilora", "hydralora", "rlora", "reference") else 1


@dataclass
class Variant:
    model: nn.Module
    backbone: Callable[..., Any]
    """The decoder stack (compiled for +compile): input_ids -> last_hidden_state."""
    head: nn.Module
    rope: tuple[Any, Callable[..., Any]]
    """(modeling module, the apply_rotary_pos_emb this variant runs with)."""
    fused_loss: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    compiled: bool
    last_loss: torch.Tensor | None = None


FLAGS = {"liger", "ce", "compile", "bf16", "nodrop", "fused", "graphs"}
_SIZE = re.compile(r"^([rn])(\d+)$")  # +r16: rank 16; +n8: 8 heads


def parse_name(name: str) -> Spec:
    kind, *flags = name.split("+")
    sizes = {m[1]: int(m[2]) for f in flags if (m := _SIZE.match(f))}
    flags = [f for f in flags if not _SIZE.match(f)]
    if (kind not in KINDS or not set(flags) <= FLAGS or 0 in sizes.values()
            or ("bf16" in flags and kind not in (*METHODS, "peft-lora")) or {"liger", "ce"} <= set(flags)
            or ("fused" in flags and kind not in METHODS) or ("graphs" in flags and "compile" not in flags)
            or ("n" in sizes and kind not in ("multilora", "hydralora", "rlora", "reference"))
            or (sizes and kind in ("base", "peft-lora-r32"))):
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(default_names(False, True))}, "
                         "each with +rN (rank), +nN (heads), +graphs (with +compile)")
    r = sizes.get("r", 32 if kind == "peft-lora-r32" else 8)  # n·r of the 4-head methods, alpha 2r
    return Spec("peft-lora" if kind.startswith("peft") else kind, "liger" in flags, "compile" in flags,
                "bf16" in flags, r, sizes.get("n", 4), ce="ce" in flags, nodrop="nodrop" in flags,
                fused="fused" in flags, graphs="graphs" in flags)


def default_names(smoke: bool, compiled: bool, peft: bool = True) -> list[str]:
    adapted = ("peft-lora", *METHODS)
    names = [k + suffix for k in KINDS for suffix in ("", "+liger")]
    names += ["peft-lora+bf16", *(f"{m}+liger+bf16" for m in adapted)]
    if compiled:
        names += [f"{m}+liger+compile" for m in adapted]
        names += [f"{m}+liger+bf16+compile" for m in adapted]
        names += [f"{m}+ce+compile" for m in adapted]
        names += [f"{m}+ce+bf16+compile" for m in adapted]
    if not peft:
        names = [n for n in names if not n.startswith("peft")]
    return [n for n in names if not (smoke and ("+liger" in n or "+ce" in n))]


# ------------------------------------------------------------------------------------ building


def build_base(shape: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # born on the device: no CPU copy of a 1B model
        model = AutoModelForCausalLM.from_config(config(shape), dtype=torch.bfloat16)
    return model.requires_grad_(False).train()  # train mode: the adapters' dropout is on


def shared_tensors(base: nn.Module) -> dict[int, torch.Tensor]:
    return {id(t): t for t in [*base.parameters(), *base.buffers()]}


def share_copy(base: nn.Module) -> nn.Module:
    """A new module tree over the same frozen tensors: each variant wraps and patches its own
    modules, while the weights are held once (deepcopy returns memo entries as they are)."""
    return copy.deepcopy(base, memo=dict(shared_tensors(base)))


_PLAIN_ROPE: dict[str, Callable[..., Any]] = {}


def plain_rope(home: Any) -> Callable[..., Any]:
    """The modeling file's own apply_rotary_pos_emb, as first seen (before any Liger patch)."""
    return _PLAIN_ROPE.setdefault(home.__name__, home.apply_rotary_pos_emb)


def apply_liger(model: nn.Module) -> Callable[..., Any]:
    """Liger's RMSNorm and SwiGLU on this instance; returns Liger's RoPE function.

    `_apply_liger_kernel_to_instance` also rebinds globals of the modeling file: its
    apply_rotary_pos_emb, and the RMSNorm/MLP classes every model built later is made of. Those
    are put back at once, so variants without Liger and later shapes stay plain; the RoPE is set
    per step instead (`train_step`). It must run on the bare HF model, before PEFT wraps it: on a
    PeftModel its `getattr(model, base_model_prefix)` finds the CausalLM, not the decoder.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    home = sys.modules[type(model).__module__]
    home.apply_rotary_pos_emb = plain_rope(home)  # a step interrupted by an OOM may have left Liger's
    saved = dict(vars(home))
    try:
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        if home.apply_rotary_pos_emb is saved["apply_rotary_pos_emb"]:  # it only logs what it skips
            raise RuntimeError(f"Liger patched nothing for model type {model.config.model_type!r}")
        return home.apply_rotary_pos_emb
    finally:
        for key, value in saved.items():
            if getattr(home, key) is not value:
                setattr(home, key, value)


def add_adapters(model: nn.Module, spec: Spec) -> nn.Module:
    """Wrap the seven projections of every layer; returns the model whose parameters train."""
    r, alpha, p = spec.r, 2 * spec.r, 0.0 if spec.nodrop else 0.05
    if spec.kind == "base":
        model.enable_input_require_grads()  # so the backward runs through every layer, as with adapters
        return model
    if spec.kind == "peft-lora":
        from peft import LoraConfig, get_peft_model

        # autocast_adapter_dtype=False keeps the adapters in the base's bf16 (PEFT's default makes them fp32)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p,
                                                target_modules=list(TARGETS)),
                              autocast_adapter_dtype=not spec.bf16)
    if spec.kind == "reference":
        for name in find_targets(model, TARGETS):
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent)
            setattr(holder, child, ReferenceRLoRA(getattr(holder, child), r, spec.heads, alpha, p))
        for name, param in model.named_parameters():  # fp32 adapters over the bf16 base, as PEFT
            param.requires_grad_(any(k in name for k in (".lora_A.", ".lora_B.", ".route.")))
        return model
    return inject_adapters(model, AdapterConfig(type=spec.kind, r=r, lora_alpha=alpha, lora_dropout=p,
                                                num_heads=spec.num_heads, target_modules=TARGETS,
                                                use_rslora=False),
                           dtype=torch.bfloat16 if spec.bf16 else None)


def build_variant(base: nn.Module, spec: Spec, compile_mode: str) -> Variant:
    model = share_copy(base)
    home = sys.modules[type(model).__module__]
    rope = apply_liger(model) if spec.liger else plain_rope(home)
    with torch.device(base.device):  # adapters (and the reference's modules) are born beside the base
        model = add_adapters(model, spec)
    if spec.fused:
        fused.enable(model)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps, rlora edits
    trainable = [q for q in model.parameters() if q.requires_grad]
    fused_loss = None
    if spec.fused_ce:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused_loss = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    if spec.compiled:
        # What `train.compile: true` does: each decoder block compiled in place (one graph for
        # all blocks); the embeddings and the loss stay eager.
        compile_model(hf, "reduce-overhead" if spec.graphs else compile_mode)
    backbone = hf.get_decoder()
    # The fused AdamW on CUDA for every variant alike: what `rlora train` runs, and the Hugging Face
    # Trainer's default optimizer (adamw_torch_fused) for a PEFT user. The foreach default launches
    # per group of tensors from the host, which rlora's 3 tensors per layer paid more for.
    fused_adamw = base.device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=fused_adamw) if trainable else None
    return Variant(model, backbone, hf.get_output_embeddings(), (home, rope), fused_loss, optimizer,
                   spec.compiled)


# ------------------------------------------------------------------------------ one step


def make_batch(rows: int, seq: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids; the first quarter of every row is an unlabelled prompt."""
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq), generator=g, device=device)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    return ids, labels


def next_token_loss(v: Variant, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss for every variant (Liger's stock fused CE for +liger, as the peers use it);
    rlora train's own loss path (kernels.install_fused_loss) is timed end to end by benchmarks.e2e."""
    targets = labels[:, 1:].flatten()
    if v.fused_loss is not None:  # chunked over tokens: the [tokens x vocab] logits are never built
        return v.fused_loss(v.head.weight, hidden[:, :-1].flatten(0, 1), targets)
    logits = v.head(hidden)  # as Hugging Face's causal-LM loss: fp32 logits, shifted by one
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets, ignore_index=-100)


def train_step(v: Variant, ids: torch.Tensor, labels: torch.Tensor) -> None:
    home, rope = v.rope
    home.apply_rotary_pos_emb = rope  # a module global: variants with and without Liger alternate
    if v.compiled:
        torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: last step's outputs may be reused
    if v.optimizer is not None:
        v.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        hidden = v.backbone(input_ids=ids, use_cache=False).last_hidden_state
        loss = next_token_loss(v, hidden, labels)
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
    v.last_loss = loss.detach()


# ------------------------------------------------------------------------------ measuring


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(variants: dict[str, Variant], failures: dict[str, str], name: str, fn: Callable[[], Any]) -> None:
    """Run fn; on any error record it, drop the variant and free its memory (the run goes on)."""
    try:
        fn()
        return
    except Exception as e:  # noqa: BLE001 - an OOM or a compile error is a result here
        failures[name] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:240]}"
    log.info("  %s failed: %s", name, failures[name])
    variants.pop(name, None)
    free_memory()


def own_bytes(v: Variant, shared: dict[int, torch.Tensor]) -> int:
    """Bytes this variant holds beyond the shared base: its adapters, buffers and AdamW state."""
    own = {id(t): t for t in [*v.model.parameters(), *v.model.buffers()] if id(t) not in shared}
    for state in (v.optimizer.state.values() if v.optimizer else ()):
        own.update({id(t): t for t in state.values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in own.values())


def peak_gib(v: Variant, ids: torch.Tensor, labels: torch.Tensor, held: int) -> float | None:
    """Peak of a process holding only this variant: what it holds (`held`: base + own bytes) plus
    the step's transient peak above what was allocated before it. Measured relative, because the
    other variants' tensors sit in the same allocator; the grads are freed first so they count in
    the transient, as the step's own zero_grad(set_to_none) would."""
    if not ids.is_cuda:
        return None
    if v.optimizer is not None:
        v.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_step(v, ids, labels)
    torch.cuda.synchronize()
    return (held + torch.cuda.max_memory_allocated() - before) / 2**30


def profile_step(v: Variant, ids: torch.Tensor,
                 labels: torch.Tensor) -> tuple[int, float, list[dict[str, Any]]]:
    """(kernels, busy ms, the busiest kernels) of one step. On CUDA: device kernels (Triton's
    included) and the sum of their durations; Memcpy/Memset activities are not kernels and are
    counted in neither. On the CPU (--smoke) the nearest thing: leaf CPU ops and their summed time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.is_cuda
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        train_step(v, ids, labels)
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        work = cuda_kernels(prof)
    else:
        work = [e for e in prof.events() if e.device_type == DeviceType.CPU and not e.cpu_children]
    return len(work), busy_ms(work), top_kernels(work)


def top_kernels(events: list[Any], keep: int = 200) -> list[dict[str, Any]]:
    """Kernel names by summed time, busiest first (up to `keep`: in practice every name, so two
    variants' inventories can be set side by side): name (cut to 160 characters), calls, ms."""
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name[:160], []).append(e.time_range.elapsed_us() / 1e3)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:keep]
    return [{"name": name, "calls": len(ms), "ms": round(sum(ms), 3)} for name, ms in ranked]


def bench(base: nn.Module, specs: dict[str, Spec], batch: tuple[int, int], warmup: int, steps: int,
          compile_mode: str) -> list[dict[str, Any]]:
    """Build every variant over `base`, time them in interleaved rounds, then measure each once."""
    device = base.device
    ids, labels = make_batch(*batch, base.config.vocab_size, device)
    home = sys.modules[type(base).__module__]
    plain = plain_rope(home)
    variants: dict[str, Variant] = {}
    failures: dict[str, str] = {}
    first_s: dict[str, float] = {}

    def build(name: str) -> None:
        variants[name] = build_variant(base, specs[name], compile_mode)

    def warm(name: str) -> None:  # the first step (with any compilation) is timed apart
        t = time.perf_counter()
        train_step(variants[name], ids, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s[name] = time.perf_counter() - t
        for _ in range(warmup - 1):
            train_step(variants[name], ids, labels)

    times: dict[str, list[float]] = {name: [] for name in specs}

    def timed(name: str) -> None:
        times[name].append(time_ms(lambda: train_step(variants[name], ids, labels), device.type))

    try:
        for name in specs:
            attempt(variants, failures, name, lambda: build(name))
        for name in list(variants):  # warm-up of every variant first, ...
            attempt(variants, failures, name, lambda: warm(name))
        for _ in range(steps):  # ... then rounds of one timed step of every variant
            for name in list(variants):
                attempt(variants, failures, name, lambda: timed(name))
        shared = shared_tensors(base)
        held_base = sum(t.numel() * t.element_size() for t in shared.values())
        extra: dict[str, dict[str, Any]] = {}

        def measure(name: str) -> None:
            v = variants[name]
            held = held_base + own_bytes(v, shared)
            kernels, busy, top = profile_step(v, ids, labels)
            # Under CUDA graphs the graph's memory pool is allocated before the measured step, so
            # its peak would read near zero: not measured.
            peak = None if specs[name].graphs else peak_gib(v, ids, labels, held)
            extra[name] = {"peak_gib": peak, "held_gib": held / 2**30,
                           "kernels": kernels, "gpu_busy_ms": busy, "top_kernels": top,
                           "loss": float(v.last_loss),
                           "trainable": parameter_counts(v.model)[0]}
        for name in list(variants):
            attempt(variants, failures, name, lambda: measure(name))
    finally:
        home.apply_rotary_pos_emb = plain
        variants.clear()
    rows = []
    for name, spec in specs.items():
        row = {"batch": "{}x{}".format(*batch), "variant": name, "r": spec.r, "heads": spec.num_heads,
               "ok": name not in failures}
        if name in failures:
            rows.append({**row, "error": failures[name]})
            continue
        ms = times[name]
        median = statistics.median(ms)
        rows.append({**row, "median_ms": median, "min_ms": min(ms), "max_ms": max(ms),
                     "tokens_per_s": batch[0] * batch[1] / (median / 1e3), **extra[name],
                     "first_step_s": first_s[name],
                     "compile_s": first_s[name] - median / 1e3 if spec.compiled else None})
    return rows


RATIOS = {"step": "median_ms", "busy": "gpu_busy_ms", "kernels": "kernels", "peak": "peak_gib"}


def anchors(rows: list[dict[str, Any]], field: str = "median_ms") -> dict[tuple[str, str], dict[str, Any]]:
    """(shape, batch) -> the fastest PEFT LoRA row at r = 8 (the best PEFT set-up of that run)
    among those that measured `field` (CUDA-graph rows measure no peak)."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        spec = parse_name(r["variant"])
        if r["ok"] and spec.kind == ANCHOR_KIND and spec.r == 8 and r.get(field) is not None:
            key = (r["shape"], r["batch"])
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    return best


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each row's numbers over its anchor's (None where missing); returns {"shape batch": anchor}.
    The peak's anchor is the fastest PEFT row with a measured peak (`peak_anchor` when not the same)."""
    refs = {k: anchors(rows, f) for k, f in RATIOS.items()}
    for r in rows:
        key = (r["shape"], r["batch"])
        ref = refs["step"].get(key)
        r["anchor"] = ref["variant"] if ref else None
        peak_ref = refs["peak"].get(key)
        if peak_ref is not None and peak_ref is not ref:
            r["peak_anchor"] = peak_ref["variant"]
        r["vs_anchor"] = {k: (r[f] / refs[k][key][f] if key in refs[k] and r.get(f) is not None
                              and refs[k][key][f] else None)  # an anchor that measured 0: no ratio
                          for k, f in RATIOS.items()} if r["ok"] else None
    return {f"{shape} {batch}": r["variant"] for (shape, batch), r in refs["step"].items()}


def _f(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| shape | batch | variant | step ms (min–max) | tok/s | busy ms | kernels | peak GiB "
           "| trainable | ×step | ×busy | ×kernels | ×peak |  (× = over the anchor: the fastest PEFT "
           "LoRA variant of the same shape and batch, marked ⚓; ×peak: the fastest with a measured peak)",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " ⚓" if r.get("anchor") == r["variant"] else ""
        head = f"| {r['shape']} | {r['batch']} | {r['variant']}{mark} "
        if not r["ok"]:
            out.append(head + f"| failed: {r['error']} |" + " – |" * 9)
            continue
        x = r["vs_anchor"]
        out.append(head + f"| {r['median_ms']:.2f} ({r['min_ms']:.2f}–{r['max_ms']:.2f}) "
                   f"| {r['tokens_per_s']:,.0f} "
                   f"| {_f(r['gpu_busy_ms'], '.2f')} | {_f(r['kernels'], 'd')} | {_f(r['peak_gib'], '.2f')} "
                   f"| {r['trainable']:,} | " + " | ".join(_f(x[k], ".2f") for k in RATIOS) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------ scale notes


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """Largest n in [start, cap] with fits(n): doubling from start, then bisecting between the
    last size that fit and the first that did not (0 when start does not fit)."""
    if not fits(start):
        return 0
    lo, hi = start, None
    while hi is None:
        n = min(2 * lo, cap)
        if n == lo:
            return lo
        lo, hi = (n, None) if fits(n) else (lo, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_batch(base: nn.Module, spec: Spec, seq: int, start: int, cap: int) -> int:
    v = build_variant(base, spec, "default")

    def fits(rows: int) -> bool:
        ids, labels = make_batch(rows, seq, base.config.vocab_size, base.device)
        try:
            train_step(v, ids, labels)
            ok = True
        except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS/Triton failing to allocate
            if (not isinstance(e, torch.OutOfMemoryError) and "ALLOC" not in str(e)
                    and "out of memory" not in str(e)):
                raise
            ok = False
        del ids, labels
        if v.optimizer is not None:
            v.optimizer.zero_grad(set_to_none=True)
        free_memory()  # after the except block, so the traceback's activations are gone
        log.info("  %s, %d rows: %s", spec.kind, rows, "fits" if ok else "OOM")
        return ok
    try:
        return largest_fitting(fits, start, cap)
    finally:
        # Rebinding empties the cell `fits` reads (as `del v` would, without leaving `fits` an undefined
        # name), so the variant is gone before free_memory() even while a traceback still holds `fits`.
        v = None
        free_memory()


def scale_notes(args: argparse.Namespace, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """(a) largest micro-batch per method, (b) rlora step time over heads and over rank."""
    liger = not args.smoke
    shape, (rows, seq) = ("tiny", (2, 16)) if args.smoke else ("llama-1b", (8, 1024))
    suffix = "+liger" if liger else ""
    base = build_base(shape, device)
    largest = []
    for kind in ("peft-lora", *METHODS):
        log.info("largest micro-batch: %s%s", kind, suffix)
        cap = 4 * rows if args.smoke else 4096  # the CPU never runs out: --smoke stops at the cap
        try:
            n = max_batch(base, Spec(kind, liger), seq, rows, cap)
            largest.append({"variant": kind + suffix, "rows": n, "tokens": n * seq, "capped": n == cap,
                            "ok": True})
        except Exception as e:  # noqa: BLE001
            largest.append({"variant": kind + suffix, "ok": False,
                            "error": f"{type(e).__name__}: {e}"[:240]})
    sweep: dict[str, Spec] = {}
    for n in (1, 2, 4, 8, 16):
        sweep[f"rlora{suffix} n={n} r=8"] = Spec("rlora", liger, heads=n)
    for r in (4, 8, 16, 32, 64):
        sweep[f"rlora{suffix} n=4 r={r}"] = Spec("rlora", liger, r=r)
        sweep[f"peft-lora{suffix} r={r}"] = Spec("peft-lora", liger, r=r)
    log.info("heads and rank sweep: %d variants at %dx%d", len(sweep), rows, seq)
    swept = [{"shape": shape, **row} for row in bench(base, sweep, (rows, seq), warmup, steps, "default")]
    del base
    free_memory()
    return {"shape": shape, "seq": seq, "largest_batch": largest, "sweep": swept}


def scale_table(scale: dict[str, Any]) -> str:
    out = [f"| variant | largest micro-batch ({scale['shape']}, {scale['seq']} tokens/row) |", "|---|---|"]
    for r in scale["largest_batch"]:
        cell = ("≥" if r["capped"] else "") + str(r["rows"]) if r["ok"] else r["error"]
        out.append(f"| {r['variant']} | {cell} |")
    # The rank sweep's peer: PEFT LoRA at the same r (per head for rlora), measured in the same rounds.
    peer = {r["r"]: r for r in scale["sweep"] if r["variant"].startswith("peft") and r["ok"]}
    out += ["", f"| variant ({scale['shape']}) | batch | step ms | tok/s | busy ms | peak GiB | trainable "
                "| ×step of PEFT at same r |", "|---|---|---|---|---|---|---|---|"]
    for r in scale["sweep"]:
        if not r["ok"]:
            out.append(f"| {r['variant']} | {r['batch']} | failed: {r['error']} |" + " – |" * 5)
            continue
        same_r = peer.get(r["r"]) if r["heads"] == 4 or r["variant"].startswith("peft") else None
        out.append(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | {r['tokens_per_s']:,.0f} "
                   f"| {_f(r['gpu_busy_ms'], '.2f')} | {_f(r['peak_gib'], '.2f')} | {r['trainable']:,} "
                   f"| {_f(same_r and r['median_ms'] / same_r['median_ms'], '.2f')} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama-1b,qwen-0.5b", help="names from benchmarks/shapes.py")
    ap.add_argument("--batches", default="8x1024,8x512", help="ROWSxTOKENS, comma-separated")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd +liger and +ce variants")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    ap.add_argument("--scale", action="store_true",
                    help="largest micro-batch; heads and rank sweeps "
                         "(always llama-1b at 8x1024, default compile)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, no Liger, 2+2 steps")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the tables, write --json, and return what was written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cpu" if args.smoke else "cuda")
    warmup, steps = (2, 2) if args.smoke else (args.warmup, args.steps)
    result: dict[str, Any] = {"meta": {
        "environment": environment(device.type),
        "command": shlex.join(["python", "-m", "benchmarks.step_bench",
                               *(sys.argv[1:] if argv is None else argv)]),
        "anchor": f"the fastest {ANCHOR_KIND} (r = 8) variant of each shape and batch",
        "warmup": warmup, "steps": steps, "compile_mode": args.compile_mode,
        "kernels_are": "CUDA kernels" if device.type == "cuda" else "leaf CPU ops",
        "tokens_per_s_counts": "every input token (rows x seq), labelled or not"}}
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # a toy model on a shared CPU: more threads only add timing spikes
    try:
        result["results"] = run_all(args, device, warmup, steps)
        result["meta"]["anchors"] = add_ratios(result["results"])
        print(table(result["results"]))
        if args.json:  # now, so a crash in the scale notes loses nothing already measured
            write_json(args.json, result)
        if args.scale:
            result["scale"] = scale_notes(args, device, warmup, steps)
            print("\n" + scale_table(result["scale"]))
            if args.json:
                write_json(args.json, result)
    finally:
        torch.set_num_threads(threads)
    return result


def run_all(args: argparse.Namespace, device: torch.device, warmup: int,
            steps: int) -> list[dict[str, Any]]:
    """Every variant at every shape and batch: one base per shape, the variants rebuilt per batch."""
    # on the GPU a missing peft is a result
    peft = importlib.util.find_spec("peft") is not None or not args.smoke
    names = args.variants.split(",") if args.variants else default_names(args.smoke, args.compile, peft)
    specs = {name: parse_name(name) for name in names}
    compiled = any(spec.compiled for spec in specs.values())  # --compile, or +compile names in --variants
    if compiled:
        torch._dynamo.config.recompile_limit = 64  # one decoder class, compiled once per variant and batch
    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    batches = ([(2, 16)] if args.smoke
               else [tuple(int(x) for x in b.split("x")) for b in args.batches.split(",")])
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        base = build_base(shape, device)
        for batch in batches:
            log.info("%s %dx%d: %d variants", shape, *batch, len(specs))
            rows += [{"shape": shape, **row}
                     for row in bench(base, specs, batch, warmup, steps, args.compile_mode)]
            free_memory()
            if compiled:
                torch._dynamo.reset()  # a fresh cache for the next batch's compilations
        del base
        free_memory()
    return rows


if __name__ == "__main__":
    main()
