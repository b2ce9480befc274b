"""`rlora train RECIPE`: setup → fit → finish, with checkpoints and exact resume.

    rlora train recipes/demo.yaml --output runs/demo
    accelerate launch -m rlora_cli train recipes/mixed.yaml          # several GPUs (DDP)
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m rlora_cli train RECIPE

`setup` loads the data first (a bad column fails before any weights load), then the model and its
adapters, the optimizer, the loader and a checkpoint to resume; `fit` takes the optimizer steps;
`finish` saves the adapter and the plots. Choices that matter:
- A step's loss is the sum of its token losses over every micro-batch and process, divided by its
  label tokens (loss.py): a per-batch mean is wrong under prompt masking.
- Softmax routers report their entropy and per-task head use through a probe (adapters/probe.py)
  given each micro-batch's task ids; with adapter.router_aux_weight its MI loss joins the step's.
- Resuming is an index skip into a per-epoch permutation, and the RNG state is snapshotted at
  every step boundary, so an interrupted run resumes bit-identically on the CPU (state.py).
- SIGTERM (a scheduler, `docker stop`, a spot preemption) is handled as Ctrl-C is: a checkpoint,
  then exit 143. The run folder (its lock, a failed start, a full disk) is rundir.py's.
- The host keeps ahead of the GPU: with a fused optimizer a step's loss is read one step late
  (loss.LossReads), the next step's rows are collated while the GPU works, and the run's objects
  are frozen out of the garbage collector's view. Measured in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gc
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from rlora_cli.adapters import inject_adapters, parameter_counts
from rlora_cli.adapters.probe import RouteProbe, install_probe
from rlora_cli.card import training_card
from rlora_cli.checkpoint import save_adapter
from rlora_cli.data.mixture import write_mixture
from rlora_cli.data.pipeline import prepare
from rlora_cli.errors import UserError
from rlora_cli.files import atomic_write_text
from rlora_cli.model import load_model, load_tokenizer, quantization_record
from rlora_cli.recipe.load import RecipeSource, load_recipe, recipe_label, recipe_to_dict
from rlora_cli.report import train as report
from rlora_cli.training.kernels import Kernels, apply_kernels, compile_model
from rlora_cli.training.loss import LossReads, label_tokens, step_values, token_losses, with_router_aux
from rlora_cli.training.metrics import LogWindow, MetricsLog, evaluate_loss, run_info, tracker_config
from rlora_cli.training.optim import adamw, mixed_precision, own_grads, state_hooks
from rlora_cli.training.rundir import (
    RunDir,
    SaveClock,
    Terminated,
    full_state,
    plan_output,
    raise_if_terminated,
    save_checkpoint,
    sigterm_as_interrupt,
)
from rlora_cli.training.state import TrainerState, restore, rng_restore, rng_snapshot, schedule, train_loader


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the CLI exits 1 and the last good checkpoint is kept."""


def train(source: RecipeSource, overrides: tuple[str, ...] = (), *, output: str | Path | None = None,
          resume: str = "never", overwrite: bool = False, console: Any = None) -> Path:
    """Train the recipe's adapter; returns the run directory. `source`: a recipe YAML path, a dict
    of its shape or a Recipe (load_recipe). Raises UserError for bad input, OutputWriteError
    (exit 1) when OUT cannot be written, and SystemExit(143) after SIGTERM, which saves a
    checkpoint as Ctrl-C does. OUT is locked for the run (rundir.RunDir)."""
    recipe = load_recipe(source, overrides)
    out = Path(output or recipe.output.dir)
    accelerator = Accelerator(mixed_precision=mixed_precision(recipe.train.precision),
                              log_with=None if recipe.output.log_with == "none" else recipe.output.log_with,
                              project_dir=str(out))
    if recipe.output.log_with != "none" and not accelerator.log_with:  # Accelerate only warns
        raise UserError(f"output.log_with: {recipe.output.log_with} is not installed",
                        f"pip install {recipe.output.log_with}, or set output.log_with: none")
    try:
        with sigterm_as_interrupt(), RunDir(out, accelerator.is_main_process) as folder:
            run = setup(recipe, recipe_label(source), out, folder, accelerator, resume, overwrite, console)
            fit(run)
            finish(run)
    except Terminated:
        raise SystemExit(143) from None  # 128 + SIGTERM, as the shell reports a process it ended
    return out


