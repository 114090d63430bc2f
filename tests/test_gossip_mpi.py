"""Gossip / D-PSGD peers placed on processes (issue 16): neighbours in the same process,
only boundary models cross, and the results are the local backend's bit for bit.

The exchange is tested twice: in one process (``GossipNetwork.local_parts``: the groups
run one after another, their boundary models handed over in memory) and under MPI (each
group on its own process, the models sent between processes).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_fl_simulation import run, without_timings
from test_mpi import final_weights, fl_rows, needs_mpi, simulate

from fedrec.federated.gossip import GossipNetwork
from fedrec.federated.placement import cut_fraction, interprocess_models, peer_order, place, round_robin, send_lists
from fedrec.federated.topology import GraphTopology, make_graph


def graph(config, algo="gossip", **topology):
    """16 peers, 2 local steps each."""
    config = copy.deepcopy(config)
    config["fl"].update({"fl_algo": {"name": algo}, "num_workers": 16, "local_epochs": None, "local_steps": 2,
                         "num_rounds": 2, "topology": {"name": "graph", **topology}})
    return config


def model_bytes(sim):
    return sum(int(v.numel()) for v in sim.global_state.values()) * sim.fl.value_bytes


@pytest.fixture
def parts(monkeypatch):
    """Run the local backend's peers in ``k`` groups (the MPI data path, in this process)."""
    def set_parts(k):
        monkeypatch.setattr(GossipNetwork, "local_parts", k)
    return set_parts


# -- placement ------------------------------------------------------------------------------------
def test_ring_blocks_cut_two_links_per_process_and_balance_peers():
    g = make_graph(GraphTopology(kind="ring"), 1000)
    order = peer_order(g, "ring")
    for processes in (2, 3, 4):
        placement = place(order, 12, processes)
        sizes = np.bincount(placement.part_of, minlength=processes)
        assert sizes.max() - sizes.min() <= 1000 // 12 + 1
        # each process is an arc of the ring: two links cut at each of its two ends
        assert round(cut_fraction(g, placement.part_of) * 2000) == 2 * processes
        assert interprocess_models(g, placement.part_of) == 2 * processes
    assert cut_fraction(g, round_robin(1000, 2)) == 1.0


def test_spectral_order_cuts_fewer_links_of_a_random_graph_than_rcm_id_blocks_or_round_robin():
    g = make_graph(GraphTopology(kind="k_regular", degree=4, seed=3), 600)
    order = peer_order(g, "k_regular")
    assert sorted(order.tolist()) == list(range(600))
    assert np.array_equal(order, peer_order(g, "k_regular", "spectral"))  # the same bits every time
    for processes in (2, 4):
        placed = place(order, 12, processes).part_of
        for naive in (place(np.arange(600), 12, processes).part_of, round_robin(600, processes),
                      place(peer_order(g, "k_regular", "rcm"), 12, processes).part_of):
            assert cut_fraction(g, placed) < 0.7 * cut_fraction(g, naive)
            assert interprocess_models(g, placed) < interprocess_models(g, naive)


def test_the_order_is_kept_in_the_run_folder_for_its_graph(tmp_path, monkeypatch):
    from fedrec.federated import placement

    g = make_graph(GraphTopology(kind="erdos_renyi", seed=1), 200)
    first = placement.stored_order(tmp_path, g, "erdos_renyi", "auto")
    monkeypatch.setattr(placement, "peer_order", lambda *a: pytest.fail("the stored order was not reused"))
    assert np.array_equal(placement.stored_order(tmp_path, g, "erdos_renyi", "auto"), first)
    other = make_graph(GraphTopology(kind="erdos_renyi", seed=2), 200)
    monkeypatch.setattr(placement, "peer_order", lambda *a: np.arange(200))
    assert np.array_equal(placement.stored_order(tmp_path, other, "erdos_renyi", "auto"), np.arange(200))


def test_blocks_do_not_depend_on_the_number_of_processes():
    order = np.random.default_rng(0).permutation(50)
    one = place(order, 12, 1)
    for processes in (2, 3, 5, 20):
        placement = place(order, 12, processes)
        assert np.array_equal(placement.block_index, one.block_index)
        # each process holds whole, contiguous blocks; together every block once
        blocks = [b for k in range(processes) for b in placement.blocks_of(k)]
        assert blocks == list(range(12))
    assert place(order, 12, 20).num_parts == 20  # more processes than blocks: some hold none


def test_send_lists_are_the_in_neighbours_across_the_cut():
    g = make_graph(GraphTopology(kind="ring"), 8)
    lists = send_lists(g, place(np.arange(8), 8, 2).part_of)
    assert {k: v.tolist() for k, v in lists.items()} == {(0, 1): [0, 3], (1, 0): [4, 7]}


# -- the exchange, in one process ------------------------------------------------------------------
@pytest.mark.parametrize("algo, topology", [("gossip", {"kind": "k_regular", "degree": 4}),
                                            ("dpsgd", {"kind": "ring"})])
