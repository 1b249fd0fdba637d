"""Real services for the integration tests: a ``prefect server`` and ``dask scheduler`` /
``dask worker`` processes, all on 127.0.0.1, each started as its own process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout, what, proc=None, log=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout} s: {_tail(log)}")


def _tail(log) -> str:
    if log is None:
        return ""
    try:
        return Path(log).read_text()[-3000:]
    except OSError:
        return ""


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=15) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def spawn(args, log: Path, env=None, cwd=None) -> subprocess.Popen:
    """Start a process in its own session (so its whole group can be killed), logging to a
    file."""
    fh = open(log, "ab")
    return subprocess.Popen(
        args,
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME (SQLite database)."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_TELEMETRY_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        self.proc = spawn(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            self.log,
            env=self.env,
        )
        _wait(self.healthy, 120, "prefect server", self.proc, self.log)

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
            return r.status == 200

    def get(self, path: str):
        return self._call(urllib.request.Request(self.url + path))

    def post(self, path: str, body: dict):
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return self._call(req)

    @staticmethod
    def _call(req: urllib.request.Request, attempts: int = 5):
        """The JSON answer to ``req``, retried like Prefect's own client on 429, 502 and 503:
        the server answers 503 for the errors it calls retryable (a busy SQLite database among
        them; prefect.server.api.server.is_client_retryable_exception). Seen once under load
        on 2 cores: test_deployment_end_to_end's create_flow_run, in a full CI run."""
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in (429, 502, 503) or attempt == attempts - 1:
                    raise
            time.sleep(0.5 * 2**attempt)

    def close(self):
        stop(self.proc)


class DaskProcesses:
    """``dask scheduler`` and ``dask worker`` processes (no nanny: killing a worker's process
    removes the worker) on 127.0.0.1."""

    def __init__(self, root: Path, n_workers: int = 2, memory_limit: str = "2GiB"):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "false"}
        self.scheduler = spawn(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dashboard-address",
                ":0",
                "--no-show",
            ],
            root / "scheduler.log",
            env=env,
        )
        self.workers = [
            spawn(
                [
                    str(BIN / "dask"),
                    "worker",
                    self.address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--memory-limit",
                    memory_limit,
                    "--name",
                    f"w{i}",
                    "--dashboard-address",
                    ":0",
                ],
                root / f"worker{i}.log",
                env=env,
            )
            for i in range(n_workers)
        ]
        self.wait_for_workers(n_workers)

    def n_workers(self) -> int:
        from distributed import Client

        with Client(self.address, timeout="5s") as c:
            return len(c.scheduler_info(n_workers=-1)["workers"])

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        _wait(
            lambda: self.n_workers() >= n,
            timeout,
            f"{n} dask workers",
            self.scheduler,
            self.root / "scheduler.log",
        )

    def close(self):
        for p in [*self.workers, self.scheduler]:
            stop(p)
