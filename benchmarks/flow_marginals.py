"""Marginal preservation of Flow-GRPO's SDE (spec §6.1, sanity check 5), with the exact velocity field.

Data x0 ~ N(m, s^2) in one dimension; rectified flow x_sigma = (1 - sigma) x0 + sigma eps has the exact
velocity v(x, sigma) = E[eps - x0 | x_sigma = x] (both Gaussian)

    v = -m + (sigma - (1 - sigma) s^2) / ((1 - sigma)^2 s^2 + sigma^2) * (x - (1 - sigma) m)

so the probability-flow ODE (noise level a = 0) and the SDE (a > 0) must both end at N(m, s^2), up to
the discretization error of T steps, which shrinks as T grows. Both run through diffalign's
FlowMatchSampler on SD3's shifted grid (FlowMatchEulerDiscreteScheduler, shift 3), from the same x_T.

    python benchmarks/flow_marginals.py [--n 200000] [--noise-level 0.7]
"""

from __future__ import annotations

import argparse

import torch


def exact_velocity(x: torch.Tensor, sigma: torch.Tensor, m: float, s: float) -> torch.Tensor:
    """E[eps - x0 | x_sigma = x] for x0 ~ N(m, s^2), eps ~ N(0, 1)."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    return -m + (sigma - (1 - sigma) * s**2) / var * (x - (1 - sigma) * m)


def final_moments(
    steps: int, noise_level: float, n: int = 200_000, m: float = 0.5, s: float = 0.5, seed: int = 0, shift: float = 3.0
) -> dict[str, float]:
    """Mean and variance of x_0 after ``steps`` flow steps at ``noise_level`` (0: the Euler ODE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.sampling import make_sampler, sample_trajectory

    sampler = make_sampler(FlowMatchEulerDiscreteScheduler(shift=shift))
    sampler.set_steps(steps)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma, _ = sampler.sigmas(t, x)
        return exact_velocity(x, sigma, m, s)

    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 1, generator=gen)
    with torch.no_grad():
        x0 = sample_trajectory(denoise, sampler, x_T, eta=noise_level, generator=gen).final.double()
    return {"mean": float(x0.mean()), "var": float(x0.var())}


def gaps(steps: int, noise_level: float = 0.7, n: int = 200_000, m: float = 0.5, s: float = 0.5) -> dict[str, float]:
    """|SDE - ODE| and |SDE - target| of the final mean and variance at ``steps`` steps."""
    ode, sde = final_moments(steps, 0.0, n, m, s), final_moments(steps, noise_level, n, m, s)
    return {
        "ode_mean": ode["mean"],
        "ode_var": ode["var"],
        "sde_mean": sde["mean"],
        "sde_var": sde["var"],
        "mean_gap": abs(sde["mean"] - ode["mean"]),
        "var_gap": abs(sde["var"] - ode["var"]),
        "sde_var_err": abs(sde["var"] - s**2),
        "ode_var_err": abs(ode["var"] - s**2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 100])
    args = ap.parse_args(argv)
    m, s = 0.5, 0.5
    print(f"target N({m}, {s**2}); n = {args.n}; noise level a = {args.noise_level}; SD3 grid, shift 3")
    print(f"{'T':>4} {'ODE mean':>9} {'ODE var':>8} {'SDE mean':>9} {'SDE var':>8} {'|dmean|':>8} {'|dvar|':>8}")
    for t in args.steps:
        g = gaps(t, args.noise_level, args.n, m, s)
        print(
            f"{t:>4} {g['ode_mean']:9.4f} {g['ode_var']:8.4f} {g['sde_mean']:9.4f} {g['sde_var']:8.4f} "
            f"{g['mean_gap']:8.4f} {g['var_gap']:8.4f}"
        )


if __name__ == "__main__":
    main()
