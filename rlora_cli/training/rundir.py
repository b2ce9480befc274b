"""The run folder OUT: one writer at a time, nothing left by a failed start, faults in one line.

- A run holds an OS lock on OUT/.lock (fcntl.flock; the file holds its PID) from before it reads
  OUT until it ends, so a second run into the same folder, a `--resume auto` included, stops at
  once and names the first. The kernel drops the lock when its holder dies, however it dies.
- Until the model and its adapters are ready (`RunDir.commit`) a run writes nothing in OUT but
  the lock: a start that fails removes the lock and the folders it created, so the corrected
  rerun finds OUT as it was. Temporary files a killed run left behind are removed at the next
  start (never while another run holds the lock).
- A full or read-only disk becomes one line naming the folder and the last good checkpoint
  (`OutputWriteError`, exit 1); writes go through temporary names, so nothing is half-written.
- Resuming reads a checkpoint in full before the model loads: a damaged one is refused (an
  explicit --resume) or skipped for the one before it (--resume auto).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from accelerate.utils import DistributedType, broadcast_object_list
from accelerate.utils import load as load_state_file  # what load_state reads checkpoints with
from safetensors.torch import load_file

from rlora_cli.card import training_card
from rlora_cli.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from rlora_cli.errors import UserError, first_line
from rlora_cli.recipe.load import resume_conflicts
from rlora_cli.runs import CHECKPOINT_PREFIX, STATE_FILE, checkpoint_step

LOCK_FILE = ".lock"
# What a run writes at the top of OUT besides its checkpoints (cleared when a run is started over).
RUN_FILES = ("recipe.yaml", "mixture.json", "run_info.json", "metrics.jsonl", "plots", "adapter")
WRITE_FAULTS = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its disk quota", errno.EROFS: "is read-only"}
# What a killed run can leave in OUT, cleaned at the next start: the files.py writers' temp files
# (`.<name>.tmp-<random suffix>`, plots ending in .png) and a checkpoint's `.checkpoint-<step>.tmp`.
# atomic_dir's `.<name>.old-<8 hex digits>` may be the only copy left (killed between its two
# renames): it is put back.
_TEMP = re.compile(r"^\..+\.tmp(-[^/]*)?$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-[0-9a-f]{8}$")

_now = time.monotonic  # the clock SaveClock reads (tests replace it)


class OutputWriteError(UserError):
    """OUT could not be written (disk full, quota, read-only): a runtime failure, exit 1."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so the loop saves the same way."""


def check_output(out: Path) -> None:
    """OUT must be a folder, or creatable in a writable one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder", "give a folder (it is created if missing)")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--output {out}: {probe} is a file, not a folder", "give a path under a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: {probe} is read-only", "give a folder you can write to")


class RunLock:
    """An exclusive, non-blocking flock on a file holding the holder's PID."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another rlora train (pid {holder})",
                                f"wait for it to end, or stop it (kill -TERM {holder} saves a checkpoint), "
                                "or train into another --output") from None
            # A holder that just ended unlinked the file we opened: lock the one on disk instead.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: see acquire's inode check
            os.close(self.fd)
            self.fd = None


@dataclass
class Plan:
    start: Path | None = None   # the checkpoint to resume from
    clear: str | None = None    # at commit: "all" (--overwrite) or "run" (a run that saved no checkpoint)
    notes: list[str] = field(default_factory=list)


