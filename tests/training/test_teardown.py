"""Distributed teardown: every rank leaves the process group together (barrier, then destroy)."""

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
