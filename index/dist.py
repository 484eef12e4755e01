"""Data parallelism for the index build: torch.distributed under torchrun, else one process."""

from __future__ import annotations

import os

import torch


class Dist:
    """torch.distributed when launched by torchrun (gloo on CPU, NCCL on GPUs), else one process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
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
