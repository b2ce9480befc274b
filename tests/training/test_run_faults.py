"""The run folder under faults: failed starts, bad --output, a second run, SIGTERM, a full or
read-only disk, damaged checkpoints and stale temporary files. Each case runs `rlora train`
through the CLI and checks the exit code, the one line it prints, and what is left in OUT."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch
from matplotlib.figure import Figure

import rlora_cli.training.loop as train_mod
import rlora_cli.training.rundir as rundir
from rlora_cli.cli import main
from rlora_cli.testing import adapter_tensors, metrics, write_recipe
from rlora_cli.training.loop import train
from rlora_cli.training.metrics import MetricsLog
from rlora_cli.training.rundir import Terminated, raise_if_terminated, sigterm_as_interrupt

LOCK_HOLDER = ("import sys, time; from pathlib import Path; from rlora_cli.training.rundir import RunLock; "
               "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process that holds OUT's lock, as a running `rlora train` does."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / rundir.LOCK_FILE)],
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def listing(out: Path) -> list[str] | None:
    """What OUT holds, or None when there is no OUT at all."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else None


def no_temps(out: Path) -> bool:
    return not [p for p in out.rglob(".*") if p.name != rundir.LOCK_FILE]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, learnable_model_dir):
    """A finished 4-step run with checkpoints 2 and 4, and its recipe; cases copy it."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(folder, learnable_model_dir, train={"max_steps": 4},
                          output={"save_steps": 2, "save_total_limit": 0})
    train(recipe, output=folder / "run")
    return folder / "run", recipe


@dataclass
class Env:
    """What a case's set-up may use."""

    out: Path
    finished: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    before: list[str] | None = None  # OUT's files after the set-up
    holder: subprocess.Popen | None = None

    def copy_finished(self) -> None:
        shutil.copytree(self.finished, self.out)

    def lock(self) -> None:
        self.holder = hold_lock(self.out)
        self.cleanups.append(lambda: (self.holder.kill(), self.holder.wait()))


@dataclass
class Case:
    id: str
    args: list[str]                      # after `train RECIPE`; {out} is OUT
    code: int
    says: list[str]                      # in the one line printed (stderr; stdout for 143)
    setup: Callable[[Env], None] = lambda env: None
    check: Callable[[Env], None] = lambda env: None


# ---------------------------------------------------------------------------- set-ups and checks


def failing(owner: object, name: str, when: Callable[..., bool], error: object) -> Callable[[Env], None]:
    """A set-up: owner.name raises `error` (or error(env)) on the calls where `when` holds."""
    def setup(env: Env) -> None:
        real = getattr(owner, name)

        def wrapper(*a, **k):
            if when(*a, **k):
                raise error if isinstance(error, BaseException) else error(env)
            return real(*a, **k)

        env.monkeypatch.setattr(owner, name, wrapper)
    return setup


def in_path(part: str) -> Callable[..., bool]:
    return lambda obj, f, *a, **k: part in str(f)


FULL = OSError(errno.ENOSPC, "No space left on device")
SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2112 vs 2000")
full_at_checkpoint_4 = failing(torch, "save", in_path(".checkpoint-4"), FULL)
read_only_metrics = failing(
    MetricsLog, "write", lambda self, row: row.get("step") == 3,
    lambda env: OSError(errno.EROFS, "Read-only file system", str(env.out / "metrics.jsonl")))
# The run's own adapter, not a checkpoint's.
full_at_adapter = failing(safetensors.torch, "save_file", lambda t, f, *a, **k: ".checkpoint-" not in f, FULL)
# A partial image is written, then the disk is full.
full_at_plots = failing(Figure, "savefig", lambda fig, f, *a, **k: Path(f).write_bytes(b"half") > 0, FULL)


def read_only_parent(env: Env) -> None:
    """What os.access says of a read-only folder, even to root (a read-only mount)."""
    env.out.mkdir()
    real = os.access
    env.monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != env.out and real(p, mode, **k))


def sigterm_at_step_3(env: Env) -> None:
    real, calls = train_mod.token_losses, {"n": 0}

    def losses(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, **kw)

    env.monkeypatch.setattr(train_mod, "token_losses", losses)


