"""Properties of Scorer, the one Score of a model, over real exported graphs of every likelihood (Bernoulli,
Gaussian, fixed-variance Gaussian, PPCA, label-free CVAE) under every normalisation: rows inside the support
score finitely and as the plain math does; a value outside it scores as its row brought back into the
support plus the support penalty of its distance, exactly at its feature and in its row's totals, finite
wherever it lands and whatever its size, and flags its row; chunking changes nothing; a decoder that breaks
down gives +inf, never NaN.

The properties hold for any model, so a Scorer here joins a model's exported graphs with a normaliser of
any kind fitted on digits and a per-feature support (digits has features constant at 0, whose support is
the single point [0, 0]), besides the model's own served Scorer with its manifest's normaliser and shared
support.
"""

from dataclasses import dataclass, fields, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vaeserve import scoring
from vaeserve.artifact import runtime
from vaeserve.export.exporter import export_checkpoint
from vaeserve.normalization import Normalizer, Support
from vaeserve.scoring import Scorer, Scores

# name -> make_checkpoint overrides, named and set as test_parity's models are, so a session builds those it
# shares once. Every one is an MLP: conv models train too slowly on 2 cores for a property test's fixture.
MODELS = {
    "vae-mlp-bernoulli": {"kind": "vae", "likelihood": "bernoulli"},
    "vae-mlp-gaussian": {"kind": "vae", "likelihood": "gaussian"},
    "vae-mlp-gaussian-fixed": {"kind": "vae", "likelihood": "gaussian-fixed"},
    "ppca-mlp-gaussian": {"kind": "ppca", "likelihood": "gaussian"},
    "cvae-mlp-bernoulli": {"kind": "cvae", "likelihood": "bernoulli"},  # scored label-free
    "cvae-mlp-gaussian": {"kind": "cvae", "likelihood": "gaussian"},  # scored label-free
}
# normalisation -> (kind, clip), each with a per-feature support; "served" is the version's own Scorer
# (its manifest's normaliser and shared support).
NORMALISATIONS = {
    "standardize-clip10": ("standardize", 10.0),
    "standardize": ("standardize", 0.0),
    "minmax": ("minmax", 0.0),
    "none": ("none", 0.0),
}
CASES = [f"{model}/{norm}" for model in MODELS for norm in [*NORMALISATIONS, "served"]]
BERNOULLI_CASES = [case for case in CASES if MODELS[case.split("/")[0]]["likelihood"] == "bernoulli"]

IW_SAMPLES = 4
MAX_ROWS = 4
F32_MAX = float(np.finfo(np.float32).max)
# Far outside any support a model of digits has, and as far as float32 goes.
EXTREMES = [1e38, -1e38, 3.4e38, -3.4e38, 1e6, -1e6]
# Deterministic in CI: the examples come from a hash of the test, and no database replays old failures.
PROPERTY = settings(deadline=None, derandomize=True, database=None)


@dataclass
class Case:
    scorer: Scorer
    threshold: float  # the version's default threshold on neg_elbo


class Cases(dict):
    def __repr__(self):  # hypothesis prints a failing example's arguments; the scorers say nothing there
        return f"<{len(self)} scorers>"


@pytest.fixture(scope="module")
def cases(make_checkpoint, digits, tmp_path_factory) -> Cases:
    data, train, _, *_ = digits
    root = tmp_path_factory.mktemp("scoring")
    support = Support.fit(data.x)  # per feature: several are the point [0, 0]
    normalizers = {name: Normalizer.fit(kind, data.x[train], clip) for name, (kind, clip) in NORMALISATIONS.items()}
    out = Cases()
    for name, overrides in MODELS.items():
        checkpoint = make_checkpoint(name, arch="mlp", steps=50, validation_rows=64, **overrides)
        model = runtime.Model(export_checkpoint(checkpoint, root, name))
        m = model.manifest
        out[f"{name}/served"] = Case(model.scorer, m.thresholds.default)
        for norm, normalizer in normalizers.items():
            # the model's own graphs under another normaliser and support: -ELBO, no neighbours (their reference
            # rows and standardisation belong to the served normaliser)
            plain = replace(m.scoring, neighbours=None, combination=None)
            built = runtime.scorer(model.encoder, model.decoder, normalizer, support, plain)
            out[f"{name}/{norm}"] = Case(built, m.thresholds.default)
    assert out["cvae-mlp-gaussian/none"].scorer.class_prior is not None  # CVAEs score label-free
    return out


