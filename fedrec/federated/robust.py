"""Byzantine-robust aggregators: coordinate-wise median, trimmed mean, Krum / Multi-Krum.

A robust aggregator cannot work on the sum of the clients' uploads, so it declares
``aggregation = "updates"``: the backend returns every client's update (from any MPI
process, in client-id order) and ``aggregate`` combines them. Every client has one vote,
whatever its data size: the combination is over the clients' *plain* deltas
(``WeightedUpdate.one_vote_``), not weighted by sample counts as FedAvg's mean is, since
a malicious client could claim a large data set. The result goes through the server
optimizer like FedAvg's mean delta does, so ``server_optimizer`` (momentum, Adam, ...)
applies to robust aggregation too.

Sparse mode (``fl.embedding_updates: sparse``) sends, for each embedding table, only the
rows a client touched:

* median and trimmed mean combine each row over the clients that sent it (their number
  varies by row), and the dense parameters (MLPs) over all clients. A rare row is not
  outvoted by the clients that never saw it (in dense mode their zero deltas would pin
  it to zero), so sparse and dense modes agree on dense parameters but not on tables;
* Krum's distances count a missing row as a zero delta, as in dense mode (they are
  computed from dot products over the rows two clients share, never materialising a
  table), and Multi-Krum averages the chosen clients' rows as FedAvg averages rows
  (``fl.embedding_aggregation``: over all chosen clients, or ``per_row`` over those that
  sent the row).

Config: ``fl_algo: {name: median}``, ``{name: trimmed_mean, trim_fraction: 0.1}``,
``{name: krum, num_byzantine: 10, multi_krum: 1}``; each also takes ``server_optimizer``.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Callable, Dict, List, Sequence, Tuple

import pydantic
import torch
from torch import Tensor

from fedrec.federated.fed_avg import FedAvgWorker
from fedrec.federated.update import RowUpdate, WeightedUpdate, sum_updates
from fedrec.federated_worker import Cohort
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError

TrimFraction = Annotated[float, pydantic.Field(ge=0, lt=0.5)]
NonNegativeInt = Annotated[int, pydantic.Field(ge=0)]
PositiveInt = Annotated[int, pydantic.Field(ge=1)]

#: numbers per stacked chunk (clients x coordinates): bounds the extra memory of sorting
#: or multiplying a model-sized parameter across a cohort
_CHUNK_NUMEL = 1 << 24


def unit_delta(update: WeightedUpdate) -> WeightedUpdate:
    """One client's plain delta as a one-vote update (weight 1, row weights 1); a copy."""
    return copy.deepcopy(update).one_vote_()


