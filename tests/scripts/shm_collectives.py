"""Run under 2 ranks: DeepSpeed's collectives with gpt_recipes.shm_comm on give gloo's results.

Each case runs the same collective twice, through deepspeed.comm (which the shared-memory
route serves) and through torch.distributed (gloo), and requires equal results; it also
records whether gloo was called, so a case that should leave gloo alone must do so.
"""

import sys

import torch
import torch.distributed as dist
from deepspeed import comm

from gpt_recipes.parallel import distributed

calls = {"gloo": 0}
_gloo_all_reduce, _gloo_all_gather = dist.all_reduce, dist.all_gather_into_tensor
_gloo_reduce_scatter = dist.reduce_scatter_tensor


def _counted(fn):
    def wrapper(*args, **kwargs):
        calls["gloo"] += 1
        return fn(*args, **kwargs)
    return wrapper


def values(numel: int, dtype: torch.dtype, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(numel, generator=gen).to(dtype)


def check(name: str, expect_gloo: bool, run_ds, run_gloo) -> None:
    before = calls["gloo"]
    got = run_ds()
    used_gloo = calls["gloo"] > before
    want = run_gloo()
    if not torch.equal(got, want):
        sys.exit(f"{name}: shared-memory result differs from gloo's by {(got.float() - want.float()).abs().max()}")
    if used_gloo != expect_gloo:
        sys.exit(f"{name}: expected {'gloo' if expect_gloo else 'the shared-memory route'}, got the other")
    print(f"ok {name}")


def main() -> None:
    env = distributed.environment()
    why_not = distributed.init(env, shm_comm=True)
    if why_not is not None:
        sys.exit(f"shared-memory route not enabled: {why_not}")
    dist.all_reduce = _counted(_gloo_all_reduce)
    comm.comm.cdb.all_gather_function = _counted(_gloo_all_gather)  # DeepSpeed's backend keeps its own reference
    comm.comm.cdb.reduce_scatter_function = _counted(_gloo_reduce_scatter)
    rank, world = env.rank, env.world_size

    def all_reduce(numel, dtype, op=comm.ReduceOp.SUM, group=None):
        def ds():
            t = values(numel, dtype, rank)
            comm.all_reduce(t, op=op, group=group)
            return t
        def gloo():
            t = values(numel, dtype, rank)
            _gloo_all_reduce(t, op=comm.comm.cdb._reduce_op(op))
            return t
        return ds, gloo

    # Sizes: one element, a ragged size, and 9M fp32 (past the kernel's 32 MiB chunk).
    for numel in (1, 12345, 9_000_001):
        check(f"all_reduce fp32 x{numel}", False, *all_reduce(numel, torch.float32))
    check("all_reduce bf16", False, *all_reduce(300_001, torch.bfloat16))
    group = dist.new_group(list(range(world)))  # every rank, as AutoEP's replicated weights' ZeRO-3 group
    check("all_reduce over another group of every rank goes to gloo", True,
          *all_reduce(4097, torch.float32, group=group))
    check("all_reduce MAX falls back", True, *all_reduce(4097, torch.float32, op=comm.ReduceOp.MAX))
    check("all_reduce float64 falls back", True, *all_reduce(4097, torch.float64))

    shard = 7_000_003
    def gather(in_place: bool):
        def ds():
            out = torch.full((world * shard,), float("nan"))
            mine = out.narrow(0, rank * shard, shard)
            mine.copy_(values(shard, torch.float32, rank))
            comm.all_gather_into_tensor(out, mine if in_place else mine.clone())
            return out
        def gloo():
            out = torch.empty(world * shard)
            _gloo_all_gather(out, values(shard, torch.float32, rank))
            return out
        return ds, gloo
    check("all_gather_into_tensor", False, *gather(in_place=False))
    check("all_gather_into_tensor, shard inside the output (ZeRO's layout)", False, *gather(in_place=True))

    def zero3_gather():  # ZeRO-3's parameter gather: asynchronous, waited on later
        out = torch.empty(world * shard)
        handle = comm.allgather_fn(out, values(shard, torch.float32, rank), async_op=True)
        handle.wait()
        return out
    check("all_gather asynchronous (ZeRO-3's call)", False, zero3_gather, gather(in_place=False)[1])

    def two_groups():
        # ZeRO-3 gathers a module's weights group by group in an order that can differ between ranks (it
        # follows a set of parameters); only the order within each group is the same on every rank.
        sizes = {"world": 1001, "other": 7}
        order = ["world", "other"] if rank == 0 else ["other", "world"]
        outs = {name: torch.empty(world * n) for name, n in sizes.items()}
        handles = [comm.all_gather_into_tensor(outs[name], values(sizes[name], torch.float32, rank),
                                               group=comm.get_world_group() if name == "world" else group,
                                               async_op=True) for name in order]
        for handle in handles:
            handle.wait()
        return torch.cat([outs["world"], outs["other"]])
    def two_groups_gloo():
        outs = []
        for n in (1001, 7):
            outs.append(torch.empty(world * n))
            _gloo_all_gather(outs[-1], values(n, torch.float32, rank))
        return torch.cat(outs)
    check("all_gathers of two groups of every rank, in another order on each rank", True, two_groups, two_groups_gloo)

    part = 3_000_001
    def scatter(output_in_input: bool, dtype=torch.float32):
        def ds():
            full = values(world * part, dtype, rank)
            out = full.narrow(0, rank * part, part) if output_in_input else torch.empty(part, dtype=dtype)
            comm.reduce_scatter_fn(out, full)
            return out.clone()
        def gloo():
            out = torch.empty(part, dtype=dtype)
            _gloo_reduce_scatter(out, values(world * part, dtype, rank))
            return out
        return ds, gloo
    check("reduce_scatter_tensor", False, *scatter(output_in_input=False))
    check("reduce_scatter_tensor, output inside the input (ZeRO's layout)", False, *scatter(output_in_input=True))


if __name__ == "__main__":
    main()
