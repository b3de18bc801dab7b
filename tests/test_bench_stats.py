"""Benchmark statistics (bench/stats.py): the interquartile mean and the bootstrap interval."""

from __future__ import annotations

import numpy as np

from bench.stats import bootstrap_ci, iqm, mean_curve, summarize


def test_iqm_is_the_mean_of_the_middle_half_and_ignores_outliers():
    assert iqm([1, 2, 3, 4]) == 2.5
    assert iqm([0, 1, 2, 3, 4, 5, 6, 1000]) == np.mean([2, 3, 4, 5])
    # n = 5: a quarter of the 2nd and 4th value is cut away (1.25 to 3.75 of the sorted ranks)
    assert abs(iqm([10, 0, 2, 3, 4]) - (0.75 * 2 + 3 + 0.75 * 4) / 2.5) < 1e-12
    assert iqm([7.0]) == 7.0


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_seeds():
    rng = np.random.default_rng(0)
    few, many = rng.normal(10, 2, 5), rng.normal(10, 2, 200)
    lo, hi = bootstrap_ci(few)
    assert lo < few.mean() < hi
    lo2, hi2 = bootstrap_ci(many)
    assert lo2 < many.mean() < hi2 and (hi2 - lo2) < (hi - lo)
    assert bootstrap_ci(few) == bootstrap_ci(few)  # seeded
    assert bootstrap_ci([3.0]) == (3.0, 3.0)


def test_summarize_and_mean_curve():
    s = summarize([1.0, 2.0, 3.0, None])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0
    xs, mean, lo, hi = mean_curve([[(0, 1.0), (10, 3.0)], [(0, 3.0), (10, 5.0)]])
    assert list(xs) == [0.0, 10.0] and list(mean) == [2.0, 4.0]
    assert (lo <= mean).all() and (mean <= hi).all()


def test_wilson_interval_matches_the_closed_form_and_stays_in_unit_range():
    from bench.stats import wilson_interval

    lo, hi = wilson_interval(40, 50)  # p = 0.8, n = 50: the textbook Wilson interval is [0.670, 0.888]
    assert abs(lo - 0.670) < 2e-3 and abs(hi - 0.888) < 2e-3
    assert wilson_interval(0, 20)[0] == 0.0 and 0.0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(20, 20)[1] == 1.0 and 0.8 < wilson_interval(20, 20)[0] < 1.0
    assert wilson_interval(5, 10)[1] - wilson_interval(5, 10)[0] > wilson_interval(50, 100)[1] - wilson_interval(
        50, 100)[0]


def test_mcnemar_exact_matches_the_binomial_tail_and_is_symmetric():
    from bench.stats import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == 2 / 64  # both tails of Binomial(6, 1/2) at the extremes
    assert abs(mcnemar_exact(1, 9) - 2 * 11 / 1024) < 1e-15
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(3, 4) == 1.0
    assert mcnemar_exact(0, 5) > 0.05 > mcnemar_exact(0, 6)  # 5 one-sided flips are not yet significant


def test_discordant_counts_and_holm_adjustment():
    from bench.stats import discordant, holm

    assert discordant([1, 1, 0, 0, 1], [1, 0, 1, 1, 1]) == (1, 2)
    adj = holm([0.01, 0.04, 0.03, float("nan")])
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1, made monotone: 0.03, 0.06, 0.06
    assert np.allclose(adj[:3], [0.03, 0.06, 0.06]) and np.isnan(adj[3])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
