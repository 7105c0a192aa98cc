"""The work of the mini slurm workflow: square a shard number, or sum the squares. Writes JSON atomically."""

import argparse
import json
import os
import socket
from pathlib import Path


def slurm_context() -> dict:
    """The Slurm job this process runs in (empty values outside Slurm)."""
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_mem_per_node": os.environ.get("SLURM_MEM_PER_NODE", ""),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "host": socket.gethostname(),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["square", "gather"])
    parser.add_argument("--shard", type=int)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-mem-mb", type=int, default=0, help="fail unless the Slurm job has this much")
    parser.add_argument("--inputs", nargs="*", type=Path, default=[])
    args = parser.parse_args(argv)
    granted = int(os.environ.get("SLURM_MEM_PER_NODE", "0"))
    if granted < args.min_mem_mb:
        raise SystemExit(f"job.py: needs {args.min_mem_mb} MB, the Slurm job has {granted} MB")
    if args.mode == "square":
        payload = {"shard": args.shard, "value": args.shard**2}
    else:
        parts = [json.loads(p.read_text()) for p in args.inputs]
        payload = {"shards": [p["shard"] for p in parts], "total": sum(p["value"] for p in parts)}
    write_json(args.out, {**payload, **slurm_context()})


if __name__ == "__main__":
    main()
