"""Our numpy Spearman against scipy's (a test-only oracle): random data, ties, constants."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from attribution.ranks import average_ranks, spearman


@pytest.mark.parametrize("levels", [None, 3, 12])
def test_ranks_and_spearman_match_scipy(levels):
    rng = np.random.default_rng(levels or 0)
    for n in (2, 5, 50, 1000):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.5 * np.arange(n) / n
        if levels:  # many ties
            a, b = np.round(a * levels) / levels, np.round(b * levels) / levels
        np.testing.assert_allclose(average_ranks(a), rankdata(a))
        expected = spearmanr(a, b).statistic
        if np.isnan(expected):
            assert np.isnan(spearman(a, b))
        else:
            assert spearman(a, b) == pytest.approx(expected, abs=1e-12)


def test_constant_input_gives_nan_and_lengths_must_match():
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="differ in length"):
        spearman(np.arange(3.0), np.arange(4.0))
