"""The optimizers of the descent engine (docs/math.md §4), checked against first principles."""

import functools

import pytest
import torch

from energy_attn import (
    EnergyBasedAttention,
    elastic_energy,
    hopfield_descent,
    hopfield_energy,
    minimize_energy,
)
from energy_attn.energies.hopfield import (
    elastic_key_bias,
    hopfield_energy_grad,
    hopfield_newton_direction,
)

f64 = torch.float64
OPTS = [("gd", 0.0), ("momentum", 0.6), ("nesterov", 0.6), ("newton_2nd1st", 0.0),
        ("newton_light", 0.0)]


def _energy(scale=0.7, fn=hopfield_energy):
    return functools.partial(fn, scale=scale)


def qk(B=2, N=5, M=7, D=4, dtype=f64, grad=False):
    return (torch.randn(B, N, D, dtype=dtype, requires_grad=grad),
            torch.randn(B, M, D, dtype=dtype, requires_grad=grad))


# ---------------------------------------------------------------- ρ = 0 is gradient descent
@pytest.mark.parametrize("optimizer", ["momentum", "nesterov"])
@pytest.mark.parametrize("closed_form", [True, False])
def test_zero_momentum_is_gd_exactly_in_minimize_energy(optimizer, closed_form):
    q, k = qk()
    kw = dict(step_size=0.8, num_steps=4, use_closed_form=closed_form)
    gd = minimize_energy(_energy(), q, k, **kw)
    assert torch.equal(minimize_energy(_energy(), q, k, optimizer=optimizer, momentum=0.0, **kw),
                       gd)


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov"])
@pytest.mark.parametrize("backend", ["reference", "autograd"])
def test_zero_momentum_is_gd_exactly_in_hopfield_descent(optimizer, backend):
    q, k = torch.randn(2, 2, 6, 4, dtype=f64), torch.randn(2, 2, 6, 4, dtype=f64)
    kw = dict(step_size=0.8, num_steps=3, is_causal=True, backend=backend)
    assert torch.equal(hopfield_descent(q, k, optimizer=optimizer, momentum=0.0, **kw),
                       hopfield_descent(q, k, **kw))


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov"])
def test_zero_momentum_is_gd_exactly_in_energy_based_attention(optimizer):
    x = torch.randn(2, 6, 8)
    gd = EnergyBasedAttention(8, heads=2, dim_head=4)
    mom = EnergyBasedAttention(8, heads=2, dim_head=4, optimizer=optimizer, momentum=0.0)
    mom.load_state_dict(gd.state_dict())
    assert torch.equal(mom(x, num_steps=3, step_size=0.5), gd(x, num_steps=3, step_size=0.5))


def test_momentum_and_nesterov_follow_their_recursions_and_record_velocities():
    q, k = qk()
    e, eta, rho = _energy(), 0.4, 0.7
    for optimizer in ("momentum", "nesterov"):
        traj = minimize_energy(e, q, k, step_size=eta, num_steps=3, optimizer=optimizer,
                               momentum=rho, return_trajs=True)
        xi, v = q, torch.zeros_like(q)
        assert torch.equal(traj["velocities"][0], v)
        for t in range(3):
            y = xi + rho * v if optimizer == "nesterov" else xi
            v = rho * v - eta * hopfield_energy_grad(y, k, 0.7)
            xi = xi + v
            torch.testing.assert_close(traj["velocities"][t + 1], v)
            torch.testing.assert_close(traj["queries"][t + 1], xi)


# --------------------------------------------- Newton closed forms vs a dense float64 Hessian
def dense_hessian(energy, xi, k, mask):
    """Per-query Hessian ``[B, N, D, D]`` of a per-query energy, by double autograd."""
    B, N, D = xi.shape
    H = torch.zeros(B, N, D, D, dtype=f64)
    for b in range(B):
        for i in range(N):
            def e(z, b=b, i=i):
                x = xi[b].clone()
                x[i] = z
                m = None if mask is None else mask[b]
                return energy(x, k[b], mask=m)[i]
            H[b, i] = torch.autograd.functional.hessian(e, xi[b, i])
    return H