@dataclass
class Run:
    """What `setup` builds and `fit` and `finish` use."""

    recipe: Any
    out: Path
    accelerator: Any
    console: Any
    tokenizer: Any
    data: Any
    model: Any
    probe: RouteProbe | None    # the softmax routers' telemetry and loss (None: no router)
    kern: Kernels
    optimizer: Any              # Accelerate's wrapper (reads holds the torch optimizer inside it)
    scheduler: Any
    loader: Any                 # its sampler is the EpochSampler
    micro_per_epoch: int
    graphs: bool                # compiled blocks replay as CUDA graphs
    reads: LossReads
    state: TrainerState
    log: MetricsLog | None      # the main process's metrics.jsonl
    clock: SaveClock
    window: LogWindow
    progress: Any
    meta: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)  # where a resume of the next step starts
    uncounted: list[tuple[int, float, float]] = field(default_factory=list)

    def save(self) -> Path:
        path = save_checkpoint(self.accelerator, self.model, self.out, self.state, self.tokenizer, self.meta,
                               self.recipe.output.save_total_limit)
        self.clock.saved(self.state.step)
        return path

    def settle(self, finished: list[tuple[int, float, float]]) -> None:
        """Check the steps read back from the device, (step, Σ loss, label tokens[, save votes]),
        and count those `state` has reached: an interrupted step's update may not have happened."""
        for step, loss_sum, n_total, *votes in finished:
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(f"the loss became {loss_sum / n_total} at step {step}")
            if votes:
                self.clock.seen(step, votes[0])
        self.uncounted.extend(f[:3] for f in finished)
        while self.uncounted and self.uncounted[0][0] <= self.state.step:
            _, loss_sum, n_total = self.uncounted.pop(0)
            self.window.add_step(loss_sum, n_total)
            self.state.tokens += int(n_total)


# ---------------------------------------------------------------------------- setup


def setup(recipe: Any, recipe_path: str, out: Path, folder: RunDir, accelerator: Any, resume: str,
          overwrite: bool, console: Any) -> Run:
    """Everything before the first step, in the order that fails fastest."""
    t, main = recipe.train, accelerator.is_main_process
    console = report.train_console(console, main)
    plan = plan_output(out, recipe_to_dict(recipe), resume, overwrite)
    report.print_notes(console, plan.notes)
    set_seed(recipe.seed)
    # Data first: a bad column fails in seconds, before any weights load.
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    with accelerator.main_process_first():
        data = prepare(recipe, tokenizer, console=console)
    model, probe, kern, compile_note = _setup_model(recipe, accelerator, len(data.tasks))
    # The run is sound: from here on what it writes in OUT stays (a failed start left nothing).
    folder.commit(plan)
    if main:
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        write_mixture(data.mixture, out / "mixture.json")
    world, cuda = accelerator.num_processes, accelerator.device.type == "cuda"
    loader = train_loader(data.train, recipe, tokenizer.pad_token_id, rank=accelerator.process_index,
                          world=world, pin_memory=cuda, cu_seq_lens=kern.packed_attention)
    micro_per_epoch, steps_per_epoch, total = schedule(len(data.train), world, t)
    # Compiled blocks replay as CUDA graphs, whose output buffers the next replay reuses: every
    # training forward starts a new generation of them (cudagraph_mark_step_begin in fit).
    graphs = t.compile and t.compile_mode == "reduce-overhead" and cuda
    model, optimizer, scheduler, reads = _setup_optimizer(recipe, accelerator, model, total, graphs)
    state = TrainerState(total_steps=total, processes=world)
    if plan.start is not None:
        state = restore(plan.start, accelerator, model, total)
        report.print_resuming(console, plan.start, state.step, total)
    trainable, all_params = parameter_counts(accelerator.unwrap_model(model))
    if main:
        report.train_banner(console, recipe, accelerator, model, data, out, kern.note, compile_note,
                            steps_per_epoch, total, trainable, all_params)
        info = run_info(recipe, accelerator, trainable, all_params)
        atomic_write_text(out / "run_info.json", json.dumps(info, indent=2))
        if recipe.output.log_with != "none":
            accelerator.init_trackers("rlora", config=tracker_config(recipe_to_dict(recipe)))
    return Run(recipe, out, accelerator, console, tokenizer, data, model, probe, kern, optimizer, scheduler,
               loader, micro_per_epoch, graphs, reads, state,
               log=MetricsLog(out / "metrics.jsonl", resume_step=state.step) if main else None,
               clock=SaveClock(recipe.output.save_minutes, main),
               window=LogWindow(len(data.tasks), accelerator.device, every=recipe.output.logging_steps,
                                probe=probe),
               progress=report.TrainProgress(console, total, state.step, main),
               meta={"templates": data.templates, "recipe": recipe_path,
                     **quantization_record(recipe.model.quantization)})


