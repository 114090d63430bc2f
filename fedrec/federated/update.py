"""Model updates as values: weighted sums that add, reduce across processes, divide once.

A client's contribution is ``weight * (trained - global)``. Summing contributions is the
only operation aggregation needs for linear algorithms (FedAvg and friends), so the same
``WeightedUpdate`` serves one process, a pre-reduced block of clients, and MPI ranks.

Parameters come in two forms:

* dense: a full tensor per parameter name (MLPs, and embedding tables in dense mode);
* rows: for an embedding table, only the rows a client touched: ``RowUpdate`` holds
  unique row ids, the weighted row deltas, and the summed weights per row (which the
  ``per_row`` semantic divides by).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor


@dataclasses.dataclass
class RowSubset:
    """Some rows of an embedding table: what a submodel carries instead of the table."""

    ids: Tensor  # int64 [k], unique and ascending
    values: Tensor  # [k, dim]
    num_rows: int  # rows of the whole table

    def gather(self, ids: Tensor) -> Tensor:
        positions = torch.searchsorted(self.ids, ids)
        if positions.numel() and (int(positions.max()) >= self.ids.numel()
                                  or not torch.equal(self.ids[positions], ids)):
            raise KeyError("rows requested that this submodel does not carry")
        return self.values.index_select(0, positions)

    def nbytes(self, value_bytes: int = 4, id_bytes: int = 8) -> int:
        return int(self.ids.numel()) * id_bytes + int(self.values.numel()) * value_bytes


def gather_rows(table: "Tensor | RowSubset", ids: Tensor) -> Tensor:
    """Rows ``ids`` of a full table or of a submodel's ``RowSubset``."""
    if isinstance(table, RowSubset):
        return table.gather(ids)
    return table.index_select(0, ids)


def submodel(state: Mapping[str, Tensor], table_rows: Mapping[str, Tensor]) -> Dict[str, "Tensor | RowSubset"]:
    """``state`` with each table in ``table_rows`` cut down to those rows (for download)."""
    out: Dict[str, "Tensor | RowSubset"] = {}
    for name, tensor in state.items():
        ids = table_rows.get(name)
        out[name] = tensor if ids is None else RowSubset(ids, tensor.index_select(0, ids), int(tensor.shape[0]))
    return out


def state_nbytes(state: Mapping[str, "Tensor | RowSubset"], value_bytes: int = 4) -> int:
    """Bytes of a (sub)model on the wire."""
    return sum(v.nbytes(value_bytes) if isinstance(v, RowSubset) else int(v.numel()) * value_bytes
               for v in state.values())


@dataclasses.dataclass
class RowUpdate:
    """Weighted deltas for some rows of one embedding table (ids unique, ascending)."""

    ids: Tensor  # int64 [k]
    values: Tensor  # [k, dim], sum of weight * delta per row
    row_weight: Tensor  # float64 [k], sum of client weights that touched each row

    def __add__(self, other: "RowUpdate") -> "RowUpdate":
        ids = torch.cat([self.ids, other.ids])
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        values = torch.zeros((unique.numel(), self.values.shape[1]), dtype=self.values.dtype)
        # index_add_ accumulates in the order of `inverse`: self's rows, then other's, so
        # the float result does not depend on anything but the operands' order.
        values.index_add_(0, inverse, torch.cat([self.values, other.values]))
        weight = torch.zeros(unique.numel(), dtype=torch.float64)
        weight.index_add_(0, inverse, torch.cat([self.row_weight, other.row_weight]))
        return RowUpdate(unique, values, weight)

    def nbytes(self, value_bytes: int = 4, id_bytes: int = 8) -> int:
        """Bytes on the wire: the row ids plus the values at ``value_bytes`` per number."""
        return int(self.ids.numel()) * id_bytes + int(self.values.numel()) * value_bytes

    @classmethod
    def sum(cls, parts: Sequence["RowUpdate"]) -> "RowUpdate":
        """``parts[0] + parts[1] + ...`` in one pass: one unique and one ``index_add_``
        over all rows, which adds each row's values in the same order as the chain of
        ``+`` does (from zero, part by part), so the result is bit for bit the same."""
        if len(parts) == 1:
            return parts[0]
        unique, inverse = torch.unique(torch.cat([p.ids for p in parts]), sorted=True, return_inverse=True)
        values = torch.zeros((unique.numel(), parts[0].values.shape[1]), dtype=parts[0].values.dtype)
        values.index_add_(0, inverse, torch.cat([p.values for p in parts]))
        weight = torch.zeros(unique.numel(), dtype=torch.float64)
        weight.index_add_(0, inverse, torch.cat([p.row_weight for p in parts]))
        return cls(unique, values, weight)