class RunDir:
    """OUT for the length of a run (a context manager on every process; only the main one writes)."""

    def __init__(self, out: Path, main: bool) -> None:
        self.out, self.main = out, main
        self.lock = RunLock(out / LOCK_FILE)
        self.created: list[Path] = []  # folders this start made, outermost first
        self.committed = False

    def __enter__(self) -> "RunDir":
        failure = None
        if self.main:
            try:
                self._open()
            except UserError as e:
                failure = (type(e).__name__, e.problem, e.fix)
        # Every process stops with the main one's error, instead of waiting for it at a barrier.
        failure = broadcast_object_list([failure])[0]
        if failure is not None:
            kind = OutputWriteError if failure[0] == OutputWriteError.__name__ else UserError
            raise kind(failure[1], failure[2])
        return self

    def _open(self) -> None:
        check_output(self.out)
        try:
            for folder in reversed([self.out, *self.out.parents]):
                if not folder.exists():
                    folder.mkdir()
                    self.created.append(folder)
            self.lock.acquire()
            clean_stale(self.out)
        except OSError as e:
            self._abandon()
            if e.errno in WRITE_FAULTS and e.errno != errno.EROFS:
                raise self._fault(e) from None
            raise UserError(f"cannot write in --output {self.out} ({e.strerror})",
                            "give a folder you can write to") from None
        except BaseException:
            self._abandon()
            raise

    def commit(self, plan: Plan) -> None:
        """The model and its adapters are ready: clear what the plan says; from here on, keep."""
        self.committed = True
        if not self.main or plan.clear is None:
            return
        for p in list(self.out.iterdir()):
            if p.name != LOCK_FILE and (plan.clear == "all" or p.name in RUN_FILES):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if self.main:
            self._abandon() if error is not None and not self.committed else self.lock.release()
        if isinstance(error, OSError) and error.errno in WRITE_FAULTS:
            raise self._fault(error) from None

    def _abandon(self) -> None:
        """Undo a failed start: the lock, then the folders it created (while they are empty)."""
        self.lock.release()
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break

    def _fault(self, e: OSError) -> OutputWriteError:
        name = Path(e.filename) if e.filename else self.out
        where = self.out if self.out in name.parents or name == self.out else name.parent
        last = latest_checkpoint(self.out) if self.out.is_dir() else None
        cure = "make it writable again" if e.errno == errno.EROFS else "free some space"
        fix = (f"{cure}, then --resume auto continues from {last}, the last good checkpoint" if last
               else f"{cure}, then run again with --resume auto (no checkpoint was saved: it starts over)")
        return OutputWriteError(f"cannot write in {where}: the disk {WRITE_FAULTS[e.errno]}", fix)


def clean_stale(out: Path) -> None:
    """Remove the temporary files of a run that was killed (the caller holds OUT's lock)."""
    for folder in (out, out / "plots"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            old = _OLD.match(p.name)
            if old and not (folder / old["name"]).exists():
                os.replace(p, folder / old["name"])  # killed between atomic_dir's two renames
            elif old or _TEMP.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def plan_output(out: Path, recipe: dict[str, Any], resume: str, overwrite: bool) -> Plan:
    """Decide, before anything is written, whether to start fresh or which checkpoint to resume."""
    if resume not in ("never", "auto"):
        start = Path(resume)
        if not (start / STATE_FILE).is_file():
            raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})",
                            f"give OUT/{CHECKPOINT_PREFIX}<step> or use --resume auto")
        _check_same_recipe(start.parent, recipe)
        damage = checkpoint_damage(start)
        if damage:
            before = [c for c in complete_checkpoints(start.parent) if _step(c) < _step(start)]
            raise UserError(f"checkpoint {start} is damaged ({damage})",
                            f"resume from the one before it: --resume {before[0]}" if before else
                            "start over with --overwrite, or train into another --output")
        return Plan(start)
    checkpoints = complete_checkpoints(out) if out.is_dir() else []
    if resume == "auto" and checkpoints:
        _check_same_recipe(out, recipe)
        notes, newest = [], None
        for ckpt in checkpoints:
            damage = checkpoint_damage(ckpt)
            if damage is None:
                return Plan(ckpt, notes=notes)
            newest = newest or f"{ckpt.name}: {damage}"
            notes.append(f"{ckpt} is damaged ({damage}); resuming from the checkpoint before it")
        raise UserError(f"every checkpoint in {out} is damaged (the newest, {newest})",
                        "start over with --overwrite, or train into another --output")
    contents = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if resume == "auto" and (out / "recipe.yaml").is_file():
        return Plan(None, "run", [f"{out} holds a run that saved no checkpoint: starting it over"])
    if contents and not overwrite:
        raise UserError(f"the output folder {out} is not empty",
                        "pass --resume auto to continue a run there, --overwrite to start over, "
                        "or --output another folder")
    return Plan(None, "all" if contents else None)


def _check_same_recipe(run_dir: Path, recipe: dict[str, Any]) -> None:
    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        return
    changed = resume_conflicts(yaml.safe_load(saved_path.read_text()), recipe)
    if changed:
        raise UserError(f"cannot resume {run_dir}: the recipe differs from its recipe.yaml in "
                        f"{', '.join(changed)}",
                        "resume with the same recipe (only train.max_steps/num_epochs and output.* may "
                        "change), or train into a new --output")