def damaged_optimizer(env: Env) -> None:
    env.copy_finished()
    path = env.out / "checkpoint-4" / "state" / "optimizer.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def stale_temps(env: Env) -> None:
    env.copy_finished()
    (env.out / ".adapter.tmp-k2j3h4").mkdir()
    (env.out / ".adapter.tmp-k2j3h4" / "rlora_adapter.safetensors").write_bytes(b"half")
    (env.out / ".checkpoint-6.tmp" / "state").mkdir(parents=True)
    (env.out / ".metrics.jsonl.tmp-x81").write_text("{")
    (env.out / "plots" / ".loss.png.tmp-k2x9q1.png").write_bytes(b"half")


def leftovers_of_a_killed_start(env: Env) -> None:
    env.out.mkdir()
    shutil.copy(env.finished / "recipe.yaml", env.out / "recipe.yaml")
    (env.out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (env.out / "notes.txt").write_text("mine")


def checkpoints(*steps: int) -> Callable[[Env], None]:
    """A check: exactly these checkpoints, no temporary files, no lock left."""
    def check(env: Env) -> None:
        assert sorted(rundir._step(p) for p in env.out.glob("checkpoint-*")) == list(steps)
        assert no_temps(env.out) and not (env.out / rundir.LOCK_FILE).exists()
    return check


def unchanged(env: Env) -> None:
    assert listing(env.out) == env.before and not (env.out / rundir.LOCK_FILE).exists()


def lock_kept(env: Env) -> None:
    assert listing(env.out) == env.before and env.holder.poll() is None
    assert (env.out / rundir.LOCK_FILE).read_text().strip() == str(env.holder.pid)


def handler_restored(env: Env) -> None:
    checkpoints(2)(env)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def no_partial_plot(env: Env) -> None:
    assert (env.out / "adapter").is_dir() and not list((env.out / "plots").glob("*"))


def started_over(env: Env) -> None:
    assert (env.out / "notes.txt").read_text() == "mine" and (env.out / "checkpoint-4").is_dir()
    assert [r["step"] for r in metrics(env.out) if "loss" in r] == [1, 2, 3, 4]


OUT = "{out}"
NO_TARGETS, NO_MODEL = "adapter.target_modules=[nothing_here]", "model.name_or_path=/no/such/model"
a_file = lambda env: env.out.write_text("not a folder")  # noqa: E731
CASES = [
    Case("bad-target-modules", ["-o", OUT, NO_TARGETS], 2, ["target_modules"], check=unchanged),
    Case("mistyped-model-path", ["-o", OUT, NO_MODEL], 2, ["/no/such/model"], check=unchanged),
    Case("failed-start-in-users-folder", ["-o", OUT, NO_TARGETS], 2, ["target_modules"],
         lambda env: env.out.mkdir(), unchanged),
    Case("failed-overwrite-keeps-the-old-run", ["-o", OUT, "--overwrite", NO_MODEL], 2, ["/no/such/model"],
         lambda env: (env.copy_finished(), (env.out / "notes.txt").write_text("mine")), unchanged),
    Case("output-is-a-file", ["-o", OUT], 2, ["is a file, not a folder"], a_file, unchanged),
    Case("output-under-a-file", ["-o", "{out}/sub"], 2, ["run is a file, not a folder"], a_file, unchanged),
    Case("output-not-creatable", ["-o", "/proc/rlora-run"], 2, ["/proc/rlora-run"]),
    Case("output-read-only", ["-o", "{out}/run"], 2, ["run is read-only"], read_only_parent, unchanged),
    Case("locked", ["-o", OUT], 2, ["in use by another rlora train (pid"], lambda env: env.lock(), lock_kept),
    Case("locked-resume-auto", ["-o", OUT, "--resume", "auto"], 2, ["(pid"],
         lambda env: (env.copy_finished(), env.lock()), lock_kept),
    Case("locked-overwrite", ["-o", OUT, "--overwrite"], 2, ["(pid"],
         lambda env: (env.copy_finished(), env.lock()), lock_kept),
    Case("disk-full-first-checkpoint", ["-o", OUT], 1, ["is full", "no checkpoint was saved"],
         failing(torch, "save", in_path(".checkpoint-"), FULL), checkpoints()),
    Case("disk-full-later-checkpoint", ["-o", OUT], 1, ["is full", "checkpoint-2, the last good"],
         full_at_checkpoint_4, checkpoints(2)),
    Case("torch-short-write", ["-o", OUT], 1, ["is full", "checkpoint-2"],
         failing(torch, "save", in_path(".checkpoint-4"), SHORT_WRITE), checkpoints(2)),
    Case("read-only-metrics", ["-o", OUT], 1, ["is read-only", "checkpoint-2"], read_only_metrics,
         checkpoints(2)),
    Case("disk-full-final-adapter", ["-o", OUT], 1, ["is full", "checkpoint-4"], full_at_adapter,
         checkpoints(2, 4)),
    Case("disk-full-plots", ["-o", OUT], 1, ["is full"], full_at_plots, no_partial_plot),
    Case("damaged-checkpoint-named", ["-o", OUT, "--resume", "{out}/checkpoint-4"], 2,
         ["checkpoint-4 is damaged (state/optimizer.bin", "--resume {out}/checkpoint-2"], damaged_optimizer,
         unchanged),
    Case("sigterm", ["-o", OUT], 143, ["terminated (SIGTERM): saved", "checkpoint-2"], sigterm_at_step_3,
         handler_restored),
    Case("stale-temporaries-removed", ["-o", OUT, "--resume", "auto", "train.max_steps=6"], 0, [],
         stale_temps, checkpoints(2, 4, 6)),
    Case("resume-auto-over-a-run-without-checkpoint", ["-o", OUT, "--resume", "auto"], 0,
         ["saved no checkpoint: starting it over"], leftovers_of_a_killed_start, started_over),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_run_folder_faults(case, tmp_path, finished, monkeypatch, capsys):
    recipe = finished[1]
    env = Env(out=tmp_path / "run", finished=finished[0], monkeypatch=monkeypatch)
    monkeypatch.setenv("COLUMNS", "2000")  # rich wraps nothing: a message reads as one line
    try:
        case.setup(env)
        env.before = listing(env.out)
        args = [a.replace(OUT, str(env.out)) for a in case.args]
        with pytest.raises(SystemExit) as e:
            main(["train", recipe, *args])
            raise SystemExit(0)
        captured = capsys.readouterr()
        assert e.value.code == case.code, captured.err
        assert "Traceback" not in captured.err + captured.out
        # Library progress bars (loading weights, tokenizing) also go to stderr; the rest is ours.
        lines = [line for line in captured.err.splitlines() if line.strip() and "%|" not in line]
        shown = captured.out
        if case.code in (0, 143):
            assert len(lines) <= 1, captured.err  # the success and SIGTERM notes go to stdout
        else:
            assert len(lines) == 1, captured.err
            shown = lines[0]
        for text in case.says:
            assert text.replace(OUT, str(env.out)) in shown, shown
        case.check(env)
    finally:
        for undo in env.cleanups:
            undo()


# ---------------------------------------------------------------------------- beyond the matrix


def test_a_corrected_rerun_starts_after_a_failed_start(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 1})
    with pytest.raises(SystemExit) as e:
        main(["train", recipe, "--output", str(tmp_path / "runs" / "a"),
              "adapter.target_modules=[nothing_here]"])
    assert e.value.code == 2 and not (tmp_path / "runs").exists()  # the parents it made are gone too
    assert train(recipe, output=tmp_path / "runs" / "a") == tmp_path / "runs" / "a"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod 555) folder anyway")
