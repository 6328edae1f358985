"""The kernels compile for real GPUs (sm_80, sm_90) with the tiles the dispatcher picks, and fit.

Compiled ahead of time through Triton's GPU pipeline and ptxas, no GPU needed: this catches
what the interpreter cannot (code the GPU compiler rejects, shared memory over the limit,
registers spilled to local memory, reported). Each case runs in a subprocess without
TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("energy_attn.kernels.hopfield_descent")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's CUDA backend")

CASES = {
    # arch, dtypes, head dims, flags. Tiles come from GPU measurements, not register counts, so
    # spills are reported (docs/kernels.md), not failed on; every kernel must compile and fit.
    "sm90-light-bf16": (["90"], ["bf16"], ["64", "128"], ["--light"]),
    "sm90-heavy": (["90"], ["bf16", "fp32"], ["64", "128"], []),
    "sm90-edge-dims": (["90"], ["fp16"], ["16", "256"], []),
    "sm80": (["80"], ["bf16"], ["64", "128"], ["--light"]),
    # the experimental one-kernel backward: TMA reduce-add on sm_90, reductions below it
    "sm90-fused-tma": (["90"], ["bf16"], ["64", "128"], ["--fused", "tma"]),
    "sm80-fused": (["80"], ["bf16"], ["64", "128"], ["--light", "--fused", "tma"]),
}


def compile_check(tmp_path, arch, dtypes, dims, extra):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile, never reuse a cached cubin
    cmd = [sys.executable, "-m", "energy_attn.kernels.compile_check", "--arch", *arch,
           "--dtype", *dtypes, "--head-dim", *dims, *extra, "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    return done, rows


def launches_per_class(dtype: str, head_dim: int, fused: bool = False) -> int:
    """Kernels compiled per (dtype, head dim): three streaming (two with the fused backward),
    the forward on the short-memory path where it holds keys, and the query kernel there too
    from its head dim on."""
    from energy_attn.kernels import hopfield_descent as kmod

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    streaming = 2 if fused else 3
    if not kmod.short_path_keys(head_dim, torch_dtype):
        return streaming
    return streaming + 1 + (block_d >= kmod.DQ_SHORT_MIN_HEAD_DIM)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_kernel_compiles_within_shared_memory(tmp_path, case):
    arch, dtypes, dims, extra = CASES[case]
    fused = "--fused" in extra
    done, rows = compile_check(tmp_path, arch, dtypes, dims, extra)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # forward, dq and dk streaming, and the launches that take the short-memory path, for every
    # dtype and head dim
    assert len(rows) == sum(launches_per_class(dt, int(D), fused) for dt in dtypes
                            for D in dims)
    for dt in dtypes:
        for D in dims:
            block_d = max(16, 1 << (int(D) - 1).bit_length())
            got = [r for r in rows if r["dtype"] == dt and r["BLOCK_D"] == block_d]
            assert len(got) == launches_per_class(dt, int(D), fused), (dt, D, got)
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= r["shared_limit"], r
        if r["kernel"] == "_bwd_dq_kernel":  # TMA from sm_90 on, relaxed reductions below
            assert r["fused"] == ((2 if arch == ["90"] else 1) if fused else 0), r


@pytest.mark.slow
def test_every_candidate_of_the_space_compiles_and_fits_sm90(tmp_path):
    """Every autotuning candidate of the measured classes (bf16, D = 64, 128, both tiers), and
    of the fused backward's space (TMA form)."""
    from energy_attn.kernels import hopfield_descent as kmod

    for extra in (["--light"], [], ["--fused", "tma"]):
        done, rows = compile_check(tmp_path, ["90"], ["bf16"], ["64", "128"],
                                   ["--space", *extra])
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        fused = "--fused" in extra
        assert sum(r["default"] for r in rows) == sum(launches_per_class("bf16", D, fused)
                                                      for D in (64, 128))
        assert len(rows) > 10 and all(r["shared_bytes"] <= r["shared_limit"] for r in rows)
        heavy = extra != ["--light"]
        for D in (64, 128):  # every streaming candidate of each kernel was compiled
            for kern in (("fwd", "dqk") if fused else ("fwd", "dq", "dk")):
                jit = kmod._KERNELS["dq" if kern == "dqk" else kern]
                tiles = {(r["BLOCK_N"], r["BLOCK_M"], r["num_warps"], r["num_stages"])
                         for r in rows if r["kernel"] == jit.__name__ and r["BLOCK_D"] == D
                         and not r["short"]}
                assert set(kmod._SPACE[kern, 2, heavy, D]) <= tiles, (kern, D, heavy)


@pytest.mark.slow
def test_compile_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "energy_attn.kernels.compile_check"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr


def test_plans_are_what_the_launch_runs():
    """The planned forward launch carries the runtime arguments and flags the call implies."""
    from energy_attn.kernels import hopfield_descent as kmod

    q = torch.empty(2, 4, 100, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 2, 300, 64, device="meta", dtype=torch.bfloat16)
    launch, (out, *_) = kmod.plan_forward(q, k, None, None, 0.125, 0.9, 0.5, 3, False,
                                          "momentum", False, True)
    assert launch.kernel is kmod._fwd_kernel and out.shape == q.shape
    assert launch.meta["T"] == 3 and launch.meta["VELOCITY"] and not launch.meta["NESTEROV"]
    assert not launch.meta["UPCAST"]  # meta tensors plan for a GPU, never for the interpreter
    assert set(launch.args) | set(launch.meta) >= set(kmod._fwd_kernel.arg_names)
    assert launch.grid(launch.meta) == (-(-100 // launch.meta["BLOCK_N"]), 8, 1)
