"""Arena ratings against known answers and independent fits: Bradley-Terry maximum likelihood on the Elo scale,
ties as half wins, the anchor, bootstrap intervals, ranks, pair sampling weights and outlier voters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.ratings import (
    BOOTSTRAP_ROUNDS,
    bootstrap_ratings,
    compute_mle_ratings,
    fit_strengths,
    intervals,
    leaderboard,
    outlier_judges,
    pair_weights,
    ranks,
    to_ratings,
)

TRUTH = {"c0": 1180.0, "c1": 1120.0, "c2": 1070.0, "c3": 1020.0, "c4": 970.0, "c5": 920.0, "c6": 870.0}


def battle(a: str, b: str, winner: str, judge: str = "j", tstamp: float = 0.0) -> dict:
    return {"model_a": a, "model_b": b, "winner": winner, "judge": judge, "tstamp": tstamp}


def simulate(
    truth: dict[str, float], n: int, seed: int, tie_rate: float = 0.1, judges: int = 20
) -> list[dict]:
    """Battles between random pairs whose expected score (ties half) follows Bradley-Terry on `truth`."""
    rng = np.random.default_rng(seed)
    names = list(truth)
    battles = []
    for k in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
        u = rng.random()
        if u < tie_rate:
            winner = "tie" if u < tie_rate / 2 else "tie (bothbad)"
        else:
            winner = "model_a" if rng.random() < (p - tie_rate / 2) / (1 - tie_rate) else "model_b"
        battles.append(battle(a, b, winner, judge=f"judge-{k % judges}", tstamp=float(k)))
    return battles


# --- known answers ------------------------------------------------------------------------------------------------


def test_two_contenders_are_apart_by_the_log_odds_of_their_win_rate() -> None:
    battles = [battle("a", "b", "model_a")] * 3 + [battle("a", "b", "model_b")]
    ratings = compute_mle_ratings(battles)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (ratings["a"] + ratings["b"]) / 2 == pytest.approx(1000, abs=1e-6)


def test_a_tie_counts_half_a_win_each_way_and_so_does_both_bad() -> None:
    with_ties = [battle("a", "b", "model_a"), battle("b", "a", "tie"), battle("a", "b", "tie (bothbad)")]
    as_wins = [battle("a", "b", "model_a")] * 2 + [battle("a", "b", "model_b")]
    assert compute_mle_ratings(with_ties) == pytest.approx(compute_mle_ratings(as_wins), abs=1e-6)
    assert compute_mle_ratings(with_ties)["a"] - 1000 == pytest.approx(200 * math.log10(2), abs=1e-6)


def test_sides_do_not_matter() -> None:
    forward = [battle("a", "b", "model_a")] * 5 + [battle("a", "b", "model_b")] * 2
    mirrored = [battle("b", "a", "model_b")] * 5 + [battle("b", "a", "model_a")] * 2
    assert compute_mle_ratings(forward) == pytest.approx(compute_mle_ratings(mirrored), abs=1e-6)


def test_the_anchor_is_pinned_and_the_gaps_are_kept() -> None:
    battles = simulate(TRUTH, 600, seed=3)
    free = compute_mle_ratings(battles)
    anchored = compute_mle_ratings(battles, anchor="c3", anchor_rating=1114.0)
    assert anchored["c3"] == 1114.0
    for name in TRUTH:
        assert anchored[name] - anchored["c0"] == pytest.approx(free[name] - free["c0"], abs=1e-6)
    with pytest.raises(ValueError, match="anchor 'nobody' is not a contender"):
        compute_mle_ratings(battles, anchor="nobody")


def test_scale_and_base_set_the_units() -> None:
    battles = [battle("a", "b", "model_a")] * 3 + [battle("a", "b", "model_b")]
    natural = compute_mle_ratings(battles, scale=1.0, base=math.e, init_rating=0.0)
    assert natural["a"] - natural["b"] == pytest.approx(math.log(3), abs=1e-9)


def test_an_unbeaten_contender_gets_a_finite_rating_above_the_rest() -> None:
    battles = (
        [battle("a", "b", "model_a")] * 4 + [battle("b", "c", "model_a")] * 3 + [battle("c", "b", "model_a")]
    )
    ratings = compute_mle_ratings(battles)
    assert all(math.isfinite(value) for value in ratings.values())
    assert ratings["a"] > ratings["b"] > ratings["c"]


def test_a_contender_without_battles_gets_the_initial_rating() -> None:
    ratings = compute_mle_ratings([battle("a", "b", "tie")], contenders=["a", "b", "new"])
    assert ratings == pytest.approx({"a": 1000.0, "b": 1000.0, "new": 1000.0}, abs=1e-6)


def test_a_winner_outside_fastchats_four_is_refused() -> None:
    with pytest.raises(ValueError, match="winner 'draw' is not one of"):
        compute_mle_ratings([battle("a", "b", "draw")])


# --- agreement with independent fits ------------------------------------------------------------------------------


def test_ratings_agree_with_an_independent_logistic_regression_within_one_point() -> None:
    """scipy fits the logistic regression on FastChat's design (one row per ordered pair and outcome, wins
    weighted 2 and ties 1 each way, no intercept, no penalty); its coefficients, put on the Elo scale with the
    same mean, are our ratings within 1 point (in fact within 0.01)."""
    from scipy.optimize import minimize
    from scipy.special import log_expit

    battles = simulate(TRUTH, 2000, seed=11)
    names = sorted(TRUTH)
    index = {name: i for i, name in enumerate(names)}
    weight = np.zeros((len(names), len(names)))
    for b in battles:
        i, j = index[b["model_a"]], index[b["model_b"]]
        if b["winner"] == "model_a":
            weight[i, j] += 2
        elif b["winner"] == "model_b":
            weight[j, i] += 2
        else:
            weight[i, j] += 1
            weight[j, i] += 1
    rows, labels, weights = [], [], []
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j and weight[i, j] + weight[j, i] > 0:
                x = np.zeros(len(names))
                x[i], x[j] = math.log(10), -math.log(10)
                rows += [x, x]
                labels += [1.0, 0.0]
                weights += [weight[i, j], weight[j, i]]
    design, y, w = np.array(rows), np.array(labels), np.array(weights)

    def loss(beta: np.ndarray) -> float:
        z = design @ beta
        return -float(np.sum(w * (y * log_expit(z) + (1 - y) * log_expit(-z))))

    fit = minimize(loss, np.zeros(len(names)), method="BFGS", options={"gtol": 1e-10, "maxiter": 1000})
    theirs = 400 * fit.x + 1000
    theirs += 1000 - theirs.mean()
    ours = compute_mle_ratings(battles)
    assert max(abs(ours[name] - theirs[index[name]]) for name in names) < 1.0
    assert max(abs(ours[name] - theirs[index[name]]) for name in names) < 0.01


def test_ratings_agree_with_fastchats_compute_mle_elo() -> None:
    """FastChat's `compute_mle_elo` as published (pivot tables into scikit-learn's LogisticRegression; C=inf is
    its penalty=None under scikit-learn's newer spelling), where scikit-learn is installed."""
    pd = pytest.importorskip("pandas")
    linear_model = pytest.importorskip("sklearn.linear_model")

    def compute_mle_elo(df, SCALE=400, BASE=10, INIT_RATING=1000):
        ptbl_a_win = pd.pivot_table(
            df[df["winner"] == "model_a"], index="model_a", columns="model_b", aggfunc="size", fill_value=0
        )
        ptbl_tie = pd.pivot_table(
            df[df["winner"].isin(["tie", "tie (bothbad)"])],
            index="model_a", columns="model_b", aggfunc="size", fill_value=0,
        )  # fmt: skip
        ptbl_tie = ptbl_tie + ptbl_tie.T
        ptbl_b_win = pd.pivot_table(
            df[df["winner"] == "model_b"], index="model_a", columns="model_b", aggfunc="size", fill_value=0
        )
        ptbl_win = ptbl_a_win * 2 + ptbl_b_win.T * 2 + ptbl_tie
        models = pd.Series(np.arange(len(ptbl_win.index)), index=ptbl_win.index)
        p = len(models)
        X = np.zeros([p * (p - 1) * 2, p])
        Y = np.zeros(p * (p - 1) * 2)
        cur_row, sample_weights = 0, []
        for m_a in ptbl_win.index:
            for m_b in ptbl_win.columns:
                if m_a == m_b or math.isnan(ptbl_win.loc[m_a, m_b]) or math.isnan(ptbl_win.loc[m_b, m_a]):
                    continue
                X[cur_row, models[m_a]] = +math.log(BASE)
                X[cur_row, models[m_b]] = -math.log(BASE)
                Y[cur_row] = 1.0
                sample_weights.append(ptbl_win.loc[m_a, m_b])
                X[cur_row + 1, models[m_a]] = math.log(BASE)
                X[cur_row + 1, models[m_b]] = -math.log(BASE)
                Y[cur_row + 1] = 0.0
                sample_weights.append(ptbl_win.loc[m_b, m_a])
                cur_row += 2
        X, Y = X[:cur_row], Y[:cur_row]
        lr = linear_model.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6)
        lr.fit(X, Y, sample_weight=sample_weights)
        elo_scores = SCALE * lr.coef_[0] + INIT_RATING
        return pd.Series(elo_scores, index=models.index)

    battles = simulate(TRUTH, 3000, seed=5)
    theirs = compute_mle_elo(pd.DataFrame(battles))
    ours = compute_mle_ratings(battles)
    theirs += 1000 - theirs.mean()
    assert max(abs(ours[name] - theirs[name]) for name in TRUTH) < 1.0


