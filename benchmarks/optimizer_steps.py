"""Steps to a gradient tolerance for each descent optimizer on the Hopfield energy.

    python benchmarks/optimizer_steps.py [--out PATH]
    python benchmarks/optimizer_steps.py --quick    # β = η = 1 only, a smoke run

Random data (float64): queries ``2·N(0, 1)``, keys ``N(0, 1)``, B=4, N=M=64, D=16. For each
inverse temperature β, step size η and optimizer (ρ for momentum/Nesterov), the number of steps
until ``‖∇E(ξ_t)‖ < 1e-6`` per query (T+1 = not within T=100), summarised by the median over
queries and the count that never got there. Prints a table and writes
``benchmarks/results/optimizer_steps.json``. Counts steps, not time: the machine does not matter.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from _machine import cpu_script_args, positive_float, write_results  # this folder is on sys.path

from energy_attn import hopfield_energy, minimize_energy
from energy_attn.energies.hopfield import hopfield_energy_grad

OPTS = [("gd", 0.0), ("momentum", 0.3), ("momentum", 0.6), ("nesterov", 0.3), ("nesterov", 0.6),
        ("newton_2nd1st", 0.0), ("newton_light", 0.0)]


def steps(q, k, beta, eta, optimizer, rho, tol=1e-6, T=100):
    traj = minimize_energy(functools.partial(hopfield_energy, scale=beta), q, k, step_size=eta,
                           num_steps=T, optimizer=optimizer, momentum=rho, return_trajs=True)
    g = torch.stack([hopfield_energy_grad(x, k, beta).norm(dim=-1) for x in traj["queries"]])
    ok = g < tol
    first = torch.where(ok.any(0), ok.int().argmax(0), torch.full_like(ok[0], T + 1, dtype=int))
    return first.double().median().item(), int((~ok[-1]).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--betas", type=positive_float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="inverse temperatures β")
    p.add_argument("--etas", type=positive_float, nargs="+", default=[0.3, 0.6, 1.0],
                   help="step sizes η")
    args = cpu_script_args(p, argv, "optimizer_steps.json", quick=dict(betas=[1.0], etas=[1.0]))
    torch.manual_seed(0)
    q = 2 * torch.randn(4, 64, 16, dtype=torch.float64)
    k = torch.randn(4, 64, 16, dtype=torch.float64)
    rows = []
    head = "".join(f"{o + (f' {r}' if r else ''):>15}" for o, r in OPTS)
    print(f"# median steps to ||grad E|| < 1e-6 (queries not converged in 100), {q.numel() // 16}"
          f" queries\n{'beta':>5}{'eta':>5}{head}")
    for beta in args.betas:
        for eta in args.etas:
            cells = []
            for opt, rho in OPTS:
                med, left = steps(q, k, beta, eta, opt, rho)
                rows.append(dict(beta=beta, eta=eta, optimizer=opt, rho=rho, median_steps=med,
                                 not_converged=left))
                cells.append(f"{med:>10.0f} ({left:>3})")
            print(f"{beta:>5}{eta:>5}" + "".join(cells))
    write_results(args.out, dict(setup=dict(B=4, N=64, M=64, D=16, tol=1e-6, T=100,
                                            dtype="float64", seed=0), rows=rows))


if __name__ == "__main__":
    sys.exit(main())
