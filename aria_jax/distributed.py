"""Several hosts, one program: every host runs the same script after `initialize()`.

On a TPU pod slice (or under SLURM / Open MPI) JAX discovers the coordinator, the number of
processes and this process's id from the environment, so `initialize()` takes no arguments
there. Elsewhere (for example several CPU processes on one machine, as the tests do) pass them.
After it, `jax.devices()` lists the devices of every host, `aria_jax.make_mesh` spans them all,
and `from_pretrained(path, mesh=mesh)` has each host read only the weights its devices hold.
"""

from __future__ import annotations

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    **kwargs,
) -> None:
    """`jax.distributed.initialize` with CPU collectives across processes over gloo (TPU and
    GPU use their own interconnect; the setting only concerns CPU devices). Call it first,
    before anything else touches JAX."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )


def is_main_process() -> bool:
    """Host 0: the one that prints and writes files."""
    return jax.process_index() == 0
