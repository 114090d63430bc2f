"""One training step of K clients at once, each with its own weights.

Two ways to compute the K clients' losses and gradients in one pass:

* :class:`BatchedDLRM`: DLRM's forward written for stacked weights (``baddbmm`` for each
  client's MLP layers, one gather for every table's lookups, the interaction over all
  K x B samples), then one autograd backward. About 20 autograd operations per step for
  the whole block, whatever K is.
* :class:`FuncBatched`: any model with DLRM's interface (``forward(dense, sparse)``,
  ``loss``, ``sparse_tables()``), through ``torch.func``: ``vmap`` over clients of
  ``grad`` of ``functional_call``. Each client's tables are replaced by the rows its batch
  looks up (and its ids by their positions), so a client's table copy costs B rows.

Both take the step's lookups as one tensor ``[K, B, T, d]`` gathered from the engine's
block table, and return the gradient per lookup, which the engine adds back into the
block table's rows (duplicates add up, as an embedding's backward does).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

# (losses [K] of each client's weighted batch, their gradients by parameter name, the
# gradient of each lookup [K, B, T, d])
StepGrads = Tuple[Tensor, Dict[str, Tensor], Tensor]

#: floats in 64 bytes: each client's slice of a stacked weight and of its gradient starts
#: on such a boundary. BLAS kernels peel unaligned edges off a matrix and sum them apart,
#: so a client's matmul results would otherwise depend on where in the stack it sits
#: (measured: a 3 x 13 weight gradient rounds differently at odd offsets).
CLIENT_ALIGN = 16


def client_stacked(k: int, shape: Tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised ``[k, *shape]`` tensor whose clients each start on a 64-byte
    boundary (contiguous when a client's size is a multiple of :data:`CLIENT_ALIGN`)."""
    size = 1
    for extent in shape:
        size *= int(extent)
    stride = -(-size // CLIENT_ALIGN) * CLIENT_ALIGN
    return like.new_empty((k, stride))[:, :size].view((k,) + tuple(shape))


def per_sample_loss(model: nn.Module):
    """``fn(probs, labels) -> [..]`` each sample's loss term, or None when the model's loss
    is not known to be a mean of per-sample terms (then the engine cannot weight it)."""
    loss_fn = getattr(model, "loss_fn", None)
    per_sample = getattr(loss_fn, "per_sample", None)
    return per_sample


class BatchedDLRM:
    """:class:`~fedrec.modules.dlrm.DLRM_Net`'s forward and backward for stacked weights.

    A client's floats do not depend on the clients batched with it (its lane, its chunk)
    when its weights are :func:`client_stacked` and its batch is a multiple of 32 samples
    (the engine's layout): each kernel then sees the same aligned runs of its numbers."""

    name = "dlrm"
    #: the engine may batch clients of different reduction blocks together
    batch_independent = True

    def for_another_thread(self) -> "BatchedDLRM":
        """Itself: a step reads the model's constants only, so threads can share it."""
        return self

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.bottom = _mlp_plan(model.dense_arch.mlp.layers, "dense_arch.mlp.layers")
        self.top = _mlp_plan(model.over_arch.mlp.layers, "over_arch.mlp.layers")
        self.dot = model.arch_interaction_op == "dot"
        if self.dot:
            self.pairs = model.interaction_arch.flat_pairs
            self.z_gradient_source = _symmetric_gather(self.pairs, model.interaction_arch.num_features)
        self.threshold = float(model.loss_threshold)
        self.per_sample = per_sample_loss(model)

    @staticmethod
    def blocker(model: nn.Module) -> Optional[str]:
        from fedrec.modules.dlrm import DLRM_Net
        from fedrec.modules.interaction import CatInteraction, DotInteraction

        if type(model) is not DLRM_Net:
            return f"{type(model).__name__} is not DLRM_Net"
        if type(model.interaction_arch) not in (DotInteraction, CatInteraction):
            return f"interaction {type(model.interaction_arch).__name__}"
        for prefix, mlp in (("dense_arch", model.dense_arch.mlp), ("over_arch", model.over_arch.mlp)):
            for layer in mlp.layers:
                if type(layer) not in (nn.Linear, nn.ReLU, nn.Sigmoid):
                    return f"{prefix} has a {type(layer).__name__} layer"
        if per_sample_loss(model) is None:
            return f"loss {type(getattr(model, 'loss_fn', None)).__name__} has no per_sample"
        return None

    def step(self, params: Dict[str, Tensor], lookups: Tensor, dense: Tensor, label: Tensor,
             weight: Tensor) -> StepGrads:
        """Forward, then the backward written out (the loss and its clamp through autograd):
        a handful of batched kernels per step instead of an autograd graph."""
        with torch.no_grad():
            k, b = dense.shape[0], dense.shape[1]
            bottom = _forward_mlp(self.bottom, params, dense)  # each layer's input and output
            x = bottom[-1][1]  # [K, B, d]
            if self.dot:
                v = torch.cat((x.unsqueeze(2), lookups), dim=2).view(k * b, -1, x.shape[-1])  # [KB, F, d]
                z = torch.bmm(v, v.transpose(1, 2))
                features = torch.cat((x, z.flatten(1).index_select(1, self.pairs).view(k, b, -1)), dim=2)
            else:
                features = torch.cat((x, lookups.flatten(2)), dim=2)
            top = _forward_mlp(self.top, params, features)
            output = top[-1][1].squeeze(-1)  # [K, B] the sigmoid's output
        probs = output.detach().requires_grad_()
        clamped = torch.clamp(probs, min=self.threshold, max=1.0 - self.threshold) if self.threshold > 0.0 else probs
        losses = (self.per_sample(clamped, label) * weight).sum(dim=1)  # [K]
        (grad_probs,) = torch.autograd.grad(losses.sum(), [probs])
        grads: Dict[str, Tensor] = {}
        with torch.no_grad():
            grad = _backward_mlp(self.top, params, top, grad_probs.unsqueeze(-1), grads)  # d features
            grad_x = grad[..., :x.shape[-1]]
            if self.dot:
                # d loss / d z is symmetric (z = v v^T): each pair's gradient at its place
                # and its mirror, gathered in one pass (a diagonal pair's twice)
                diagonal, source = self.z_gradient_source
                if diagonal.numel():
                    grad_pairs = grad[..., x.shape[-1]:].reshape(k * b, -1)
                    grad_pairs = torch.cat((grad_pairs, grad_pairs.index_select(1, diagonal) * 2,
                                            grad_pairs.new_zeros((k * b, 1))), dim=1)
                else:  # the pairs' gradients and a zero
                    grad_pairs = torch.nn.functional.pad(grad[..., x.shape[-1]:], (0, 1)).view(k * b, -1)
                grad_z = grad_pairs.index_select(1, source)
                grad_v = torch.bmm(grad_z.view_as(z), v).view(k, b, -1, x.shape[-1])
                grad_x = grad_x + grad_v[:, :, 0]
                grad_lookups = grad_v[:, :, 1:]
            else:
                grad_lookups = grad[..., x.shape[-1]:].reshape(lookups.shape)
            _backward_mlp(self.bottom, params, bottom, grad_x, grads)
        return losses.detach(), grads, grad_lookups


def _forward_mlp(plan: List[Tuple[str, str]], params: Dict[str, Tensor], x: Tensor) -> List[Tuple[Tensor, Tensor]]:
    """Each layer's (input, output), for the backward."""
    trace = []
    for kind, name in plan:
        if kind == "linear":  # x [K, B, in] @ W[K]^T + b[K]: every client its own layer
            y = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), x, params[f"{name}.weight"].transpose(1, 2))
        elif kind == "relu":
            y = torch.relu(x)
        else:
            y = torch.sigmoid(x)
        trace.append((x, y))
        x = y
    return trace