# --- strategies ------------------------------------------------------------------------------------------


def rows_inside(low: np.ndarray, high: np.ndarray, max_rows: int = MAX_ROWS, min_rows: int = 1) -> st.SearchStrategy:
    """float32 rows [n, features] with feature d in [low[d], high[d]], the ends included: each value is a
    fraction of its interval, and the fractions 0 and 1 give the ends exactly."""
    low64, width = low.astype(np.float64), high.astype(np.float64) - low.astype(np.float64)

    def at_fractions(fractions):
        x = np.where(fractions == 1.0, high, (low64 + fractions * width).astype(np.float32))
        return np.clip(x, low, high).astype(np.float32)  # rounding never steps past an end

    fraction = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
    return st.integers(min_rows, max_rows).flatmap(
        lambda n: arrays(np.float64, (n, len(low)), elements=fraction).map(at_fractions)
    )


def outside_value(low: np.float32, high: np.float32) -> st.SearchStrategy:
    """A float32 outside [low, high]: an extreme, one ulp past an end, or an end plus or minus a random
    positive amount."""
    above, below = np.nextafter(high, np.float32(np.inf)), np.nextafter(low, np.float32(-np.inf))
    values = st.one_of(
        st.sampled_from(EXTREMES),
        st.sampled_from([float(above), float(below)]),
        st.floats(float(above), F32_MAX, width=32),
        st.floats(-F32_MAX, float(below), width=32),
    )
    return values.map(np.float32).filter(lambda v: v > high or v < low)


def perturb(data: st.DataObject, x: np.ndarray, support: Support, features: dict[int, list[int]]) -> np.ndarray:
    """x with every (row, feature) named in `features` moved outside the support."""
    x = x.copy()
    for row, feats in features.items():
        for d in feats:
            x[row, d] = data.draw(outside_value(support.low[d], support.high[d]), label=f"x[{row}, {d}]")
    return x


# --- helpers ---------------------------------------------------------------------------------------------


def score_fields(s: Scores) -> dict[str, np.ndarray]:
    return {f.name: getattr(s, f.name) for f in fields(s) if getattr(s, f.name) is not None}


ROUNDING = 1e-5  # relative: the neighbour graph's float32 distances of a row and of it brought back, a step apart


def model_part(s: Scores) -> Scores:
    """The scores of the model alone, without what the Scorer adds from the neighbours and calibration."""
    return replace(s, knn=None, anomaly_score=None, p_value=None)


def assert_same(got: Scores, want: Scores, rows=slice(None)) -> None:
    """Bitwise equal scores (inf equals inf), optionally at some rows only."""
    want_fields = score_fields(want)
    assert list(score_fields(got)) == list(want_fields)
    for name, value in score_fields(got).items():
        a, b = value[rows], want_fields[name][rows]
        with np.errstate(invalid="ignore"):  # inf - inf in the message
            assert np.array_equal(a, b), f"{name}: {np.sum(a != b)} values differ, by up to {np.nanmax(abs(a - b)):.3g}"


def assert_never_nan(s: Scores) -> None:
    for name, value in score_fields(s).items():
        assert not np.isnan(value).any(), name
        assert not (value == -np.inf).any(), name


def assert_finite(s: Scores) -> None:
    for name, value in score_fields(s).items():
        assert np.isfinite(value).all(), name


def distance_outside(scorer: Scorer, x: np.ndarray) -> np.ndarray:
    """float64 [rows, features]: how far each value of raw rows x lies outside the support, in raw units,
    |x - clip(x)| (0 inside)."""
    return np.abs(x.astype(np.float64) - scorer.support.clip(x))


def penalty_of(scorer: Scorer, distance: np.ndarray) -> np.ndarray:
    """Nats each value outside costs: support_penalty of its distance in normaliser units."""
    return scoring.support_penalty(distance / scorer.normalizer.scale)


