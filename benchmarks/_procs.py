"""Start worker processes together and collect one result from each, reaping every one."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any


def run_together(
    target: Callable[..., None], per_process: Sequence[tuple[Any, ...]], *, timeout: float
) -> list[Any]:
    """Spawn one process per argument tuple, each called as ``target(*args, barrier, results)``.

    Workers wait at ``barrier`` (all of them) before their measured part and put exactly one
    result on ``results``. Every process is joined (killed after a grace period if need be);
    a non-zero exit code raises.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(per_process))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(*args, barrier, results), daemon=True)
        for args in per_process
    ]
    for p in procs:
        p.start()
    collected: list[Any] = []
    try:
        for _ in procs:
            collected.append(results.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker processes of {target.__qualname__} exited with {failed}")
    return collected
