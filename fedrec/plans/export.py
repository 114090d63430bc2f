"""``fedrec plan export``: a simulation's client computation as a plan (see ``format.py``).

The train step is one functional program ``(params..., dense, sparse, label) ->
(new params..., mean loss)``: forward, loss, backward and the SGD step, traced to ATen
ops with ``make_fx`` (through ``torch.func.grad_and_value``) and exported with
``torch.export`` with a dynamic batch dimension and, for plain tables, a dynamic row
count, so that one program trains on whole tables (dense mode) or on just a client's
rows (sparse mode). ``torch.export`` cannot trace ``autograd.grad`` itself (it leaves a
fake tensor among the program's constants); tracing the joint graph first is the way
through. Evaluation (validate and test) is the forward alone.

Exportable: the ``dlrm`` trainer, an algorithm whose clients do FedAvg's local work
(``fed_avg`` and its server-optimizer presets), the local optimizer ``sgd`` without
momentum or weight decay, no client-side postprocessors or attack. Anything else is
refused with what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch.fx.experimental.proxy_tensor import make_fx

from fedrec.plans.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS,
    fedrec_version,
    program_bytes,
    write_plan,
)
from fedrec.utilities.config import ConfigError

TRAIN_STEP = "train_step.pt2"
EVALUATE = "evaluate.pt2"

# example sizes for tracing: distinct from each other and from the model's own widths, so
# that symbolic tracing gives every dynamic dimension its own symbol
_EXAMPLE_BATCH = 11
_EXAMPLE_ROWS = 1009


def export_plan(config: dict[str, Any], out: str | Path, logdir: str | Path | None = None,
                config_path: str | None = None) -> dict[str, Any]:
    """Write the plan of ``config`` to ``out``; the weights are ``logdir``'s newest
    checkpoint's global model (a run to continue), else the simulation's initial model.
    Returns the manifest."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the plan file's path, e.g. {out / 'client.plan'}")
    if out.exists() and not _is_plan(out):
        raise ConfigError(f"--out {out} already exists and is not a fedrec plan; choose a new path or remove it "
                          "yourself")
    from fedrec.federated.client_runner import build_client_runner

    runner = build_client_runner(config, None, config_path, new_partition=True)
    check_exportable(runner)
    model = runner.model
    names = [name for name, _ in model.named_parameters()]
    state_names = [n for n in model.state_dict() if n not in runner.private_names]
    if sorted(state_names) != sorted(names):
        extra = sorted(set(state_names) - set(names))
        raise ConfigError(f"plan export: the model keeps state other than parameters ({extra[:3]}); "
                          "plans carry parameters only")
    weights, start_round, source = _start_weights(runner, logdir)
    tables = _tables(model)
    identity = all(t["row_map"] == "identity" for t in tables)
    if runner.sparse_mode and not identity:
        custom = [t["name"] for t in tables if t["row_map"] != "identity"][:3]
        raise ConfigError(f"plan export: fl.embedding_updates sparse needs tables whose row is the id "
                          f"(torch_bag); {custom} map ids to rows otherwise; use embedding_updates: dense")
    train_step, evaluate = export_programs(model, names, runner.fl.optimizer_config["lr"],
                                           dynamic_tables=identity)
    fl = runner.fl
    dataset = runner.trainer.dataset
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fedrec_version": fedrec_version(),
        "torch_version": torch.__version__.split("+")[0],
        "source": {"config": config_path, "logdir": None if logdir is None else str(logdir),
                   "weights": source, "round": start_round, "dataset": str(dataset.path)},
        "model": {
            "name": config["model"].get("name"),
            "parameters": [{"name": n, "shape": list(weights[n].shape), "dtype": str(weights[n].dtype).split(".")[-1]}
                           for n in names],
            "tables": tables,
        },
        "inputs": {
            "batch": "dynamic (first dimension of dense, sparse and label)",
            "dense": {"dtype": "float32", "shape": ["batch", int(dataset.num_dense)]},
            "sparse": {"dtype": "int64", "shape": ["batch", len(dataset.table_sizes)],
                       "ids_below": [int(n) for n in dataset.table_sizes]},
            "label": {"dtype": "float32", "shape": ["batch"]},
        },
        "train": {
            "optimizer": {"name": "sgd", "lr": float(fl.optimizer_config["lr"])},
            "local_epochs": fl.local_epochs if fl.local_steps is None else None,
            "local_steps": fl.local_steps,
            "local_batch_size": int(fl.local_batch_size),
            "seed": int(fl.seed),
            # the simulator trains clients with this many torch threads (sums can depend on it)
            "threads": int(fl.client_threads),
            "order": "client seed = derive_seed(seed, round, client); epoch e visits the client's rows in "
                     "numpy default_rng(derive_seed(client seed, e)).permutation order, last batch partial",
        },
        "update": {
            "embedding_updates": fl.embedding_updates,
            "upload": "weight * (trained - start), weight = the client's rows; tables as rows in sparse mode",
            "value_bytes": int(fl.value_bytes),
            "fl_algo": dict(fl.fl_algo),
            "embedding_aggregation": fl.embedding_aggregation,
        },
        "programs": {
            "train_step": {"file": TRAIN_STEP, "inputs": names + ["dense", "sparse", "label"],
                           "outputs": [f"new {n}" for n in names] + ["loss"]},
            "validate": {"file": EVALUATE, "inputs": names + ["dense", "sparse"], "outputs": ["probs"]},
            "test": {"file": EVALUATE, "inputs": names + ["dense", "sparse"], "outputs": ["probs"]},
        },
    }
    members = {TRAIN_STEP: train_step, EVALUATE: evaluate,
               WEIGHTS: safetensors_save({n: weights[n].contiguous() for n in names},
                                         metadata={"round": str(start_round)})}
    out.parent.mkdir(parents=True, exist_ok=True)
    checksum = write_plan(out, manifest, members)
    return dict(manifest, checksum=checksum, bytes=out.stat().st_size)


