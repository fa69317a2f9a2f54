"""Killing a command at a named point (`aria_jax.files.pause_point`), for crash-safety tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from aria_jax.files import PAUSE_ENV


def kill_at(argv: list[str], point: str, timeout: float = 300.0, env: dict | None = None) -> None:
    """Runs `python -m aria_jax.cli *argv` until it reports pausing at `point`, then SIGKILLs it.
    Fails if the process ends, or does not reach the point within `timeout` seconds."""
    environment = {**os.environ, **(env or {}), PAUSE_ENV: point}
    process = subprocess.Popen(
        [sys.executable, "-m", "aria_jax.cli", *argv],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.strip() == f"aria-jax: paused at {point}":
                return
        raise AssertionError(
            f"ended (exit {process.wait()}) before reaching {point} within {timeout} s: {''.join(seen)[-2000:]}"
        )
    finally:
        watchdog.cancel()
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
