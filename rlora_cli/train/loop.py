"""`rlora train RECIPE`: the Accelerate training loop, checkpoints and exact resume.

    rlora train recipes/demo.yaml --output runs/demo
    accelerate launch -m rlora_cli train recipes/mixed.yaml          # several GPUs (DDP)
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m rlora_cli train RECIPE

One readable loop (`train`), in the spirit of Accelerate's examples. Choices that matter:
- The loss of an optimizer step is the sum of token losses over every micro-batch of the step and
  every process, divided by the number of label tokens in all of them. A per-batch mean is wrong
  under prompt masking (batches hold different numbers of trained tokens), so we count the
  window's tokens before the first backward.
- Each process reads its own rank-strided share of a per-epoch permutation seeded by the recipe's
  seed, so resuming is an index skip (no batch is read to be thrown away), and the RNG state is
  snapshotted at every step boundary, so an interrupted run resumes bit-identically on the CPU.
- SIGTERM (a scheduler, `docker stop`, a spot preemption) is handled as Ctrl-C is: a checkpoint,
  then exit 143. The run folder itself (its lock, what a failed start leaves, a full disk,
  damaged checkpoints) is rundir.py's.
"""

from __future__ import annotations

import gc
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from rlora_cli.checkpoint import load_adapter_weights, save_adapter
from rlora_cli.errors import UserError
from rlora_cli.files import atomic_write_text
from rlora_cli.train.kernels import Kernels, apply_kernels, compile_model
from rlora_cli.train.rundir import (  # noqa: F401 (API)
    CHECKPOINT_PREFIX,
    STATE_FILE,
    OutputWriteError,
    RunDir,
    SaveClock,
    Terminated,
    full_state,
    latest_checkpoint,
    plan_output,
    save_checkpoint,
    sigterm_as_interrupt,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the CLI exits 1 and the last good checkpoint is kept."""


@dataclass
class TrainerState:
    step: int = 0            # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed by completed steps
    tokens: int = 0          # trained (label) tokens seen, all processes
    total_steps: int = 0


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a permutation seeded by (seed, epoch), from a start position.

    The permutation is padded by wrapping around to a multiple of the world size, so every
    process takes the same number of steps.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.world) - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: (-len(order)) % self.world]
        return iter(order[self.rank::self.world][self.start:])


def train(recipe_path: str | Path, overrides: tuple[str, ...] = (), *, output: str | Path | None = None,
          resume: str = "never", overwrite: bool = False, console: Any = None) -> Path:
    """Train the recipe's adapter; returns the run directory. Raises UserError for bad input,
    OutputWriteError (exit 1) when OUT cannot be written, and SystemExit(143) after SIGTERM, which
    saves a checkpoint as Ctrl-C does. OUT is locked for the run (rundir.RunDir)."""
    from accelerate import Accelerator

    from rlora_cli.recipe.load import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    out = Path(output or recipe.output.dir)
    accelerator = Accelerator(mixed_precision=mixed_precision(recipe.train.precision),
                              log_with=None if recipe.output.log_with == "none" else recipe.output.log_with,
                              project_dir=str(out))
    if recipe.output.log_with != "none" and not accelerator.log_with:  # Accelerate only warns
        raise UserError(f"output.log_with: {recipe.output.log_with} is not installed",
                        f"pip install {recipe.output.log_with}, or set output.log_with: none")
    try:
        with sigterm_as_interrupt(), RunDir(out, accelerator.is_main_process) as run:
            _train(recipe, recipe_path, out, run, accelerator, resume, overwrite, console)
    except Terminated:
        raise SystemExit(143) from None  # 128 + SIGTERM, as the shell reports a process it ended
    return out


def _train(recipe: Any, recipe_path: str | Path, out: Path, run: RunDir, accelerator: Any, resume: str,
           overwrite: bool, console: Any) -> None:
    from accelerate.utils import set_seed
    from rich.console import Console
    from rich.markup import escape
    from transformers import get_scheduler

    from rlora_cli.adapters import inject_adapters, parameter_counts
    from rlora_cli.data.pipeline import collate, prepare, write_mixture
    from rlora_cli.model import load_model, load_tokenizer
    from rlora_cli.recipe.load import recipe_to_dict
    from rlora_cli.report.train import MetricsLog, TrainProgress, plot_losses, run_info, train_banner

    t = recipe.train
    main = accelerator.is_main_process
    console = (console or Console()) if main else Console(quiet=True)
    plan = plan_output(out, recipe_to_dict(recipe), resume, overwrite)
    start = plan.start
    for note in plan.notes:
        console.print(f"[yellow]warning:[/] {escape(note)}")
    set_seed(recipe.seed)

    # Data first: a bad column fails in seconds, before any weights load.
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    with accelerator.main_process_first():
        data = prepare(recipe, tokenizer, console=console)

    model, _ = load_model(recipe.model.name_or_path, dtype=recipe.model.dtype,
                          trust_remote_code=recipe.model.trust_remote_code,
                          attn_implementation=recipe.model.attn_implementation)
    inject_adapters(model, recipe.adapter, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}.get(t.adapter_dtype))
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # so checkpointed blocks see inputs that need grad
    kern = apply_kernels(model, t.kernels, accelerator.device, compiled=t.compile,
                         packed_length=recipe.data.max_length if recipe.data.packing else None)
    compile_note = compile_model(model, t.compile_mode) if t.compile else "off"
    # The run is sound: from here on what it writes in OUT stays (a failed start left nothing).
    run.commit(plan)
    if main:
        atomic_write_text(out / "recipe.yaml", _yaml(recipe_to_dict(recipe)))
        write_mixture(data.mixture, out / "mixture.json")
    # Compiled blocks replay as CUDA graphs, whose output buffers the next replay reuses: every
    # training forward starts a new generation of them (cudagraph_mark_step_begin below).
    graphs = t.compile and t.compile_mode == "reduce-overhead" and accelerator.device.type == "cuda"
    fused = _fused_optimizer(accelerator)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.learning_rate, fused=fused)
    # The fp16 grad scaler drives a fused optimizer's skip flag itself: no deferred read then.
    reads = _LossReads(optimizer, defer=fused and accelerator.scaler is None)

    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = EpochSampler(len(data.train), recipe.seed, rank, world)
    pad_id = tokenizer.pad_token_id
    # Compiled blocks want few distinct shapes: packed rows are padded to max_length (one static
    # shape), unpacked ones to a multiple of 64.
    pad_to = (recipe.data.max_length if recipe.data.packing else 64) if t.compile else None
    loader = torch.utils.data.DataLoader(
        # Its own generator: iter(DataLoader) draws a worker seed, which must not shift the
        # global RNG that dropout uses (a resumed run calls iter() at a different point).
        data.train, batch_size=t.micro_batch_size, sampler=sampler, generator=torch.Generator(),
        pin_memory=accelerator.device.type == "cuda",  # so the copy below need not wait for the GPU
        collate_fn=lambda rows: collate(rows, pad_id=pad_id, packing=recipe.data.packing, pad_to_multiple_of=pad_to,
                                        cu_seq_lens=kern.packed_attention))
    micro_per_epoch = math.ceil(math.ceil(len(data.train) / world) / t.micro_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / t.gradient_accumulation_steps)
    total = t.max_steps if t.max_steps > 0 else t.num_epochs * steps_per_epoch
    scheduler = get_scheduler(t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total),
                              num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)
    if graphs:
        # The backward's gradients are CUDA-graph outputs, which the next replay overwrites; a
        # .grad of None would take that buffer over. Own .grad tensors, which every backward adds
        # into (gradient accumulation), stay valid: they are zeroed, never set to None.
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    accelerator.register_for_checkpointing(scheduler)
    _state_hooks(accelerator)

    state = TrainerState(total_steps=total)
    if start is not None:
        load_adapter_weights(accelerator.unwrap_model(model), start / "adapter")
        accelerator.load_state(str(start / "state"))
        state = TrainerState(**{**json.loads((start / STATE_FILE).read_text()), "total_steps": total})
        console.print(f"[green]resuming[/] from {escape(str(start))} (step {state.step} of {total})")

    trainable, all_params = parameter_counts(accelerator.unwrap_model(model))
    if main:
        train_banner(console, recipe, accelerator, model, data, out, kern.note, compile_note, steps_per_epoch, total,
                     trainable, all_params)
        atomic_write_text(out / "run_info.json", json.dumps(run_info(recipe, accelerator, trainable, all_params), indent=2))
        if recipe.output.log_with != "none":
            accelerator.init_trackers("rlora", config=_flat(recipe_to_dict(recipe)))
    log = MetricsLog(out / "metrics.jsonl", resume_step=state.step) if main else None
    meta = {"templates": data.templates, "recipe": str(recipe_path)}
    clock = SaveClock(recipe.output.save_minutes, main)

    def save() -> Path:
        path = save_checkpoint(accelerator, model, out, state, tokenizer, meta, recipe.output.save_total_limit)
        clock.saved(state.step)
        return path

    window = _Window(len(data.tasks), accelerator.device, every=recipe.output.logging_steps)
    progress = TrainProgress(console, total, state.step, main)
    # What exists now (the model, the optimizer, the data) lives for the whole run: frozen out of
    # the garbage collector's view, so its occasional full collection does not walk all of it in
    # the middle of a step. (Compiled graphs come later, in the first step; measured enough as is.)
    gc.collect()
    gc.freeze()
    rng = _rng_snapshot()  # where a resume of the next step starts; retaken after every step

    uncounted: list[tuple[int, float, float]] = []

    def settle(finished: list[tuple[int, float, float]]) -> None:
        """Check the steps read back from the device, (step, Σ loss, label tokens[, save votes]),
        and count those `state` has reached: an interrupted step's update may not have happened."""
        for step, loss_sum, n_total, *votes in finished:
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(f"the loss became {loss_sum / n_total} at step {step}")
            if votes:
                clock.seen(step, votes[0])
        uncounted.extend(f[:3] for f in finished)
        while uncounted and uncounted[0][0] <= state.step:
            _, loss_sum, n_total = uncounted.pop(0)
            window.add_step(loss_sum, n_total)
            state.tokens += int(n_total)

    try:
        with progress:
            while state.step < total:
                sampler.epoch, sampler.start = state.epoch, state.batch_in_epoch * t.micro_batch_size
                batches = iter(loader)
                micro = list(islice(batches, t.gradient_accumulation_steps))
                while state.step < total and micro:
                    n_tokens = _label_tokens(micro, accelerator)
                    step_loss = torch.zeros((), device=accelerator.device)
                    model.train()
                    for i, batch in enumerate(micro):
                        window.add_inputs(batch)
                        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                        # Gradients are all-reduced once per step, on the last micro-batch.
                        sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
                        if graphs:
                            torch.compiler.cudagraph_mark_step_begin()
                        with sync, accelerator.autocast():
                            loss = token_losses(model, batch, fused=kern.fused_loss)
                            total_loss = loss.sum()
                            # Σ over processes of (local sum · world / N), averaged by DDP = global sum / N.
                            accelerator.backward(total_loss * world / n_tokens)
                        step_loss += total_loss.detach()
                        window.add(loss.detach(), batch)
                    # The next step's rows are collated now, while the GPU still works on this one
                    # (a check that reads this step's loss waits for it). Resume counts batches from `state`, not from
                    # this iterator, and collating draws nothing from the RNG that dropout uses.
                    upcoming = list(islice(batches, t.gradient_accumulation_steps)) if state.step + 1 < total else []
                    # A diverged step never reaches the weights or a checkpoint: it is read here,
                    # before the update, or (deferred) the optimizer skips it on the device and it
                    # is read next step, before any later checkpoint (_LossReads).
                    values = _step_values(accelerator, step_loss, n_tokens, clock)
                    settle(reads.push(values, state.step + 1))
                    grad_norm = (accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                                 if t.max_grad_norm > 0 else None)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=not graphs)
                    state.step += 1
                    state.batch_in_epoch += len(micro)
                    rng = _rng_snapshot()  # where a resume after this step starts (Ctrl-C from here on)
                    evaluates = bool(recipe.output.eval_steps) and state.step % recipe.output.eval_steps == 0
                    saves = bool(recipe.output.save_steps) and state.step % recipe.output.save_steps == 0
                    if window.logs_at(state.step, total) or evaluates or saves or clock.due:
                        settle(reads.flush())
                    saves = saves or clock.due  # output.save_minutes: read alike on every process
                    row = window.maybe_log(state, accelerator, scheduler, grad_norm, data.tasks)
                    if row is not None:
                        if log:
                            log.write(row)
                        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state.step)
                        progress.update(row)
                    progress.advance(state.step)
                    if evaluates and state.step < total:
                        _log_eval(model, data, accelerator, state, log, pad_id, recipe, console, kern)
                    if saves and state.step < total:
                        save()
                    micro = upcoming
                if state.batch_in_epoch >= micro_per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
        _rng_restore(rng)  # undo the dropout draws of the unfinished step, so resume is exact
        optimizer.zero_grad(set_to_none=True)
        settle(reads.flush())  # the finished steps' tokens, before their checkpoint
        if state.step > 0:
            path = save()
            how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
            console.print(f"[yellow]{how}:[/] saved {escape(str(path))}; continue with --resume auto")
        raise
    finally:
        gc.unfreeze()  # the run's objects become collectable again once train() returns
    settle(reads.flush())
    _log_eval(model, data, accelerator, state, log, pad_id, recipe, console, kern)
    save()
    full = full_state(accelerator, model)  # a collective under FSDP: every process must call it
    if main:
        save_adapter(accelerator.unwrap_model(model), out / "adapter", tokenizer=tokenizer, metadata=meta,
                     state_dict=full)
        plots = plot_losses(out / "metrics.jsonl", out / "plots")
        console.print(f"[green]done:[/] {state.step} steps, adapter in {escape(str(out / 'adapter'))}"
                      + (f", plots in {escape(str(out / 'plots'))}" if plots else ""))
    accelerator.end_training()


