"""Data-parallel collectives through shared memory, for CPU ranks that share one machine.

On the CPU accelerator DeepSpeed sends every collective through gloo. It also builds a
shared-memory all-reduce kernel (`torch.ops.deepspeed.inference_all_reduce_`, written for
inference tensor parallelism) that its training engine never calls. For gpt2-micro's 14M fp32
gradients on 2 ranks here, gloo's all-reduce took 45 ms and the kernel 18 ms.

`enable` routes SUM all-reduces, all-gathers and reduce-scatters of one group of every rank
through that kernel, the same way DeepSpeed's own backend routes world all-gathers to a faster
transport where one exists: the world group until the engine starts, then the group that
carries most of the engine's traffic (`carry_engine_group`). Anything else (other groups, other ops,
dtypes the kernel lacks) still goes to gloo, so the engine needs no other change.

One group, because the kernel is one channel whose n-th call on each rank meets the n-th call on
every other. DeepSpeed keeps each group's collectives in one order on every rank, but not the
order between groups: with AutoEP at ZeRO-3, a layer's router weights are partitioned over
DeepSpeed's copy of the world group while the rest are partitioned over the world group itself,
and a module's weights are gathered group by group in an order that follows a set of parameters,
so it differs between ranks from one run to the next. Served by one kernel, the two gathers met
crossed and returned other weights (in 13 of 56 runs here, the first step's loss was 0.006-0.015
off); gloo gives each group its own channel.

ZeRO-3 asks for its parameter all-gathers asynchronously, to overlap them with compute.
The kernel runs them at once instead and hands back a finished handle: on a CPU, gloo's
"asynchronous" work runs on the same cores as the compute it would overlap.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# The kernel's fp32 reduction needs AVX2, its bf16/fp16 ones AVX-512BW (DeepSpeed's levels 1 and 2).
_KERNEL_LEVEL = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}

_route: "_SharedMemoryCollectives | None" = None  # once enabled


def unavailable(device_type: str, world_size: int, local_world_size: int) -> str | None:
    """Why the shared-memory route cannot serve this run, or None if it can (before init)."""
    if device_type != "cpu":
        return f"{device_type} ranks communicate through their own library"
    if world_size == 1:
        return "one rank: nothing to reduce"
    if local_world_size != world_size:
        return "ranks span more than one machine"
    return None


def prepare(world_size: int) -> None:
    """Call before `deepspeed.init_distributed`: the kernel maps its buffers only when LOCAL_SIZE
    (which the deepspeed launcher exports and torchrun does not) says every rank is local."""
    os.environ.setdefault("LOCAL_SIZE", str(world_size))


def enable() -> str | None:
    """Route the world group's all-reduces, all-gathers and reduce-scatters through shared memory
    (until `carry_engine_group` names another group); None if done, else why not."""
    from deepspeed import comm

    global _route
    backend = comm.comm.cdb
    level = getattr(backend, "shm_vector_kernel_level", 0)
    if getattr(backend, "shm_comm_op", None) is None or not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        return "DeepSpeed's shared-memory op did not build"
    if level < 1:
        return "this CPU lacks AVX2, which the shared-memory kernel needs"
    if int(os.environ.get("LOCAL_SIZE", "0")) != dist.get_world_size():
        return "LOCAL_SIZE does not cover every rank"
    _route = _SharedMemoryCollectives(backend, level)
    backend.all_reduce = _route.all_reduce
    backend.all_gather_into_tensor = _route.all_gather_into_tensor
    backend.reduce_scatter_tensor = _route.reduce_scatter_tensor
    return None


def carry_engine_group(engine) -> None:
    """From now on the kernel serves alone the group that carries most of a DeepSpeed engine's
    collectives: at ZeRO-3, the one most of the weights are partitioned over (their gathers, their
    gradients' reduce-scatters); at ZeRO-0/1/2, the one its gradients are reduced over. Every rank
    calls this at the same point; a group without every rank (the kernel sums over all) changes nothing."""
    numel: dict[int, list] = {}
    for param in engine.module.parameters():
        group = getattr(param, "ds_process_group", None)
        if group is not None:
            numel.setdefault(id(group), [group, 0])[1] += param.ds_numel
    group = max(numel.values(), key=lambda entry: entry[1])[0] if numel else engine.seq_data_parallel_group
    if _route is not None and group is not None and dist.get_world_size(group) == dist.get_world_size():
        _route.group = group


class _SharedMemoryCollectives:
    """The backend's collectives, served by the shared-memory kernel where it can (CPU tensors of the
    group it carries, of a dtype the kernel sums), else by gloo as before."""

    def __init__(self, backend, level: int):
        self.level, self.group = level, dist.GroupMember.WORLD
        self.gloo_all_reduce = backend.all_reduce
        self.gloo_all_gather = backend.all_gather_into_tensor
        self.gloo_reduce_scatter = backend.reduce_scatter_tensor

    def served(self, tensor: torch.Tensor, group) -> bool:
        # One group only, not any group of every rank (see the module's docstring); None is the world.
        return (tensor.device.type == "cpu" and tensor.is_contiguous()
                and _KERNEL_LEVEL.get(tensor.dtype, 99) <= self.level
                and (group if group is not None else dist.GroupMember.WORLD) is self.group)

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        # DeepSpeed passes its own ReduceOp or torch's; the kernel only sums.
        if getattr(op, "name", None) == "SUM" and self.served(tensor, group):
            torch.ops.deepspeed.inference_all_reduce_(tensor)
            return _Finished() if async_op else None
        return self.gloo_all_reduce(tensor, op, group, async_op)

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        # Each rank places its shard among zeros and the ranks sum: exact, since x + 0 == x.
        # ZeRO's shard is often a view into the output itself, so only the rest is zeroed.
        if self.served(output_tensor, group) and input_tensor.dtype == output_tensor.dtype:
            flat, shard = output_tensor.view(-1), input_tensor.numel()
            start = dist.get_rank(group) * shard
            flat[:start].zero_()
            flat[start + shard:].zero_()
            flat.narrow(0, start, shard).copy_(input_tensor.view(-1))
            torch.ops.deepspeed.inference_all_reduce_(output_tensor)
            return _Finished() if async_op else None
        return self.gloo_all_gather(output_tensor=output_tensor, input_tensor=input_tensor, group=group,
                                    async_op=async_op)

    def reduce_scatter_tensor(self, output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        # The ranks sum the whole input and each keeps its part. The input then holds the sums,
        # where gloo leaves it as it was: ZeRO reduces temporary buckets and never reads them again.
        if (getattr(op, "name", None) == "SUM" and self.served(input_tensor, group)
                and output_tensor.dtype == input_tensor.dtype):
            torch.ops.deepspeed.inference_all_reduce_(input_tensor)
            part = output_tensor.numel()
            mine = input_tensor.view(-1).narrow(0, dist.get_rank(group) * part, part)
            if mine.data_ptr() != output_tensor.data_ptr():
                output_tensor.view(-1).copy_(mine)
            return _Finished() if async_op else None
        return self.gloo_reduce_scatter(output_tensor=output_tensor, input_tensor=input_tensor, op=op, group=group,
                                        async_op=async_op)


class _Finished:
    """The handle of a collective that already ran: what callers of an async collective wait on."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True
