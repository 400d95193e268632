"""Per-configuration statistics of a sweep: mean and standard deviation over seeds, and each
configuration's difference from the baseline with a 95% Welch interval.

The interval is Welch's (unequal variances) t interval with the Welch–Satterthwaite degrees of
freedom (B. L. Welch, Biometrika 34, 1947). The t quantile is computed here, not looked up: Student's
t distribution function is written with the regularized incomplete beta function,
P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2), evaluated by its continued fraction (modified Lentz, as in
Numerical Recipes 3rd ed. section 6.4), and inverted by bisection. It works for the non-integer
degrees of freedom Welch's formula gives and matches published t tables to all their digits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n-1) of `values`; the deviation is NaN for n < 2 and
    both are NaN for no values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1; `y` is
    1 - x when the caller has it more precisely than `1 - x` (x close to 1)."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, y) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > t) for Student's t with `df` (> 0, not necessarily integer) degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile (0.5 < p < 1) of Student's t with `df` > 0 degrees of freedom; df=inf gives
    the normal quantile (used past df = 1e7). Bisection on `t_two_sided_p` to a relative 1e-13."""
    if not 0.5 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    tail = 2.0 * (1.0 - p)
    # P(|Z| > z) = erfc(z / sqrt 2) is the limit df -> inf; past 1e7 the two differ by < 1e-6 and
    # lgamma of such large arguments loses more than that.
    p_two = (lambda t: math.erfc(t / math.sqrt(2.0))) if df > 1e7 else (lambda t: t_two_sided_p(t, df))
    lo, hi = 0.0, 1.0
    while p_two(hi) > tail:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_two(mid) > tail else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Difference:
    """`mean(a) - mean(b)` with its Welch interval; `half` (the interval's half width), `df`, `low`
    and `high` are NaN when either side has fewer than 2 values (the interval is undefined)."""

    diff: float
    half: float
    df: float

    @property
    def low(self) -> float:
        return self.diff - self.half

    @property
    def high(self) -> float:
        return self.diff + self.half

    @property
    def defined(self) -> bool:
        return not math.isnan(self.half)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of zero (False when undefined)."""
        return self.defined and (self.low > 0.0 or self.high < 0.0)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """mean(a) - mean(b) with a two-sided `confidence` Welch t interval.

    se^2 = s_a^2/n_a + s_b^2/n_b; df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1));
    half width = t_{(1+confidence)/2, df} * se. With n < 2 on either side the interval is undefined
    (NaN). When both sides have no spread (se = 0) the interval is the point itself (df = inf).
    """
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, math.nan, math.nan)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se2 = va + vb
    if se2 == 0.0:
        return Difference(diff, 0.0, math.inf)
    df = se2 * se2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return Difference(diff, t_quantile((1.0 + confidence) / 2.0, df) * math.sqrt(se2), df)
