"""Optimizers (registry kind ``optimizer``).

Each entry is a factory ``f(model, **config) -> torch.optim.Optimizer``::

    opt = registry.construct("optimizer", {"name": "adam", "lr": 1e-3}, model=model)

``model`` is normally an ``nn.Module`` (its trainable parameters are optimized); a list of
parameters or of param-group dicts works too. The config keys are type-checked by the
registry against the factories' hints, and unknown keys are refused.

``split`` sends the embedding tables to one optimizer (usually a sparse-gradient one,
``sparse_adam`` or ``rowwise_adagrad``) and everything else to another::

    {"name": "split",
     "sparse": {"name": "rowwise_adagrad", "lr": 0.01},
     "dense": {"name": "adam", "lr": 0.001}}

and behaves like one optimizer towards the trainer and LR schedulers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from fedrec.utilities import registry

__all__ = [
    "RowWiseAdagrad",
    "SparseAdam",
    "SplitOptimizer",
    "SPARSE_OPTIMIZERS",
    "DENSE_OPTIMIZERS",
    "embedding_parameters",
    "split_parameters",
    "build_optimizer",
]

# Optimizers that accept sparse (COO) gradients, hence may take sparse embedding tables.
SPARSE_OPTIMIZERS = ("sparse_adam", "rowwise_adagrad", "adagrad", "sgd")
# Optimizers usable for the dense part of a split (everything but the sparse-only one).
DENSE_OPTIMIZERS = ("sgd", "adam", "adagrad", "rowwise_adagrad", "yogi")

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


# --------------------------------------------------------------------------------------
# parameter selection


def _trainable(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    seen: set[int] = set()
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def embedding_parameters(model: nn.Module) -> List[torch.Tensor]:
    """The trainable embedding-table parameters of ``model``.

    Uses ``model.embedding_parameters()`` when the model defines it, otherwise the
    parameters of every ``nn.Embedding`` / ``nn.EmbeddingBag`` in ``model.modules()``.
    """
    method = getattr(model, "embedding_parameters", None)
    if callable(method):
        return _trainable(method())
    params: List[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, _EMBEDDING_TYPES):
            params.extend(module.parameters(recurse=False))
    return _trainable(params)


def split_parameters(model: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(embedding_params, other_params)``, both trainable only, disjoint, in model order."""
    sparse = embedding_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in _trainable(model.parameters()) if id(p) not in sparse_ids]
    return sparse, dense


def _as_params(model: Any) -> List[Any]:
    """Trainable parameters of a module, or the given parameters / param groups as a list."""
    if isinstance(model, nn.Module):
        params: List[Any] = _trainable(model.parameters())
    elif isinstance(model, torch.Tensor):
        params = [model]
    else:
        params = list(model)
    if not params:
        raise ValueError("the optimizer got no trainable parameters")
    return params


def _sparse_grad_modules(model: nn.Module) -> set[int]:
    """ids of the parameters of modules flagged ``sparse=True`` (embedding tables)."""
    ids: set[int] = set()
    for module in model.modules():
        if getattr(module, "sparse", None) is True:
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def _dense_grad_tables(model: nn.Module, params: List[torch.Tensor]) -> List[str]:
    """Names of the modules flagged ``sparse=False`` that own one of ``params``."""
    wanted = {id(p) for p in params}
    names = []
    for name, module in model.named_modules():
        if getattr(module, "sparse", None) is False and any(
                id(p) in wanted for p in module.parameters(recurse=False)):
            names.append(name or type(module).__name__)
    return names


