"""One helper for the external commands of template builds: argv lists, exit status checked, stderr kept."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence


class CommandError(Exception):
    """An external command failed; the message names the command, its status and the end of its stderr."""

    def __init__(self, argv: Sequence[str], status: int | None, stderr: str) -> None:
        tail = stderr.strip()[-800:]
        super().__init__(f"{argv[0]} exited with {status}: {tail}" if tail else f"{argv[0]} exited with {status}")
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr


async def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,  # noqa: ASYNC109  (the subprocess is killed on expiry, not just abandoned)
) -> str:
    """Run argv (never through a shell); return stdout; raise CommandError on a non-zero exit or timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError:
        raise CommandError(argv, None, f"{argv[0]}: command not found") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise CommandError(argv, None, f"timed out after {timeout} s") from None
        raise
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, err.decode(errors="replace"))
    return out.decode(errors="replace")
