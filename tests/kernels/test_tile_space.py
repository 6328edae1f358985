"""The autotuning space: every tile configuration in it computes the right thing.

Tile-size bugs must not wait for a GPU: each distinct ``(BLOCK_N, BLOCK_M)`` of the space (and
the asymmetric 16×64 / 64×16) runs forward and backward under the interpreter, forced on
every kernel, at sizes that cross its tiles, with causal + padding masks, a key bias and
grouped heads, against the reference. ``num_warps``/``num_stages`` do not change what a
program computes (the interpreter ignores them); that every full configuration compiles for
sm_90 and fits its shared memory is checked by test_compile_check.py.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import key_path_knobs
from energy_attn.kernels import hopfield_descent as kmod
from test_hopfield_descent_kernel import compare

ROOT = Path(__file__).resolve().parents[2]
KERNELS = sorted({key[0] for key in kmod._SPACE})
PAIRS = sorted({c[:2] for space in kmod._SPACE.values() for c in space} | {(16, 64), (64, 16)})


def _force(monkeypatch, bn, bm):
    monkeypatch.setattr(kmod, "FORCE_TILES", {k: (bn, bm, 4, 1) for k in KERNELS})


@pytest.mark.parametrize("bn,bm", PAIRS, ids=[f"{n}x{m}" for n, m in PAIRS])
def test_every_tile_of_the_space_streaming(bn, bm, monkeypatch):
    _force(monkeypatch, bn, bm)
    monkeypatch.setattr(kmod, "SHORT_MAX_KEYS", 0)
    # N = M = 2·max tile + 3: every kernel sees full, partial and (causal) skipped tiles.
    n = 2 * max(bn, bm) + 3
    compare(torch.float32, B=2, H=2, Hk=1, N=n, M=n, D=16, mask_kind="causal+padding",
            optimizer="nesterov", num_steps=2)


@pytest.mark.parametrize("bn", sorted({n for n, _ in PAIRS}))
def test_every_query_tile_on_the_short_path(bn, monkeypatch):
    _force(monkeypatch, bn, 32)
    for name, value in key_path_knobs(short=True).items():
        monkeypatch.setattr(kmod, name, value)
    compare(torch.float32, B=2, H=4, Hk=2, N=2 * bn + 3, M=45, D=16, mask_kind="padding",
            optimizer="momentum", num_steps=2)


def test_space_contains_every_measured_winner_first():
    """The bold (winning) tiles of the H200 measurement are in the space, and lead it."""
    text = (ROOT / "benchmarks" / "results" / "gpu-H200-2026-11-29.md").read_text()
    bold = {tuple(int(x) for x in m.split(","))
            for m in re.findall(r"\*\*\((\d+,\d+,\d+,\d+)\)", text)}
    bold |= {tuple(int(x) for x in m.split(","))
             for m in re.findall(r"\*\*\((\d+,\d+,\d+,\d+)\)\*\*", text)}
    in_space = {c for space in kmod._SPACE.values() for c in space}
    assert bold and bold <= in_space, bold - in_space
    defaults = {space[0] for key, space in kmod._SPACE.items() if key[1] == 2
                and key[3] in (64, 128) and key[0] != "dqk"}
    assert defaults <= bold


def test_fused_backward_space_leads_with_its_swept_winners():
    """The experimental one-kernel backward's space ("dqk") leads with the tiles that won the
    sweep of its atomic predecessor (h200-f7d6df6), then holds the query kernel's defaults."""
    text = (ROOT / "benchmarks" / "results" / "h200-f7d6df6" / "kernel-tiles-nvidia-h200.md"
            ).read_text()
    won = {int(d): tuple(int(x) for x in t.split(", ")) for d, t in
           re.findall(r"\| bwd \| gd \| (\d+) \| 8192 \| 8192 \| 4 \| \((\d+, \d+, \d+, \d+)\)",
                      text)}
    assert set(won) == {64, 128}
    for (kern, itemsize, heavy, d), space in kmod._SPACE.items():
        if kern == "dqk":
            assert itemsize == 2 and space[0] == won[d], (heavy, d)
            assert kmod._SPACE["dq", 2, heavy, d][0] in space


def test_candidates_are_few_and_short_path_holds_every_key(monkeypatch):
    monkeypatch.setattr(kmod, "FORCE_TILES", None)
    for key, space in kmod._SPACE.items():
        assert 1 <= len(space) <= 4, key  # bounded first-call autotuning cost
        assert len(set(space)) == len(space), key
    fwd = kmod.candidates("fwd", 2, False, 64, short=True, block_m_all=256)
    assert fwd[0] == (32, 256, 8, 3)  # the measured short-path tile (128x64 logits budget)
    assert all(bm == 256 and bn * bm <= 128 * 128 for bn, bm, _, _ in fwd)


