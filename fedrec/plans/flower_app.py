"""fedrec plans over Flower's Deployment Engine: a ClientApp that runs plans and a
ServerApp whose rounds are fedrec's own.

The ServerApp builds a :class:`~fedrec.federated.simulation.Simulation` (sampler,
algorithm, server optimizer, postprocessors, evaluation, checkpoints, metrics: the
simulator's server side unchanged) with a :class:`FlowerBackend` in place of the
simulated clients: each selected client's work goes as a Flower ``train`` message to
the SuperNode that holds that client's data, whose ClientApp runs the plan and replies
with the update. Replies are summed per block in client-id order, as the local backend
sums them, so the global model matches the simulation's.

A client that does not answer within ``round-timeout`` seconds (its process died, its
node went away) is dropped from the round; with fewer than ``min-clients`` answers the
round is abandoned (the model and server state stay as they are), as a simulated round
policy abandons one. Nothing waits longer than the timeout.

Messages: ``query`` (reply: client id, rows, plan checksum and, in sparse mode, the
embedding rows the client's data read), ``train`` (weights down: the MLPs and every
table, or only the client's rows in sparse mode; reply: the weighted update and counts).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedrec.federated.backends import Backend
from fedrec.federated.client_runner import ClientStats, JobResult
from fedrec.federated.update import RowSubset, RowUpdate, WeightedUpdate

log = logging.getLogger("fedrec")

client_app = ClientApp()
server_app = ServerApp()

# -- client side --------------------------------------------------------------------------------
_RUNNERS: dict[tuple[str, str], Any] = {}


def _client(context: Context):
    """The node's plan runner and data (loaded once per ClientApp process)."""
    from fedrec.plans.data import read_client_data
    from fedrec.plans.runner import PlanRunner

    plan, data = str(context.node_config["plan"]), str(context.node_config["data-file"])
    key = (plan, data)
    if key not in _RUNNERS:
        runner = PlanRunner(plan)
        _RUNNERS[key] = (runner, read_client_data(data, runner.manifest))
    return _RUNNERS[key]


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if len(record) else {}