def assert_penalised(scorer: Scorer, s: Scores, back: Scores, distance: np.ndarray) -> None:
    """s is `back` (the same rows brought back into the support) plus the support penalty of `distance`:
    per_feature gets it exactly at the values outside and is back's bit for bit elsewhere, neg_elbo,
    reconstruction and neg_iw get their row's sum, kl is back's; all finite."""
    outside = distance > 0
    penalty = penalty_of(scorer, distance)
    assert back.support_distance is None
    assert_finite(s)
    np.testing.assert_array_equal(s.support_distance, distance)
    np.testing.assert_array_equal(s.out_of_support, outside.any(axis=1))
    np.testing.assert_array_equal(s.per_feature, back.per_feature + penalty)
    np.testing.assert_array_equal(s.per_feature[~outside], back.per_feature[~outside])
    assert (s.per_feature >= back.per_feature).all()
    # Strictly more wherever the penalty is not lost to rounding (a value an ulp past an end of [0, 0] costs
    # ~1e-90 nats).
    visible = penalty > 1e-9 * (1.0 + np.abs(back.per_feature))
    assert (s.per_feature[visible] > back.per_feature[visible]).all()
    row_penalty = penalty.sum(axis=1)
    for name in ("neg_elbo", "reconstruction", "neg_iw"):
        value, inside = getattr(s, name), getattr(back, name)
        np.testing.assert_array_equal(value, inside + row_penalty, err_msg=name)
        assert (value >= inside).all(), name
        visible = row_penalty > 1e-9 * (1.0 + np.abs(inside))
        assert (value[visible] > inside[visible]).all(), name
    np.testing.assert_array_equal(s.kl, back.kl)


def plain_math(scorer: Scorer, normalised: np.ndarray, iw_samples: int) -> Scores:
    """scoring.score with the Scorer's settings: no support, no domain clip, no fail-safe, one chunk."""
    return scoring.score(normalised, scorer.encode, scorer.decode, scorer.likelihood, class_prior=scorer.class_prior,
                         elbo_samples=scorer.elbo_samples, iw_samples=iw_samples, seed=scorer.seed)  # fmt: skip


def rebuilt(scorer: Scorer, decode: scoring.Decode | None = None, chunk_values: int = scoring.CHUNK_VALUES) -> Scorer:
    """The same Scorer with another decoder or chunk size."""
    return Scorer(scorer.encode, decode or scorer.decode, scorer.likelihood, scorer.normalizer, scorer.support,
                  class_prior=scorer.class_prior, elbo_samples=scorer.elbo_samples, seed=scorer.seed,
                  chunk_values=chunk_values, neighbours=scorer.neighbours, reference_rows=scorer.reference_rows,
                  combination=scorer.combination, calibration=scorer.calibration)  # fmt: skip


def domain_box(s: Scorer) -> tuple[np.ndarray, np.ndarray]:
    """The raw values inside the support that a Bernoulli model's normaliser sends into [0, 1]."""
    ends = s.normalizer.invert(np.array([[0.0], [1.0]], np.float32) * np.ones((2, s.features), np.float32))
    low, high = np.maximum(s.support.low, ends.min(axis=0)), np.minimum(s.support.high, ends.max(axis=0))
    # float32 rounding can put an end an ulp past 0 or 1; step it inward. Normalising is monotone, so
    # every value between two ends inside [0, 1] lands inside too.
    while True:
        normalised = s.normalizer.apply(np.stack([low, high]))
        below, above = normalised[0] < 0, normalised[1] > 1
        if not (below.any() or above.any()):
            break
        low = np.where(below, np.nextafter(low, np.float32(np.inf)), low)
        high = np.where(above, np.nextafter(high, np.float32(-np.inf)), high)
    assert (low <= high).all()  # the training rows' normalised values lie in [0, 1] and inside the support
    return low, high


