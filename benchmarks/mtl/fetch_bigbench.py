"""Extract BIG-bench's JSON task files from its PyPI source distribution.

    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d data/.bigbench-sdist
    python -m benchmarks.mtl.fetch_bigbench data/.bigbench-sdist --out data/bigbench

Every `bigbench/benchmark_tasks/**/task.json` of the sdist becomes `OUT/<task>[/<subtask>]/task.json`
(unchanged, canary strings kept); nothing else is extracted, and no path can leave OUT.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path, PurePosixPath

from rlora_cli.errors import UserError

MARKER = ("bigbench", "benchmark_tasks")


def sdist_path(source: str | Path) -> Path:
    """The bigbench-*.tar.gz itself, or the one file of that name in a download folder."""
    source = Path(source)
    if source.is_file():
        return source
    found = sorted(source.glob("bigbench-*.tar.gz")) if source.is_dir() else []
    if not found:
        raise UserError(f"{source}: no bigbench-*.tar.gz here",
                        "download it first: pip download --no-deps --no-binary :all: bigbench==1.0.0 -d DIR")
    return found[-1]


def task_path(member: str) -> PurePosixPath | None:
    """benchmark_tasks/<task>/.../task.json -> <task>/.../task.json; None for anything else."""
    parts = PurePosixPath(member).parts
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == MARKER:
            rest = parts[i + 2:]
            if len(rest) >= 2 and rest[-1] == "task.json" and all(p not in ("", ".", "..") for p in rest):
                return PurePosixPath(*rest)
    return None


def extract(source: str | Path, out: str | Path) -> int:
    """Extract the task files into `out`; returns how many were written."""
    archive, out = sdist_path(source), Path(out)
    written = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                rel = task_path(member.name)
                if rel is None or not member.isfile():
                    continue
                target = out.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                tmp = target.with_name(".task.json.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
                written += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{archive}: cannot read the archive ({e})", "download it again") from None
    if not written:
        raise UserError(f"{archive}: no bigbench/benchmark_tasks/*/task.json inside",
                        "give the bigbench==1.0.0 source distribution (--no-binary :all:)")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mtl.fetch_bigbench",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the bigbench-1.0.0.tar.gz sdist, or the folder pip downloaded it to")
    ap.add_argument("--out", default="data/bigbench", help="where the task folders go")
    args = ap.parse_args(argv)
    try:
        n = extract(args.source, args.out)
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"{n} task.json files in {args.out}")


if __name__ == "__main__":
    main()