def test_the_multinomial_bootstrap_matches_resampling_battles() -> None:
    """FastChat's `get_bootstrap_result` resamples the battle table with replacement; drawing each distinct
    outcome's count from a multinomial is the same distribution, so the intervals agree up to Monte Carlo
    error (a few points at 400 rounds)."""
    battles = simulate(TRUTH, 1500, seed=8)
    names = sorted(TRUTH)
    index = {name: i for i, name in enumerate(names)}
    p = len(names)
    cells, shares, owner = [], [], []  # each battle's entries in the flattened win matrix
    for k, b in enumerate(battles):
        i, j = index[b["model_a"]], index[b["model_b"]]
        entries = {"model_a": [(i * p + j, 1.0)], "model_b": [(j * p + i, 1.0)]}.get(
            b["winner"], [(i * p + j, 0.5), (j * p + i, 0.5)]
        )
        for cell, share in entries:
            cells.append(cell)
            shares.append(share)
            owner.append(k)
    cells_of, shares_of = np.array(cells), np.array(shares)
    by_battle = np.bincount(np.array(owner), minlength=len(battles))
    rng = np.random.default_rng(0)
    wins = []
    for _ in range(400):
        drawn = np.bincount(rng.integers(0, len(battles), len(battles)), minlength=len(battles))
        wins.append(
            np.bincount(cells_of, shares_of * np.repeat(drawn, by_battle), minlength=p * p).reshape(p, p)
        )
    resampled = to_ratings(fit_strengths(np.array(wins)))
    ours = bootstrap_ratings(battles, names, rounds=400, seed=1)
    for name, low_a, high_a, low_b, high_b in zip(
        names, *intervals(resampled), *intervals(ours), strict=True
    ):
        assert abs(low_a - low_b) < 6 and abs(high_a - high_b) < 6, name


