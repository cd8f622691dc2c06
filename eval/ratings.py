"""Arena ratings as pure functions over battle records: Bradley-Terry maximum likelihood, bootstrap intervals,
ranks, pair sampling weights and outlier voters.

A battle is a mapping with `model_a`, `model_b` and `winner` (`model_a`, `model_b`, `tie` or `tie (bothbad)`), as
in FastChat's battle records. Ratings are on the Elo scale FastChat uses: P(i beats j) = 1 / (1 + 10^((R_j - R_i)
/ 400)), ties count half a win each way, and the mean rating is 1000 unless an anchor contender is pinned instead.
docs/arena.md derives the formulas.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
TIES = frozenset(WINNERS[2:])
BOOTSTRAP_ROUNDS = 1000

# A ridge on the natural-scale strengths keeps the maximum finite when a contender won (or lost) every battle it
# played, as happens in bootstrap resamples of small arenas; otherwise it moves ratings by less than 1e-6.
_RIDGE = 1e-9
_MAX_NEWTON_STEPS = 200
_MAX_HALVINGS = 40
_TOLERANCE = 1e-10

Battle = Mapping[str, object]


# --- tallies ------------------------------------------------------------------------------------------------------


def contenders_of(battles: Iterable[Battle]) -> list[str]:
    """The contenders that appear in the battles, sorted by name."""
    return sorted({str(b["model_a"]) for b in battles} | {str(b["model_b"]) for b in battles})


def outcome_counts(battles: Iterable[Battle]) -> Counter[tuple[str, str, str]]:
    """How often each (model_a, model_b, winner) occurred: all a Bradley-Terry fit needs of the battles, and
    what the bootstrap resamples. Raises ValueError for a winner outside WINNERS or a contender against itself."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for battle in battles:
        a, b, winner = str(battle["model_a"]), str(battle["model_b"]), str(battle["winner"])
        if winner not in WINNERS:
            raise ValueError(f"winner {winner!r} is not one of {', '.join(WINNERS)}")
        if a == b:
            raise ValueError(f"a battle of {a!r} against itself")
        counts[a, b, winner] += 1
    return counts


def _cell_matrix(cells: Sequence[tuple[str, str, str]], index: Mapping[str, int]) -> np.ndarray:
    """(cells, p*p): what one battle of each cell adds to the win matrix (a tie: half to each side)."""
    p = len(index)
    matrix = np.zeros((len(cells), p * p))
    for row, (a, b, winner) in enumerate(cells):
        i, j = index[a], index[b]
        if winner == "model_a":
            matrix[row, i * p + j] = 1.0
        elif winner == "model_b":
            matrix[row, j * p + i] = 1.0
        else:
            matrix[row, i * p + j] = matrix[row, j * p + i] = 0.5
    return matrix


def win_matrix(counts: Mapping[tuple[str, str, str], float], contenders: Sequence[str]) -> np.ndarray:
    """W[i, j] = the wins of contender i over contender j, a tie counting half a win each way."""
    index = {name: i for i, name in enumerate(contenders)}
    cells = list(counts)
    p = len(contenders)
    if not cells:
        return np.zeros((p, p))
    weights = np.array([counts[cell] for cell in cells], dtype=np.float64)
    return (weights @ _cell_matrix(cells, index)).reshape(p, p)


# --- Bradley-Terry maximum likelihood -----------------------------------------------------------------------------


def _objective(theta: np.ndarray, wins: np.ndarray) -> np.ndarray:
    """Negative log-likelihood plus the ridge, per row of a batch: theta (R, p), wins (R, p, p)."""
    diff = theta[:, :, None] - theta[:, None, :]
    return (wins * np.logaddexp(0.0, -diff)).sum(axis=(1, 2)) + 0.5 * _RIDGE * (theta**2).sum(axis=1)