def _step_values(accelerator: Any, step_loss: torch.Tensor, n_tokens: torch.Tensor, clock: SaveClock) -> torch.Tensor:
    """[Σ loss over all processes, label tokens], and with output.save_minutes the main process's
    vote to save, reduced in the same collective (votes = its sum): no extra sync."""
    if not clock.on:
        return torch.stack([accelerator.reduce(step_loss, reduction="sum"), n_tokens])
    loss_sum, votes = accelerator.reduce(torch.stack([step_loss, step_loss.new_full((), clock.vote())]),
                                         reduction="sum")
    return torch.stack([loss_sum, n_tokens, votes.to(n_tokens.dtype)])


def _fused_optimizer(accelerator: Any) -> bool:
    """Fused AdamW on CUDA: one kernel launch per step for all adapter tensors instead of a
    foreach chain (~10 ms of host time a step on a 1B model, which the GPU waits for). FSDP's
    sharded parameters keep the foreach version."""
    from accelerate.utils import DistributedType

    return accelerator.device.type == "cuda" and accelerator.distributed_type != DistributedType.FSDP


class _LossReads:
    """Each step's [Σ loss, label tokens], read on the host without stalling the GPU where safe.

    Reading a GPU value waits for all queued work, and the host's work after the read (clipping,
    the optimizer, the next step's set-up; ~10 ms a step on a 1B model) then runs while the GPU
    idles. With a fused optimizer (`defer`) the values are copied to pinned memory behind an
    event and read one step later, once the next step's forward and backward are queued. The
    update of a step whose loss is not finite is skipped on the device meanwhile: the fused
    optimizer's `found_inf`, the flag the fp16 grad scaler uses."""

    def __init__(self, optimizer: torch.optim.Optimizer, defer: bool) -> None:
        self.optimizer, self.defer = optimizer, defer
        self.pending: list[tuple[int, torch.Tensor, Any]] = []

    def push(self, values: torch.Tensor, step: int) -> list[tuple[int, float, float]]:
        """Queue `step`'s values; return the finished steps that can be read now: this one, or
        (deferred) the one before."""
        if not self.defer:
            return [(step, *values.tolist())]
        self.optimizer.found_inf = (~torch.isfinite(values[0])).float()
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event() if values.is_cuda else None
        if event is not None:
            event.record()
        ready, self.pending = self.pending, [(step, host, event)]
        return [self._read(p) for p in ready]

    def flush(self) -> list[tuple[int, float, float]]:
        ready, self.pending = self.pending, []
        return [self._read(p) for p in ready]

    @staticmethod
    def _read(pending: tuple[int, torch.Tensor, Any]) -> tuple[int, float, float]:
        step, host, event = pending
        if event is not None:
            event.synchronize()  # that step's copy only, not the work queued after it
        return (step, *host.tolist())


