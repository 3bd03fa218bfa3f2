"""Weak scaling of a distributed product: W ranks over W x the data against one process over 1x.

    nice python -m benchmarks.bench_distributed [--ranks 2] [--samples 256] [--repeats 15]

The 102k-parameter MLP (``mlp100k``: 784-128-10 tanh, cross-entropy, 256 samples a
shard). Rank 0's shard is the problem's data, rank ``r``'s is 256 more samples drawn with
seed ``1000 + r`` (with ``--samples n``, every shard is ``n`` such samples). Every rank
runs one thread (``torch.set_num_threads(1)``), gloo over the loopback interface.

Products are timed in blocks of ``--block`` back-to-back calls, as Lanczos makes them,
and each round runs every case once, side by side: rank 0 alone runs ``H1 @ v`` of the
one-process operator over its shard (the others wait in a barrier, so it has a core to
itself); all ranks at once run ``H1 @ v`` of their own one-process operators (the local
work of a distributed product without communication: what sharing the cores costs when
the machine has other load); all ranks run ``H @ v`` of the distributed operator over W
shards; all ranks run the ``all_reduce`` of a product's buffer alone. Medians over the
rounds of the time per call; the ratio is distributed / one process. Warm-up rounds first
(the operators cache their batch functions). On an otherwise idle machine the concurrent
local products take as long as the lone one; the load average is printed with the
results, and beside each wall time the CPU time of the process (all its threads, gloo's
included), which sharing the cores does not inflate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hessfunc as hf

from .problems import mlp_100k


def _loopback() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def _shard(rank: int, samples: int, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    prob = mlp_100k(dtype=dtype)
    if rank == 0 and samples == prob.x.shape[0]:
        return prob, prob.x, prob.y
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(samples, prob.x.shape[1], generator=g).to(dtype)
    y = torch.randint(0, 10, (samples,), generator=g)
    return prob, x, y


def _worker(rank: int, world: int, store: str, repeats: int, block: int, samples: int,
            dtype_name: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    dtype = getattr(torch, dtype_name)
    prob, x, y = _shard(rank, samples, dtype)
    f, params = hf.functionalize(prob.model, prob.loss_fn)
    one = hf.HessianOperator(f, params, (x, y))
    two = hf.HessianOperator(f, params, (x, y), process_group=dist.group.WORLD)
    P = one.shape[0]
    v = torch.randn(P, generator=torch.Generator().manual_seed(0)).to(dtype)
    buffer = torch.zeros(P + 9, dtype=dtype)
    cases = {"one": lambda: one @ v, "local": lambda: one @ v, "two": lambda: two @ v,
             "all_reduce": lambda: dist.all_reduce(buffer)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(repeats + 2):
        for key, fn in cases.items():
            dist.barrier()
            if key == "one" and rank != 0:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                fn()
            if i >= 2:
                times[key].append((time.perf_counter() - t0) / block)
                cpu[key].append((time.process_time() - c0) / block)
    torch.testing.assert_close(two @ v, two @ v)  # the same on repeat
    if rank == 0:
        result: dict[str, Any] = {k: statistics.median(t) for k, t in times.items()}
        result["cpu"] = {k: statistics.median(t) for k, t in cpu.items()}
        result.update(P=P, samples_per_rank=x.shape[0], ranks=world, dtype=dtype_name,
                      repeats=repeats, block=block,
                      method=one._cached[0][1].method if one._cached else "?")
        with open(out, "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


def run(ranks: int, repeats: int, block: int, samples: int, dtype: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(ranks, os.path.join(tmp, "store"), repeats, block, samples,
                                dtype, out), nprocs=ranks, join=True)
        with open(out) as fh:
            return json.load(fh)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="rounds (default 15)")
    parser.add_argument("--block", type=int, default=10,
                        help="back-to-back calls per timing (default 10)")
    parser.add_argument("--samples", type=int, default=256,
                        help="samples a rank (default 256: rank 0 holds the problem's data)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    res = run(args.ranks, args.repeats, args.block, args.samples, args.dtype)
    res["ratio"] = res["two"] / res["one"]
    res["load_average"] = os.getloadavg()
    W = res["ranks"]
    print(f"MLP 784-128-10 CE, P={res['P']:,}, {res['samples_per_rank']} samples a rank, "
          f"{res['dtype']}, 1 thread a rank, {res['repeats']} rounds of {res['block']} calls, "
          f"{res['method']} products; load average {res['load_average'][0]:.2f}")
    cpu = res["cpu"]
    rows = [("one process, 1x data, H1 @ v", "one"),
            (f"{W} ranks at once, each H1 @ v, no communication", "local"),
            (f"{W} ranks, {W}x data, H @ v (gloo)", "two"),
            ("all_reduce of the P+9 buffer alone", "all_reduce")]
    print(f"  {'':<48} {'wall':>8}  {'ratio':>6}  {'CPU':>8}  {'ratio':>6}")
    for name, key in rows:
        ratios = ("", "") if key == "all_reduce" else (
            f"x{res[key] / res['one']:.3f}", f"x{cpu[key] / cpu['one']:.3f}")
        print(f"  {name:<48} {res[key] * 1e3:6.2f}ms  {ratios[0]:>6}  "
              f"{cpu[key] * 1e3:6.2f}ms  {ratios[1]:>6}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
