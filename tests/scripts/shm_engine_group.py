"""Run under 2 ranks: once a DeepSpeed engine has started and its group is carried
(shm_comm.carry_engine_group(engine)), every fp32 sum the engine's steps ask for goes
through the shared-memory kernel, at ZeRO-1, 2 and 3 (whose groups differ: DeepSpeed's copy of
the world group, and the world group itself for weights partitioned at ZeRO-3)."""

import sys

import deepspeed
import torch

from gpt_recipes.parallel import distributed, shm_comm


def main() -> None:
    env = distributed.environment()
    why_not = distributed.init(env, shm_comm=True)
    if why_not is not None:
        sys.exit(f"shared-memory route not enabled: {why_not}")
    route = shm_comm._route
    asked = []  # for each fp32 collective the kernel could sum: whether it did
    served = route.served

    def watching(tensor, group):
        answer = served(tensor, group)
        if tensor.dtype == torch.float32:
            asked.append(answer)
        return answer

    route.served = watching
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
               "zero_optimization": {"stage": stage}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          config=cfg)
        shm_comm.carry_engine_group(engine)
        asked.clear()
        for _ in range(2):
            loss = engine(torch.randn(2, 64)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        through_kernel = sum(asked)
        if through_kernel == 0 or through_kernel != len(asked):
            sys.exit(f"ZeRO-{stage}: {through_kernel} of {len(asked)} fp32 sums went through the kernel")
        print(f"ok ZeRO-{stage}: {through_kernel} fp32 sums, all through the kernel")


if __name__ == "__main__":
    main()