# --- intervals, ranks, leaderboard --------------------------------------------------------------------------------


def test_rank_is_one_plus_the_contenders_whose_lower_bound_is_above_this_upper_bound() -> None:
    lower = [1050.0, 1040.0, 990.0, 900.0]
    upper = [1100.0, 1080.0, 1045.0, 980.0]
    # c: only a's lower bound (1050) clears its upper bound (1045); d: everyone's does.
    assert ranks(lower, upper) == [1, 1, 2, 4]


def test_leaderboard_rows_carry_rating_interval_rank_and_record() -> None:
    battles = simulate(TRUTH, 3000, seed=2)
    rows = leaderboard(battles)
    assert BOOTSTRAP_ROUNDS >= 100
    assert [row.contender for row in rows] == sorted(TRUTH, key=lambda name: -TRUTH[name])
    for row in rows:
        assert row.lower <= row.rating <= row.upper
        assert row.battles == row.wins + row.ties + row.losses
        assert row.rank == 1 + sum(other.lower > row.upper for other in rows)
    assert sum(row.battles for row in rows) == 2 * len(battles)
    assert rows[0].rank == 1 and rows[-1].rank > 1


def test_bootstrap_intervals_cover_the_truth_and_narrow_with_more_battles() -> None:
    names = sorted(TRUTH)
    truth = np.array([TRUTH[name] for name in names])
    truth += 1000 - truth.mean()
    widths = []
    for n in (500, 4000):
        low, high = intervals(bootstrap_ratings(simulate(TRUTH, n, seed=4), names, rounds=300))
        assert np.mean((low <= truth) & (truth <= high)) >= 0.85
        widths.append(float(np.mean(high - low)))
    assert widths[1] < widths[0] / 2