@pytest.mark.parametrize("energy_fn", [hopfield_energy, elastic_energy])
@pytest.mark.parametrize("masked", [False, True])
def test_newton_directions_equal_dense_covariance_and_hessian(energy_fn, masked):
    q, k = qk(B=2, N=4, M=6, D=3)
    q = q * 2
    beta = 0.9
    mask = None
    if masked:
        mask = torch.rand(2, 4, 6) > 0.4
        mask[0, 1] = False  # fully masked: H = I, Σ = 0
    energy = _energy(beta, energy_fn)
    H = dense_hessian(energy, q, k, mask)
    # Explicit covariance Σ_i = Σ_j p_ij (k_j − μ_i)(k_j − μ_i)ᵀ built densely.
    logits = beta * q @ k.transpose(-1, -2)
    if energy_fn is elastic_energy:
        logits = logits + elastic_key_bias(k, beta).unsqueeze(-2)
    if masked:
        logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(logits.softmax(-1))  # fully masked row: p = 0
    mu = p @ k
    cen = k[:, None] - mu[:, :, None]  # [B, N, M, D]
    sigma = torch.einsum("bnm,bnmd,bnme->bnde", p, cen, cen)
    eye = torch.eye(3, dtype=f64)
    torch.testing.assert_close(H, eye - beta * sigma)  # ∇²E = I − βΣ
    g = q - mu
    kw = dict(mask=mask)
    if energy_fn is hopfield_energy:
        d2 = hopfield_newton_direction(q, k, beta, kind="2nd1st", **kw)
        dl = hopfield_newton_direction(q, k, beta, kind="light", **kw)
    else:
        d2 = energy_fn.newton_direction(q, k, beta, kind="2nd1st", **kw)
        dl = energy_fn.newton_direction(q, k, beta, kind="light", **kw)
    # 2nd1st: (I + βΣ) g = (2I − H) g ; light: (1 + β diag Σ) ⊙ g
    torch.testing.assert_close(d2, ((eye + beta * sigma) @ g[..., None]).squeeze(-1))
    torch.testing.assert_close(d2, ((2 * eye - H) @ g[..., None]).squeeze(-1))
    torch.testing.assert_close(dl, (1 + beta * torch.diagonal(sigma, dim1=-2, dim2=-1)) * g)
    # I + βΣ is positive definite: both directions are descent directions (g·d > 0 where g ≠ 0)
    assert ((d2 * g).sum(-1) >= 0).all() and ((dl * g).sum(-1) >= 0).all()


@pytest.mark.parametrize("energy_fn", [hopfield_energy, elastic_energy])
def test_newton_2nd1st_closed_form_equals_hvp_form(energy_fn):
    q, k = qk(grad=True)
    mask = torch.rand(2, 5, 7) > 0.3
    mask[1, 2] = False
    kw = dict(mask=mask, step_size=0.6, num_steps=3, optimizer="newton_2nd1st")
    closed = minimize_energy(_energy(0.8, energy_fn), q, k, **kw)
    hvp = minimize_energy(_energy(0.8, energy_fn), q, k, use_closed_form=False, **kw)
    torch.testing.assert_close(closed, hvp)
    w = torch.randn_like(closed)
    for a, b in zip(torch.autograd.grad((closed * w).sum(), (q, k)),
                    torch.autograd.grad((hvp * w).sum(), (q, k))):
        torch.testing.assert_close(a, b)