def _setup_model(recipe: Any, accelerator: Any, n_tasks: int) -> tuple[Any, RouteProbe | None, Kernels, str]:
    """The base model with its adapters, router probe, fused kernels and compiled blocks;
    (model, probe, kernels, compile note)."""
    t, quantization = recipe.train, recipe.model.quantization
    if quantization is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("model.quantization: FSDP cannot shard bitsandbytes' quantized weights",
                        "train a quantized base on one GPU or with DDP (accelerate launch without the "
                        "FSDP config), or drop model.quantization")
    # A quantized base is placed as it loads (bitsandbytes quantizes on the device): each process's own.
    model, _ = load_model(recipe.model.name_or_path, dtype=recipe.model.dtype,
                          trust_remote_code=recipe.model.trust_remote_code,
                          attn_implementation=recipe.model.attn_implementation, quantization=quantization,
                          device=accelerator.device if quantization is not None else None)
    adapter_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(t.adapter_dtype)
    inject_adapters(model, recipe.adapter, dtype=adapter_dtype)  # auto: fp32 over a quantized base
    # Before compiling and DDP: compiled blocks trace the probe's calls as the rest of the layer.
    probe = install_probe(model, n_tasks, aux_weight=recipe.adapter.router_aux_weight,
                          device=accelerator.device)
    if t.gradient_checkpointing:
        # All a quantized base needs too: norms compute in fp32 inside, so PEFT's k-bit cast of
        # every unquantized weight (norms, embeddings, LM head) to fp32 would only cost memory.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # so checkpointed blocks see inputs that need grad
    kern = apply_kernels(model, t.kernels, accelerator.device, compiled=t.compile,
                         packed_length=recipe.data.max_length if recipe.data.packing else None)
    compile_note = compile_model(model, t.compile_mode) if t.compile else "off"
    return model, probe, kern, compile_note


def _setup_optimizer(recipe: Any, accelerator: Any, model: Any, total: int,
                     graphs: bool) -> tuple[Any, Any, Any, LossReads]:
    """AdamW and its schedule, through accelerator.prepare; (model, optimizer, scheduler, reads)."""
    fused = _fused_optimizer(accelerator)
    optimizer, scheduler = adamw(model, recipe.train, total, fused=fused, adapter=recipe.adapter)
    # The fp16 grad scaler drives a fused optimizer's skip flag itself: no deferred read then.
    reads = LossReads(optimizer, defer=fused and accelerator.scaler is None)
    model, optimizer = accelerator.prepare(model, optimizer)
    if graphs:
        own_grads(model)
    accelerator.register_for_checkpointing(scheduler)
    state_hooks(accelerator)
    return model, optimizer, scheduler, reads


def _fused_optimizer(accelerator: Any) -> bool:
    """Fused AdamW on CUDA: one kernel launch per step for all adapter tensors instead of a
    foreach chain, whose host time the GPU waits for (benchmarks/RESULTS.md, "Second pass").
    FSDP's sharded parameters keep the foreach version."""
    return accelerator.device.type == "cuda" and accelerator.distributed_type != DistributedType.FSDP


# ---------------------------------------------------------------------------- fit


def fit(run: Run) -> None:
    """Optimizer steps until the budget is spent. Ctrl-C or SIGTERM saves the last finished step."""
    # What exists now (the model, the optimizer, the data) lives for the whole run: frozen out of
    # the garbage collector's view, so its occasional full collection does not walk all of it in
    # the middle of a step (benchmarks/RESULTS.md, "Third pass").
    gc.collect()
    gc.freeze()
    run.rng = rng_snapshot()
    try:
        with run.progress:
            while run.state.step < run.state.total_steps:
                _epoch(run)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
        _save_interrupted(run, terminated=isinstance(stop, Terminated))
        raise
    finally:
        gc.unfreeze()  # the run's objects become collectable again once train() returns


