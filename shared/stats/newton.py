"""Newton-Raphson for a one-parameter log-likelihood computed centrally (no exchanges)."""

from __future__ import annotations

from collections.abc import Callable

from shared.errors import ConvergenceError

Derivatives = Callable[[float], tuple[float, float, float]]  # beta -> (loglik, score, information)


def maximize_1d(
    derivatives: Derivatives, what: str, tolerance: float = 1e-12, max_iter: int = 100
) -> tuple[float, int]:
    """The maximizing ``beta`` and the iterations used; steps that lower the likelihood are halved."""
    beta, iteration = 0.0, 0
    while (iteration := iteration + 1) <= max_iter:
        loglik, score, information = derivatives(beta)
        if not information > 0:
            raise ConvergenceError(f"{what}: the information is {information!r} at log HR {beta!r}")
        step = score / information
        while derivatives(beta + step)[0] < loglik - 1e-12 * abs(loglik) and abs(step) >= tolerance:
            step /= 2.0
        beta += step
        if abs(step) < tolerance:
            return beta, iteration
    raise ConvergenceError(f"{what} did not converge in {max_iter} Newton steps (log HR {beta!r})")
