"""User-facing errors: one problem, one fix, exit code 2.

Everything that is the user's to correct (a recipe key, a missing file, an impossible rank) raises
`UserError`. Only `cli.py` turns it into a red line and an exit code; library callers catch it
like any exception.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. `problem` says what is wrong, `fix` says what to do."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = "", problems: list[str] | None = None) -> None:
        self.problem = problem
        self.fix = fix
        self.problems = problems or [problem]  # each problem alone, for callers that merge reports
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem


def collect(problems: list[str], fix: str = "") -> None:
    """Raise one UserError listing every problem at once (config validation reports all errors)."""
    if len(problems) == 1:
        raise UserError(problems[0], fix, problems)
    if problems:
        raise UserError(f"{len(problems)} problems:\n  " + "\n  ".join(problems), fix, problems)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
