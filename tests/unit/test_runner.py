"""The one external-command helper (iscsi/runner.py), with real child processes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from iscsi.model import StorageError
from iscsi.runner import CommandError, SubprocessRunner, run_command, run_output


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); reaped means gone from /proc
    return Path(f"/proc/{pid}").exists()


async def test_output_env_and_cwd(tmp_path: Path) -> None:
    out = await run_output(["sh", "-c", 'echo "$CELLO_X $(pwd)"'], env={"CELLO_X": "x", "PATH": os.environ["PATH"]},
                           cwd=str(tmp_path))
    assert out == f"x {tmp_path}\n"


async def test_a_failure_names_the_command_its_status_and_the_end_of_its_stderr() -> None:
    script = 'i=0; while [ $i -lt 500 ]; do echo "noise line $i" >&2; i=$((i+1)); done; echo "the reason" >&2; exit 3'
    with pytest.raises(CommandError) as caught:
        await run_command(["sh", "-c", script])
    message = str(caught.value)
    assert message.startswith("sh -c i=0;") and " exited with 3: …" in message
    assert message.endswith("the reason")  # the end of stderr is kept, where a tool says why it failed
    assert caught.value.result.returncode == 3
    assert isinstance(caught.value, StorageError)


async def test_unchecked_returns_the_status() -> None:
    result = await run_command(["sh", "-c", "echo out; echo err >&2; exit 4"], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (4, "out\n", "err\n")


async def test_missing_command() -> None:
    with pytest.raises(CommandError, match=r"^no-such-cello-tool: command not found$"):
        await run_command(["no-such-cello-tool", "x"])


async def test_a_timeout_kills_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandError, match=r"timed out after 0.3 s$"):
        await SubprocessRunner(timeout=0.3)(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"])
    assert not alive(int(pidfile.read_text()))


async def test_cancelling_the_caller_kills_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(run_command(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"]))
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(int(pidfile.read_text()))


async def test_argv_must_be_strings() -> None:
    with pytest.raises(TypeError):
        await run_command(["echo", 1])  # type: ignore[list-item]
