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
from typing import Dict, Iterable, Mapping, Optional

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


@dataclasses.dataclass
class WeightedUpdate:
    """``sum_i w_i * delta_i`` over some clients, with ``sum_i w_i`` and their count."""

    dense: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    rows: Dict[str, RowUpdate] = dataclasses.field(default_factory=dict)
    weight: float = 0.0
    num_clients: int = 0

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
        """In-place sum (``self`` first, then ``other``: the order is part of the result)."""
        if not self.num_clients:
            self.dense = {k: v.clone() for k, v in other.dense.items()}
            self.rows = dict(other.rows)
        else:
            if set(self.dense) != set(other.dense) or set(self.rows) != set(other.rows):
                raise ValueError("cannot add updates over different parameters")
            names = list(self.dense)
            torch._foreach_add_([self.dense[n] for n in names], [other.dense[n] for n in names])
            for name, row in other.rows.items():
                self.rows[name] = self.rows[name] + row
        self.weight += other.weight
        self.num_clients += other.num_clients
        return self

    def apply_mean_(self, state: Mapping[str, Tensor], per_row: bool = False) -> None:
        """``state += sum / weight`` in place.

        Rows divide by the total client weight (``dense_equivalent``: untouched rows count
        as zero updates, exactly like dense FedAvg) or, with ``per_row``, by the weight of
        the clients that touched each row.
        """
        if not self.num_clients:
            return
        for name, total in self.dense.items():
            state[name].add_(total / self.weight)
        for name, row in self.rows.items():
            if per_row:
                mean = row.values / row.row_weight.to(row.values.dtype).unsqueeze(1)
            else:
                mean = row.values / self.weight
            state[name].index_add_(0, row.ids, mean)

    def nbytes(self, value_bytes: int = 4) -> int:
        dense = sum(int(t.numel()) for t in self.dense.values()) * value_bytes
        return dense + sum(r.nbytes(value_bytes) for r in self.rows.values())


def sum_updates(updates: Iterable[WeightedUpdate]) -> WeightedUpdate:
    """Sum in the given order (callers pass client-id or block order for determinism)."""
    total = WeightedUpdate()
    for update in updates:
        total.add_(update)
    return total
