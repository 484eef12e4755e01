"""Under torchrun each rank of a multi-GPU node uses its own GPU, cuda:LOCAL_RANK (issue 19);
the device choice is checked here without a GPU (no CUDA call is made for it)."""

from __future__ import annotations

import pytest
import torch

from index.dist import Dist, rank_device


def test_plain_cuda_becomes_the_local_rank_gpu():
    assert rank_device("cuda", 0) == torch.device("cuda", 0)
    assert rank_device(torch.device("cuda"), 3) == torch.device("cuda", 3)


def test_other_devices_are_kept():
    assert rank_device("cpu", 3) == torch.device("cpu")
    assert rank_device("cuda:1", 3) == torch.device("cuda", 1)  # named by the user: kept


@pytest.mark.parametrize("local_rank", ["0", "5"])
def test_dist_reads_local_rank(monkeypatch, local_rank):
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no process group is started
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no set_device on this machine
    d = Dist(torch.device("cuda"))
    assert d.device == torch.device("cuda", int(local_rank)) and d.backend == "nccl"
    assert Dist(torch.device("cpu")).device == torch.device("cpu")


def test_without_local_rank_a_single_process_uses_gpu_0(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Dist(torch.device("cuda")).device == torch.device("cuda", 0)


def test_more_ranks_than_gpus_is_a_plain_error(monkeypatch):
    from attribution.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK 3 asks for cuda:3, but this node shows 2 GPU"):
        Dist(torch.device("cuda"))
