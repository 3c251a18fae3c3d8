"""The one helper for external commands: argv lists, exit status checked, stderr in the error.

Used by the storage and export code and by template builds alike. Every driver and backend takes a
`CommandRunner`; tests pass a `RecordingRunner` to check the exact argv without running anything
(ctld and OpenZFS zvols cannot run on this Linux host).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from iscsi.model import StorageError

_STDERR_LIMIT = 2000
_ARGV_LIMIT = 200


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _shown(argv: Sequence[str]) -> str:
    command = " ".join(argv)
    return command if len(command) <= _ARGV_LIMIT else command[:_ARGV_LIMIT] + "…"


class CommandError(StorageError):
    """An external command failed; carries its argv, exit status and stderr (the end of it in the message:
    a failing build prints its reason last)."""

    def __init__(self, result: CommandResult, message: str | None = None) -> None:
        self.result = result
        if message is None:
            err = result.stderr.strip() or result.stdout.strip()
            if len(err) > _STDERR_LIMIT:
                err = "…" + err[-_STDERR_LIMIT:]
            message = f"{_shown(result.argv)} exited with {result.returncode}" + (f": {err}" if err else "")
        super().__init__(message)


async def run_command(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,  # noqa: ASYNC109  (the child is killed on expiry, not just abandoned)
) -> CommandResult:
    """Run argv (never through a shell, stdin closed) and collect its output.

    On a timeout or a cancellation the child is killed and reaped: nothing outlives the call that
    started it. `check` raises CommandError on a non-zero exit.
    """
    args = tuple(argv)
    if not args or not all(isinstance(a, str) for a in args):
        raise TypeError(f"argv must be a non-empty list of str: {args!r}")
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError:
        raise CommandError(CommandResult(args, 127, "", ""), f"{args[0]}: command not found") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise CommandError(CommandResult(args, -9, "", ""),
                               f"{_shown(args)} timed out after {timeout:g} s") from None
        raise
    result = CommandResult(
        args,
        proc.returncode if proc.returncode is not None else -1,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise CommandError(result)
    return result


async def run_output(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,  # noqa: ASYNC109
) -> str:
    """`run_command` for the common case: checked, and only its stdout wanted."""
    return (await run_command(argv, env=env, cwd=cwd, timeout=timeout)).stdout


class CommandRunner(Protocol):
    async def __call__(self, argv: Sequence[str], *, check: bool = True) -> CommandResult: ...


class SubprocessRunner:
    """The real CommandRunner: `run_command` with this runner's environment and time limit."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout: float | None = None) -> None:
        self._env = dict(env) if env is not None else None
        self._timeout = timeout

    async def __call__(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        return await run_command(argv, check=check, env=self._env, timeout=self._timeout)


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