def test_default_launch_is_the_first_candidate(monkeypatch):
    monkeypatch.setattr(kmod, "FORCE_TILES", None)
    q = torch.empty(1, 4, 8192, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 4, 8192, 128, device="meta", dtype=torch.bfloat16)
    launch, _ = kmod.plan_forward(q, k, None, None, 0.1, 0.8, 0.0, 4, False, "gd", False, True)
    assert launch.candidates[0] == (128, 64, 8, 3)  # measured: 8.9 ms, the winner
    assert tuple(launch.meta[k] for k in kmod.TILE_KEYS) == launch.candidates[0]
    assert launch.args["NB"] == launch.args["MB"] == 16384


def test_prune_drops_candidates_over_shared_memory(monkeypatch):
    """Autotuning's early prune: this call's candidates, minus those whose compiled program
    needs more shared memory than the device has (no GPU here: compile and device faked)."""
    from types import SimpleNamespace

    monkeypatch.setattr(kmod, "FORCE_TILES", None)
    compiled = []

    class FakeJit:
        @staticmethod
        def warmup(grid, **kw):
            compiled.append((kw["BLOCK_N"], kw["BLOCK_M"], kw["num_warps"], kw["num_stages"]))
            assert kw["enable_fp_fusion"] is True  # the candidates compile as they will run
            return SimpleNamespace(metadata=SimpleNamespace(shared=kw["BLOCK_M"] * 1024))

    monkeypatch.setitem(kmod._KERNELS, "fwd", FakeJit)
    monkeypatch.setattr(kmod, "_shared_memory_limit", lambda device: 100 * 1024)
    q = torch.empty(1, 1, 8192, 128, dtype=torch.bfloat16)
    kept = kmod._prune("fwd")([], {}, Q=q, VELOCITY=False, ENERGIES=False, BLOCK_D=128,
                              SHORT=False, MB=16384)
    space = kmod._SPACE["fwd", 2, False, 128]
    assert compiled == list(space)  # every candidate compiled once, in order
    kept = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in kept]
    assert kept == [c for c in space if c[1] <= 100]  # the 128-key tile needs 128 KiB: dropped
    assert (128, 128, 8, 2) in space and (128, 128, 8, 2) not in kept


@pytest.mark.parametrize("tuned", [False, True])
def test_every_launch_pins_fp_fusion(monkeypatch, tuned):
    """The kernels were timed with FP fusion on; Triton 3.10 turns its default off, so every
    launch (direct or through the autotuner) passes ``enable_fp_fusion=True``, as does
    ``compile_check``."""
    monkeypatch.setattr(kmod, "FORCE_TILES", None)
    seen = {}

    class Spy:
        def __getitem__(self, grid):
            return lambda **kw: seen.update(kw)

    q = torch.empty(1, 2, 256, 64, dtype=torch.bfloat16)
    launch, _ = kmod.plan_forward(q, q, None, None, 0.1, 0.8, 0.0, 2, False, "gd", False, False)
    assert len(launch.candidates) > 1
    if tuned:  # as on a GPU: through the kernel's autotuner
        monkeypatch.setitem(kmod._TUNERS, launch.kernel, Spy())
        monkeypatch.setattr(kmod, "_on_gpu", lambda args: True)
    else:
        launch = launch._replace(kernel=Spy())
    launch()
    assert seen["enable_fp_fusion"] is True
    assert ("BLOCK_N" in seen) is not tuned  # the autotuner picks the tiles itself
    assert kmod.COMPILE_OPTIONS == {"enable_fp_fusion": True}
    src = (Path(kmod.__file__).parent / "compile_check.py").read_text()
    assert "**hd.COMPILE_OPTIONS" in src


def test_autotuners_key_and_reset():
    """Keyed on head dim, key path, tier flags and length buckets (dtypes are always in
    Triton's key); only the query kernel's fused form accumulates into its outputs (DK, DBIAS,
    empty otherwise), so only those are zeroed between timed runs."""
    fwd, dq, dk = (kmod._TUNERS[k] for k in (kmod._fwd_kernel, kmod._bwd_dq_kernel,
                                              kmod._bwd_dk_kernel))
    for tuner in (fwd, dq, dk):
        assert {"BLOCK_D", "VELOCITY", "NESTEROV", "NB", "MB"} <= set(tuner.keys)
        assert len(tuner.configs) > 1
    assert not fwd.reset_to_zero and not dk.reset_to_zero
    assert dq.reset_to_zero == ["DK", "DBIAS"] and "FUSED" in dq.keys
    dq_tiles = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages)
                for c in dq.configs}
    assert {c for key, v in kmod._SPACE.items() if key[0] in ("dq", "dqk") for c in v} <= dq_tiles
    assert "SHORT" in fwd.keys and "SHORT" in dq.keys  # the dK kernel always streams
    assert "ENERGIES" in fwd.keys and "EGRAD" in dq.keys and "EGRAD" in dk.keys