def _epoch(run: Run) -> None:
    """The rest of the current epoch (all of it, unless a resume starts inside it)."""
    state, t = run.state, run.recipe.train
    accumulation = t.gradient_accumulation_steps
    run.loader.sampler.epoch = state.epoch
    run.loader.sampler.start = state.batch_in_epoch * t.micro_batch_size
    batches = iter(run.loader)
    micro = list(islice(batches, accumulation))
    while state.step < state.total_steps and micro:
        # forward backward, over the step's micro-batches
        step_loss, n_tokens = _forward_backward(run, micro)
        # prefetch: the next step's rows are collated now, while the GPU still works on this one (a
        # check that reads this step's loss waits for it). Resume counts batches from `state`, not
        # from this iterator, and collating draws nothing from the RNG that dropout uses.
        upcoming = list(islice(batches, accumulation)) if state.step + 1 < state.total_steps else []
        # check the loss, clip the gradient, update
        grad_norm = _update(run, step_loss, n_tokens)
        state.batch_in_epoch += len(micro)
        run.rng = rng_snapshot()  # where a resume after this step starts (Ctrl-C from here on)
        # timing and logging, held-out loss, checkpoints; then a SIGTERM whose exception was lost
        _log_eval_save(run, grad_norm)
        raise_if_terminated()
        micro = upcoming
    if state.batch_in_epoch >= run.micro_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def _forward_backward(run: Run, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's micro-batches; returns (this process's Σ token loss, label tokens of all processes)."""
    accelerator, model = run.accelerator, run.model
    world = accelerator.num_processes
    n_tokens = label_tokens(micro, accelerator)
    step_loss = torch.zeros((), device=accelerator.device)
    model.train()
    for i, batch in enumerate(micro):
        run.window.add_inputs(batch)
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        if run.probe is not None:
            run.probe.start(batch["task_ids"], batch["input_ids"])
        # Gradients are all-reduced once per step, on the last micro-batch.
        sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
        if run.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with sync, accelerator.autocast():
            loss = token_losses(model, batch, fused=run.kern.fused_loss)
            total_loss = loss.sum()
            aux = None if run.probe is None else run.probe.stop()  # None unless router_aux_weight > 0
            objective, aux_sum = with_router_aux(total_loss, aux, batch)
            # Σ over processes of (local sum · world / N), averaged by DDP = global sum / N.
            accelerator.backward(objective * world / n_tokens)
        step_loss += total_loss.detach()
        run.window.add(loss.detach(), batch, aux_sum)
    return step_loss, n_tokens


def _update(run: Run, step_loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor | None:
    """Check the loss, clip the gradient, step the optimizer and the schedule; returns the norm."""
    state, clock = run.state, run.clock
    # A diverged step never reaches the weights or a checkpoint: it is read here, before the
    # update, or (deferred) the optimizer skips it on the device and it is read next step, before
    # any later checkpoint (LossReads). A save_minutes vote rides in the same all-reduce.
    values = step_values(run.accelerator, step_loss, n_tokens, clock.vote() if clock.on else None)
    run.settle(run.reads.push(values, state.step + 1))
    # clip the gradient
    max_norm = run.recipe.train.max_grad_norm
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm) if max_norm > 0 else None
    # update; CUDA-graph runs keep their own .grad tensors (zeroed, never None: _setup_optimizer)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=not run.graphs)
    state.step += 1
    return grad_norm


def _log_eval_save(run: Run, grad_norm: torch.Tensor | None) -> None:
    """Timing and logging, then the held-out loss and a checkpoint where they are due."""
    state, output, clock = run.state, run.recipe.output, run.clock
    evaluates = bool(output.eval_steps) and state.step % output.eval_steps == 0
    saves = bool(output.save_steps) and state.step % output.save_steps == 0
    if run.window.logs_at(state.step, state.total_steps) or evaluates or saves or clock.due:
        run.settle(run.reads.flush())
    saves = saves or clock.due  # output.save_minutes: read alike on every process
    row = run.window.maybe_log(state, run.accelerator, run.scheduler, grad_norm, run.data.tasks)
    if row is not None:
        if run.log:
            run.log.write(row)
        run.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state.step)
        run.progress.update(row)
    run.progress.advance(state.step)
    if evaluates and state.step < state.total_steps:
        _log_eval(run)
    if saves and state.step < state.total_steps:
        run.save()


def _log_eval(run: Run) -> None:
    if not run.data.val:
        return
    losses = evaluate_loss(run.model, run.data, run.accelerator, run.tokenizer.pad_token_id, run.recipe,
                           run.kern, losses=token_losses)
    if run.log:
        run.log.write({"step": run.state.step, "eval_loss": losses})
    run.accelerator.log({f"eval_loss/{k}": v for k, v in losses.items()}, step=run.state.step)
    report.print_eval(run.console, run.state.step, losses)


def _save_interrupted(run: Run, terminated: bool) -> None:
    """The exact save of Ctrl-C and SIGTERM: the state at the end of the last finished step."""
    rng_restore(run.rng)  # undo the dropout draws of the unfinished step, so resume is exact
    run.optimizer.zero_grad(set_to_none=True)
    run.settle(run.reads.flush())  # the finished steps' tokens, before their checkpoint
    if run.state.step > 0:
        report.print_stopped(run.console, run.save(), terminated)


# ---------------------------------------------------------------------------- finish


def finish(run: Run) -> None:
    """The last held-out loss and checkpoint, then OUT/adapter and the plots."""
    run.settle(run.reads.flush())
    _log_eval(run)
    run.save()
    full = full_state(run.accelerator, run.model)  # a collective under FSDP: every process must call it
    if run.accelerator.is_main_process:
        adapter, plots = run.out / "adapter", run.out / "plots"
        save_adapter(run.accelerator.unwrap_model(run.model), adapter, tokenizer=run.tokenizer,
                     metadata=run.meta, state_dict=full, card=training_card(run.out, run.state))
        written = report.plot_losses(run.log.rows(), plots)
        report.print_done(run.console, run.state.step, adapter, plots if written else None)
    run.accelerator.end_training()

