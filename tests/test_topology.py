"""Topologies beyond the star: hierarchical FedAvg and gossip / D-PSGD (issue 16).

HierFAVG with one edge holding every client and one edge round is star FedAvg bit for
bit; bytes are counted per link; gossip keeps the peers' mean and resumes exactly; bad
graphs, files and roles are clear errors (or a warning) before round 1; under MPI the
results equal the local backend's.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import cli, error_line, write_config
from test_fl_simulation import resumed_after, run, without_timings
from test_mpi import assert_same_run, needs_mpi, simulate

from fedrec.federated.gossip import GossipWorker
from fedrec.federated.hierarchical import HierFAVGWorker
from fedrec.federated.topology import Graph, GraphTopology, HierarchicalTopology, make_graph, read_assignment
from fedrec.federated_worker import NeighbourTable
from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError, load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def hierarchical(config, **topology):
    config = copy.deepcopy(config)
    config["fl"].update({"fl_algo": {"name": "hier_favg"}, "topology": {"name": "hierarchical", **topology}})
    return config


def graph(config, algo="gossip", **topology):
    """16 peers, 2 local steps each (every peer trains every round)."""
    config = copy.deepcopy(config)
    config["fl"].update({"fl_algo": {"name": algo}, "num_workers": 16, "local_epochs": None, "local_steps": 2,
                         "topology": {"name": "graph", **topology}})
    return config


def model_bytes(sim):
    return sum(int(v.numel()) for v in sim.global_state.values()) * sim.fl.value_bytes


# -- hierarchical FedAvg -------------------------------------------------------------------------
def test_one_edge_with_one_edge_round_is_star_fedavg_bit_for_bit(config, tmp_path):
    star, star_rows = run(config, tmp_path / "star")
    hier, hier_rows = run(hierarchical(config, num_edges=1, edge_rounds=1), tmp_path / "hier")
    for name, tensor in star.global_state.items():
        assert torch.equal(tensor, hier.global_state[name]), name
    assert [r["roc_auc"] for r in hier_rows] == [r["roc_auc"] for r in star_rows]
    assert [r["train_loss"] for r in hier_rows] == [r["train_loss"] for r in star_rows]
    assert [r["clients"] for r in hier_rows] == [config["fl"]["client_num_per_round"]] * 3


def test_edges_count_bytes_per_link_and_the_busiest_node(config, tmp_path):
    sim, rows = run(hierarchical(config, num_edges=4, edge_rounds=2), tmp_path / "hier")
    size = model_bytes(sim)
    topology = sim.topology
    assert topology.edges == 4 and [len(topology.clients_of(e)) for e in range(4)] == [10] * 4
    for row in rows:
        # each edge: 2 of its 10 clients (8 per round of 40), twice per cloud round
        assert row["clients"] == 16
        assert row["bytes_edge_cloud"] == 2 * 4 * size
        assert row["bytes_down"] + row["bytes_up"] == row["bytes_client_edge"] + row["bytes_edge_cloud"]
        assert row["bytes_max_link"] >= 2 * size
        # the cloud hears 4 models and sends 4; an edge carries its clients' traffic too
        assert row["bytes_max_node"] >= max(2 * 4 * size, row["bytes_client_edge"] // 4)
    # the cloud's model is the edges' models averaged by their data
    runtime = sim.topology_runtime
    total = sum(edge.sample_num for edge in runtime.edges)
    for name, tensor in sim.global_state.items():
        expected = sum(runtime.models[edge.worker_index][name].double() * (edge.sample_num / total)
                       for edge in runtime.edges)
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name


def test_edges_sample_only_their_own_clients(config, tmp_path):
    sim, _ = run(hierarchical(config, num_edges=4, assign="round_robin"), tmp_path / "hier")
    for edge in sim.topology_runtime.edges:
        chosen = edge.sample_neighbours(0, edge.client_num_per_round)
        assert set(chosen) <= set(edge.in_neighbours) and len(chosen) == 2
        assert all(c % 4 == edge.edge_index for c in chosen)


def test_hierarchy_with_edge_momentum_resumes_exactly(config, tmp_path):
    config = hierarchical(config, num_edges=2, edge_rounds=2)
    config["fl"]["fl_algo"]["server_optimizer"] = {"name": "sgd", "lr": 1.0, "momentum": 0.5}
    whole, whole_rows = run(config, tmp_path / "whole")
    resumed, rest = resumed_after(config, tmp_path / "cut", rounds=2, unsaved_rounds=1)
    assert without_timings(rest) == without_timings(whole_rows[2:])
    for name, tensor in whole.global_state.items():
        assert torch.equal(tensor, resumed.global_state[name]), name


def test_assignment_file(config, tmp_path):
    path = tmp_path / "assign.csv"
    path.write_text("# client,edge\n" + "".join(f"{c},{0 if c < 30 else 1}\n" for c in range(40)))
    sim, rows = run(hierarchical(config, assignment_file=str(path)), tmp_path / "hier")
    assert sim.topology.edges == 2 and len(sim.topology.clients_of(1)) == 10
    assert rows[-1]["bytes_edge_cloud"] == 2 * 2 * model_bytes(sim)


@pytest.mark.parametrize("lines, expected", [
    (["0,0", "1,0", "77,1"], "assign.csv:3: unknown worker 77: clients are 0..39 (fl.num_workers 40)"),
    (["0,0", "0,1"], "assign.csv:2: client 0 is already assigned on line 1"),
    (["0,0", "1 1"], "assign.csv: 38 client(s) have no edge, e.g. [2, 3, 4, 5, 6]"),
    (["0,x"], "assign.csv:1: expected 'client,edge' (two integers), got '0,x'"),
    (["0,-1"], "assign.csv:1: unknown edge aggregator -1"),
])
def test_bad_assignment_files_name_file_and_line(tmp_path, lines, expected):
    path = tmp_path / "assign.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        read_assignment(str(path), 40, None)
    assert expected in str(err.value)


def test_an_assignment_file_with_a_gap_in_its_edge_ids_names_the_file(tmp_path):
    path = tmp_path / "assign.csv"
    path.write_text("".join(f"{c},{0 if c < 2 else 3}\n" for c in range(4)))
    with pytest.raises(ConfigError) as err:
        HierarchicalTopology(assignment_file=str(path)).build(4)
    assert str(err.value) == (f"fl.topology.assignment_file {path}: edge(s) [1, 2] have no client "
                              "(edges are numbered 0..3 without gaps)")
    # num_edges promises more edges than the file names: those are empty, not dropped
    path.write_text("".join(f"{c},{c % 2}\n" for c in range(4)))
    with pytest.raises(ConfigError) as err:
        HierarchicalTopology(num_edges=3, assignment_file=str(path)).build(4)
    assert str(err.value).startswith(f"fl.topology.assignment_file {path}: edge(s) [2] have no client")


# -- graphs --------------------------------------------------------------------------------------
def test_graph_kinds_have_the_degrees_they_promise():
    def built(n, **kw):
        return make_graph(GraphTopology(**kw), n)

    assert set(built(10, kind="ring").in_degrees().tolist()) == {2}
    assert set(built(12, kind="torus").in_degrees().tolist()) == {4}  # 3 x 4
    regular = built(100, kind="k_regular", degree=6, seed=3)
    assert set(regular.in_degrees().tolist()) == {6} and regular.components() == 1
    assert np.array_equal(regular.indices, built(100, kind="k_regular", degree=6, seed=3).indices)
    er = built(200, kind="erdos_renyi", p=0.05, seed=1)
    assert 0.03 < er.num_edges / (200 * 199) < 0.07
    with pytest.raises(ConfigError, match="no 3-regular graph on 7 workers"):
        built(7, kind="k_regular", degree=3)


def test_a_disconnected_graph_is_warned_with_its_component_count(config, tmp_path, caplog):
    edges = tmp_path / "edges.txt"
    edges.write_text("".join(f"{i} {(i + 1) % 8}\n" for i in range(8))
                     + "".join(f"{8 + i} {8 + (i + 1) % 8}\n" for i in range(8)))
    with caplog.at_level(logging.WARNING, logger="fedrec"):
        _, rows = run(graph(config, kind="file", edge_list_file=str(edges)), tmp_path / "g")
    assert any("disconnected: 2 components" in r.getMessage() for r in caplog.records)
    assert rows[-1]["consensus_distance"] > 0


@pytest.mark.parametrize("text, expected", [
    ("0 1\n1 2\n2 99\n", "edges.txt:3: unknown worker 99: workers are 0..15 (fl.num_workers 16)"),
    ("0 1\n1\n", "edges.txt:2: expected an edge 'a b' (two worker ids), got '1'"),
    ("# nothing\n", "edges.txt: no edges"),
    (None, "fl.topology.edge_list_file: cannot read"),
    (b"\xff\xfe0 1\n", "edges.txt is not a UTF-8 text file (byte 0)"),
])
def test_bad_edge_list_files_name_file_and_line(config, tmp_path, capsys, text, expected):
    edges = tmp_path / "edges.txt"
    if isinstance(text, bytes):
        edges.write_bytes(text)
    elif text is not None:
        edges.write_text(text)
    line = simulate_error(capsys, graph(config, kind="file", edge_list_file=str(edges)), tmp_path)
    assert expected in line


def test_metropolis_weights_are_doubly_stochastic():
    # a star-shaped graph: degrees differ, so uniform weights would not be symmetric
    g = Graph.from_edges(5, np.zeros(4, np.int64), np.arange(1, 5))

    class Degrees:
        def degree(self, i):
            return int(g.in_degrees()[i])

    rows = np.zeros((5, 5))
    for i in range(5):
        peer = GossipWorker(worker_index=i, roles=["trainer", "aggregator"],
                            in_neighbours=NeighbourTable(g.in_neighbours(i)), runtime=Degrees())
        for j, w in peer.mixing_weights([i] + list(g.in_neighbours(i))).items():
            rows[i, j] = w
    assert np.allclose(rows, rows.T) and np.allclose(rows.sum(1), 1) and (rows >= 0).all()


def test_gossip_keeps_the_mean_of_the_trained_models(config, tmp_path):
    """Doubly stochastic mixing moves models towards each other, never their mean."""
    from fedrec.federated.simulation import Simulation
    from fedrec.utilities.logger import MemoryLogger

    sim = Simulation(graph(config, kind="k_regular", degree=4), tmp_path / "g", logger=MemoryLogger())
    try:
        row = sim.run_round()
        network = sim.topology_runtime
        trained = [network.groups[0].sent.get(i, 1)[0] for i in range(16)]
    finally:
        sim.close()
    for name, tensor in sim.global_state.items():
        mean = torch.stack([t[name].double() for t in trained]).mean(0)
        assert torch.allclose(tensor.double(), mean, atol=1e-6), name
    assert row["clients"] == 16 and row["consensus_distance"] > 0
    size = model_bytes(sim)
    assert row["bytes_up"] == 16 * 4 * size  # one model over each directed link
    assert row["bytes_max_link"] == 2 * size and row["bytes_max_node"] == 2 * 4 * size


@pytest.mark.parametrize("algo", ["gossip", "dpsgd"])
def test_gossip_resumes_exactly(config, tmp_path, algo):
    config = graph(config, algo, kind="ring")
    config["fl"].update({"num_workers": 6, "client_num_per_round": 6, "eval_every_n_rounds": 3})
    whole, whole_rows = run(config, tmp_path / "whole")
    resumed, rest = resumed_after(config, tmp_path / "cut", rounds=2, unsaved_rounds=1)
    assert without_timings(rest) == without_timings(whole_rows[2:])
    for name, tensor in whole.global_state.items():
        assert torch.equal(tensor, resumed.global_state[name]), name
    # models on disk: the current version and the one the checkpoint needs, no more
    versions = sorted(p.name for p in (tmp_path / "whole" / "peer_models").rglob("r*.safetensors")
                      if p.parent.name == "0")
    assert versions == ["r000001.safetensors", "r000002.safetensors"]


@pytest.mark.parametrize("which", ["hierarchical", "gossip"])
def test_the_vectorized_client_engine_serves_edges_and_peers(config, tmp_path, which):
    """Edges' clients share the edge's model: the engine batches them (results within its
    tolerance); peers each start from their own model: they train one by one (same bits)."""
    config = (hierarchical(config, num_edges=2, edge_rounds=2) if which == "hierarchical"
              else graph(config, kind="ring"))
    config["fl"].update({"num_rounds": 2, "reduce_blocks": 1})
    sequential, _ = run(config, tmp_path / "sequential")
    config["fl"]["client_engine"] = "vectorized"
    vectorized, _ = run(config, tmp_path / "vectorized")
    for name, tensor in sequential.global_state.items():
        if which == "gossip":
            assert torch.equal(tensor, vectorized.global_state[name]), name
        else:
            assert torch.allclose(tensor, vectorized.global_state[name], rtol=1e-4, atol=1e-6), name


# -- bad input, before round 1 -------------------------------------------------------------------
def simulate_error(capsys, config, tmp_path: Path) -> str:
    cfg = write_config(config, tmp_path / "c.yml")
    status, _, err = cli(capsys, "simulate", "--config", cfg, "--logdir", tmp_path / "run")
    assert status == 2, err
    line = error_line(err, "simulate")
    assert err.strip() == line
    assert not (tmp_path / "run").exists()
    return line


@registry.load("fl_algo", "test_edge_without_aggregator_role")
class _EdgeWithoutAggregatorRole(HierFAVGWorker):
    """A user's slip: its edges drop the aggregator role."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.out_neighbours):
            self.roles = ["trainer"]


