"""Privacy accounting for FedShufde: the local Gaussian mechanism, amplification by shuffling, composition.

- Local randomiser: each client clips its update to L2 norm C and adds N(0, sigma^2 I). Two clipped updates
  differ by at most 2C, so sigma is calibrated to sensitivity 2C with the *analytic* Gaussian mechanism
  (Balle & Wang, ICML 2018), exact for every epsilon (the classical sqrt(2 ln(1.25/delta)) formula only holds
  for epsilon < 1).
- Shuffling n reports that are (eps0, delta0)-LDP: closed form of Feldman, McMillan & Talwar, "Hiding Among
  the Clones" (FOCS 2021), Theorem 3.1, extended to approximate LDP by their Theorem 3.8. It is only valid when
  eps0 <= log(n / (16 log(2/delta))); outside that range we return *no* amplified number (the guarantee is
  then just eps0).
- Composition over rounds: the better of basic composition and the advanced composition theorem of Dwork,
  Rothblum & Vadhan (2010).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy.stats import norm


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism N(0, sigma^2) with L2 sensitivity `sensitivity`."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return float(norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b))


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma for which the Gaussian mechanism is (epsilon, delta)-DP (analytic Gaussian mechanism,
    found by bisection on the exact delta; delta(sigma) is decreasing in sigma)."""
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError("need epsilon > 0, 0 < delta < 1, sensitivity > 0")
    if math.isinf(epsilon):
        return 0.0
    lo, hi = 1e-6 * sensitivity, sensitivity
    while gaussian_delta(hi, epsilon, sensitivity) > delta:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, epsilon, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def amplification_threshold(n: int, delta: float) -> float:
    """Largest eps0 for which the FMT closed form applies to n reports: log(n / (16 log(2/delta)))."""
    x = n / (16 * math.log(2 / delta))
    return math.log(x) if x > 0 else -math.inf


def min_clients_for_amplification(eps0: float, delta: float) -> int:
    """Smallest n for which eps0 is in the closed form's range."""
    return math.ceil(math.exp(eps0) * 16 * math.log(2 / delta))


@dataclass
class ShuffleBound:
    eps0: float
    delta0: float
    n: int
    delta: float
    valid: bool
    epsilon: float | None  # central epsilon after shuffling; None when the closed form does not apply
    delta_total: float | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def shuffle_amplification(eps0: float, n: int, delta: float, delta0: float = 0.0) -> ShuffleBound:
    """Central (epsilon, delta_total) of shuffling n reports from (eps0, delta0)-LDP randomisers (FMT'21)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if math.isinf(eps0):
        return ShuffleBound(eps0, delta0, n, delta, False, None, None, "no local noise (eps0 = inf): no DP guarantee")
    limit = amplification_threshold(n, delta)
    if eps0 > limit:
        need = min_clients_for_amplification(eps0, delta)
        return ShuffleBound(eps0, delta0, n, delta, False, None, None,
                            f"eps0={eps0:g} > log(n/(16 log(2/delta)))={limit:.3f}: the closed form does not apply "
                            f"with n={n} reports (needs n >= {need}); the guarantee stays eps0={eps0:g}")
    e0 = math.exp(eps0)
    eps = math.log(1 + (e0 - 1) / (e0 + 1) * (8 * math.sqrt(e0 * math.log(4 / delta)) / math.sqrt(n) + 8 * e0 / n))
    delta_total = delta + (math.exp(eps) + 1) * (1 + math.exp(-eps0) / 2) * n * delta0
    return ShuffleBound(eps0, delta0, n, delta, True, eps, delta_total, "FMT'21 Theorem 3.1 / 3.8 closed form")


def compose(epsilon: float, delta: float, k: int, delta_slack: float = 1e-6) -> tuple[float, float]:
    """k-fold composition of an (epsilon, delta)-DP mechanism: min of basic (k eps, k delta) and advanced
    (eps sqrt(2k ln(1/delta')) + k eps (e^eps - 1), k delta + delta')."""
    basic = (k * epsilon, k * delta)
    adv_eps = epsilon * math.sqrt(2 * k * math.log(1 / delta_slack)) + k * epsilon * (math.exp(epsilon) - 1)
    advanced = (adv_eps, k * delta + delta_slack)
    return advanced if advanced[0] < basic[0] else basic


def privacy_report(eps0: float, delta0: float, n: int, rounds: int, delta: float = 1e-6) -> dict:
    """What a federation run guarantees, per round and over all rounds (each client reports once a round)."""
    per_round = shuffle_amplification(eps0, n, delta, delta0)
    out: dict = {"local": {"eps0": eps0, "delta0": delta0}, "n_reports_per_shuffle": n, "rounds": rounds,
                 "shuffle": per_round.to_dict()}
    if math.isinf(eps0):
        out["summary"] = "no local noise: no differential-privacy guarantee"
        return out
    local_total = compose(eps0, delta0, rounds)
    out["local_total"] = {"epsilon": local_total[0], "delta": local_total[1]}
    if per_round.valid:
        assert per_round.epsilon is not None and per_round.delta_total is not None
        central_total = compose(per_round.epsilon, per_round.delta_total, rounds)
        out["central_total"] = {"epsilon": central_total[0], "delta": central_total[1]}
        out["summary"] = (f"per round: eps0={eps0:g} locally, eps={per_round.epsilon:.3f} after shuffling {n} reports; "
                          f"over {rounds} rounds: eps={central_total[0]:.3f} (local only: {local_total[0]:.3f})")
    else:
        out["summary"] = f"no amplification: {per_round.reason}; over {rounds} rounds eps={local_total[0]:.3f}"
    return out