def fit_strengths(wins: np.ndarray, initial: np.ndarray | None = None) -> np.ndarray:
    """Natural-scale strengths theta maximising sum_ij W_ij log sigmoid(theta_i - theta_j), summing to zero; by
    Newton's method with backtracking, for one win matrix (p, p) or a batch of them (R, p, p). `initial` (the
    strengths of a slightly different matrix, say) only changes how many steps it takes."""
    batch = wins[None] if wins.ndim == 2 else wins
    rounds, p, _ = batch.shape
    theta = (
        np.zeros((rounds, p)) if initial is None else np.array(initial, dtype=np.float64).reshape(rounds, p)
    )
    if p == 0:
        return theta[0] if wins.ndim == 2 else theta
    played = batch + batch.transpose(0, 2, 1)
    eye = np.eye(p)
    value = _objective(theta, batch)
    active = np.ones(rounds, dtype=bool)
    for _ in range(_MAX_NEWTON_STEPS):
        if not active.any():
            break
        t, w, n = theta[active], batch[active], played[active]
        s = 1.0 / (1.0 + np.exp(-(t[:, :, None] - t[:, None, :])))
        gradient = (w - n * s).sum(axis=2) - _RIDGE * t  # of the log-likelihood
        curvature = n * s * (1.0 - s)
        hessian = _RIDGE * eye - curvature  # of the negative log-likelihood
        hessian[:, np.arange(p), np.arange(p)] += curvature.sum(axis=2)
        step = np.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        size = np.ones(len(t))
        current = value[active]
        for _ in range(_MAX_HALVINGS):
            candidate = _objective(t + size[:, None] * step, w)
            worse = candidate > current + 1e-12 * np.abs(current)
            if not worse.any():
                break
            size[worse] /= 2
        moved = t + size[:, None] * step
        theta[active] = moved
        value[active] = _objective(moved, w)
        done = np.abs(size[:, None] * step).max(axis=1) < _TOLERANCE
        active[np.flatnonzero(active)[done]] = False
    theta -= theta.mean(axis=1, keepdims=True)
    return theta[0] if wins.ndim == 2 else theta


def to_ratings(
    theta: np.ndarray,
    *,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
    anchor: int | None = None,
    anchor_rating: float = INIT_RATING,
) -> np.ndarray:
    """Strengths on the rating scale: mean `init_rating`, or contender `anchor` at `anchor_rating`."""
    ratings = init_rating + theta * (scale / math.log(base))
    if anchor is not None:
        ratings = ratings + (anchor_rating - ratings[..., [anchor]])
    return ratings


def compute_mle_ratings(
    battles: Iterable[Battle],
    *,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
    anchor: str | None = None,
    anchor_rating: float = INIT_RATING,
    contenders: Sequence[str] | None = None,
) -> dict[str, float]:
    """Bradley-Terry ratings by maximum likelihood, as FastChat's `compute_mle_elo`: the logistic regression of
    outcomes on rating differences, without intercept or penalty. `contenders` fixes the names rated (default:
    those in the battles); one without battles gets `init_rating`."""
    counts = outcome_counts(battles)
    names = list(contenders) if contenders is not None else contenders_of(_battles_of(counts))
    anchor_index = _anchor_index(names, anchor)
    theta = fit_strengths(win_matrix(counts, names))
    ratings = to_ratings(
        theta,
        scale=scale,
        base=base,
        init_rating=init_rating,
        anchor=anchor_index,
        anchor_rating=anchor_rating,
    )
    return dict(zip(names, ratings.tolist(), strict=True))


def _battles_of(counts: Mapping[tuple[str, str, str], int]) -> list[dict[str, str]]:
    return [{"model_a": a, "model_b": b, "winner": w} for a, b, w in counts]


def _anchor_index(names: Sequence[str], anchor: str | None) -> int | None:
    if anchor is None:
        return None
    if anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not a contender: use one of {', '.join(names) or '(none)'}")
    return list(names).index(anchor)


# --- bootstrap, intervals, ranks ----------------------------------------------------------------------------------