# --- pair sampling ------------------------------------------------------------------------------------------------


def test_pair_weights_favour_pairs_with_few_battles_and_close_ratings() -> None:
    ratings = [1000.0, 1000.0, 1000.0, 1400.0]
    counts = np.array([[0, 0, 30, 0], [0, 0, 0, 0], [30, 0, 0, 0], [0, 0, 0, 0]])
    weights = pair_weights(ratings, counts)
    assert weights[0, 1] == pytest.approx(1.0)  # equal ratings, never compared: the most informative battle
    assert weights[0, 2] == pytest.approx(1 / 31)  # equal ratings, compared 30 times
    p = 1 / (1 + 10 ** (-1))  # 400 points apart: the outcome is nearly certain
    assert weights[0, 3] == pytest.approx(0.5 * 4 * p * (1 - p) + 0.5)
    assert pair_weights(ratings, counts, exploration=0.0)[0, 3] == pytest.approx(4 * p * (1 - p))
    assert pair_weights(ratings, counts, exploration=1.0)[0, 3] == pytest.approx(1.0)
    assert np.all(np.tril(weights) == 0)


# --- outlier voters -----------------------------------------------------------------------------------------------


def test_contrarian_and_coin_flipping_voters_are_flagged_and_honest_ones_are_not() -> None:
    rng = np.random.default_rng(9)
    honest = simulate(TRUTH, 4000, seed=9, judges=40)
    names = list(TRUTH)
    planted = []
    for k in range(
        200
    ):  # a coin flipper is told from an honest voter only where the outcome is far from even
        i, j = rng.choice(len(names), 2, replace=False)
        if k < 30:  # a contrarian, though, is caught within a few dozen votes
            weaker_side = "model_a" if TRUTH[names[i]] < TRUTH[names[j]] else "model_b"
            planted.append(battle(names[i], names[j], weaker_side, judge="contrarian", tstamp=k))
        random_side = "model_a" if rng.random() < 0.5 else "model_b"
        planted.append(battle(names[j], names[i], random_side, judge="coin-flipper", tstamp=k))
        planted.append(battle(names[i], names[j], "tie", judge="always-tie", tstamp=k))
    few = [battle("c6", "c0", "model_a", judge="newcomer", tstamp=k) for k in range(5)]
    battles = honest + planted + few
    flagged = outlier_judges(battles, compute_mle_ratings(battles), alpha=1e-3)
    assert set(flagged) == {"contrarian", "coin-flipper"}
    assert all(evidence >= 1e3 for evidence in flagged.values())
