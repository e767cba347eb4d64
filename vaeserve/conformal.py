"""Split-conformal p-values and thresholds from the anomaly scores of calibration rows.

The calibration rows are normal rows that neither trained the model nor chose its epoch, so a new normal
row's score is exchangeable with theirs. Its p-value (Vovk et al. 2005; Bates et al. 2023, "Testing for
outliers with conformal p-values")

    p(s) = (1 + #{calibration scores >= s}) / (n + 1)

then satisfies P(p <= alpha) <= alpha for every alpha: flagging rows with p <= alpha flags at most a share
alpha of normal rows, on average over calibration sets, whatever the score's distribution. Flagging p <= alpha is
flagging scores above the k-th largest calibration score, k = floor(alpha (n + 1)), and the rate it holds is
k / (n + 1). With k = 0 (n < 1/alpha - 1) no threshold reaches alpha: the smallest rate n rows support is
1 / (n + 1), flagging scores above the largest.
"""

import math
from dataclasses import dataclass

import numpy as np

from vaeserve.errors import InvalidInput

EPS = 1e-9  # alpha (n + 1) within this of an integer counts as that integer (0.29 * 100 is 28.999999999999996)


@dataclass(frozen=True)
class Calibration:
    """The sorted anomaly scores of n calibration rows."""

    scores: np.ndarray  # float64 [n], ascending

    @classmethod
    def of(cls, scores: np.ndarray) -> "Calibration":
        scores = np.sort(np.asarray(scores, np.float64))
        scores.flags.writeable = False
        return cls(scores)

    @property
    def rows(self) -> int:
        return len(self.scores)

    @property
    def smallest_rate(self) -> float:
        """The smallest false-positive rate these rows support: 1 / (n + 1)."""
        return 1.0 / (self.rows + 1)

    def rank(self, alpha: float) -> int:
        """k = floor(alpha (n + 1)), at most n: flagging p <= alpha flags scores above the k-th largest."""
        return min(self.rows, int(math.floor(alpha * (self.rows + 1) + EPS)))

    def rate(self, alpha: float) -> float:
        """The false-positive rate flagging at alpha holds: k / (n + 1) <= alpha (0 when out of reach)."""
        return self.rank(alpha) / (self.rows + 1)

    def reachable(self, alpha: float) -> bool:
        return self.rank(alpha) >= 1

    def threshold(self, alpha: float) -> float:
        """The score above which p <= alpha: the k-th largest calibration score. InvalidInput when alpha is
        outside (0, 1) or below the smallest rate these rows support."""
        if not 0 < alpha < 1:
            raise InvalidInput(f"alpha must be in (0, 1), got {alpha}")
        k = self.rank(alpha)
        if k < 1:
            raise InvalidInput(f"alpha {alpha:g} is out of reach: this version's {self.rows} calibration rows support a "
                               f"false-positive rate of {self.smallest_rate:.4g} (1/(n+1)) at the least")  # fmt: skip
        return float(self.scores[self.rows - k])

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """(1 + #{calibration scores >= s}) / (n + 1) per score; +inf gets 1 / (n + 1)."""
        at_least = self.rows - np.searchsorted(self.scores, scores, side="left")
        return (1.0 + at_least) / (self.rows + 1)