def bootstrap_ratings(
    battles: Iterable[Battle],
    contenders: Sequence[str],
    *,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
    anchor: str | None = None,
    anchor_rating: float = INIT_RATING,
) -> np.ndarray:
    """(rounds, contenders) ratings, each fitted on the battles resampled with replacement. Resampling battles is
    drawing how often each distinct (model_a, model_b, winner) occurs from a multinomial, as FastChat does, so a
    round costs one fit of a p x p matrix whatever the number of battles."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    counts = outcome_counts(battles)
    names = list(contenders)
    anchor_index = _anchor_index(names, anchor)
    cells = list(counts)
    total = sum(counts.values())
    if not cells:
        return np.full((rounds, len(names)), init_rating if anchor is None else anchor_rating)
    rng = np.random.default_rng(seed)
    probabilities = np.array([counts[cell] for cell in cells], dtype=np.float64) / total
    drawn = rng.multinomial(total, probabilities, size=rounds).astype(np.float64)
    index = {name: i for i, name in enumerate(names)}
    wins = (drawn @ _cell_matrix(cells, index)).reshape(rounds, len(names), len(names))
    return to_ratings(
        fit_strengths(wins),
        scale=scale,
        base=base,
        init_rating=init_rating,
        anchor=anchor_index,
        anchor_rating=anchor_rating,
    )


def intervals(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of each column of bootstrap samples (rounds, contenders)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    tail = (1 - level) / 2
    return np.quantile(samples, tail, axis=0), np.quantile(samples, 1 - tail, axis=0)


def ranks(lower: Sequence[float], upper: Sequence[float]) -> list[int]:
    """1 + the number of contenders whose lower bound is above this one's upper bound: contenders whose intervals
    overlap share a rank, and a rank is only ever raised by a statistically clear winner."""
    return [1 + sum(other > mine for other in lower) for mine in upper]


@dataclass(frozen=True)
class ContenderRating:
    """A leaderboard row: the rating, its interval, the rank those give, and the record behind them."""

    contender: str
    rating: float
    lower: float
    upper: float
    rank: int
    battles: int
    wins: int
    ties: int
    losses: int

    @property
    def win_rate(self) -> float:
        """Wins, ties counting half, over battles (nan without battles)."""
        return (self.wins + 0.5 * self.ties) / self.battles if self.battles else float("nan")


def leaderboard(
    battles: Iterable[Battle],
    *,
    contenders: Sequence[str] | None = None,
    rounds: int = BOOTSTRAP_ROUNDS,
    level: float = 0.95,
    seed: int = 0,
    scale: float = SCALE,
    base: float = BASE,
    init_rating: float = INIT_RATING,
    anchor: str | None = None,
    anchor_rating: float = INIT_RATING,
) -> list[ContenderRating]:
    """Every contender's rating, `level` bootstrap interval and rank, best first."""
    records = list(battles)
    names = list(contenders) if contenders is not None else contenders_of(records)
    options = {"scale": scale, "base": base, "init_rating": init_rating, "anchor": anchor,
               "anchor_rating": anchor_rating}  # fmt: skip
    point = compute_mle_ratings(records, contenders=names, **options)
    lower, upper = intervals(bootstrap_ratings(records, names, rounds=rounds, seed=seed, **options), level)
    rank = ranks(lower.tolist(), upper.tolist())
    record = _records(records)
    rows = [
        ContenderRating(
            name, point[name], float(lower[i]), float(upper[i]), rank[i], *record.get(name, (0, 0, 0, 0))
        )
        for i, name in enumerate(names)
    ]
    return sorted(rows, key=lambda row: (row.rank, -row.rating, row.contender))


def _records(battles: Iterable[Battle]) -> dict[str, tuple[int, int, int, int]]:
    """Battles, wins, ties and losses of each contender."""
    tally: dict[str, list[int]] = {}
    for battle in battles:
        a, b, winner = str(battle["model_a"]), str(battle["model_b"]), battle["winner"]
        for name, won, lost in ((a, "model_a", "model_b"), (b, "model_b", "model_a")):
            row = tally.setdefault(name, [0, 0, 0, 0])
            row[0] += 1
            row[1 if winner == won else 3 if winner == lost else 2] += 1
    return {name: (row[0], row[1], row[2], row[3]) for name, row in tally.items()}


