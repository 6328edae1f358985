"""Data-parallel training with energy attention needs nothing special: DDP and FSDP2 on CPU.

Two processes (gloo, 127.0.0.1) each train on half of a batch; the parameters afterwards equal
those of one process trained on the whole batch (the mean loss of two equal halves averages to
the whole batch's mean loss, and DDP/FSDP average gradients).
"""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from energy_attn.integrations import swap_attention
from energy_attn.training.loop import join_process_group, leave_process_group

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, BATCH, STEPS, DTYPE = 2, 8, 3, torch.float64
MODES = ("ddp", "fsdp2")


def make_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 8),
                          nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(8, 1))
    return swap_attention(model, num_steps=3, step_size=0.5, optimizer="nesterov",
                          momentum=0.5).to(DTYPE)


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 5, 4, generator=g, dtype=DTYPE),
            torch.randn(BATCH, 5, 1, generator=g, dtype=DTYPE))


def train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _train_parallel(rank, mode):
    """This rank's share of data-parallel training; returns the full parameters."""
    model = make_model()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:  # FSDP2: shard each encoder layer, then the root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model[1].layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    x, y = data()
    half = BATCH // WORLD
    train(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    params = {n.removeprefix("module."): p.detach() for n, p in model.named_parameters()}
    if mode == "fsdp2":  # DTensor shards -> full tensors (a collective: every rank calls it)
        params = {n: p.full_tensor() for n, p in params.items()}
    return params


def _worker(rank, port, out_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    join_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                       world_size=WORLD)
    try:  # one process group for both modes: spawning costs more than training here
        results = {mode: _train_parallel(rank, mode) for mode in MODES}
        if rank == 0:
            torch.save(results, out_path)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every rank leaves together (barrier, then destroy): see leave_process_group.
    leave_process_group()
    # DDP alone leaves no gloo thread behind (tests/training/test_teardown.py). FSDP2 does:
    # DTensor's module-level caches (sharding propagation in Python and C++, tensor metadata,
    # redistribute transforms and planners, MeshTopoInfo.build_from_mesh) keep the DeviceMesh,
    # hence the ProcessGroup and its gloo threads, alive until interpreter teardown, where a
    # thread still running can abort the process; PyTorch 2.13 has no public call that empties
    # them (measured: only clearing all six private caches frees the group). The group is
    # destroyed and the results are on disk, so end here, without interpreter teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    out_path = tmp_path / "params.pt"
    mp.spawn(_worker, args=(_free_port(), str(out_path)), nprocs=WORLD, join=True)
    results = torch.load(out_path, weights_only=True)
    single = dict(train(make_model(), *data()).named_parameters())
    start = dict(make_model().named_parameters())
    eps = torch.finfo(DTYPE).eps
    for mode in MODES:
        parallel = results[mode]
        assert parallel.keys() == single.keys()
        for name, p in single.items():
            torch.testing.assert_close(parallel[name], p.detach(), atol=1e3 * eps,
                                       rtol=1e3 * eps, msg=f"{mode}: {name}")
    assert all(not torch.equal(p, start[n]) for n, p in single.items())  # everything trained
