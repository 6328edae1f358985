"""Distributed teardown: every rank leaves the process group together (barrier, then destroy),
and no gloo thread outlives it (one alive at interpreter exit aborts the process)."""

import os
import socket

import pytest
import torch.distributed as dist

from energy_attn.training import loop

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def test_leave_process_group_waits_for_every_rank_then_destroys(monkeypatch):
    calls = []
    monkeypatch.setattr(loop.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(loop.dist, "destroy_process_group", lambda: calls.append("destroy"))
    loop.leave_process_group()
    assert calls == ["barrier", "destroy"]


def test_leave_process_group_destroys_even_when_the_barrier_fails(monkeypatch):
    calls = []

    def broken_barrier():
        raise RuntimeError("peer gone")

    monkeypatch.setattr(loop.dist, "barrier", broken_barrier)
    monkeypatch.setattr(loop.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with pytest.raises(RuntimeError, match="peer gone"):
        loop.leave_process_group()
    assert calls == ["destroy"]


def test_leave_process_group_on_a_real_gloo_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(os.environ, "GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    loop.leave_process_group()
    assert not dist.is_initialized()


# Threads a gloo process group starts: the TCPStore server (rank 0), gloo's I/O loop and the
# ProcessGroupGloo workers. Alive at interpreter exit, they abort the process (std::terminate).
GLOO_THREADS = frozenset({"pt_tcpstore_uv", "gloo_tcp_loop", "pt_gloo_runloop"})


def _thread_names():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while we listed
            pass
    return names


def _ddp_step():
    import torch
    from torch import nn

    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()


def _ddp_worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    loop.join_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    during = _thread_names()
    _ddp_step()  # as in train(): the model and optimizer are gone when the group is left
    loop.leave_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(" ".join(during) + "\n" + " ".join(_thread_names()) + "\n")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                    reason="thread names are read from /proc/self/task (Linux only)")
def test_ddp_leaves_no_gloo_thread_alive_after_leave_process_group(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        during, after = ((tmp_path / f"rank{rank}.txt").read_text().split("\n")[:2])
        assert GLOO_THREADS & set(during.split()), f"rank {rank}: no gloo thread to watch"
        assert not GLOO_THREADS & set(after.split()), f"rank {rank}: alive after teardown: {after}"