def _backward_mlp(plan: List[Tuple[str, str]], params: Dict[str, Tensor], trace: List[Tuple[Tensor, Tensor]],
                  grad: Tensor, grads: Dict[str, Tensor]) -> Tensor:
    """The gradient of the MLP's input; each layer's weight and bias gradients into ``grads``."""
    for (kind, name), (x, y) in zip(reversed(plan), reversed(trace)):
        if kind == "linear":
            weight = params[f"{name}.weight"]
            grads[f"{name}.weight"] = torch.bmm(grad.transpose(1, 2), x,
                                                out=client_stacked(weight.shape[0], weight.shape[1:], weight))
            grads[f"{name}.bias"] = grad.sum(dim=1)
            grad = torch.bmm(grad, weight)
        elif kind == "relu":  # (autograd's own fused kernels: one pass, no mask tensor)
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        else:
            grad = torch.ops.aten.sigmoid_backward(grad, y)
    return grad


def _symmetric_gather(pairs: Tensor, features: int) -> Tuple[Tensor, Tensor]:
    """(the diagonal pairs, where each of the F x F entries of d loss / d z comes from)
    for the gradients ``g`` of the ``pairs`` (flat positions in z): ``cat(g, 2 g[:,
    diagonal], 0)`` gathered by the second tensor is ``G + G^T``, G being ``g`` scattered
    into zeros; one gather instead of a scatter, a transpose and an add."""
    rows, cols = pairs // features, pairs % features
    diagonal = torch.nonzero(rows == cols).flatten()
    source = torch.full((features * features,), len(pairs) + len(diagonal), dtype=torch.long, device=pairs.device)
    order = torch.arange(len(pairs), device=pairs.device)
    source[pairs] = order
    source[cols * features + rows] = order
    source[pairs[diagonal]] = len(pairs) + torch.arange(len(diagonal), device=pairs.device)
    return diagonal, source


