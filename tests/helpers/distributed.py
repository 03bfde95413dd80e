"""Start real JAX processes on this machine: `jax.distributed` on a loopback coordinator, CPU
devices, gloo collectives. Used by the multi-process tests."""

import os
import socket
import subprocess
import sys

HELPERS = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(process_id: int, num_processes: int, port: int, local_devices: int) -> None:
    """Call in a child before anything else touches JAX."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
    )


def launch(script: str, num_processes: int, *args: str) -> list[subprocess.Popen]:
    """Start `helpers/<script>` once per process with `process_id num_processes port *args`."""
    port = str(free_port())
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (HELPERS, os.environ.get("PYTHONPATH")) if p),
    )
    env.pop("XLA_FLAGS", None)
    return [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HELPERS, script),
                str(i),
                str(num_processes),
                port,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(num_processes)
    ]
