"""Student-t intervals: the quantile against printed table values (and SciPy when installed), the
interval against a hand computation, paired intervals on per-seed differences."""

from __future__ import annotations

import math

import pytest

from megatron_exact.study.stats import mean_interval, paired_interval, t_cdf, t_quantile

# t(0.975, df) from standard tables (10 significant digits).
TABLE = {1: 12.70620474, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_t_quantile_matches_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(TABLE[df], rel=1e-9)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7.5, 20, 200):
        for p in (0.6, 0.9, 0.975, 0.995, 0.025):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)


def test_t_df1_is_cauchy():
    # With one degree of freedom t is Cauchy: the quantile is tan(pi (p - 1/2)).
    assert t_quantile(0.9, 1) == pytest.approx(math.tan(math.pi * 0.4), rel=1e-10)


def test_interval_by_hand():
    # values 0.50, 0.58, 0.71: mean 0.59666..., s = sqrt(((-.09667)^2 + (-.01667)^2 + .11333^2) / 2)
    interval = mean_interval([0.50, 0.58, 0.71])
    mean = (0.50 + 0.58 + 0.71) / 3
    s = math.sqrt(((0.50 - mean) ** 2 + (0.58 - mean) ** 2 + (0.71 - mean) ** 2) / 2)
    assert s == pytest.approx(0.10598742, rel=1e-7)
    assert interval.mean == pytest.approx(mean) and interval.std == pytest.approx(s)
    assert interval.half_width == pytest.approx(4.302652730 * 0.10598742 / math.sqrt(3), rel=1e-7)
    # 4.302653 * 0.1059874 / 1.7320508 = 0.263287: [0.596667 - 0.263287, 0.596667 + 0.263287]
    assert interval.low == pytest.approx(0.33338, abs=1e-5) and interval.high == pytest.approx(0.85995, abs=1e-5)
    assert interval.excludes_zero()


def test_single_value_has_no_interval():
    interval = mean_interval([0.4])
    assert interval.mean == 0.4 and interval.half_width is None and interval.excludes_zero() is None


def test_paired_interval_uses_per_seed_differences():
    uniform = {1: 0.80, 2: 0.60, 3: 0.70}
    exact = {1: 0.83, 2: 0.62, 3: 0.74, 4: 0.9}  # seed 4 has no partner: left out
    paired = paired_interval(uniform, exact)
    by_hand = mean_interval([0.03, 0.02, 0.04])
    assert paired.n == 3 and paired.mean == pytest.approx(0.03) and paired.half_width == pytest.approx(by_hand.half_width)
    # Between-seed spread is large but the differences are consistent: the paired interval excludes zero,
    # the difference of the two unpaired intervals would not.
    assert paired.excludes_zero()
    assert mean_interval(list(uniform.values())).high > mean_interval([0.83, 0.62, 0.74]).low