# ---------------------------------------------------------------------------- the loss


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = False) -> torch.Tensor:
    """Cross-entropy of every next-token prediction [B, T-1] in float32 (float64 for a float64
    model), 0 where unlabelled.
    `fused`: the model has kernels.install_fused_loss's forward, which never builds the logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "rlora_cu_seq_lens") if k in batch}
    if fused:
        return model(**inputs, use_cache=False, rlora_labels=batch["labels"])
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="none")
    return loss.view(labels.shape)


def _label_tokens(micro: list[dict[str, torch.Tensor]], accelerator: Any) -> torch.Tensor:
    """Trained tokens in this step's micro-batches, summed over processes (≥ 1)."""
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)  # the batches are on the host still
    # Filled on the device: a host->GPU copy of a pageable tensor would wait for all queued GPU work.
    total = accelerator.reduce(torch.full((), float(n), device=accelerator.device), reduction="sum")
    return total.clamp_min(1.0)


class _Window:
    """What a log line reports: the loss over the steps since the last line, per-task loss sums,
    and token throughput."""

    def __init__(self, n_tasks: int, device: Any, every: int) -> None:
        self.n_tasks, self.device, self.every = n_tasks, device, max(every, 1)
        self.reset()

    def reset(self) -> None:
        # Kept on the device: adding a micro-batch must not wait for the GPU (no host sync).
        self.loss = torch.zeros(self.n_tasks, dtype=torch.float64, device=self.device)
        self.count = torch.zeros(self.n_tasks, dtype=torch.float64, device=self.device)
        self.step_loss = self.step_tokens = 0.0  # global sums, as _LossReads reads them back
        self.inputs = 0  # this process's non-padding input tokens, counted on the host
        self.started = time.perf_counter()

    def logs_at(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def add_inputs(self, batch: dict[str, torch.Tensor]) -> None:
        self.inputs += int((batch["task_ids"] != -1).sum())  # a CPU tensor still: no sync

    def add(self, token_loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        # Every token added, unlabelled ones with weight 0: selecting the labelled ones
        # (token_loss[mask]) would wait for the GPU to count them.
        mask = (batch["labels"][:, 1:] != -100).flatten()
        tasks = _token_tasks(batch)[:, 1:].flatten().clamp_min(0)  # padding's task -1 -> 0, weight 0
        self.loss.index_add_(0, tasks, torch.where(mask, token_loss.flatten().double(), 0.0))
        self.count.index_add_(0, tasks, mask.double())

    def add_step(self, loss_sum: float, tokens: float) -> None:
        self.step_loss += loss_sum
        self.step_tokens += tokens

    def maybe_log(self, state: TrainerState, accelerator: Any, scheduler: Any, grad_norm: Any,
                  tasks: list[str]) -> dict[str, Any] | None:
        if not self.logs_at(state.step, state.total_steps):
            return None
        inputs = torch.tensor([float(self.inputs)], dtype=torch.float64, device=self.device)
        both = accelerator.reduce(torch.cat([self.loss, self.count, inputs]), reduction="sum").cpu()
        loss, count, n = both[:self.n_tasks], both[self.n_tasks:-1], float(both[-1])
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        row = {
            "step": state.step, "epoch": state.epoch,
            "loss": self.step_loss / max(self.step_tokens, 1.0),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": state.tokens,
            "tokens_per_s": self.step_tokens / elapsed,
            "input_tokens_per_s": n / elapsed,
            "task_loss": {tasks[i]: float(loss[i] / count[i]) for i in range(len(tasks)) if count[i] > 0},
        }
        self.reset()
        return row


def _token_tasks(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    tasks = batch["task_ids"]
    return tasks if tasks.dim() == 2 else tasks[:, None].expand_as(batch["input_ids"])


@torch.no_grad()
def evaluate_loss(model: Any, data: Any, accelerator: Any, pad_id: int, recipe: Any,
                  kern: Kernels = Kernels("none")) -> dict[str, float]:
    """Held-out loss per task: each process scores its share, sums are reduced; `kern` is what
    `apply_kernels` did to the model (the loss and attention it expects)."""
    from rlora_cli.data.pipeline import collate

    model.eval()
    world, rank, bs = accelerator.num_processes, accelerator.process_index, recipe.train.micro_batch_size
    result = {}
    for task, dataset in data.val.items():
        rows = list(range(rank, len(dataset), world))
        n_batches = math.ceil(math.ceil(len(dataset) / world) / bs)  # equal on every process
        sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for b in range(n_batches):
            idx = rows[b * bs:(b + 1) * bs]
            weight = 1.0 if idx else 0.0  # a process with no rows left runs a dummy batch
            batch = collate([dataset[i] for i in (idx or [0])], pad_id=pad_id, packing=False,
                            cu_seq_lens=kern.packed_attention)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # Compiled blocks run eagerly here: held-out rows come in many lengths, each of which
            # would compile (and under reduce-overhead record CUDA graphs) for a few batches.
            with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
                loss = token_losses(model, batch, fused=kern.fused_loss)
            mask = batch["labels"][:, 1:] != -100
            sums += weight * torch.stack([loss[mask].double().sum(), mask.sum().double()])
        sums = accelerator.reduce(sums, reduction="sum")
        if sums[1] > 0:
            result[task] = float(sums[0] / sums[1])
    model.train()
    return result


def _log_eval(model, data, accelerator, state, log, pad_id, recipe, console, kern) -> None:
    if not data.val:
        return
    losses = evaluate_loss(model, data, accelerator, pad_id, recipe, kern)
    row = {"step": state.step, "eval_loss": losses}
    if log:
        log.write(row)
    accelerator.log({f"eval_loss/{k}": v for k, v in losses.items()}, step=state.step)
    from rich.markup import escape

    console.print(f"step {state.step} held-out loss: " + escape(", ".join(f"{k} {v:.4f}" for k, v in losses.items())))


# ---------------------------------------------------------------------------- set-up pieces


def mixed_precision(precision: str) -> str:
    """auto = bf16 where supported, else fp16 (with loss scaling) on GPU, fp32 on CPU."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not torch.cuda.is_available():  # bf16 autocast also runs on the CPU
        raise UserError("train.precision: fp16 needs a CUDA GPU", "use precision: auto or fp32 on the CPU")
    return {"fp32": "no"}.get(precision, precision)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on A/B factors only, never on gates and routers."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(("rlora_gate", "rlora_router")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _state_hooks(accelerator: Any) -> None:
    """Keep the frozen base out of Accelerate's state: the adapter is saved on its own."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return  # FSDP saves sharded model state itself; the hooks do not apply to it

    def drop_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def skip_models(models: list, input_dir: str) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(skip_models)


def _rng_snapshot() -> dict[str, Any]:
    import random

    import numpy as np

    snap = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def _rng_restore(snap: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap:
        torch.cuda.set_rng_state_all(snap["cuda"])


def _yaml(d: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            flat[f"{prefix}{k}"] = v
    return flat