def _is_plan(path: Path) -> bool:
    """Whether ``path`` is a plan (an earlier export may be replaced, nothing else)."""
    import zipfile

    from fedrec.plans.format import MANIFEST

    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(MANIFEST)).get("format") == FORMAT_NAME
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def check_exportable(runner: Any) -> None:
    """Refuse what a plan cannot carry yet, naming the config key."""
    from fedrec.federated_worker import FederatedWorker
    from fedrec.trainers.dlrm_trainer import DLRMTrainer

    fl = runner.fl
    if not isinstance(runner.trainer, DLRMTrainer):
        raise ConfigError(f"plan export supports train.name dlrm (Criteo-style dense, sparse and label inputs); "
                          f"this config's trainer is {type(runner.trainer).__name__}")
    algorithm = runner.algorithm
    hooks = [h for h in ("begin_local_training", "local_objective", "client_update")
             if getattr(algorithm, h) is not getattr(FederatedWorker, h)]
    if hooks or runner.mode != "sum":
        raise ConfigError(f"fl.fl_algo {fl.fl_algo.get('name')!r}: its clients do more than FedAvg's local "
                          f"training ({', '.join(hooks) or 'aggregation ' + runner.mode}); plans export fed_avg, "
                          "fed_avgm, fed_adam, fed_yogi and fed_adagrad")
    optimizer = dict(fl.optimizer_config)
    extra = {k: v for k, v in optimizer.items() if k not in ("name", "lr") and v not in (0, 0.0, False, None)}
    if optimizer.get("name") != "sgd" or extra:
        raise ConfigError(f"fl.local_optimizer {optimizer}: plans export plain sgd (no momentum, weight decay "
                          "or nesterov) as their local step")
    if fl.postprocessors:
        raise ConfigError(f"fl.postprocessors {[p.get('name') for p in fl.postprocessors]}: plans do not carry "
                          "client-side postprocessors yet; export without them")
    if runner.attack is not None:
        raise ConfigError("fl.attack: a plan is what honest clients run; export without an attack")
    if runner.private_names:
        raise ConfigError("plans do not carry private user tables")


def _start_weights(runner: Any, logdir: str | Path | None) -> tuple[dict[str, torch.Tensor], int, str]:
    """The global model the plan starts from, its round, and where it came from."""
    model_state = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    if logdir is None:
        return model_state, 0, "the simulation's initial model (train.config.init_seed)"
    from fedrec.utilities.checkpoint import CheckpointManager

    directory = Path(logdir) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"--logdir {logdir} has no checkpoints/ folder: give a finished or running "
                          "`fedrec simulate` logdir, or leave --logdir out to start from the initial model")
    loaded = CheckpointManager(directory).load_newest_intact()
    if loaded is None:
        raise ConfigError(f"--logdir {logdir}: no checkpoint in {directory}")
    state = loaded.state.get("global")
    if not isinstance(state, dict) or sorted(state) != sorted(model_state):
        raise ConfigError(f"checkpoint {loaded.path} does not hold this config's model (global weights "
                          "differ in names); export with the config the run was made with")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(model_state[name].shape):
            raise ConfigError(f"checkpoint {loaded.path}: {name} has shape {list(tensor.shape)}, this config's "
                              f"model {list(model_state[name].shape)}; export with the run's config")
    return ({k: v.detach().clone() for k, v in state.items()}, int(loaded.state.get("round", 0)),
            str(Path(loaded.path).resolve()))