# --- properties ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@settings(PROPERTY, max_examples=40)
@given(data=st.data())
def test_rows_inside_the_support_score_finitely_and_add_up(cases, case, data):
    scorer, threshold = cases[case].scorer, cases[case].threshold
    x = data.draw(rows_inside(scorer.support.low, scorer.support.high), label="x")
    s = scorer.score(x, iw_samples=IW_SAMPLES)
    assert_finite(s)
    assert s.per_feature.shape == x.shape
    assert s.support_distance is None  # nothing outside, no distance
    assert not s.out_of_support.any()
    np.testing.assert_array_equal(s.flagged(threshold), s.anomaly_score > threshold)
    if scorer.combination is None:
        np.testing.assert_array_equal(s.anomaly_score, s.neg_elbo)
    # -ELBO = reconstruction + KL; exact for one label, to rounding when summed over labels' responsibilities.
    scale = np.abs(s.reconstruction) + np.abs(s.kl) + 1.0
    assert (np.abs(s.neg_elbo - (s.reconstruction + s.kl)) <= 1e-9 * scale).all()
    added = s.per_feature.sum(axis=1)
    assert (np.abs(added - s.reconstruction) <= 1e-9 * (np.abs(s.per_feature).sum(axis=1) + 1.0)).all()
    assert (s.kl >= -1e-9).all()  # a KL divergence


@pytest.mark.parametrize("case", CASES)
@settings(PROPERTY, max_examples=40)
@given(data=st.data())
def test_one_value_outside_the_support_adds_its_penalty_at_its_feature(cases, case, data):
    scorer, threshold = cases[case].scorer, cases[case].threshold
    x = data.draw(rows_inside(scorer.support.low, scorer.support.high), label="x")
    row = data.draw(st.integers(0, len(x) - 1), label="row")
    feature = data.draw(st.integers(0, scorer.features - 1), label="feature")
    bad = perturb(data, x, scorer.support, {row: [feature]})

    s = scorer.score(bad, iw_samples=IW_SAMPLES)
    inside = scorer.score(x, iw_samples=IW_SAMPLES)
    back = scorer.score(scorer.support.clip(bad), iw_samples=IW_SAMPLES)  # the row brought back into the support
    distance = distance_outside(scorer, bad)
    assert np.array_equal(np.argwhere(distance > 0), [[row, feature]])
    assert_penalised(scorer, s, back, distance)
    # The penalty raises the anomaly score over the row brought back, and so does the distance to the training
    # rows (they lie inside the support; float32 rounding of the distance aside): flagged when the row
    # brought back is, and the other rows as they were.
    assert s.anomaly_score[row] >= back.anomaly_score[row] - ROUNDING * (1 + abs(back.anomaly_score[row]))
    others = np.arange(len(x)) != row
    np.testing.assert_array_equal(s.flagged(threshold)[others], inside.anomaly_score[others] > threshold)
    assert_same(replace(s, support_distance=None), inside, others)
    assert (s.support_distance[others] == 0).all()


@pytest.mark.parametrize("case", CASES)
@settings(PROPERTY, max_examples=25)
@given(data=st.data())
def test_several_values_outside_add_their_penalties_exactly_where_they_are(cases, case, data):
    scorer, threshold = cases[case].scorer, cases[case].threshold
    x = data.draw(rows_inside(scorer.support.low, scorer.support.high), label="x")
    # Row 0 has at least two features outside; the others any number, none included.
    where = {row: data.draw(st.lists(st.integers(0, scorer.features - 1), min_size=2 if row == 0 else 0, max_size=12,
                                     unique=True), label=f"features[{row}]")
             for row in range(len(x))}  # fmt: skip
    bad = perturb(data, x, scorer.support, where)
    outside = np.zeros(x.shape, bool)
    for row, feats in where.items():
        outside[row, feats] = True
    out_rows = outside.any(axis=1)

    s = scorer.score(bad, iw_samples=IW_SAMPLES)
    distance = distance_outside(scorer, bad)
    assert np.array_equal(s.support_distance > 0, outside)  # exactly where the values are outside
    assert_penalised(scorer, s, scorer.score(scorer.support.clip(bad), iw_samples=IW_SAMPLES), distance)
    np.testing.assert_array_equal(s.out_of_support, out_rows)
    back = scorer.score(scorer.support.clip(bad), iw_samples=IW_SAMPLES)
    assert (s.anomaly_score >= back.anomaly_score - ROUNDING * (1 + np.abs(back.anomaly_score))).all()
    np.testing.assert_array_equal(s.flagged(threshold), s.anomaly_score > threshold)


