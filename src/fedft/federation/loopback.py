"""A real Flower federation on this machine (127.0.0.1): one SuperLink, SuperNodes as asked, and
`flwr run` of the fedft app, for tests, benchmarks and trying things out. It drives Flower's
command-line programs as separate processes (it does not import flwr), keeps Flower's state in
a folder of its own, and stops every process it started by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parents[3] / "flower-app"  # in a source checkout
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    def __init__(self, workdir: Path, simulation: bool = False):
        self.workdir = workdir
        self.simulation = simulation
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # the nodes' warm workers keep their sockets here, so that stop() finds them
            "FEDFT_WARM_DIR": str(workdir / "warm"),
        }
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedft"\n\n[superlink.fedft]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _start(self, name: str, args: list[str], home: Path) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            args,
            env={**self.env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        args = [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            args.append("--simulation")
        self._start("superlink", args, self.home)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"SuperLink did not come up; see {self.workdir / 'superlink.log'}")

    def start_supernode(self, name: str, node_config: str) -> subprocess.Popen:
        home = self.workdir / f"home-{name}"
        home.mkdir(exist_ok=True)
        args = [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        ]
        return self._start(name, args, home)

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env={**self.env, "FLWR_HOME": str(self.home)},
            capture_output=True,
            text=True,
            check=check,
            cwd=self.workdir,
        )

    def run_app(self, run_config: str, federation_config: str | None = None) -> int:
        args = ["run", str(APP), "fedft", "--format", "json", "--run-config", run_config]
        if federation_config:
            args += ["--federation-config", federation_config]
        done = self.flwr(*args)
        return int(json.loads(done.stdout)["run-id"])

    def status(self, run_id: int) -> str:
        """Flower's status of the run, e.g. 'running' or 'finished:completed' ('' if unknown)."""
        done = self.flwr("ls", "fedft", "--run-id", str(run_id), "--format", "json", check=False)
        try:
            return str(json.loads(done.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return ""

    def wait(self, run_id: int, timeout: float = 420, done_file: Path | None = None) -> str:
        """Flower's final status of the run. Each status query is a `flwr` process (about 1.7 s
        of CPU, taken from the run itself on a small machine): with `done_file` (the run's
        summary.json), the status is asked once the file appears, and otherwise only every
        `slow` seconds (a run that fails writes none)."""
        deadline = time.monotonic() + timeout
        slow = 1.0 if done_file is None else 10.0
        asked = time.monotonic()
        while time.monotonic() < deadline:
            ready = done_file is not None and done_file.exists()
            if ready or time.monotonic() - asked >= slow:
                asked = time.monotonic()
                status = self.status(run_id)
                if status.startswith("finished"):
                    return status
            time.sleep(0.5 if ready else 0.25)
        raise TimeoutError(f"run {run_id} did not finish in {timeout:.0f} s")

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), "fedft", "--show", check=False).stdout

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        from fedft.federation.warm import stop_workers  # no flwr import, no torch

        stop_workers(Path(self.env["FEDFT_WARM_DIR"]))  # started by ClientApp processes
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