# -- coordinate-wise combinations ------------------------------------------------------------
def _row_chunks(shape: torch.Size, clients: int) -> List[slice]:
    """Slices along dim 0 of a parameter such that ``clients`` stacked copies of one slice
    stay within ``_CHUNK_NUMEL`` numbers."""
    if len(shape) == 0:
        return [slice(None)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, _CHUNK_NUMEL // (per_row * max(clients, 1)))
    return [slice(a, min(a + step, shape[0])) for a in range(0, max(shape[0], 1), step)]


def _combine_dense(tensors: Sequence[Tensor], reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """``reduce`` over the clients' sorted values of each coordinate, in row chunks."""
    first = tensors[0]
    if first.dim() == 0:
        return reduce(torch.stack(list(tensors)).sort(dim=0).values)
    out = torch.empty_like(first)
    for part in _row_chunks(first.shape, len(tensors)):
        out[part] = reduce(torch.stack([t[part] for t in tensors]).sort(dim=0).values)
    return out


def _grouped_rows(rows: Sequence[RowUpdate]) -> Tuple[Tensor, Tensor, Tensor]:
    """The clients' rows of one table grouped by row id, sorted by value within a group
    (per column): ``(values [N, dim], unique ids [U], counts [U])``; group ``u`` is
    ``values[start_u : start_u + counts[u]]``."""
    ids = torch.cat([r.ids for r in rows])
    values = torch.cat([r.values for r in rows])
    by_value, order = values.sort(dim=0, stable=True)
    ids_per_column = ids[order]
    ids_sorted, regroup = ids_per_column.sort(dim=0, stable=True)
    grouped = by_value.gather(0, regroup)
    unique, counts = torch.unique_consecutive(ids_sorted[:, 0], return_counts=True)
    return grouped, unique, counts


def _median_sorted(values: Tensor) -> Tensor:
    n = values.shape[0]
    if n % 2:
        return values[n // 2].clone()
    return (values[n // 2 - 1] + values[n // 2]) / 2


def _median_grouped(values: Tensor, counts: Tensor) -> Tensor:
    starts = torch.cumsum(counts, 0) - counts
    low, high = starts + (counts - 1) // 2, starts + counts // 2
    odd = (counts % 2 == 1).unsqueeze(1)
    return torch.where(odd, values[low], (values[low] + values[high]) / 2)


def _trim_counts(counts: Tensor, fraction: float) -> Tensor:
    """Values cut at each end: ``floor(fraction * n)`` (Yin et al. 2018; scipy's rule)."""
    return torch.floor(counts.to(torch.float64) * fraction).to(torch.int64)


def _trimmed_sorted(values: Tensor, fraction: float) -> Tensor:
    n = values.shape[0]
    cut = int(_trim_counts(torch.tensor([n]), fraction))
    return values[cut:n - cut].sum(0) / (n - 2 * cut)


def _trimmed_grouped(values: Tensor, counts: Tensor, fraction: float) -> Tensor:
    cut = _trim_counts(counts, fraction)
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(values.shape[0]) - starts[group]
    keep = (rank >= cut[group]) & (rank < (counts - cut)[group])
    sums = torch.zeros((counts.numel(), values.shape[1]), dtype=values.dtype)
    sums.index_add_(0, group[keep], values[keep])
    return sums / (counts - 2 * cut).to(values.dtype).unsqueeze(1)


def _coordinatewise(updates: Sequence[WeightedUpdate], dense: Callable[[Tensor], Tensor],
                    grouped: Callable[[Tensor, Tensor], Tensor]) -> WeightedUpdate:
    """One update from the clients' plain deltas: dense parameters over all clients,
    each table row over the clients that sent it."""
    if not updates:
        return WeightedUpdate()
    out = {name: _combine_dense([u.dense[name] for u in updates], dense) for name in updates[0].dense}
    rows: Dict[str, RowUpdate] = {}
    for name in sorted({name for u in updates for name in u.rows}):
        sent = [u.rows[name] for u in updates if name in u.rows and u.rows[name].ids.numel()]
        if not sent:
            continue
        values, ids, counts = _grouped_rows(sent)
        rows[name] = RowUpdate(ids, grouped(values, counts), torch.ones(ids.numel(), dtype=torch.float64))
    return WeightedUpdate(out, rows, 1.0, 1)


def coordinate_median(updates: Sequence[WeightedUpdate]) -> WeightedUpdate:
    """The coordinate-wise median of plain deltas (``np.median``'s: the mean of the two
    middle values for an even count); a table row over the clients that sent it."""
    return _coordinatewise(updates, _median_sorted, _median_grouped)


def trimmed_mean(updates: Sequence[WeightedUpdate], fraction: float) -> WeightedUpdate:
    """The coordinate-wise ``fraction``-trimmed mean of plain deltas (Yin et al. 2018):
    per coordinate, drop the ``floor(fraction * n)`` largest and smallest values and
    average the rest (``scipy.stats.trim_mean``); a table row over its senders' ``n``."""
    return _coordinatewise(updates, lambda v: _trimmed_sorted(v, fraction),
                           lambda v, c: _trimmed_grouped(v, c, fraction))


# -- Krum ------------------------------------------------------------------------------------
def _add_dense_gram(gram: Tensor, tensors: Sequence[Tensor]) -> None:
    """``gram[i, j] += <t_i, t_j>`` for one dense parameter, in column chunks (float64)."""
    flat = [t.reshape(-1) for t in tensors]
    numel = flat[0].numel()
    step = max(1, _CHUNK_NUMEL // len(flat))
    for a in range(0, numel, step):
        block = torch.stack([f[a:a + step] for f in flat]).to(torch.float64)
        gram.add_(block @ block.T)


def _add_row_gram(gram: Tensor, rows: Sequence[RowUpdate | None]) -> None:
    """``gram[i, j] += <rows_i, rows_j>`` for one table, summed over the row ids clients
    ``i`` and ``j`` both sent (a row one of them lacks is a zero delta: adds nothing).

    Pairs are formed within each row id's group, so the work is the sum over rows of
    (senders of the row)^2, at most ``clients`` times the rows sent; no table is built.
    """
    clients = gram.shape[0]
    present = [(i, r) for i, r in enumerate(rows) if r is not None and r.ids.numel()]
    if not present:
        return
    ids = torch.cat([r.ids for _, r in present])
    owner = torch.cat([torch.full((r.ids.numel(),), i, dtype=torch.int64) for i, r in present])
    values = torch.cat([r.values for _, r in present]).to(torch.float64)
    order = torch.argsort(ids, stable=True)
    ids, owner, values = ids[order], owner[order], values[order]
    _, counts = torch.unique_consecutive(ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pairs_of = torch.repeat_interleave(counts, counts)  # each entry pairs with its whole group
    start_of = torch.repeat_interleave(starts, counts)
    ends = torch.cumsum(pairs_of, 0)
    budget = max(clients, _CHUNK_NUMEL // max(values.shape[1], 1))
    flat = gram.view(-1)
    a, total = 0, ids.numel()
    while a < total:
        done = int(ends[a - 1]) if a else 0
        b = max(a + 1, int(torch.searchsorted(ends, done + budget, right=True)))
        counts_ab = pairs_of[a:b]
        left = torch.repeat_interleave(torch.arange(a, b), counts_ab)
        offset = torch.arange(left.numel()) - torch.repeat_interleave(torch.cumsum(counts_ab, 0) - counts_ab,
                                                                      counts_ab)
        right = torch.repeat_interleave(start_of[a:b], counts_ab) + offset
        dots = (values[left] * values[right]).sum(1)
        flat.index_add_(0, owner[left] * clients + owner[right], dots)
        a = b


def pairwise_sq_distances(updates: Sequence[WeightedUpdate]) -> Tensor:
    """``[n, n]`` float64 squared L2 distances between the updates' values, dense
    parameters and table rows together (a row an update lacks counts as zero), from the
    Gram matrix: ``|a - b|^2 = |a|^2 + |b|^2 - 2 <a, b>``, clamped at 0."""
    n = len(updates)
    gram = torch.zeros((n, n), dtype=torch.float64)
    if not n:
        return gram
    for name in updates[0].dense:
        _add_dense_gram(gram, [u.dense[name] for u in updates])
    for name in sorted({name for u in updates for name in u.rows}):
        _add_row_gram(gram, [u.rows.get(name) for u in updates])
    norms = torch.diagonal(gram).clone()
    return (norms.unsqueeze(0) + norms.unsqueeze(1) - 2 * gram).clamp_(min=0.0)


def krum_scores(distances: Tensor, num_byzantine: int) -> Tensor:
    """Blanchard et al. (2017): client ``i``'s score is the sum of its squared distances
    to its ``n - f - 2`` nearest other clients."""
    n = distances.shape[0]
    check_krum_cohort(num_byzantine, 1, n)
    others = distances.clone()
    others.fill_diagonal_(math.inf)
    return others.sort(dim=1).values[:, :n - num_byzantine - 2].sum(1)


def krum_select(updates: Sequence[WeightedUpdate], num_byzantine: int, multi_krum: int = 1) -> List[int]:
    """Positions (ascending) of the ``multi_krum`` best-scored updates (ties: lower first)."""
    check_krum_cohort(num_byzantine, multi_krum, len(updates))
    scores = krum_scores(pairwise_sq_distances(updates), num_byzantine)
    return sorted(int(i) for i in torch.argsort(scores, stable=True)[:multi_krum])


def check_krum_cohort(num_byzantine: int, multi_krum: int, cohort: int, source: str = "") -> None:
    """Krum needs ``n > 2f + 2`` (Blanchard et al. 2017) and Multi-Krum ``m <= n``;
    ``source`` says where the cohort size came from (for the message)."""
    where = f"a cohort of {cohort} clients" + (f" ({source})" if source else "")
    if cohort <= 2 * num_byzantine + 2:
        largest = f"num_byzantine <= {(cohort - 3) // 2}" if cohort >= 3 else "at least 3 clients"
        raise ValueError(f"fl.fl_algo.num_byzantine = {num_byzantine} is too large for {where}: "
                         f"Krum needs more than 2 * num_byzantine + 2 clients ({largest})")
    if multi_krum > cohort:
        raise ValueError(f"fl.fl_algo.multi_krum = {multi_krum} exceeds {where}: "
                         "Multi-Krum averages the multi_krum best-scored of them")


# -- the registered algorithms ---------------------------------------------------------------
class RobustAggregator(FedAvgWorker):
    """FedAvg's rounds with a non-linear combination of every client's plain delta.

    ``combine`` maps the cohort's one-vote deltas (client-id order) to one update, which
    the server optimizer applies as FedAvg applies its mean delta.
    """

    linear_aggregation = False
    aggregation = "updates"

    def aggregate(self, neighbours: Cohort) -> Dict[str, torch.Tensor]:
        # the cohort's updates are the aggregator's own: made one-vote in place
        deltas = [update.one_vote_() for _, update in sorted(neighbours.updates.items())]
        if deltas:
            self.server_step(self.combine(deltas), neighbours)
        return self.get_model()

    def combine(self, deltas: List[WeightedUpdate]) -> WeightedUpdate:
        raise NotImplementedError


@registry.load("fl_algo", "median")
class MedianWorker(RobustAggregator):
    """Coordinate-wise median (Yin et al. 2018): each coordinate moves by the median of
    the clients' deltas; a table row in sparse mode by the median over its senders."""

    def combine(self, deltas):
        return coordinate_median(deltas)


@registry.load("fl_algo", "trimmed_mean")
class TrimmedMeanWorker(RobustAggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, the mean of the
    clients' deltas without the ``floor(trim_fraction * n)`` largest and smallest; in
    sparse mode ``n`` is a row's senders. ``trim_fraction`` in [0, 0.5) (0: the mean)."""

    def __init__(self, *args: Any, trim_fraction: TrimFraction = 0.1, **kwargs: Any) -> None:
        self.trim_fraction = float(trim_fraction)
        super().__init__(*args, **kwargs)

    def combine(self, deltas):
        return trimmed_mean(deltas, self.trim_fraction)


@registry.load("fl_algo", "krum")
class KrumWorker(RobustAggregator):
    """Krum / Multi-Krum (Blanchard et al. 2017): score each client by the summed squared
    distances to its ``n - f - 2`` nearest others (``f`` = ``num_byzantine``), then take
    the ``multi_krum`` best-scored deltas and average them (``multi_krum: 1`` is Krum).
    Needs ``n > 2f + 2`` clients per round, checked against ``fl.client_num_per_round``
    before round 1 (and against each round's cohort, which a Poisson sampler varies).
    """

    def __init__(self, *args: Any, num_byzantine: NonNegativeInt = 0, multi_krum: PositiveInt = 1,
                 **kwargs: Any) -> None:
        self.num_byzantine, self.multi_krum = int(num_byzantine), int(multi_krum)
        super().__init__(*args, **kwargs)
        if self.client_num_per_round:
            check_krum_cohort(self.num_byzantine, self.multi_krum, self.client_num_per_round,
                              source="fl.client_num_per_round")

    def combine(self, deltas):
        try:  # a Poisson sampler's cohort varies around fl.client_num_per_round
            check_krum_cohort(self.num_byzantine, self.multi_krum, len(deltas),
                              source=f"round {self.round_idx}, drawn by fl.sampler")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return sum_updates(deltas[i] for i in krum_select(deltas, self.num_byzantine, self.multi_krum))
