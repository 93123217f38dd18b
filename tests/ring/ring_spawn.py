"""Shared by the ring tests: spawn one process per rank, run a list of cases in each, collect.

spawn(fn, world, args, tmp_path, name) runs fn(rank, world, port, *args, out) in `world` spawned
processes and returns each rank's JSON report (written to <out>.<rank>.json).
run_cases(rank, cases, check, case_id, out) is the body of a worker: check(case) -> (error or
None, detail) for each case, exceptions reported as tracebacks, then the report is written and
the group torn down.
"""
import json
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, args, tmp_path, name):
    out = str(tmp_path / name)
    mp.spawn(fn, args=(world, free_port(), *args, out), nprocs=world, join=True)
    return [json.loads(open(f"{out}.{r}.json").read()) for r in range(world)]


def run_cases(rank, cases, check, case_id, out):
    results = {}
    for c in cases:
        try:
            err, detail = check(c)
            results[case_id(c)] = {"error": err, "detail": detail}
        except Exception:
            results[case_id(c)] = {"error": traceback.format_exc(), "detail": None}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
