"""Notebook 07 attempts no network access at all: it runs in a kernel where every non-local connection fails.

The guard is a `sitecustomize.py` written into a temporary folder that is put first on the kernel's
PYTHONPATH, so Python imports it at start-up, before any notebook code. It replaces
`socket.socket.connect` / `connect_ex` and `socket.getaddrinfo` so that anything but a loopback
address raises `NetworkBlocked`, and it *records* every attempt: libraries such as huggingface_hub
catch connection errors and fall back to their cache, so an exception alone could go unnoticed.
After the notebook, a cell appended to it asserts that nothing was attempted.

A control test proves the guard really blocks: `urllib` fetching example.com fails with the
guard's own message (without the guard, this machine would fail differently, or succeed).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "07_from_pretrained_and_the_hub.ipynb"
MESSAGE = "network access blocked by tests/test_no_network.py"

GUARD = textwrap.dedent(f'''
    """Installed by tests/test_no_network.py: any non-loopback network access raises, and is recorded."""
    import ipaddress
    import socket
    import traceback

    MESSAGE = {MESSAGE!r}
    ATTEMPTS = []  # (what, address, where) of every blocked attempt, even ones a library caught and ignored
    _LOCAL_NAMES = {{"localhost", "localhost.localdomain", "ip6-localhost", ""}}


    class NetworkBlocked(OSError):
        pass


    def _is_local(host):
        if isinstance(host, bytes):
            host = host.decode()
        if host is None or str(host).lower() in _LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False


    def _refuse(what, address):
        where = " <- ".join(f"{{f.filename.rsplit('/', 1)[-1]}}:{{f.lineno}} {{f.name}}"
                            for f in reversed(traceback.extract_stack()[-40:-2]))
        ATTEMPTS.append((what, repr(address), where))
        raise NetworkBlocked(f"{{MESSAGE}}: {{what}} {{address!r}}")


    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _refuse("connect", address)
        return _connect(self, address)


    def guarded_connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _refuse("connect_ex", address)
        return _connect_ex(self, address)


    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            _refuse("getaddrinfo", host)
        return _getaddrinfo(host, *args, **kwargs)


    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo
''')


@pytest.fixture
def guarded_env(tmp_path):
    """An environment whose Python processes start with the network guard installed."""
    folder = tmp_path / "guard"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(GUARD)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the notebook must be offline by itself
        env.pop(key, None)
    return env


def test_the_guard_blocks_and_records_a_real_request(guarded_env):
    code = textwrap.dedent("""
        import urllib.request, sitecustomize
        try:
            urllib.request.urlopen("http://example.com", timeout=5)
        except Exception as exc:  # urllib wraps it in URLError
            print(repr(exc))
        print("attempts:", sitecustomize.ATTEMPTS)
    """)
    result = subprocess.run([sys.executable, "-c", code], env=guarded_env, capture_output=True, text=True,
                            timeout=60)
    assert MESSAGE in result.stdout, result.stdout + result.stderr
    assert "example.com" in result.stdout.split("attempts:")[1]


def test_the_guard_lets_loopback_through(guarded_env):
    code = textwrap.dedent("""
        import socket, sitecustomize
        server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
        client = socket.create_connection(server.getsockname(), timeout=5)
        client.close(); server.close()
        assert sitecustomize.ATTEMPTS == []
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], env=guarded_env, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "ok", result.stdout + result.stderr


def test_local_files_only_still_reaches_for_the_network_but_offline_hub_does_not(guarded_env, tmp_path):
    """What the guard found in huggingface_hub 2.4 (notebook 07 explains it): `local_files_only=True` still
    builds a User-Agent header, which looks up an "agent harnesses" registry on the hub once per process,
    unless offline mode (or HF_HUB_DISABLE_TELEMETRY) is on. If this starts failing, upstream changed."""
    code = textwrap.dedent(f"""
        import sys, sitecustomize
        from huggingface_hub import hf_hub_download
        from helpers import hub
        repo = hub.publish_to_local_cache({str(ROOT / "data" / "tiny-llama")!r}, "suite/tiny-llama")
        if sys.argv[1] == "per-call":
            hf_hub_download("suite/tiny-llama", "config.json", cache_dir=repo.cache_dir, local_files_only=True)
        else:
            with hub.offline_hub(repo.cache_dir):
                hf_hub_download("suite/tiny-llama", "config.json")
        print([a[1] for a in sitecustomize.ATTEMPTS])
    """)
    env = {**guarded_env, "BIGMODEL_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home"),
           "PYTHONPATH": guarded_env["PYTHONPATH"] + os.pathsep + str(ROOT)}
    env = {k: v for k, v in env.items() if k not in ("HF_HUB_DISABLE_TELEMETRY", "HF_HOME", "XDG_CACHE_HOME")}
    seen = {}
    for mode in ("per-call", "offline_hub"):
        result = subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        seen[mode] = result.stdout.strip().splitlines()[-1]
    assert "huggingface.co" in seen["per-call"], seen
    assert seen["offline_hub"] == "[]", seen


@pytest.mark.slow
def test_notebook_07_runs_without_any_network_attempt(guarded_env):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import sitecustomize, socket\n"
        "assert socket.socket.connect.__name__ == 'guarded_connect', 'the guard was not installed'\n"
        "print('network attempts:', sitecustomize.ATTEMPTS)\n"
        "assert sitecustomize.ATTEMPTS == [], sitecustomize.ATTEMPTS"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=guarded_env)
    errors = [(i, o["ename"], o["evalue"][:200]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"
              and "raises-exception" not in c.metadata.get("tags", [])]
    assert not errors, errors
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "network attempts: []" in last, last