def _mlp_plan(layers: nn.Sequential, prefix: str) -> List[Tuple[str, str]]:
    plan = []
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            plan.append(("linear", f"{prefix}.{index}"))
        else:
            plan.append(("relu" if isinstance(layer, nn.ReLU) else "sigmoid", ""))
    return plan


class FuncBatched:
    """Any DLRM-interface model, vmapped over clients with ``torch.func``."""

    name = "torch.func"
    #: ``vmap`` allocates the gradients itself, unaligned: a client's floats can depend on
    #: its position in the batch, so the engine batches one reduction block at a time
    batch_independent = False

    def for_another_thread(self) -> "FuncBatched":
        """A copy around a copy of the model: ``functional_call`` swaps the module's
        parameters in place while it runs, so two threads cannot share one module. The
        copy's tables are empty (every call passes the rows it reads in their place)."""
        parameters = dict(self.model.named_parameters())
        memo = {id(parameters[name]): nn.Parameter(parameters[name].new_empty((0,) + parameters[name].shape[1:]),
                                                   requires_grad=False) for name in self.table_names}
        return FuncBatched(copy.deepcopy(self.model, memo), self.table_names)

    def __init__(self, model: nn.Module, table_names: List[str]) -> None:
        from torch.func import functional_call, grad_and_value, vmap

        self.model = model
        columns = dict(model.sparse_tables())
        self.table_names = sorted(table_names, key=lambda n: columns[n])
        self.buffers = {n: b for n, b in model.named_buffers()}
        per_sample = per_sample_loss(model)
        if per_sample is None:  # the model's own loss, one sample at a time
            per_sample = vmap(lambda p, y: model.loss(p.unsqueeze(0), y.unsqueeze(0)))
        table_names = self.table_names

        def client_loss(params: Dict[str, Tensor], lookups: Tensor, dense: Tensor, label: Tensor,
                        weight: Tensor) -> Tuple[Tensor, Tensor]:
            batch = dense.shape[0]
            # each table becomes the B rows this batch looks up, each id its position
            tables = {name: lookups[:, t] for t, name in enumerate(table_names)}
            ids = torch.arange(batch, device=dense.device).unsqueeze(1).expand(batch, len(table_names))
            probs = functional_call(model, {**params, **tables, **self.buffers}, (dense, ids))
            loss = (per_sample(probs, label) * weight).sum()
            return loss, loss

        self._step = vmap(grad_and_value(client_loss, argnums=(0, 1), has_aux=True))

    def step(self, params: Dict[str, Tensor], lookups: Tensor, dense: Tensor, label: Tensor,
             weight: Tensor) -> StepGrads:
        (param_grads, lookup_grads), (_, losses) = self._step(params, lookups, dense, label, weight)
        return losses.detach(), param_grads, lookup_grads
