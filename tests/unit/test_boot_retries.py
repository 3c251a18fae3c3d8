"""The tiny initramfs tries DHCP and the iSCSI login again with a growing wait: its own `retry`, run by a
real shell (dash, as the busybox sh of the initramfs would), against a command that fails a few times."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

INIT = Path(__file__).resolve().parents[2] / "image-build" / "tiny" / "init"


def retry_function() -> str:
    text = INIT.read_text()
    found = re.search(r"^TRIES=\d+\nretry\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert found, "image-build/tiny/init has no retry() function"
    return found.group(0)


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)


def test_a_step_that_fails_twice_is_tried_again_and_goes_on() -> None:
    out = run('say() { echo "$*"; }\nsleep() { echo "slept $1"; }\n' + retry_function() + """
n=0
flaky() { n=$((n + 1)); [ "$n" -ge 3 ]; }
retry "iSCSI login" flaky && echo "logged in after $n"
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "iSCSI login failed (try 1 of 8), again in 1 s", "slept 1",
        "iSCSI login failed (try 2 of 8), again in 2 s", "slept 2",
        "logged in after 3"]


def test_a_step_that_never_succeeds_gives_up_after_its_tries() -> None:
    out = run('say() { :; }\nsleep() { :; }\n' + retry_function() + """
n=0
never() { n=$((n + 1)); return 1; }
retry "DHCP" never || echo "gave up after $n"
""")
    assert out.stdout.strip() == "gave up after 8"


def test_both_steps_go_through_it() -> None:
    text = INIT.read_text()
    assert 'retry "DHCP" net_up' in text
    assert text.count('retry "iSCSI login" iscsistart') == 2  # explicit target, and the iBFT