# --- pair sampling ------------------------------------------------------------------------------------------------


def win_probability(rating_i: float, rating_j: float, *, scale: float = SCALE, base: float = BASE) -> float:
    """P(i beats j) under the ratings."""
    return 1.0 / (1.0 + base ** ((rating_j - rating_i) / scale))


def pair_weights(
    ratings: Sequence[float],
    battle_counts: np.ndarray,
    *,
    exploration: float = 0.5,
    scale: float = SCALE,
    base: float = BASE,
) -> np.ndarray:
    """How much to favour each pair (i, j), i < j, for the next battle (0 on and below the diagonal):
    ((1 - exploration) 4 p (1 - p) + exploration) / (1 + n_ij), with p the predicted win probability and n_ij
    the battles the pair had.

    p (1 - p) is the Fisher information one battle carries about the rating difference: largest (1/4) for equal
    ratings, falling as the outcome becomes foregone. Dividing by 1 + n_ij steers battles to pairs that had few,
    so every pair keeps being compared and a new contender meets everyone first. `exploration` is the share of
    the weight that does not depend on the ratings: the more the pairs follow the outcomes so far, the less the
    bootstrap (which resamples battles as if the pairs were fixed) covers; half keeps its 95% intervals at about
    95% while close pairs still get twice the battles of foregone ones."""
    if not 0 <= exploration <= 1:
        raise ValueError(f"exploration must be between 0 and 1, got {exploration}")
    r = np.asarray(ratings, dtype=np.float64)
    p = 1.0 / (1.0 + base ** ((r[None, :] - r[:, None]) / scale))
    information = 4.0 * p * (1.0 - p)
    weights = ((1 - exploration) * information + exploration) / (
        1.0 + np.asarray(battle_counts, dtype=np.float64)
    )
    return np.triu(weights, k=1)


# --- outlier voters -----------------------------------------------------------------------------------------------


def outlier_judges(
    battles: Iterable[Battle],
    ratings: Mapping[str, float],
    *,
    alpha: float = 1e-3,
    min_votes: int = 10,
    scale: float = SCALE,
    base: float = BASE,
) -> dict[str, float]:
    """The judges whose decisive votes the ratings explain worse than coin flips would, with the evidence against
    each: {judge: e-value}, for e-values of at least 1 / alpha.

    Under the ratings, a judge's vote for the side with win probability p has likelihood p; a coin-flipping or
    contrarian judge's has 1/2. The running product of 0.5 / p over a judge's votes in time order is a test
    martingale for "this judge votes like the crowd" (its expectation is 1 under that hypothesis), so by Ville's
    inequality an honest judge's ever reaches 1 / alpha with probability at most alpha. As in FastChat's
    `outlier_detect`, ties carry no evidence, and judges with fewer than `min_votes` decisive votes are not judged.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    votes: dict[str, list[tuple[float, float]]] = {}
    for battle in battles:
        winner = battle["winner"]
        if winner in TIES or battle.get("judge") is None:
            continue
        a, b = str(battle["model_a"]), str(battle["model_b"])
        if a not in ratings or b not in ratings:
            continue
        p_a = win_probability(ratings[a], ratings[b], scale=scale, base=base)
        p = p_a if winner == "model_a" else 1.0 - p_a
        when = battle.get("tstamp")
        votes.setdefault(str(battle["judge"]), []).append(
            (float(when) if isinstance(when, int | float) else 0.0, p)
        )
    flagged = {}
    threshold = math.log(1 / alpha)
    for judge, cast in votes.items():
        if len(cast) < min_votes:
            continue
        steps = [math.log(0.5) - math.log(max(p, 1e-12)) for _, p in sorted(cast)]
        peak = max(np.cumsum(steps))
        if peak >= threshold:
            flagged[judge] = math.exp(min(peak, 700.0))
    return flagged