@dataclasses.dataclass
class WeightedUpdate:
    """``sum_i w_i * delta_i`` over some clients, with ``sum_i w_i`` and their count.

    ``aux`` holds further named sums an algorithm's clients upload beside the model delta
    (SCAFFOLD's control-variate deltas), and ``scalars`` named numbers summed the same
    way (FedNova's ``n_i * tau_i``, q-FFL's ``h_i``): both add with the update, so linear
    algorithms keep per-process pre-reduction whatever they upload.
    """

    dense: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    rows: Dict[str, RowUpdate] = dataclasses.field(default_factory=dict)
    weight: float = 0.0
    num_clients: int = 0
    aux: Dict[str, "WeightedUpdate"] = dataclasses.field(default_factory=dict)
    scalars: Dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_client(cls, trained: Mapping[str, Tensor], base: Mapping[str, "Tensor | RowSubset"], weight: float,
                    dense_names: Iterable[str], touched_rows: Optional[Mapping[str, Tensor]] = None
                    ) -> "WeightedUpdate":
        """One client's weighted delta: dense for ``dense_names``, rows for ``touched_rows``."""
        names = list(dense_names)
        deltas = torch._foreach_sub([trained[n] for n in names], [base[n] for n in names])
        torch._foreach_mul_(deltas, float(weight))
        rows: Dict[str, RowUpdate] = {}
        for name, ids in (touched_rows or {}).items():
            delta = trained[name].index_select(0, ids) - gather_rows(base[name], ids)
            delta.mul_(float(weight))
            rows[name] = RowUpdate(ids, delta, torch.full((ids.numel(),), float(weight), dtype=torch.float64))
        return cls(dict(zip(names, deltas)), rows, float(weight), 1)

    def add_(self, other: "WeightedUpdate") -> "WeightedUpdate":
        """In-place sum (``self`` first, then ``other``: the order is part of the result).
        An update of no clients adds nothing (a dropped client's upload that never came)."""
        if not other.num_clients:
            return self
        if not self.num_clients:
            self.dense = {k: v.clone() for k, v in other.dense.items()}
            self.rows = dict(other.rows)
            self.aux = {k: WeightedUpdate().add_(v) for k, v in other.aux.items()}
            self.scalars = dict(other.scalars)
        else:
            if (set(self.dense) != set(other.dense) or set(self.rows) != set(other.rows)
                    or set(self.aux) != set(other.aux) or set(self.scalars) != set(other.scalars)):
                raise ValueError("cannot add updates over different parameters")
            names = list(self.dense)
            if names:  # (an update of rows only, e.g. a DP contribution map, has no dense part)
                torch._foreach_add_([self.dense[n] for n in names], [other.dense[n] for n in names])
            for name, row in other.rows.items():
                self.rows[name] = self.rows[name] + row
            for name, aux in other.aux.items():
                self.aux[name].add_(aux)
            for name, value in other.scalars.items():
                self.scalars[name] += value
        self.weight += other.weight
        self.num_clients += other.num_clients
        return self

    def mean_delta(self, like: Mapping[str, Tensor], per_row: bool = False,
                   denominator: Optional[float] = None) -> Dict[str, Tensor]:
        """The mean delta as full tensors shaped like ``like`` (rows scattered into zeros).

        This is the server's pseudo-gradient (negated). ``denominator`` replaces the summed
        client weight (DP divides by the expected cohort size, not the sampled one).
        """
        out = {name: torch.zeros_like(value) for name, value in like.items()}
        self.apply_mean_(out, per_row=per_row, denominator=denominator)
        return out

    def sq_norm(self) -> float:
        """Squared L2 norm of the summed values (model delta only, not ``aux``)."""
        tensors = list(self.dense.values()) + [r.values for r in self.rows.values()]
        if not tensors:
            return 0.0
        # one fused pass, no float64 copies (the sum of squares is taken in float64)
        return sum(float(n) ** 2 for n in torch._foreach_norm(tensors, 2))

    def scale_(self, factor: float) -> "WeightedUpdate":
        """Multiply the summed values (not the weights) by ``factor`` in place."""
        if self.dense:
            torch._foreach_mul_(list(self.dense.values()), float(factor))
        for name, row in self.rows.items():
            self.rows[name] = RowUpdate(row.ids, row.values * float(factor), row.row_weight)
        return self

    def one_vote_(self, scale: float = 1.0) -> "WeightedUpdate":
        """In place: one client's update as its plain delta (times ``scale``) with weight 1
        and row weights 1, so that it counts once whatever its data size (robust
        aggregation, user-level DP)."""
        if self.num_clients != 1:
            raise ValueError(f"one_vote_() is for one client's update, this one sums {self.num_clients}")
        self.scale_(scale / self.weight if self.weight else 0.0)
        self.weight = 1.0
        self.rows = {k: RowUpdate(r.ids, r.values, torch.ones(r.ids.numel(), dtype=torch.float64))
                     for k, r in self.rows.items()}
        return self

    def apply_mean_(self, state: Mapping[str, Tensor], per_row: bool = False,
                    denominator: Optional[float] = None) -> None:
        """``state += sum / weight`` in place.

        Rows divide by the total client weight (``dense_equivalent``: untouched rows count
        as zero updates, exactly like dense FedAvg) or, with ``per_row``, by the weight of
        the clients that touched each row.
        """
        if not self.num_clients:
            return
        weight = self.weight if denominator is None else denominator
        if not weight:  # only clients of weight 0 (e.g. no local steps): nothing to average
            return
        for name, total in self.dense.items():
            state[name].add_(total / weight)
        for name, row in self.rows.items():
            if per_row:
                row_weight = row.row_weight.to(row.values.dtype).unsqueeze(1)
                mean = torch.where(row_weight > 0, row.values / row_weight, 0.0)  # 0/0 rows stay put
            else:
                mean = row.values / weight
            state[name].index_add_(0, row.ids, mean)

    def nbytes(self, value_bytes: int = 4) -> int:
        dense = sum(int(t.numel()) for t in self.dense.values()) * value_bytes
        own = dense + sum(r.nbytes(value_bytes) for r in self.rows.values())
        return own + sum(a.nbytes(value_bytes) for a in self.aux.values()) + len(self.scalars) * value_bytes


