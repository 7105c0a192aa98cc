"""How a training job starts, chosen from its resources so that changing them reruns nothing (the train rule
runs ``python -m stages.core.launch {resources.gpu} {resources.nodes} -m stages.train ...``). The process
replaces itself with

* ``python ARGS...``: at most one GPU on one node;
* ``torchrun --standalone --nproc_per_node GPUS ARGS...``: one node, one process per GPU;
* ``srun --ntasks-per-node=1 torchrun --nnodes NODES ...``: inside a Slurm job, one torchrun per node with a
  c10d rendezvous on this node.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence


def launch_command(gpus: int, nodes: int, args: Sequence[str], *, env: Mapping[str, str] = os.environ
                   ) -> list[str]:
    """The command line that runs ``python ARGS`` on ``nodes`` nodes with ``gpus`` GPUs each."""
    if gpus < 0 or nodes < 1:
        raise ValueError(f"need gpus >= 0 and nodes >= 1, got gpus={gpus} nodes={nodes}")
    if nodes > 1:
        if "SLURM_JOB_ID" not in env:
            raise ValueError(f"nodes={nodes} needs a Slurm job (SLURM_JOB_ID is not set)")
        return ["srun", "--ntasks-per-node=1", "torchrun", "--nnodes", str(nodes), "--nproc_per_node",
                str(max(gpus, 1)), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{socket.gethostname()}:29500",
                "--rdzv_id", env["SLURM_JOB_ID"], *args]
    if gpus > 1:
        return ["torchrun", "--standalone", "--nproc_per_node", str(gpus), *args]
    return [sys.executable, *args]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        raise SystemExit("usage: python -m stages.core.launch GPUS NODES ARGS...")
    cmd = launch_command(int(argv[0]), int(argv[1]), argv[2:])
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