def _array_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    if not tensors:
        return ArrayRecord()
    return ArrayRecord(OrderedDict((k, v.detach().contiguous()) for k, v in tensors.items()))


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    runner, data = _client(context)
    rows = runner.rows_needed(data) if runner.sparse_mode else {}
    content = RecordDict({
        "client": ConfigRecord({"client-id": int(context.node_config["client-id"]), "rows": len(data),
                                "plan": runner.checksum}),
        "rows": _array_record({name: ids for name, ids in rows.items()}),
    })
    return Message(content=content, reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    runner, data = _client(context)
    config = msg.content["config"]
    round_idx, client_id = int(config["round"]), int(config["client-id"])
    fail_at = int(context.node_config.get("fail-at-round", -1))
    if round_idx == fail_at:  # tests: the client's process dies mid-round
        os._exit(3)
    if client_id != int(context.node_config["client-id"]) or str(config["plan"]) != runner.checksum:
        raise ValueError(f"this node runs client {context.node_config['client-id']} with plan "
                         f"{runner.checksum[:12]}; the server sent client {client_id}, plan {str(config['plan'])[:12]}")
    weights: dict[str, Any] = _tensors(msg.content["weights"])
    if runner.sparse_mode:
        for name, ids in runner.rows_needed(data).items():
            weights[name] = RowSubset(ids, weights[name], int(runner.tables[name]["rows"]))
    start = time.perf_counter()
    result = runner.train(weights, data, round_idx, client_id)
    update = {f"dense/{k}": v for k, v in result.update.dense.items()}
    for name, rows in result.update.rows.items():
        update[f"rows/{name}"] = rows.values
    metrics = MetricRecord({"sample-num": result.sample_num, "num-samples": result.num_samples,
                            "num-steps": result.num_steps, "loss-sum": result.loss_sum,
                            "bytes-up": result.bytes_up, "bytes-down": runner.download_bytes(data),
                            "seconds": time.perf_counter() - start})
    return Message(content=RecordDict({"update": _array_record(update), "metrics": metrics}), reply_to=msg)


# -- server side --------------------------------------------------------------------------------
class FlowerBackend(Backend):
    """Client work sent to SuperNodes through Flower's Grid, one message per client."""

    name = "flower"

    def __init__(self, grid: Grid, nodes: dict[int, int], rows: dict[int, dict[str, torch.Tensor]],
                 plan_checksum: str, round_timeout: float, min_clients: int) -> None:
        self.grid, self.nodes, self.rows = grid, nodes, rows
        self.plan = plan_checksum
        self.round_timeout, self.min_clients = float(round_timeout), int(min_clients)
        self.dropped: list[tuple[int, int, str]] = []  # (round, client, why)

    def run_round(self, context, blocks, global_state):
        from fedrec.federated.virtual_clock import RoundAbandoned

        ids = [cid for _, clients in blocks for cid in clients]
        messages = {}
        for cid in ids:
            if cid not in self.nodes:
                raise RuntimeError(f"client {cid} has no SuperNode (connected clients: {sorted(self.nodes)})")
            weights = dict(global_state)
            for name, row_ids in self.rows.get(cid, {}).items():
                weights[name] = global_state[name].index_select(0, row_ids)
            content = RecordDict({"weights": _array_record(weights),
                                  "config": ConfigRecord({"round": int(context.round_idx), "client-id": int(cid),
                                                          "plan": self.plan})})
            messages[cid] = Message(content=content, message_type="train", dst_node_id=self.nodes[cid])
        by_node = {node: cid for cid, node in self.nodes.items()}
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(list(messages.values()), timeout=self.round_timeout):
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                self.dropped.append((context.round_idx, cid, f"error: {reply.error.reason}"))
                log.warning("round %d: client %d failed: %s", context.round_idx, cid, reply.error.reason)
                continue
            replies[cid] = reply
        for cid in ids:
            if cid not in replies and not any(d[:2] == (context.round_idx, cid) for d in self.dropped):
                self.dropped.append((context.round_idx, cid, f"no reply within {self.round_timeout:g}s"))
                log.warning("round %d: client %d did not reply within %gs", context.round_idx, cid,
                            self.round_timeout)
        if len(replies) < min(self.min_clients, len(ids)):
            log.warning("round %d abandoned: %d of %d clients replied, min-clients is %d", context.round_idx,
                        len(replies), len(ids), self.min_clients)
            raise RoundAbandoned()
        result = JobResult()
        for block_index, clients in blocks:
            block = WeightedUpdate()
            for cid in clients:
                if cid in replies:
                    update, stats = self._update_of(cid, replies[cid], global_state)
                    block.add_(update)
                    result.stats.append(stats)
            result.block_updates.append((block_index, block))
        return [result]

    def _update_of(self, cid: int, reply: Message, global_state: dict[str, Any]) -> tuple[WeightedUpdate, ClientStats]:
        tensors = _tensors(reply.content["update"])
        metrics = reply.content["metrics"]
        weight = float(metrics["sample-num"])
        dense = {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}
        rows = {}
        for key, values in tensors.items():
            if key.startswith("rows/"):
                name = key[len("rows/"):]
                ids = self.rows[cid][name]
                rows[name] = RowUpdate(ids, values, torch.full((ids.numel(),), weight, dtype=torch.float64))
        expected = set(global_state)
        if set(dense) | set(rows) != expected:
            raise RuntimeError(f"client {cid} uploaded {sorted(set(dense) | set(rows))[:4]}..., not the model's "
                               "parameters")
        stats = ClientStats(cid, int(metrics["sample-num"]), int(metrics["num-samples"]), int(metrics["num-steps"]),
                            float(metrics["loss-sum"]), int(metrics["bytes-down"]), int(metrics["bytes-up"]))
        return WeightedUpdate(dense, rows, weight, 1), stats


def _discover(grid: Grid, num_clients: int, plan_checksum: str, wait: float
              ) -> tuple[dict[int, int], dict[int, dict[str, torch.Tensor]]]:
    """Wait for ``num_clients`` SuperNodes; ask each which client it is and its rows."""
    deadline = time.monotonic() + wait
    node_ids: list[int] = []
    while time.monotonic() < deadline:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= num_clients:
            break
        time.sleep(0.5)
    if len(node_ids) < num_clients:
        raise RuntimeError(f"{len(node_ids)} of {num_clients} SuperNodes connected within {wait:g}s")
    messages = [Message(content=RecordDict({"config": ConfigRecord({"plan": plan_checksum})}),
                        message_type="query", dst_node_id=node) for node in node_ids]
    nodes: dict[int, int] = {}
    rows: dict[int, dict[str, torch.Tensor]] = {}
    for reply in grid.send_and_receive(messages, timeout=wait):
        if reply.has_error():
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} cannot run the plan: {reply.error.reason}")
        info = reply.content["client"]
        if str(info["plan"]) != plan_checksum:
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} has another plan ({str(info['plan'])[:12]}, "
                               f"the server's is {plan_checksum[:12]})")
        cid = int(info["client-id"])
        if cid in nodes:
            raise RuntimeError(f"two SuperNodes say they are client {cid}")
        nodes[cid] = reply.metadata.src_node_id
        rows[cid] = {k: v.to(torch.int64) for k, v in _tensors(reply.content["rows"]).items()}
    if len(nodes) < num_clients:
        raise RuntimeError(f"{len(nodes)} of {num_clients} SuperNodes answered the query within {wait:g}s")
    return nodes, rows


