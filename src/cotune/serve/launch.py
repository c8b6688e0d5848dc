"""`cotune serve` in a child process, for scripts, benchmarks and tests that talk to a real server.

>>> with serve_subprocess(["--model_name", "demo_out/tiny", "--adapter", "demo=demo_out/run/adapter"]) as (url, proc):
...     ...  # an OpenAI client on f"{url}/v1"
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve_subprocess(
    args: list[str], timeout: float = 90.0, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Starts ``python -m cotune serve --port <free port> *args`` on 127.0.0.1 and waits for ``/health``.

    ``env`` is the child's environment (default: this process's); this cotune's folder is put first on
    its ``PYTHONPATH``.

    Yields ``(base URL, process)``; on exit the process is stopped by its PID (terminate, then kill).

    Raises:
        RuntimeError: the server exited before answering (its stderr's tail in the message), or did not
            answer within ``timeout`` seconds.
    """
    port = free_port()
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding cotune/
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "cotune", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up in {timeout:.0f} s")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
