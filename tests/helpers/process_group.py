"""A command run in its own process group, the whole group killed if it outlives its time: a rank
waiting on a dead or stuck peer (DDP tests) must not hang the test run."""
import os
import signal
import subprocess

import pytest


def run_group(cmd: list[str], *, env: dict, cwd, timeout: float, what: str,
              merge_stderr: bool = False) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of `cmd`; stderr goes into stdout with `merge_stderr` (then "").
    Past `timeout` seconds the group is killed and the test fails, naming `what` and the output's tail."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} did not end in {timeout} s (a rank waiting?):\n{out[-4000:]}{(err or '')[-3000:]}")
    return proc.returncode, out, err or ""