def _step(path: Path) -> int:
    step = checkpoint_step(path)
    return -1 if step is None else step  # sorts any other name first


def complete_checkpoints(out: Path) -> list[Path]:
    """OUT's complete checkpoints (renamed into place, so they have their state file), newest first."""
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if _step(p) >= 0 and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step, reverse=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint."""
    found = complete_checkpoints(out)
    return found[0] if found else None


def checkpoint_damage(ckpt: Path) -> str | None:
    """Why resuming from `ckpt` would fail (its first unreadable file), or None. Every file is read
    in full, as resuming will, but now, before the model loads, and the same on every process."""
    if not (ckpt / "state").is_dir():
        return "state/ is missing"
    files = [ckpt / STATE_FILE, ckpt / "adapter" / CONFIG_FILE, ckpt / "adapter" / WEIGHTS_FILE,
             *sorted(p for p in (ckpt / "state").rglob("*") if p.is_file())]
    for f in files:
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix in (".bin", ".pt", ".pth", ".pkl"):
                load_state_file(f, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure to read is damage
            return f"{f.relative_to(ckpt)}: {first_line(e).split('. ')[0]}"  # torch adds advice sentences
    return None


def save_checkpoint(accelerator: Any, model: Any, out: Path, state: Any, tokenizer: Any,
                    meta: dict[str, Any], limit: int) -> Path:
    """OUT/checkpoint-<step>: adapter (with its model card) + Accelerate state + trainer_state.json,
    renamed into place."""
    final = out / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = out / f".{final.name}.tmp"  # same name on every process: they all write into it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp / "state"))
        # save_state has no barrier: every process's RNG file must be in tmp before it is renamed.
        accelerator.wait_for_everyone()
        full = full_state(accelerator, model)
        if accelerator.is_main_process:
            save_adapter(accelerator.unwrap_model(model), tmp / "adapter", tokenizer=tokenizer, metadata=meta,
                         state_dict=full, card=training_card(out, state))
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(out, limit)
    except BaseException as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back now
        # torch reports a short write (a full disk) as "unexpected pos" or "file write failed".
        if isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "file write failed")):
            raise OSError(errno.ENOSPC, f"torch could not write the checkpoint ({first_line(e)})") from e
        raise
    accelerator.wait_for_everyone()
    return final


def full_state(accelerator: Any, model: Any) -> dict[str, Any] | None:
    """A full state dict where parameters are sharded (FSDP); None means 'read the model'."""
    return accelerator.get_state_dict(model) if accelerator.distributed_type == DistributedType.FSDP else None


def _prune(out: Path, limit: int) -> None:
    if limit and limit > 0:
        ckpts = sorted((p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if _step(p) >= 0), key=_step)
        for p in ckpts[:-limit]:
            shutil.rmtree(p, ignore_errors=True)


class SaveClock:
    """output.save_minutes. Only the main process's clock counts: its vote travels in the step's
    all-reduced loss sum, so every process reads the same vote at the same step (no extra sync)."""

    def __init__(self, minutes: float, main: bool) -> None:
        self.seconds, self.main = minutes * 60.0, main
        self.last, self.saved_step, self.due = _now(), 0, False

    @property
    def on(self) -> bool:
        return self.seconds > 0

    def vote(self) -> float:
        return float(self.main and _now() - self.last >= self.seconds)

    def seen(self, step: int, votes: float) -> None:
        """A finished step's summed votes, as every process reads them back."""
        if votes > 0 and step > self.saved_step:
            self.due = True

    def saved(self, step: int) -> None:
        self.last, self.saved_step, self.due = _now(), step, False


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` like Ctrl-C raises KeyboardInterrupt (a
    second one is ignored, so the checkpoint being saved is finished). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if not _SIGTERM:
            _SIGTERM.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        _SIGTERM.clear()
        signal.signal(signal.SIGTERM, previous)


# The SIGTERM seen inside `sigterm_as_interrupt` (empty: none). Raised from the handler, Terminated
# can land in a garbage-collector callback, which prints and drops it; training checks this list at
# every step boundary (`raise_if_terminated`), so such a signal still stops the run there.
_SIGTERM: list[int] = []


def raise_if_terminated() -> None:
    """Raise Terminated when a SIGTERM arrived but its exception was lost."""
    if _SIGTERM:
        raise Terminated()