def _continue_from(sim: Any, plan: Any) -> None:
    """Start at the plan's round from its weights; with the checkpoint it was exported from
    at hand (and unchanged), resume that checkpoint whole, so that the server's state
    (a server optimizer's moments, the postprocessors') continues too."""
    from fedrec.plans.runner import PlanRunner
    from fedrec.utilities.checkpoint import (
        CheckpointError,
        CheckpointManager,
        LoadedCheckpoint,
    )

    weights = PlanRunner(plan).initial_weights()
    start_round = int(plan.manifest["source"]["round"])
    source = Path(str(plan.manifest["source"]["weights"]))
    state = None
    if source.is_file():
        try:
            state = CheckpointManager.load(source)
        except CheckpointError:
            state = None
    if (state is not None and int(state.get("round", -1)) == start_round
            and all(torch.equal(weights[k], state["global"][k]) for k in weights)):
        sim.resume(LoadedCheckpoint(start_round, source, state))
        return
    log.warning("starting at round %d from the plan's weights; the server's state starts afresh (the checkpoint "
                "%s is not here or has changed)", start_round, source)
    sim.update_model(sim.aggregator, weights)
    sim.round_idx = start_round


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """fedrec's rounds over the connected SuperNodes (run config: see ``deploy.py``)."""
    serve(grid, context.run_config)


def serve(grid: Any, run: Any) -> dict[str, Any]:
    """The ServerApp's work on any grid (tests pass one of their own); returns the
    summary it writes to ``<logdir>/deployment.json``."""
    import yaml

    from fedrec.federated.simulation import Simulation
    from fedrec.plans.format import read_plan
    from fedrec.utilities.logger import RunLogger

    config = yaml.safe_load(Path(str(run["fedrec-config"])).read_text())
    logdir = Path(str(run["logdir"]))
    plan = read_plan(str(run["plan"]))
    num_clients = int(config["fl"]["num_workers"])
    nodes, rows = _discover(grid, num_clients, plan.checksum, float(run["connect-timeout"]))
    if plan.manifest["update"]["embedding_updates"] != "sparse":
        rows = {}
    backend = FlowerBackend(grid, nodes, rows, plan.checksum, float(run["round-timeout"]), int(run["min-clients"]))
    logger = RunLogger(logdir, console=False)
    sim = Simulation(config, logdir, logger=logger, backend=backend)
    if int(plan.manifest["source"]["round"]):  # a plan exported from a run continues it
        _continue_from(sim, plan)
    error = None
    try:
        sim.run()
    except Exception as err:
        import traceback

        error = f"{type(err).__name__}: {err}"
        log.error("the deployment failed: %s", traceback.format_exc())
        raise
    finally:
        sim.close()
        summary = {"clients": {str(c): n for c, n in nodes.items()}, "dropped": backend.dropped,
                   "rounds": sim.round_idx, "error": error}
        tmp = logdir / "deployment.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(logdir / "deployment.json")
        logger.close()
    return summary