def test_hvp_form_works_for_a_user_energy_with_no_closed_form():
    # E(ξ) = ¼‖ξ‖⁴ − Σ_j ξ·k_j: ∇ = ‖ξ‖² ξ − Σk, H = ‖ξ‖² I + 2ξξᵀ
    def quartic(xi, keys, mask=None):
        return 0.25 * xi.pow(2).sum(-1).pow(2) - (xi * keys.sum(-2, keepdim=True)).sum(-1)

    q, k = qk(B=1, N=3, M=4, D=3)
    out = minimize_energy(quartic, q, k, step_size=0.1, num_steps=1, optimizer="newton_2nd1st")
    n2 = q.pow(2).sum(-1, keepdim=True)
    g = n2 * q - k.sum(-2, keepdim=True)
    hg = n2 * g + 2 * q * (q * g).sum(-1, keepdim=True)
    torch.testing.assert_close(out, q - 0.1 * (2 * g - hg))
    with pytest.raises(ValueError, match="newton_light"):
        minimize_energy(quartic, q, k, optimizer="newton_light")


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("optimizer,rho", OPTS[:4])
def test_gradcheck_autograd_path_every_optimizer(T, optimizer, rho):
    q, k = qk(B=1, N=3, M=4, D=2, grad=True)
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    mask[0, 0] = False

    def fn(q, k):
        return minimize_energy(_energy(0.9), q, k, mask=mask, step_size=0.7, num_steps=T,
                               optimizer=optimizer, momentum=rho, use_closed_form=False)

    assert torch.autograd.gradcheck(fn, (q, k))


# ----------------------------------------- speed of descent: steps to a gradient tolerance
def steps_to_tolerance(q, k, beta, eta, optimizer, rho, tol=1e-6, T=80):
    """Per query, the first step t with ‖∇E(ξ_t)‖ < tol (T+1 if never), float64."""
    traj = minimize_energy(_energy(beta), q, k, step_size=eta, num_steps=T, optimizer=optimizer,
                           momentum=rho, return_trajs=True)
    gnorm = torch.stack([hopfield_energy_grad(x, k, beta).norm(dim=-1)
                         for x in traj["queries"]])  # [T+1, ...]
    ok = gnorm < tol
    return torch.where(ok.any(0), ok.int().argmax(0), torch.full_like(ok[0], T + 1, dtype=int))


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_descent_speed_matches_theory(beta):
    """Recorded in docs/zoo.md (benchmarks/optimizer_steps.py measures the full grid).

    * Newton-like steps precondition with I + βΣ ≈ H⁻¹: never slower than gd.
    * Heavy ball / Nesterov help when the step is short relative to the curvature (η = 0.3,
      ρ = 0.3), where gd contracts only by |1 − ηλ| per step.
    """
    torch.manual_seed(0)
    q, k = torch.randn(2, 32, 16, dtype=f64) * 2, torch.randn(2, 32, 16, dtype=f64)
    for eta in (0.3, 0.6, 1.0):
        gd = steps_to_tolerance(q, k, beta, eta, "gd", 0.0).double().median()
        for opt in ("newton_2nd1st", "newton_light"):
            assert steps_to_tolerance(q, k, beta, eta, opt, 0.0).double().median() <= gd, (opt, eta)
    gd = steps_to_tolerance(q, k, beta, 0.3, "gd", 0.0).double().median()
    for opt in ("momentum", "nesterov"):
        assert steps_to_tolerance(q, k, beta, 0.3, opt, 0.3).double().median() < gd, opt


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(optimizer="adam"), ValueError, "optimizer"),
        (dict(optimizer="momentum", momentum=1.0), ValueError, "momentum"),
        (dict(optimizer="nesterov", momentum=-0.1), ValueError, "momentum"),
        (dict(optimizer="momentum", momentum=float("nan")), ValueError, "momentum"),
        (dict(optimizer="gd", momentum=0.5), ValueError, "momentum"),
        (dict(num_steps=1.5), TypeError, "num_steps"),
        (dict(num_steps=True), TypeError, "num_steps"),
    ],
)
def test_bad_optimizer_arguments_everywhere(kw, exc, match):
    q, k = qk()
    with pytest.raises(exc, match=match):
        minimize_energy(_energy(), q, k, **kw)
    with pytest.raises(exc, match=match):
        hopfield_descent(q[:, None], k[:, None], **kw)
    if "num_steps" not in kw:
        with pytest.raises(exc, match=match):
            EnergyBasedAttention(4, **kw)