def test_groups_give_the_one_group_result_bit_for_bit(config, tmp_path, parts, algo, topology):
    config = graph(config, algo, **topology)
    whole, whole_rows = run(config, tmp_path / "one")
    for k in (2, 3):
        parts(k)
        split, rows = run(config, tmp_path / f"parts{k}")
        placement = split.topology_runtime.placement
        models = interprocess_models(split.topology.graph, placement.part_of)
        assert models > 0 and all(r["bytes_interprocess"] == models * model_bytes(split) for r in rows)
        assert [{**r, "bytes_interprocess": 0} for r in without_timings(rows)] == without_timings(whole_rows)
        for name, tensor in whole.global_state.items():
            assert torch.equal(tensor, split.global_state[name]), name
    assert all(r["bytes_interprocess"] == 0 for r in whole_rows)


def test_resume_with_another_number_of_groups_is_exact(config, tmp_path, parts):
    from fedrec.federated.simulation import Simulation
    from fedrec.utilities.logger import MemoryLogger

    config = graph(config, "dpsgd", kind="k_regular", degree=4)
    config["fl"]["num_rounds"] = 3
    whole, whole_rows = run(config, tmp_path / "whole")
    parts(2)
    cut = Simulation(config, tmp_path / "cut", logger=MemoryLogger())
    for _ in range(2):
        cut.run_round()
        cut.save_checkpoint()
    cut.close()
    parts(3)
    resumed = Simulation(config, tmp_path / "cut", logger=MemoryLogger())
    assert resumed.resume()
    try:
        rest = resumed.run()
    finally:
        resumed.close()
    strip = (lambda rows: [{**r, "bytes_interprocess": 0} for r in without_timings(rows)])
    assert strip(rest) == strip(whole_rows[2:])
    for name, tensor in whole.global_state.items():
        assert torch.equal(tensor, resumed.global_state[name]), name


# -- under MPI ---------------------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("algo, topology, processes", [
    # slow: test_groups_give_the_one_group_result_bit_for_bit covers gossip's exchange, and
    # the D-PSGD case the MPI transport
    pytest.param("gossip", {"kind": "ring"}, [2], marks=pytest.mark.slow),
    ("dpsgd", {"kind": "k_regular", "degree": 4}, [2, 3])])
def test_mpi_processes_exchange_boundary_models_and_give_the_local_result(config, tmp_path, algo, topology,
                                                                         processes):
    """Two rounds on MPI (``processes``: per round; [2, 3] resumes round 2 on 3 processes)."""
    from fedrec.federated.run import run_simulation

    config = graph(config, algo, **topology)
    run_simulation(config, tmp_path / "local", print_rounds=False)  # one group, in this process
    config["fl"]["backend"] = "mpi"
    if len(processes) == 1:
        simulate(config, tmp_path / "mpi", processes=processes[0] + 1)  # rank 0 and one process per group
    else:
        simulate({**config, "fl": {**config["fl"], "num_rounds": 1}}, tmp_path / "mpi", processes=processes[0] + 1)
        simulate(config, tmp_path / "mpi", processes=processes[1] + 1, resume=True)
    rows = fl_rows(tmp_path / "mpi")
    g = make_graph(GraphTopology(**topology), 16)
    size = sum(int(v.numel()) for v in final_weights(tmp_path / "mpi").values()) * 4
    for row, count in zip(rows, processes * 2):
        models = interprocess_models(g, place(peer_order(g, topology["kind"]), 12, count).part_of)
        assert models > 0 and row["bytes_interprocess"] == models * size
        if topology["kind"] == "ring":  # 2 arcs of 8 peers: each end's peer goes to the other process
            assert models == 4
    assert all(r["bytes_interprocess"] == 0 for r in fl_rows(tmp_path / "local"))
    strip = (lambda logdir: [{k: v for k, v in r.items() if k != "bytes_interprocess"} for r in fl_rows(logdir)])
    assert strip(tmp_path / "mpi") == strip(tmp_path / "local")
    local, mpi = final_weights(tmp_path / "local"), final_weights(tmp_path / "mpi")
    assert local.keys() == mpi.keys() and all(torch.equal(local[k], mpi[k]) for k in local)
    # each process wrote only its own peers' models, all under the run folder
    assert len(list((tmp_path / "mpi" / "peer_models").rglob("r000001.safetensors"))) == 16


FAILING_PEER = '''
from fedrec.federated.gossip import GossipWorker
from fedrec.utilities import registry


@registry.load("fl_algo", "test_failing_peer")
class FailingPeer(GossipWorker):
    def client_update(self, context):
        if self.worker_index == 5:
            raise RuntimeError("disk full")
        return super().client_update(context)
'''


@needs_mpi
def test_a_peer_failing_on_one_process_stops_every_process_with_its_error(config, tmp_path):
    """The failing group still exchanges (its error instead of models): nothing hangs or
    is left pending, and the error names the rank, the group, the round and the peer."""
    module = tmp_path / "failing_peer.py"
    module.write_text(FAILING_PEER)
    config = graph(config, kind="ring")
    config["fl"].update({"fl_algo": {"name": "test_failing_peer"}, "imports": [str(module)], "num_rounds": 1,
                         "backend": "mpi"})
    result = simulate(config, tmp_path / "run", processes=3, check=False)
    assert result.returncode != 0
    assert "peer group 0, round 0: ClientError: round 0, client 5: RuntimeError: disk full" in result.stderr
    assert "Assertion failed" not in result.stderr