def _tables(model: torch.nn.Module) -> list[dict[str, Any]]:
    from fedrec.modules.embeddings import TorchBagEmbedding

    out = []
    for name, feature in model.sparse_tables():
        table = model.sparse_arch.tables[feature]
        out.append({"name": name, "feature": int(feature), "rows": int(model.get_parameter(name).shape[0]),
                    "row_map": "identity" if isinstance(table, TorchBagEmbedding) else type(table).__name__})
    return out


def export_programs(model: torch.nn.Module, names: list[str], lr: float,
                    dynamic_tables: bool) -> tuple[bytes, bytes]:
    """(train step, evaluate) as ``.pt2`` bytes."""
    table_names = {name for name, _ in model.sparse_tables()}
    params = dict(model.named_parameters())
    lr = float(lr)

    def loss_of(weights: list[torch.Tensor], dense: torch.Tensor, sparse: torch.Tensor,
                label: torch.Tensor) -> torch.Tensor:
        probs = torch.func.functional_call(model, dict(zip(names, weights)), (dense, sparse))
        return model.loss(probs, label)

    def train_step(weights, dense, sparse, label):
        grads, loss = torch.func.grad_and_value(loss_of)(weights, dense, sparse, label)
        # torch.optim.SGD's step: p.add_(grad, alpha=-lr)
        return [torch.add(w, g, alpha=-lr) for w, g in zip(weights, grads)], loss

    def evaluate(weights, dense, sparse):
        return torch.func.functional_call(model, dict(zip(names, weights)), (dense, sparse))

    example = []
    for k, name in enumerate(names):
        shape = list(params[name].shape)
        if dynamic_tables and name in table_names:
            shape[0] = _EXAMPLE_ROWS + 2 * k
        example.append(torch.zeros(shape, dtype=params[name].dtype))
    num_tables = len(model.sparse_tables())
    batch = _EXAMPLE_BATCH
    dense = torch.zeros(batch, int(model.num_dense))
    sparse = torch.zeros(batch, num_tables, dtype=torch.int64)
    label = torch.zeros(batch)
    batch_dim = torch.export.Dim("batch", min=1)
    weight_dims = [{0: torch.export.Dim(f"rows_{k}", min=1)} if dynamic_tables and name in table_names else None
                   for k, name in enumerate(names)]
    was_training = model.training
    model.train()
    try:
        step_graph = make_fx(train_step, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            example, dense, sparse, label)
        step_program = torch.export.export(_StepGraph(step_graph), (example, dense, sparse, label),
                                           dynamic_shapes=(weight_dims, {0: batch_dim}, {0: batch_dim},
                                                           {0: batch_dim}))
        model.eval()
        with torch.no_grad():
            eval_graph = make_fx(evaluate, tracing_mode="symbolic", _allow_non_fake_inputs=True)(example, dense, sparse)
        eval_program = torch.export.export(_EvalGraph(eval_graph), (example, dense, sparse),
                                           dynamic_shapes=(weight_dims, {0: batch_dim}, {0: batch_dim}))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"plan export: torch.export cannot export this model's train step ({first})") from err
    finally:
        model.train(was_training)
    return program_bytes(step_program), program_bytes(eval_program)


class _StepGraph(torch.nn.Module):
    """A traced train step as a module for ``torch.export`` (its tensor constants become
    the program's constants)."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph

    def forward(self, weights: list[torch.Tensor], dense: torch.Tensor, sparse: torch.Tensor,
                label: torch.Tensor) -> Any:
        return self.graph_module(weights, dense, sparse, label)


class _EvalGraph(_StepGraph):
    """The traced forward, likewise."""

    def forward(self, weights: list[torch.Tensor], dense: torch.Tensor, sparse: torch.Tensor) -> Any:  # type: ignore[override]
        return self.graph_module(weights, dense, sparse)


def describe(manifest: dict[str, Any]) -> str:
    """One paragraph for the command line."""
    params = sum(int(torch.Size(p["shape"]).numel()) for p in manifest["model"]["parameters"])
    train = manifest["train"]
    length = (f"{train['local_steps']} local steps" if train["local_steps"] else
              f"{train['local_epochs']} local epochs")
    return (f"plan format {manifest['format_version']} (fedrec {manifest['fedrec_version']}): {params:,} parameters "
            f"from {manifest['source']['weights']} (round {manifest['source']['round']}), {length} of batch "
            f"{train['local_batch_size']} at lr {train['optimizer']['lr']}, "
            f"{manifest['update']['embedding_updates']} updates; {manifest['bytes']:,} bytes, "
            f"sha256 {manifest['checksum'][:16]}")


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True)