def sum_updates(updates: Iterable[WeightedUpdate]) -> WeightedUpdate:
    """Sum in the given order (callers pass client-id or block order for determinism);
    the same as chaining ``add_``, with each table's rows merged once (:class:`BlockSum`)."""
    total = BlockSum()
    for update in updates:
        total.add(update)
    return total.result()


class BlockSum:
    """``sum_updates`` of a stream of client updates (a block), with the embedding rows
    merged once at the end (:meth:`RowUpdate.sum`) instead of at every client: the same
    result bit for bit, without re-merging the growing sum's rows per client. Dense
    parts are added as they come (they may be model-sized)."""

    def __init__(self) -> None:
        self.total = WeightedUpdate()
        self.rows: Dict[str, List[RowUpdate]] = {}

    def add(self, update: WeightedUpdate) -> None:
        if not update.num_clients:
            return
        if self.total.num_clients and set(update.rows) != set(self.rows):
            raise ValueError("cannot add updates over different parameters")
        self.total.add_(dataclasses.replace(update, rows={}))
        for name, row in update.rows.items():
            self.rows.setdefault(name, []).append(row)

    def result(self) -> WeightedUpdate:
        self.total.rows = {name: RowUpdate.sum(parts) for name, parts in self.rows.items()}
        self.rows = {}
        return self.total


def weighted_model_sum(models: Iterable[tuple[Mapping[str, Tensor], float]]) -> Dict[str, Tensor]:
    """``sum_j share_j * model_j`` in the given order (integer tensors: the first model's);
    the average of whole models, as a hierarchy's cloud and a gossip peer take it."""
    out: Dict[str, Tensor] = {}
    for model, share in models:
        for name, value in model.items():
            if not value.is_floating_point():
                out.setdefault(name, value.clone())
            elif name not in out:
                out[name] = value * share
            else:
                out[name].add_(value, alpha=share)
    return out
