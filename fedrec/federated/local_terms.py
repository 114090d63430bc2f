"""Terms a local objective adds over a client's parameters, cheap for embedding tables.

FedProx's proximal term and SCAFFOLD's gradient correction are sums over every
parameter. Over an embedding table only the rows the client's data touch can move during
local training (the others get no gradient), so the terms are taken over those rows,
gathered with ``F.embedding`` so that a table keeps the gradient layout (sparse or dense)
it is built with: the cost is the client's rows, not the table.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fedrec.federated.context import ClientContext


@dataclasses.dataclass
class ParamView:
    """A parameter as the local terms see it: whole (MLPs) or some of its rows (tables)."""

    name: str
    param: torch.nn.Parameter
    rows: "Tensor | None" = None  # row ids for a table, None for a whole parameter
    sparse: bool = False  # the table's gradient layout

    def value(self) -> Tensor:
        """The differentiable current value (the rows, for a table)."""
        if self.rows is None:
            return self.param
        return F.embedding(self.rows, self.param, sparse=self.sparse)


def param_views(context: ClientContext) -> List[ParamView]:
    """Every trainable parameter of the client's model: tables by their touched rows."""
    model = context.model
    sparse_of = {f"{name}.{pname}" if name else pname: bool(getattr(module, "sparse", False))
                 for name, module in model.named_modules() for pname, _ in module.named_parameters(recurse=False)}
    rows = context.table_rows()
    views = []
    for name, param in model.named_parameters():
        if not param.requires_grad or name in context.private_names:
            continue  # (private user rows have no global value to anchor or correct against)
        views.append(ParamView(name, param, rows.get(name), sparse_of.get(name, False)))
    return views


def start_values(views: List[ParamView], context: ClientContext) -> Dict[str, Tensor]:
    """The values the client started from, per view (rows for tables), detached."""
    from fedrec.federated.update import gather_rows

    out = {}
    for view in views:
        start = context.start[view.name]
        out[view.name] = (start if view.rows is None else gather_rows(start, view.rows)).detach().clone()
    return out


def split_state(values: Mapping[str, Tensor], views: List[ParamView]) -> Dict[str, Tensor]:
    """Per-view values as storable tensors (a table's rows with their ids)."""
    from fedrec.federated.client_state import split_rows

    out: Dict[str, Tensor] = {}
    for view in views:
        if view.rows is None:
            out[view.name] = values[view.name]
        else:
            out.update(split_rows(view.name, view.rows, values[view.name]))
    return out


def views_of_state(state: Mapping[str, Tensor], views: List[ParamView]) -> Dict[str, Tensor]:
    """Stored per-view values back (zeros where the state has none, or other rows)."""
    from fedrec.federated.client_state import rows_of

    out = {}
    for view in views:
        shape_like = view.param if view.rows is None else view.param.new_zeros((view.rows.numel(), view.param.shape[1]))
        if view.rows is None:
            stored = state.get(view.name)
            out[view.name] = stored.clone() if stored is not None else torch.zeros_like(shape_like)
            continue
        found = rows_of(state, view.name)
        value = torch.zeros_like(shape_like)
        if found is not None and found[0].numel():
            ids, rows = found
            position = torch.searchsorted(ids, view.rows).clamp_(max=ids.numel() - 1)
            match = ids[position] == view.rows
            value[match] = rows[position[match]]
        out[view.name] = value
    return out


def dot(views: List[ParamView], coefficients: Mapping[str, Tensor]) -> Tensor:
    """``sum_p <coefficients[p], p>`` (differentiable in the parameters)."""
    total = None
    for view in views:
        term = (view.value() * coefficients[view.name]).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def squared_distance(views: List[ParamView], anchor: Mapping[str, Tensor]) -> Tensor:
    """``sum_p ||p - anchor[p]||^2`` (differentiable in the parameters)."""
    total = None
    for view in views:
        term = (view.value() - anchor[view.name]).pow(2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
