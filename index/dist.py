"""Data parallelism for the index build: torch.distributed under torchrun, else one process."""

from __future__ import annotations

import os

import torch

from attribution.errors import ConfigError


def rank_device(device: torch.device | str, local_rank: int) -> torch.device:
    """This process's device: `cuda` without an index becomes `cuda:LOCAL_RANK` (torchrun starts
    one process per GPU of a node and numbers them 0, 1, … on each node); any other device, or a
    GPU named by its index, is kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


class Dist:
    """torch.distributed when launched by torchrun (gloo on CPU, NCCL on GPUs), else one process.
    `device`: this process's device, cuda:LOCAL_RANK for a plain `cuda` (`rank_device`)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = rank_device(device, self.local_rank)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda" and torch.cuda.is_available():
            if self.device.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK {self.local_rank} asks for {self.device}, but this node shows "
                    f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node"
                )
            torch.cuda.set_device(self.device)  # NCCL's collectives run on the current device
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(self.backend)

    @property
    def main(self) -> bool:
        """Rank 0, the process that writes the shared files."""
        return self.rank == 0

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over processes, on x's device (NCCL reduces on the GPU, so CPU sums
        such as the curvature's counts travel there and back)."""
        if self.world == 1:
            return x
        y = x.to(self.device, copy=True) if self.backend == "nccl" else x.clone()
        torch.distributed.all_reduce(y)
        return y.to(x.device)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