# --------------------------------------------------------------------------------------
# row-wise Adagrad


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row (per embedding vector), as in FBGEMM/DLRM.

    For each row ``r`` with gradient ``g_r``::

        state[r] += mean(g_r ** 2)
        w_r      -= lr * g_r / (sqrt(state[r]) + eps)

    A "row" is a slice along dim 0; a 1-D parameter (a bias) has one-element rows, so it
    gets element-wise Adagrad. Sparse COO gradients (``nn.EmbeddingBag(sparse=True)``)
    update only the rows they touch (after coalescing, so a row seen twice in a batch is
    updated once with its summed gradient); dense gradients update all rows (rows with a
    zero gradient are not moved, but their accumulator is unchanged too).
    """

    def __init__(self, params: Any, lr: float = 0.01, eps: float = 1e-8,
                 initial_accumulator_value: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"rowwise_adagrad: invalid lr {lr} (must be >= 0)")
        if eps < 0.0:
            raise ValueError(f"rowwise_adagrad: invalid eps {eps} (must be >= 0)")
        if initial_accumulator_value < 0.0:
            raise ValueError(
                f"rowwise_adagrad: invalid initial_accumulator_value {initial_accumulator_value}"
            )
        defaults = dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    def _init_state(self, p: torch.Tensor, group: Mapping[str, Any]) -> Dict[str, Any]:
        state = self.state[p]
        if not state:
            rows = p.shape[0] if p.dim() > 0 else 1
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["sum"] = torch.full((rows,), float(group["initial_accumulator_value"]),
                                      dtype=p.dtype, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, group)
                state["step"] += 1
                acc = state["sum"]
                grad = p.grad
                if grad.is_sparse:
                    if wd != 0:
                        raise RuntimeError(
                            "rowwise_adagrad: weight_decay is not supported with sparse gradients"
                        )
                    grad = grad.coalesce()
                    if grad.sparse_dim() != 1:
                        raise RuntimeError(
                            "rowwise_adagrad: sparse gradients must be row-sparse (sparse_dim 1), "
                            f"got sparse_dim {grad.sparse_dim()} for a parameter of shape "
                            f"{tuple(p.shape)}"
                        )
                    rows = grad.indices()[0]
                    values = grad.values()
                    if values.numel() == 0:
                        continue
                    flat = values.reshape(values.shape[0], -1)
                    acc_rows = acc.index_select(0, rows) + flat.pow(2).mean(dim=1)
                    acc.index_copy_(0, rows, acc_rows)
                    denom = acc_rows.sqrt().add_(eps)
                    update = values / denom.view((-1,) + (1,) * (values.dim() - 1))
                    p.index_add_(0, rows, update, alpha=-lr)
                else:
                    if wd != 0:
                        grad = grad.add(p, alpha=wd)
                    if p.dim() == 0:
                        flat = grad.reshape(1, 1)
                    else:
                        flat = grad.reshape(grad.shape[0], -1)
                    acc.add_(flat.pow(2).mean(dim=1))
                    denom = acc.sqrt().add_(eps)
                    if p.dim() == 0:
                        p.add_(grad / denom[0], alpha=-lr)
                    else:
                        p.add_(grad / denom.view((-1,) + (1,) * (p.dim() - 1)), alpha=-lr)
        return loss


# --------------------------------------------------------------------------------------
# sparse Adam with a clear error for dense gradients


class SparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` whose error for a dense gradient says what to do."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    raise RuntimeError(
                        "sparse_adam got a dense gradient for a parameter of shape "
                        f"{tuple(p.shape)}: it only handles sparse gradients (embedding tables "
                        "built with sparse=True). Make the tables sparse, or give the parameters "
                        "with dense gradients to another optimizer with 'split', e.g. {name: split, "
                        "sparse: {name: sparse_adam, lr: ...}, dense: {name: adam, lr: ...}}, or "
                        "use rowwise_adagrad, which takes both kinds"
                    )
        return super().step(closure)


# --------------------------------------------------------------------------------------
# split optimizer


class _MergedState(Mapping):
    """A live, read-only view of the sub-optimizers' ``state`` mappings (disjoint keys)."""

    def __init__(self, owner: "SplitOptimizer") -> None:
        self._owner = owner

    def _maps(self) -> List[Mapping]:
        return [opt.state for opt in self._owner.optimizers.values()]

    def __getitem__(self, key: Any) -> Any:
        for m in self._maps():
            if key in m:
                return m[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return any(key in m for m in self._maps())

    def __iter__(self) -> Iterator[Any]:
        for m in self._maps():
            yield from m

    def __len__(self) -> int:
        return sum(len(m) for m in self._maps())


class SplitOptimizer(torch.optim.Optimizer):
    """Two optimizers (``sparse`` for embedding tables, ``dense`` for the rest) as one.

    ``param_groups`` is the union of the sub-optimizers' groups (the same dict objects),
    so an LR scheduler built on this optimizer scales both learning rates;
    ``step``/``zero_grad`` act on both; ``state_dict()`` is ``{"sparse": ..., "dense": ...}``.
    Either part may be absent (``None``) when the model has no parameters of that kind.
    """

    def __init__(self, sparse: Optional[torch.optim.Optimizer],
                 dense: Optional[torch.optim.Optimizer]) -> None:
        # Optimizer.__init__ would build its own param groups; set up only what the base
        # class machinery (step hooks, profiling, state-dict hooks) needs.
        opts: "OrderedDict[str, torch.optim.Optimizer]" = OrderedDict()
        if sparse is not None:
            opts["sparse"] = sparse
        if dense is not None:
            opts["dense"] = dense
        if not opts:
            raise ValueError("split optimizer: both the sparse and the dense part are empty")
        self.optimizers = opts
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # the union of the parts, always current (load_state_dict replaces the parts' groups)
    @property  # type: ignore[override]
    def param_groups(self) -> List[Dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        raise AttributeError("SplitOptimizer.param_groups is the union of its parts; "
                             "set the parts' param_groups instead")

    @property  # type: ignore[override]
    def state(self) -> Mapping[Any, Any]:
        return _MergedState(self)

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("SplitOptimizer.state is a view of its parts' states")

    @property
    def sparse(self) -> Optional[torch.optim.Optimizer]:
        return self.optimizers.get("sparse")

    @property
    def dense(self) -> Optional[torch.optim.Optimizer]:
        return self.optimizers.get("dense")

    def __getstate__(self) -> Dict[str, Any]:
        # not the `step` wrapper an LR scheduler may have put on the instance (a closure)
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={opt!r}" for k, opt in self.optimizers.items())
        return f"SplitOptimizer({parts})"

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        raise NotImplementedError(
            "SplitOptimizer: add the param group to .sparse or .dense instead"
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        mine, theirs = set(self.optimizers), set(state_dict)
        if mine != theirs:
            raise ValueError(
                f"split optimizer state_dict has parts {sorted(theirs)}, expected {sorted(mine)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


# --------------------------------------------------------------------------------------
# registered factories


@registry.load("optimizer", "sgd")
def sgd(model: Any, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False, dampening: float = 0.0) -> torch.optim.Optimizer:
    """Plain SGD (sparse gradients are fine when ``weight_decay`` is 0)."""
    return torch.optim.SGD(_as_params(model), lr=lr, momentum=momentum,
                           weight_decay=weight_decay, nesterov=nesterov, dampening=dampening)


@registry.load("optimizer", "adagrad")
def adagrad(model: Any, lr: float, lr_decay: float = 0.0, weight_decay: float = 0.0,
            initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> torch.optim.Optimizer:
    """Element-wise Adagrad (``torch.optim.Adagrad``; sparse gradients need weight_decay 0)."""
    return torch.optim.Adagrad(_as_params(model), lr=lr, lr_decay=lr_decay,
                               weight_decay=weight_decay,
                               initial_accumulator_value=initial_accumulator_value, eps=eps)


@registry.load("optimizer", "rowwise_adagrad")
def rowwise_adagrad(model: Any, lr: float, eps: float = 1e-8,
                    initial_accumulator_value: float = 0.0,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Row-wise Adagrad (:class:`RowWiseAdagrad`); sparse or dense gradients."""
    return RowWiseAdagrad(_as_params(model), lr=lr, eps=eps,
                          initial_accumulator_value=initial_accumulator_value,
                          weight_decay=weight_decay)


@registry.load("optimizer", "adam")
def adam(model: Any, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, bias_correction: bool = True,
         initial_accumulator_value: float = 0.0) -> torch.optim.Optimizer:
    """Adam (dense gradients only: use ``split`` for models with sparse embeddings).

    ``bias_correction: false`` is Adam as FedAdam's server optimizer (Reddi et al. 2021):
    no bias correction, ``eps`` the paper's tau, ``v`` starting at
    ``initial_accumulator_value``.
    """
    if not bias_correction:
        if weight_decay or amsgrad:
            raise ValueError("adam with bias_correction: false takes no weight_decay or amsgrad")
        from fedrec.optimization.adaptive import ReddiAdaptive

        return ReddiAdaptive(_as_params(model), lr=lr, betas=tuple(betas), eps=eps,
                             initial_accumulator_value=initial_accumulator_value, method="adam")
    if initial_accumulator_value:
        raise ValueError("adam: initial_accumulator_value needs bias_correction: false")
    return torch.optim.Adam(_as_params(model), lr=lr, betas=tuple(betas), eps=eps,
                            weight_decay=weight_decay, amsgrad=amsgrad)


@registry.load("optimizer", "yogi")
def yogi(model: Any, lr: float, betas: Tuple[float, float] = (0.9, 0.99), eps: float = 1e-3,
         initial_accumulator_value: float = 1e-6, bias_correction: bool = False) -> torch.optim.Optimizer:
    """Yogi (Zaheer et al. 2018) as FedYogi's server optimizer (Reddi et al. 2021):
    ``v -= (1 - b2) * g^2 * sign(v - g^2)``; dense gradients only."""
    from fedrec.optimization.adaptive import ReddiAdaptive

    return ReddiAdaptive(_as_params(model), lr=lr, betas=tuple(betas), eps=eps,
                         initial_accumulator_value=initial_accumulator_value,
                         bias_correction=bias_correction, method="yogi")


@registry.load("optimizer", "sparse_adam")
def sparse_adam(model: Any, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8) -> torch.optim.Optimizer:
    """Lazy Adam for sparse gradients only (``torch.optim.SparseAdam``).

    Every parameter must get sparse gradients. Given a module, parameters outside
    ``sparse=True`` embedding tables are refused here with a hint to use ``split``.
    """
    if isinstance(model, nn.Module):
        sparse_ids = _sparse_grad_modules(model)
        dense_names = [n for n, p in model.named_parameters()
                       if p.requires_grad and id(p) not in sparse_ids]
        if dense_names:
            shown = ", ".join(dense_names[:5]) + (" ..." if len(dense_names) > 5 else "")
            raise ValueError(
                f"sparse_adam needs sparse gradients for every parameter, but {len(dense_names)} "
                f"parameter(s) get dense gradients ({shown}). Use the 'split' optimizer, e.g. "
                "{name: split, sparse: {name: sparse_adam, lr: ...}, dense: {name: adam, lr: ...}}"
            )
    return SparseAdam(_as_params(model), lr=lr, betas=tuple(betas), eps=eps)


def _sub_config(role: str, config: Any, allowed: Tuple[str, ...]) -> Dict[str, Any]:
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping) or "name" not in config:
        raise registry.RegistryError(
            f"split optimizer: '{role}' must be a mapping with a 'name' key "
            f"(one of {', '.join(allowed)}), got {config!r}"
        )
    if config["name"] not in allowed:
        raise registry.RegistryError(
            f"split optimizer: '{role}' optimizer {config['name']!r} is not allowed; "
            f"use one of {', '.join(allowed)}"
        )
    return dict(config)


@registry.load("optimizer", "split")
def split(model: Any, sparse: Union[str, Dict[str, Any]],
          dense: Union[str, Dict[str, Any]]) -> torch.optim.Optimizer:
    """Embedding tables -> ``sparse`` optimizer, every other parameter -> ``dense``."""
    if not isinstance(model, nn.Module):
        raise TypeError("the split optimizer needs the model (an nn.Module) to find its "
                        f"embedding tables, got {type(model).__name__}")
    sparse_cfg = _sub_config("sparse", sparse, SPARSE_OPTIMIZERS)
    dense_cfg = _sub_config("dense", dense, DENSE_OPTIMIZERS)
    sparse_params, dense_params = split_parameters(model)
    if sparse_cfg["name"] == "sparse_adam":
        dense_tables = _dense_grad_tables(model, sparse_params)
        if dense_tables:
            raise ValueError(
                "split optimizer: sparse_adam needs embedding tables built with sparse=True, but "
                f"{', '.join(dense_tables[:5])} give dense gradients; set sparse: true on the "
                "embeddings or use rowwise_adagrad for the sparse part"
            )
    sparse_opt = (registry.construct("optimizer", sparse_cfg, model=sparse_params)
                  if sparse_params else None)
    dense_opt = (registry.construct("optimizer", dense_cfg, model=dense_params)
                 if dense_params else None)
    if sparse_opt is None and dense_opt is None:
        raise ValueError("split optimizer: the model has no trainable parameters")
    return SplitOptimizer(sparse_opt, dense_opt)


def build_optimizer(config: Any, model: Any) -> torch.optim.Optimizer:
    """``registry.construct("optimizer", config, model=model)``."""
    return registry.construct("optimizer", config, model=model)
