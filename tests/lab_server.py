"""JupyterLab as `make lab` starts it, for the tests that need a running server (test_lab, test_browser)."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def make_lab(workdir: Path, notebook_dir: Path | None = None, timeout: float = 180):
    """Start `make lab` on a free port with its runtime and workspaces under `workdir`; yield (base URL, token).

    The server runs in its own process group, which is stopped (SIGTERM, then SIGKILL) on exit, so no kernel
    or server outlives the test. Fails with the server's log if it exits or prints no URL within `timeout`.
    """
    port = free_port()
    log = workdir / "lab.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(workdir / "workspaces")}
    command = ["make", "-s", "lab", f"PORT={port}"] + ([f"NOTEBOOK_DIR={notebook_dir}"] if notebook_dir else [])
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        token = None
        deadline = time.monotonic() + timeout
        while token is None and time.monotonic() < deadline:
            time.sleep(1)
            assert process.poll() is None, f"make lab exited:\n{log.read_text()}"
            match = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=([0-9a-f]+)", log.read_text())
            token = match.group(1) if match else None
        assert token, f"no URL with a token printed within {timeout:.0f} s:\n{log.read_text()}"
        yield f"http://127.0.0.1:{port}", token
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Stop make and the JupyterLab server it started (its whole process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
