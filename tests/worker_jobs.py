"""Test helpers for worker scripts run in subprocesses on fake CPU devices (multi-device and
multi-host tests): JAX reads the device count when it starts, so a test cannot change it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from repo_paths import ROOT


def worker_env(num_devices: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class Job:
    """A worker script in a subprocess; it prints its result as one `RESULT {json}` line. Output
    goes to files: a full pipe would block a process that another host waits for."""

    def __init__(self, name: str, script: str, args: list[str], num_devices: int, directory: str):
        self.name = name
        self.stdout_path = os.path.join(directory, f"{name}.out")
        self.stderr_path = os.path.join(directory, f"{name}.err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, script, *args], stdout=out, stderr=err, env=worker_env(num_devices), cwd=ROOT
            )
        self._result = None

    def result(self, timeout: float) -> dict:
        if self._result is None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.name} did not finish in {timeout:.0f} s\n{self.tail()}")
            with open(self.stdout_path) as f:
                lines = [line for line in f.read().splitlines() if line.startswith("RESULT ")]
            if self.process.returncode != 0 or not lines:
                pytest.fail(f"{self.name} exited with {self.process.returncode}\n{self.tail()}")
            self._result = json.loads(lines[-1][len("RESULT ") :])
        return self._result

    def tail(self, chars: int = 4000) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()[-chars:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