def test_a_worker_without_the_role_its_position_needs(config, tmp_path, capsys):
    config = hierarchical(config, num_edges=2)
    config["fl"]["fl_algo"] = {"name": "test_edge_without_aggregator_role"}
    line = simulate_error(capsys, config, tmp_path)
    assert ("worker 40 (edge aggregator 0 of fl.topology hierarchical) lacks the role(s) ['aggregator'] "
            "that a edge needs; it has ['trainer']") in line


@pytest.mark.parametrize("topology, algo, expected", [
    ({"name": "graph"}, "fed_avg", ("fl.topology 'graph' needs peer workers with roles ['trainer', 'aggregator'], "
                                    "but fl.fl_algo 'fed_avg' has no peer position")),
    ({"name": "hierarchical"}, "gossip", "fl.fl_algo 'gossip' has no cloud position"),
    ({"name": "mesh"}, "fed_avg", "unknown topology 'mesh'; known topology names: graph, hierarchical, star"),
    ({"name": "graph", "degre": 3}, "gossip", "does not take config key(s) ['degre']"),
    ({"name": "graph", "kind": "file"}, "gossip", "kind: file needs edge_list_file"),
    ({"name": "hierarchical", "num_edges": 41}, "hier_favg", "num_edges is 41, more than fl.num_workers (40)"),
    ({"name": "hierarchical"}, {"name": "hier_favg", "server_optimizer": {"name": "sgd", "lr": -1}},
     "fl.fl_algo 'hier_favg': server_optimizer"),
    ({"name": "graph", "kind": "k_regular", "degree": 40}, "gossip", "fl.topology: no 40-regular graph on 40 workers"),
    ({"name": "graph", "kind": "k_regular", "seed": -1}, "gossip", "config key 'seed' expects int, got -1"),
    ({"name": "hierarchical", "num_edges": 2, "assign": "random", "seed": -3}, "hier_favg",
     "config key 'seed' expects int, got -3"),
    # a key its kind would ignore
    ({"name": "graph", "kind": "ring", "degree": 6}, "gossip", "fl.topology.degree applies to kind: k_regular only"),
    ({"name": "graph", "kind": "k_regular", "p": 0.1}, "gossip", "fl.topology.p applies to kind: erdos_renyi only"),
])
def test_config_mistakes_are_one_line_errors(config, tmp_path, capsys, topology, algo, expected):
    config = copy.deepcopy(config)
    config["fl"].update({"topology": topology, "fl_algo": algo if isinstance(algo, dict) else {"name": algo}})
    assert expected in simulate_error(capsys, config, tmp_path)


