"""The peak resident memory of this process, as the convert summary, `aria-jax bench` and the
memory tests report it."""

from __future__ import annotations

import resource
import sys


def peak_resident_bytes() -> int:
    """The high-water mark of this process's resident memory, in bytes.

    On Linux, VmHWM from /proc/self/status: the peak of this process's own memory map. Not
    getrusage's ru_maxrss, which a process started by fork/vfork + exec inherits from its parent
    (a command started from a 3 GB Python process reports at least 3 GB). Elsewhere ru_maxrss,
    which macOS gives in bytes.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):  # "VmHWM:  123456 kB"
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux and the BSDs report KiB
