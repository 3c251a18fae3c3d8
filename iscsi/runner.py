"""The one helper for external commands: argv lists, exit status checked, stderr in the error.

Every driver and backend takes a `CommandRunner`; tests pass a `RecordingRunner` to check the exact
argv without running anything (ctld and OpenZFS zvols cannot run on this Linux host).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from iscsi.model import StorageError

_STDERR_LIMIT = 2000


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(StorageError):
    """An external command failed; carries its argv, exit status and (trimmed) stderr."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        err = result.stderr.strip() or result.stdout.strip()
        if len(err) > _STDERR_LIMIT:
            err = err[:_STDERR_LIMIT] + "…"
        super().__init__(f"{' '.join(result.argv)!s} exited with {result.returncode}: {err}")


class CommandRunner(Protocol):
    async def __call__(self, argv: Sequence[str], *, check: bool = True) -> CommandResult: ...


class SubprocessRunner:
    """Runs commands with asyncio subprocesses (never a shell), stdin closed."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(env) if env is not None else None

    async def __call__(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        args = tuple(argv)
        if not args or not all(isinstance(a, str) for a in args):
            raise TypeError(f"argv must be a non-empty list of str: {args!r}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env if self._env is not None else None,
            )
        except FileNotFoundError as exc:
            raise StorageError(f"{args[0]}: command not found") from exc
        out, err = await proc.communicate()
        result = CommandResult(
            args,
            proc.returncode if proc.returncode is not None else -1,
            out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
        )
        if check and result.returncode != 0:
            raise CommandError(result)
        return result


Responder = Callable[[tuple[str, ...]], "CommandResult | tuple[int, str, str] | str | None"]


@dataclass
class RecordingRunner:
    """Records every argv; answers from `respond` (return None for "exit 0, no output").

    `respond` may return a CommandResult, an (rc, stdout, stderr) tuple or just stdout.
    """

    respond: Responder | None = None
    calls: list[tuple[str, ...]] = field(default_factory=list)

    async def __call__(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        args = tuple(argv)
        if not args or not all(isinstance(a, str) for a in args):
            raise TypeError(f"argv must be a non-empty list of str: {args!r}")
        self.calls.append(args)
        answer = self.respond(args) if self.respond is not None else None
        if answer is None:
            result = CommandResult(args, 0, "", "")
        elif isinstance(answer, CommandResult):
            result = answer
        elif isinstance(answer, str):
            result = CommandResult(args, 0, answer, "")
        else:
            rc, out, err = answer
            result = CommandResult(args, rc, out, err)
        if check and result.returncode != 0:
            raise CommandError(result)
        return result


def default_runner() -> CommandRunner:
    return SubprocessRunner(env={**os.environ, "LC_ALL": "C"})