def test_features_beyond_the_star_are_refused_clearly(config, tmp_path, capsys):
    config = hierarchical(config, num_edges=2)
    config["fl"]["postprocessors"] = [{"name": "l2_clip", "bound": 1.0}]
    assert "fl.topology 'hierarchical' does not support fl.postprocessors yet" in simulate_error(
        capsys, config, tmp_path)


# -- from the CLI, with the example configs --------------------------------------------------------
@pytest.mark.parametrize("name", ["dlrm_fl_hierarchical.yml", "dlrm_fl_gossip.yml"])
def test_example_configs_run_from_the_cli(synthetic_data, tmp_path, capsys, name):
    config = load_config(PROJECT_ROOT / "configs" / name)
    small = synthetic_data["config"]
    for key in ("model", "train"):
        config[key] = copy.deepcopy(small[key])
    config["fl"].update({"num_workers": 40, "num_rounds": 1, "client_num_per_round": 8, "local_epochs": 1,
                         "progress_bar": False})
    if config["fl"]["topology"]["name"] == "hierarchical":
        config["fl"]["topology"]["num_edges"] = 4
    cfg = write_config(config, tmp_path / "c.yml")
    status, out, err = cli(capsys, "simulate", "--config", cfg, "--logdir", tmp_path / "run")
    assert status == 0, err
    assert "round   1: auc" in out


# -- MPI ---------------------------------------------------------------------------------------------

@needs_mpi
def test_mpi_gives_the_local_result(config, tmp_path):
    """(gossip and D-PSGD under MPI: tests/test_gossip_mpi.py)"""
    from fedrec.federated.run import run_simulation

    config = hierarchical(config, num_edges=3, edge_rounds=2)
    config["fl"].update({"num_rounds": 2, "backend": "local"})
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")