def test_a_read_only_folder_is_refused(tmp_path, learnable_model_dir):
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 1})
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    with pytest.raises(rundir.UserError, match="is read-only"):
        train(recipe, output=tmp_path / "ro" / "run")


def test_a_crashed_lock_holder_releases_the_lock(tmp_path, finished):
    holder = hold_lock(tmp_path / "run")
    holder.kill()  # SIGKILL: no clean-up at all, the kernel drops the lock
    holder.wait()
    assert (tmp_path / "run" / rundir.LOCK_FILE).read_text().strip() == str(holder.pid)
    train(finished[1], output=tmp_path / "run")  # the stale lock file is not "not empty"
    assert (tmp_path / "run" / "adapter").is_dir() and not (tmp_path / "run" / rundir.LOCK_FILE).exists()


def test_resume_auto_skips_a_damaged_checkpoint_and_ends_identically(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    optimizer = out / "checkpoint-4" / "state" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    from rich.console import Console

    console = Console(file=io.StringIO(), width=400)
    train(finished[1], output=out, resume="auto", console=console)
    notes = console.file.getvalue()
    assert "checkpoint-4 is damaged (state/optimizer.bin" in notes and "checkpoint before it" in notes
    assert "resuming from" in notes and "checkpoint-2 (step 2" in notes
    a, b = adapter_tensors(finished[0]), adapter_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3-4 trained again, exactly
    assert rundir.checkpoint_damage(out / "checkpoint-4") is None  # replaced by a good one


def test_every_checkpoint_damaged_is_refused(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    for step in (2, 4):
        (out / f"checkpoint-{step}" / rundir.STATE_FILE).write_text("{")
    with pytest.raises(rundir.UserError, match="every checkpoint in .* is damaged") as e:
        train(finished[1], output=out, resume="auto")
    assert "--overwrite" in e.value.message


SLOW_RUN = ("import sys, time; import rlora_cli.training.loop as t; real = t.token_losses\n"
            "def slow(*a, **k):\n    time.sleep(0.3)\n    return real(*a, **k)\n"
            "t.token_losses = slow\nfrom rlora_cli.cli import main\nmain(sys.argv[1:])\n")


def test_sigterm_from_outside_saves_and_resume_is_bit_identical(tmp_path, learnable_model_dir):
    """A scheduler's SIGTERM, sent to a real `rlora train` process in the middle of its run."""
    recipe = write_recipe(tmp_path, learnable_model_dir, train={"max_steps": 8}, output={"save_steps": 0})
    straight = train(recipe, output=tmp_path / "straight")
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "train", recipe, "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not [r for r in metrics(out) if r.get("step", 0) >= 2]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr.decode()
    assert b"Traceback" not in stderr and b"terminated (SIGTERM): saved" in stdout
    saved = rundir.latest_checkpoint(out)
    assert saved is not None and 2 <= rundir._step(saved) < 8 and not (out / rundir.LOCK_FILE).exists()
    train(recipe, output=out, resume="auto")
    a, b = adapter_tensors(straight), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clean_stale_puts_back_an_adapter_caught_between_renames(tmp_path):
    out = tmp_path / "run"
    (out / ".adapter.old-0123abcd").mkdir(parents=True)
    (out / ".adapter.old-0123abcd" / "w").write_text("kept")
    (out / ".adapter.tmp-zz9").mkdir()
    (out / "notes.txt").write_text("mine")
    rundir.clean_stale(out)
    assert listing(out) == ["adapter", "adapter/w", "notes.txt"]


def test_bracketed_paths_print_literally(tmp_path, learnable_model_dir, capsys):
    from rich.console import Console

    model = tmp_path / "m[bold]x"
    shutil.copytree(learnable_model_dir, model)
    recipe = write_recipe(tmp_path, model, train={"max_steps": 1})
    console = Console(file=io.StringIO(), width=500)
    train(recipe, output=tmp_path / "o[/b]", console=console)
    text = console.file.getvalue()
    assert "m[bold]x" in text and "o[/b]" in text and "done:" in text
    with pytest.raises(SystemExit) as e:  # through the CLI: no MarkupError either
        main(["train", recipe, "--output", str(tmp_path / "p[/b]")])
        raise SystemExit(0)
    assert e.value.code == 0 and "Traceback" not in capsys.readouterr().err


def test_the_sigterm_handler_is_only_installed_on_the_main_thread():
    import threading

    seen = []

    def in_thread():
        with rundir.sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]
    with rundir.sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_sigterm_whose_exception_was_swallowed_still_stops_at_the_next_step():
    """Raised from the handler, Terminated can land in a garbage-collector callback, which drops
    it; the step boundary's check raises it again, and leaving the block forgets it."""
    with sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Terminated:
            pass  # what a __del__ or gc callback does with it
        with pytest.raises(Terminated):
            raise_if_terminated()
    raise_if_terminated()  # outside the block: nothing pending