@pytest.mark.parametrize("case", CASES)
@settings(PROPERTY, max_examples=25)
@given(data=st.data())
def test_rows_inside_score_as_the_plain_math(cases, case, data):
    """Gaussian models on any row inside the support; Bernoulli ones on rows their normaliser sends into
    [0, 1], where the Scorer's clip to the Bernoulli domain does nothing."""
    scorer = cases[case].scorer
    box = domain_box(scorer) if scorer.likelihood == "bernoulli" else (scorer.support.low, scorer.support.high)
    x = data.draw(rows_inside(*box), label="x")
    normalised = scorer.normalizer.apply(x)
    if scorer.likelihood == "bernoulli":
        assert ((normalised >= 0) & (normalised <= 1)).all()  # the clip to the Bernoulli domain does nothing
    assert_same(model_part(scorer.score(x, iw_samples=IW_SAMPLES)), plain_math(scorer, normalised, IW_SAMPLES))


@pytest.mark.parametrize("case", BERNOULLI_CASES)
@settings(PROPERTY, max_examples=15)
@given(data=st.data())
def test_bernoulli_rows_are_scored_in_the_domain_of_the_likelihood(cases, case, data):
    """Anywhere in the support, a Bernoulli row is scored as the plain math on its normalised values
    clipped to [0, 1] (the support spans validation rows past the training split's range)."""
    scorer = cases[case].scorer
    x = data.draw(rows_inside(scorer.support.low, scorer.support.high), label="x")
    expected = plain_math(scorer, np.clip(scorer.normalizer.apply(x), 0.0, 1.0), IW_SAMPLES)
    assert_same(model_part(scorer.score(x, iw_samples=IW_SAMPLES)), expected)


@pytest.mark.parametrize("case", CASES)
@settings(PROPERTY, max_examples=20)
@given(data=st.data())
def test_chunking_does_not_change_scores(cases, case, data):
    scorer = cases[case].scorer
    x = data.draw(rows_inside(scorer.support.low, scorer.support.high, max_rows=8, min_rows=2), label="x")
    if data.draw(st.booleans(), label="one row outside"):
        x = perturb(data, x, scorer.support, {0: [data.draw(st.integers(0, scorer.features - 1), label="feature")]})
    one_row = rebuilt(scorer, chunk_values=1)
    assert scorer.work(len(x), iw_samples=IW_SAMPLES) <= scorer.chunk_values  # the default scores them in one chunk
    assert_same(one_row.score(x, iw_samples=IW_SAMPLES), scorer.score(x, iw_samples=IW_SAMPLES))


def poisoned(decode, rows: int, bad: list[int], value: float):
    """decode, with its outputs at every posterior sample (and label) of rows `bad` replaced by `value`:
    in a chunk of `rows` rows, decoder input i belongs to row i % rows."""

    def decode_poisoned(z, y):
        hit = np.isin(np.arange(len(z)) % rows, bad)[:, None]
        return {name: np.where(hit, np.float32(value), v) for name, v in decode(z, y).items()}

    return decode_poisoned


@pytest.mark.parametrize("case", CASES)
@settings(PROPERTY, max_examples=20)
@given(data=st.data())
def test_a_decoder_breaking_down_gives_inf_never_nan(cases, case, data):
    scorer = cases[case].scorer
    x = data.draw(rows_inside(scorer.support.low, scorer.support.high, max_rows=6), label="x")
    bad = data.draw(st.lists(st.integers(0, len(x) - 1), min_size=1, unique=True), label="bad rows")
    value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
    broken = rebuilt(scorer, decode=poisoned(scorer.decode, len(x), bad, value))
    assert broken.work(len(x), iw_samples=IW_SAMPLES) <= broken.chunk_values  # one chunk: row i % rows holds

    s, clean = broken.score(x, iw_samples=IW_SAMPLES), scorer.score(x, iw_samples=IW_SAMPLES)
    assert_never_nan(s)
    for name in ("neg_elbo", "reconstruction", "neg_iw", "per_feature"):
        assert (getattr(s, name)[bad] == np.inf).all(), name
    if scorer.class_prior is None:  # KL(q(z|x) || p(z)) is the encoder's alone
        assert np.array_equal(s.kl[bad], clean.kl[bad])
    good = np.setdiff1d(np.arange(len(x)), bad)
    assert_same(s, clean, good)
