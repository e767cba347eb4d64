"""Conformal p-values and thresholds (vaeserve.conformal): the formula, the finite-sample rank, and the
false-positive rate they hold on exchangeable normal rows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaeserve.conformal import Calibration
from vaeserve.errors import InvalidInput


def test_p_values_follow_the_formula_with_ties_and_infinities():
    c = Calibration.of(np.array([3.0, 1.0, 2.0, 2.0]))  # n = 4, sorted on the way in
    np.testing.assert_array_equal(c.scores, [1.0, 2.0, 2.0, 3.0])
    got = c.p_values(np.array([0.0, 1.0, 2.0, 2.5, 3.0, 9.0, np.inf]))
    # (1 + #{calibration >= s}) / (n + 1)
    np.testing.assert_array_equal(got, np.array([5, 5, 4, 2, 2, 1, 1]) / 5)
    assert c.smallest_rate == 1 / 5


@pytest.mark.parametrize("n, alpha, k", [(99, 0.01, 1), (98, 0.01, 0), (199, 0.01, 2), (799, 0.01, 8), (26, 0.05, 1),
                                         (99, 0.29, 29), (9, 0.5, 5)])  # fmt: skip
def test_the_rank_is_floor_alpha_n_plus_one(n, alpha, k):
    c = Calibration.of(np.arange(n, dtype=np.float64))
    assert c.rank(alpha) == k and c.reachable(alpha) == (k >= 1)
    assert c.rate(alpha) == k / (n + 1) <= alpha + 1e-12
    if k:
        assert c.threshold(alpha) == n - k  # the k-th largest of 0 .. n-1


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300), alpha=st.floats(0.001, 0.999),
       new=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50))  # fmt: skip
def test_flagging_above_the_threshold_is_flagging_p_at_most_alpha(scores, alpha, new):
    c = Calibration.of(np.array(scores))
    new = np.array(new)
    if not c.reachable(alpha):
        with pytest.raises(InvalidInput, match="out of reach"):
            c.threshold(alpha)
        assert (c.p_values(new) > alpha).all()  # nothing can be flagged at alpha
        return
    p = c.p_values(new)
    # p <= alpha, up to alpha (n + 1) landing a rounding error below an integer (0.29 * 100): p <= k / (n + 1)
    np.testing.assert_array_equal(new > c.threshold(alpha), p <= c.rate(alpha))
    assert c.rate(alpha) <= alpha * (1 + 1e-9)
    assert ((p >= c.smallest_rate) & (p <= 1)).all()


def test_alpha_just_below_one_flags_above_the_smallest_score():
    c = Calibration.of(np.arange(10.0))
    assert c.rank(1 - 1e-12) == 10 and c.threshold(1 - 1e-12) == 0.0 and c.rate(1 - 1e-12) == 10 / 11


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, float("nan")])
def test_an_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(InvalidInput, match=r"alpha must be in \(0, 1\)"):
        Calibration.of(np.arange(100.0)).threshold(alpha)


def test_the_false_positive_rate_holds_over_calibration_draws():
    """Exchangeable normal rows: over 2,000 draws of 49 calibration and 200 new rows from one distribution,
    the mean share of new rows flagged at alpha = 0.1 is k / (n + 1) = 5/50 (the marginal guarantee), and the
    p-values are uniform on the grid j / 50."""
    rng = np.random.default_rng(0)
    n, m, alpha = 49, 200, 0.1
    flagged, p_all = [], []
    for _ in range(2000):
        c = Calibration.of(rng.standard_normal(n))
        new = rng.standard_normal(m)
        flagged.append(np.mean(new > c.threshold(alpha)))
        p_all.append(c.p_values(new))
    assert np.mean(flagged) == pytest.approx(5 / 50, abs=0.003)  # standard error ~0.001
    p = np.concatenate(p_all)
    for j in (1, 5, 25, 50):  # P(p <= j / 50) = j / 50
        assert np.mean(p <= j / 50 + 1e-12) == pytest.approx(j / 50, abs=0.004)
