"""The vectorized client engine (fedrec/federated/client_engine.py): each client's training
equals sequential local training within 1e-5 relative, for DLRM (the batched path) and for
a second, plain-PyTorch model (the torch.func path), dense and sparse modes, every local
optimizer; a client's result does not depend on its block; it falls back or fails clearly."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from fedrec.federated.client_engine import VectorizationError
from fedrec.federated.client_runner import build_client_runner, train_locally
from fedrec.federated.simulation import Simulation
from fedrec.modules.embeddings import TorchBagEmbedding
from fedrec.modules.losses import BCELoss
from fedrec.utilities import registry
from fedrec.utilities.logger import MemoryLogger
from fedrec.utilities.random_state import derive_seed
from tests.test_mpi import _config, assert_same_run, needs_mpi, simulate

RELATIVE = 1e-5


@registry.load("model", "test_wide_and_deep")
class WideAndDeep(nn.Module):
    """Not DLRM: a linear part on the dense features plus an MLP on the concatenated
    embeddings, so the engine must take its generic torch.func path."""

    def __init__(self, table_sizes, num_dense, dim: int = 4) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(TorchBagEmbedding(int(n), dim) for n in table_sizes)
        self.deep = nn.Sequential(nn.Linear(num_dense + dim * len(table_sizes), 8), nn.Tanh(), nn.Linear(8, 1))
        self.wide = nn.Linear(num_dense, 1)
        self.loss_fn = BCELoss()

    def forward(self, dense, sparse):
        e = torch.cat([table(sparse[:, t]) for t, table in enumerate(self.embeddings)], dim=1)
        return torch.sigmoid(self.deep(torch.cat((dense, e), dim=1)) + self.wide(dense)).squeeze(-1)

    def loss(self, probs, labels):
        return self.loss_fn(probs, labels)

    def sparse_tables(self):
        return [(f"embeddings.{t}.weight", t) for t in range(len(self.embeddings))]

    def rows_touched(self, sparse):
        return {f"embeddings.{t}.weight": torch.unique(sparse[:, t]) for t in range(len(self.embeddings))}


def _runner(config, **fl):
    config = copy.deepcopy(config)
    config["fl"].update({"client_engine": "vectorized", **fl})
    return build_client_runner(config, None, new_partition=True)


def _sequential(runner, global_state, cid, round_idx=0):
    """Client ``cid`` trained the sequential way; returns the model's state afterwards."""
    runner.model.load_state_dict(global_state)
    optimizer = runner._make_optimizer(model=runner.model)
    loader = runner.trainer.client_loader(runner.partition.indices_of(cid), runner.fl.local_batch_size,
                                          seed=derive_seed(runner.fl.seed, round_idx, cid))
    result = train_locally(runner.trainer, loader, optimizer, runner.fl)
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}, result


def _assert_close_update(trained, reference, start, name, relative=RELATIVE):
    """The update (trained - start) within RELATIVE of the reference's update in L2 norm,
    give or take the float32 weights' own rounding (1e-6 of their size per element, about
    8 units in the last place), which bounds how closely any two implementations agree."""
    got, want = (trained - start).double(), (reference - start).double()
    error, scale = float((got - want).norm()), float(want.norm())
    ulps = 1e-6 * float(start.abs().max()) * want.numel() ** 0.5
    assert error <= relative * scale + ulps, f"{name}: error {error:.3g} against update norm {scale:.3g}"


def _check_engine_against_sequential(runner, clients, relative=RELATIVE):
    start = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    trained = runner.engine.train(clients, {c: 0 for c in clients}, start)
    assert sorted(trained) == sorted(clients)
    moved = 0
    for cid in clients:
        reference, result = _sequential(runner, start, cid)
        mine = trained[cid]
        assert (mine.result.num_samples, mine.result.num_steps) == (result.num_samples, result.num_steps)
        assert mine.result.loss_sum == pytest.approx(result.loss_sum, rel=1e-5)
        for name, value in mine.dense.items():
            _assert_close_update(value, reference[name], start[name], f"client {cid} {name}", relative)
        for name, (ids, rows) in mine.rows.items():
            _assert_close_update(rows, reference[name][ids], start[name][ids], f"client {cid} {name}", relative)
            moved += int((rows != start[name][ids]).any())
            if runner.fl.embedding_updates == "dense":  # the rows it never read did not move
                others = torch.ones(start[name].shape[0], dtype=torch.bool)
                others[ids] = False
                assert torch.equal(reference[name][others], start[name][others]), name
    assert moved, "nothing trained"


@pytest.mark.parametrize("fl, local_optimizer", [
    ({}, None),  # plain SGD, dense mode, one epoch
    ({"embedding_updates": "sparse", "local_epochs": 2}, {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                          "nesterov": True, "weight_decay": 0.01}),
    ({"local_epochs": None, "local_steps": 5}, {"name": "sgd", "lr": 0.05, "momentum": 0.5, "dampening": 0.1}),
    ({"embedding_updates": "sparse", "local_epochs": 2}, {"name": "adagrad", "lr": 0.05, "lr_decay": 0.01}),
    # Adam divides each element by its own gradient scale, so elements whose gradients are
    # mostly rounding noise amplify it: over two epochs (58 steps for the largest client)
    # the updates agree to about 2e-5 (nudging the sequential run's top-MLP weights by one
    # unit in the last place alone moves its table updates by 1e-6), hence 5e-5 for Adam
    ({"local_epochs": 2}, {"name": "adam", "lr": 0.01}),
])
def test_dlrm_clients_equal_sequential_training(config, fl, local_optimizer):
    relative = 5e-5 if local_optimizer and local_optimizer["name"] == "adam" else RELATIVE
    runner = _runner(config, local_optimizer=local_optimizer, **fl)
    assert runner.engine is not None and runner.engine.forward.name == "dlrm"
    sizes = runner.partition.sizes
    clients = [c for c in range(16) if sizes[c] > 0][:10]
    assert len({-(-int(sizes[c]) // runner.fl.local_batch_size) for c in clients}) > 1  # masking is exercised
    runner.engine.micro_clients = 3  # steps in several forward/backward passes (one optimizer step)
    _check_engine_against_sequential(runner, clients, relative)


@pytest.mark.parametrize("model", [
    {"arch_interaction_op": "cat", "arch_mlp_top": [8, 1], "loss_function": "mse"},
    {"arch_interaction_itself": True, "loss_function": "wbce", "loss_weights": [0.3, 0.7], "loss_threshold": 0.01},
])
def test_dlrm_variants_equal_sequential_training(config, model):
    """The batched DLRM's hand-written backward for the cat interaction, the dot with the
    diagonal, the mse and weighted bce losses and the probability clamp."""
    config["model"].update(model)
    runner = _runner(config, local_epochs=2)
    assert runner.engine.forward.name == "dlrm"
    _check_engine_against_sequential(runner, [c for c in range(12) if runner.partition.sizes[c] > 0][:6])


@pytest.mark.parametrize("local_optimizer", [None, {"name": "adam", "lr": 0.01}])
def test_a_second_model_takes_the_torch_func_path(config, local_optimizer):
    config["model"] = {"name": "test_wide_and_deep", "dim": 4, "preproc": config["model"]["preproc"]}
    runner = _runner(config, local_optimizer=local_optimizer, local_epochs=2)
    assert runner.engine.forward.name == "torch.func"
    _check_engine_against_sequential(runner, [c for c in range(12) if runner.partition.sizes[c] > 0][:6])


@pytest.mark.parametrize("model", [None, "test_wide_and_deep"])
def test_lanes_on_several_threads_give_the_same_bits_as_one(config, model):
    """Lanes of clients train on ``fl.vectorize_threads`` threads at once; a client's floats
    do not depend on how many (each lane's kernels run on one thread), for the batched DLRM
    and for the torch.func path, with momentum state and the summed uploads."""
    if model:
        config["model"] = {"name": model, "dim": 4, "preproc": config["model"]["preproc"]}
    optimizer = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    results = []
    for threads in (1, 2, 3):
        runner = _runner(config, local_optimizer=optimizer, local_epochs=2, vectorize_threads=threads)
        assert runner.engine.threads == threads
        runner.engine.micro_clients = 2  # several lanes, of unequal lengths
        clients = [c for c in range(14) if runner.partition.sizes[c] > 0][:9]
        start = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
        rounds = {c: 1 for c in clients}
        trained = runner.engine.train(clients, rounds, start)
        # a job's small chunks train side by side, each on one thread
        sums = [part for chunk in runner.engine.map_chunks(
            lambda chunk: runner.engine.train_sum(chunk, rounds, start),
            [[(0, clients[:4])], [(1, clients[4:6])], [(2, clients[6:])]]) for part in chunk]
        results.append(({cid: (t.dense, t.rows, t.result) for cid, t in trained.items()}, sums))
    for other, other_sums in results[1:]:
        for cid, (dense, rows, result) in results[0][0].items():
            assert result == other[cid][2]
            assert all(torch.equal(value, other[cid][0][name]) for name, value in dense.items())
            for name, (ids, values) in rows.items():
                assert torch.equal(ids, other[cid][1][name][0]) and torch.equal(values, other[cid][1][name][1])
        for (update, stats), (other_update, other_stats) in zip(results[0][1], other_sums, strict=True):
            assert stats == other_stats
            assert all(torch.equal(value, other_update.dense[name]) for name, value in update.dense.items())
            for name, rows in update.rows.items():
                assert torch.equal(rows.values, other_update.rows[name].values), name


def _same_bits(alone, together):
    """The clients of ``alone`` trained to the same bits in ``together``."""
    for cid, mine in alone.items():
        other = together[cid]
        assert mine.result == other.result, cid
        for name, value in mine.dense.items():
            assert torch.equal(value, other.dense[name]), (cid, name)
        for name, (ids, rows) in mine.rows.items():
            assert torch.equal(ids, other.rows[name][0]) and torch.equal(rows, other.rows[name][1]), (cid, name)


@pytest.mark.parametrize("model, fl, local_optimizer", [
    # layer sizes whose clients' weights are not whole 64-byte runs, a batch of 24 (padded
    # to 32), momentum
    ({"arch_feature_emb_size": 3, "arch_mlp_bot": [13, 7, 3], "arch_mlp_top": [5, 1]},
     {"local_batch_size": 24, "local_epochs": 2}, {"name": "sgd", "lr": 0.05, "momentum": 0.9}),
    ({}, {"local_batch_size": 50, "embedding_updates": "sparse"}, {"name": "adam", "lr": 0.01}),
])
def test_a_clients_floats_do_not_depend_on_the_clients_batched_with_it(config, model, fl, local_optimizer):
    """So a chunk may take several reduction blocks (and lanes clients of any block)
    while every backend and process count still gets the same bits: the same clients
    alone, in lanes of 1, 2 or many, with others before or after them."""
    config["model"].update(model)
    runner = _runner(config, local_optimizer=local_optimizer, **fl)
    assert runner.engine.packs_blocks and runner.engine.batch == 32 * -(-fl["local_batch_size"] // 32)
    sizes = runner.partition.sizes
    clients = [c for c in range(len(sizes)) if sizes[c] > 0]
    start = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    rounds = {c: 0 for c in clients}
    alone = runner.engine.train(clients[2:9], rounds, start)
    assert len({r.result.num_steps for r in alone.values()}) > 1  # lanes shrink as clients finish
    for micro, together in ((1, clients[2:9]), (2, clients[1:]), (64, clients[::-1])):
        runner.engine.micro_clients = micro
        _same_bits(alone, runner.engine.train(together, rounds, start))


def test_packed_blocks_sum_as_each_block_alone(config):
    """A chunk of several blocks' parts returns each part's sum with the bits that part
    trained alone gives."""
    runner = _runner(config, embedding_updates="sparse", local_epochs=2, local_batch_size=32)
    engine = runner.engine
    clients = [c for c in range(len(runner.partition.sizes)) if runner.partition.sizes[c] > 0][:12]
    blocks = [(0, clients[:5]), (1, clients[5:6]), (2, clients[6:])]
    start = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    rounds = {c: 0 for c in clients}
    chunks = engine.pack(blocks)
    assert chunks == [blocks]  # all three fit the default budget: one chunk
    together = engine.train_sum(chunks[0], rounds, start)
    for part, (update, stats) in zip(blocks, together, strict=True):
        [(alone, alone_stats)] = engine.train_sum([part], rounds, start)
        assert sorted(s.client_id for s in stats) == sorted(part[1]) and stats == alone_stats
        assert (update.weight, update.num_clients) == (alone.weight, alone.num_clients)
        assert all(torch.equal(value, alone.dense[name]) for name, value in update.dense.items())
        assert sorted(update.rows) == sorted(alone.rows)
        for name, rows in update.rows.items():
            assert torch.equal(rows.ids, alone.rows[name].ids) and torch.equal(rows.values, alone.rows[name].values)
            assert torch.equal(rows.row_weight, alone.rows[name].row_weight)


def test_chunks_cut_blocks_within_the_budget_and_pack_them(config):
    runner = _runner(config, local_epochs=2, local_batch_size=32)
    engine = runner.engine
    clients = list(range(20))
    assert engine.chunks(clients) == [clients]
    steps = [engine._steps_of(c) for c in clients]
    engine.budget = 3 * engine.client_bytes(max(steps))
    chunks = engine.chunks(clients)
    assert [c for chunk in chunks for c in chunk] == clients and len(chunks) > 1
    for chunk in chunks:
        assert sum(engine.client_bytes(engine._steps_of(c)) for c in chunk) <= engine.budget
    # a block's pieces are cut as if it were alone; pieces of several blocks share chunks
    blocks = [(0, clients[:1]), (1, clients[1:2]), (2, clients[2:])]
    packed = engine.pack(blocks)
    assert [part for chunk in packed for part in chunk] == [(b, p) for b, block in blocks
                                                            for p in engine.chunks(block)]
    assert packed[0][:2] == blocks[:2]  # two small blocks share a chunk
    for chunk in packed:
        assert engine._bytes_of([c for _, part in chunk for c in part]) <= engine.budget
    # a batch that padding would swell by more than a third trains one part at a time
    engine = _runner(config, local_batch_size=20).engine
    assert not engine.packs_blocks and engine.batch == 20
    assert engine.pack([(0, [0, 1]), (1, [2])]) == [[(0, [0, 1])], [(1, [2])]]
    # so does the torch.func path (vmap's gradients are not aligned)
    config["model"] = {"name": "test_wide_and_deep", "dim": 4, "preproc": config["model"]["preproc"]}
    engine = _runner(config).engine
    assert engine.forward.name == "torch.func"
    assert engine.pack([(0, [0, 1]), (1, [2])]) == [[(0, [0, 1])], [(1, [2])]]


def test_lanes_use_every_core_alone_and_client_threads_under_an_mpi_launcher(config, monkeypatch):
    import os

    from fedrec.federated.client_engine import lane_threads
    from fedrec.federated.config import FLConfig

    for var in ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cores = len(os.sched_getaffinity(0))
    assert lane_threads(FLConfig()) == cores
    assert lane_threads(FLConfig(client_threads=cores + 1)) == cores + 1
    assert lane_threads(FLConfig(vectorize_threads=3)) == 3
    monkeypatch.setenv("PMI_SIZE", "4")  # one of 4 processes on the node: its own share
    assert lane_threads(FLConfig()) == 1 and lane_threads(FLConfig(client_threads=2)) == 2
    assert lane_threads(FLConfig(vectorize_threads=3)) == 3
    monkeypatch.delenv("PMI_SIZE")

    class FakeMPI:  # a worker that spawn mode started: a world of its own, and a parent
        COMM_NULL = object()

        class COMM_WORLD:
            @staticmethod
            def Get_size():
                return 1

        class Comm:
            @staticmethod
            def Get_parent():
                return "the simulation"

        @staticmethod
        def Is_initialized():
            return True

        @staticmethod
        def Is_finalized():
            return False

    monkeypatch.setitem(sys.modules, "mpi4py.MPI", FakeMPI)
    assert lane_threads(FLConfig()) == 1


def _simulate(config, logdir):
    sim = Simulation(config, logdir, logger=MemoryLogger())
    try:
        history = sim.run()
        weights = {k: v.clone() for k, v in sim.trainer.model.state_dict().items()}
    finally:
        sim.close()
    return sim, history, weights


@pytest.mark.parametrize("fl, summed", [
    ({"embedding_updates": "sparse", "fl_algo": {"name": "fed_adam", "server_lr": 0.01}, "local_epochs": 2}, True),
    ({"fl_algo": {"name": "fed_avg"}}, True),  # dense mode, fast path: rows, bytes as dense
    ({"fl_algo": {"name": "fed_avgm", "server_lr": 0.5, "server_momentum": 0.9}, "dense_fast_path": "off"}, True),
    ({"fl_algo": {"name": "fed_nova"}, "embedding_updates": "sparse"}, False),  # its own upload
    # FedProx's term mu (w - start) on the MLPs and the rows read, in both modes
    ({"fl_algo": {"name": "fed_prox", "mu": 0.5}, "embedding_updates": "sparse", "local_epochs": 2}, True),
    ({"fl_algo": {"name": "fed_prox", "mu": 0.5}, "local_optimizer": {"name": "sgd", "lr": 0.05,
                                                                        "momentum": 0.9}}, True),
    ({"postprocessors": [{"name": "l2_clip", "bound": 0.5}]}, False),
    ({"local_epochs": None, "local_steps": 3, "embedding_updates": "sparse"}, False),
])
def test_simulation_with_the_vectorized_engine_matches_the_sequential_one(config, tmp_path, fl, summed):
    config["fl"].update({"num_rounds": 3, "client_num_per_round": 12, **fl})
    seq, seq_history, seq_weights = _simulate(copy.deepcopy(config), tmp_path / "seq")
    config["fl"]["client_engine"] = "auto"
    vec, vec_history, vec_weights = _simulate(config, tmp_path / "vec")
    assert seq.runner.engine is None and vec.runner.engine is not None
    assert "client engine: vectorized (dlrm path" in vec.runner.engine_note
    assert vec.runner.engine.sums_uploads is summed
    assert ("uploads summed per block" if summed else "uploads client by client") in vec.runner.engine_note
    assert any("client engine: vectorized" in line for line in vec.logger.messages)
    for a, b in zip(seq_history, vec_history):
        for key in ("samples", "bytes_up", "bytes_down", "clients"):
            assert a[key] == b[key], key
        assert a["roc_auc"] == pytest.approx(b["roc_auc"], abs=1e-4)
    for name in seq_weights:
        assert torch.allclose(seq_weights[name], vec_weights[name], rtol=1e-4, atol=1e-6), name


def test_auto_falls_back_with_a_reason_and_forcing_it_is_a_clear_error(config):
    config["fl"]["fl_algo"] = {"name": "scaffold"}
    runner = _runner(config, client_engine="auto")
    assert runner.engine is None
    assert runner.engine_note == "client engine: sequential (fl_algo 'scaffold' has its own local training hooks)"
    with pytest.raises(VectorizationError, match=r"scaffold.*use fl.client_engine: auto"):
        _runner(config)
    config["fl"].update({"fl_algo": {"name": "fed_avg"}, "local_optimizer": {"name": "rowwise_adagrad", "lr": 0.1}})
    with pytest.raises(VectorizationError, match="the local optimizer is RowWiseAdagrad; the vectorized engine "
                                                 "reproduces SGD, Adagrad, Adam"):
        _runner(config)
    config["fl"]["local_optimizer"] = None
    config["model"]["embedding_types"]["base"] = {"name": "qr_emb", "qr_collisions": 2}
    with pytest.raises(VectorizationError, match="qr_emb|QREmbedding.*maps ids to rows itself"):
        _runner(config)


def test_a_memory_budget_too_small_for_one_client_names_the_size_it_needs(config, tmp_path, capsys):
    """Refused before the run starts (whichever round would draw that client), with the
    size the largest client needs: enough for every client."""
    from tests.run_helpers import assert_simulate_refuses

    config["fl"].update({"client_engine": "vectorized", "vectorize_memory_mb": 1, "local_epochs": 50,
                         "num_rounds": 1})
    with pytest.raises(Exception, match=r"fl.vectorize_memory_mb is 1 MiB, but client \d+ alone needs "
                                        r"about \d+ MiB .*raise it to at least that"):
        Simulation(config, tmp_path / "run", logger=MemoryLogger())
    (tmp_path / "cli").mkdir()
    line = assert_simulate_refuses(config, tmp_path / "cli", capsys, "fl.vectorize_memory_mb is 1 MiB")
    needed = int(line.split("needs about ")[1].split(" MiB")[0])
    config["fl"]["vectorize_memory_mb"] = needed  # what it asked for is enough for every client
    _runner(config, **config["fl"])


@needs_mpi
def test_vectorized_engine_under_mpi_gives_the_local_result(synthetic_data, tmp_path, threads=2):
    """Each process packs the blocks it holds into chunks (the local backend all 12 into
    one); on two threads lanes and table groups run side by side, and the result is still
    the local one bit for bit."""
    from fedrec.federated.run import run_simulation

    config = _config(synthetic_data["config"], backend="local", num_rounds=2, client_engine="vectorized",
                     embedding_updates="sparse", client_threads=threads, vectorize_threads=threads,
                     local_batch_size=32)
    run_simulation(config, tmp_path / "local", print_rounds=False)
    config["fl"]["backend"] = "mpi"
    simulate(config, tmp_path / "mpi", processes=3)
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


def test_simulate_cli_runs_the_engine_and_refuses_a_misfit_in_one_line(config, tmp_path, capsys):
    from tests.run_helpers import assert_simulate_refuses, cli, write_config

    config["fl"].update({"num_rounds": 1, "client_engine": "auto", "reduce_blocks": 2, "local_batch_size": 32})
    path = write_config(config, tmp_path / "vec.yml")
    status, _, err = cli(capsys, "simulate", "--config", path, "--logdir", tmp_path / "run")
    assert status == 0, err
    log = (tmp_path / "run" / "run.log").read_text()
    assert ("client engine: vectorized (dlrm path; chunks of up to 1,024 MiB of several reduction blocks, SGD "
            "local steps, lanes on ") in log and "thread(s); uploads summed" in log
    config["fl"].update({"client_engine": "vectorized", "fl_algo": {"name": "scaffold"}})
    (tmp_path / "refused").mkdir()
    line = assert_simulate_refuses(config, tmp_path / "refused", capsys,
                                   "fl.client_engine: vectorized cannot run this config")
    assert "use fl.client_engine: auto" in line


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.01}),
])
def test_stacked_optimizer_is_torch_optim_per_client(name, kwargs):
    """Each client's slice moves as its own torch.optim optimizer would move it, with the
    clients of a step split over several calls and clients dropping out as they finish."""
    from fedrec.federated.stacked_optim import StackedOptimizer, spec_of

    generator = torch.Generator().manual_seed(0)
    clients, steps = 5, [6, 6, 4, 2, 1]  # most steps first: the active ones are a prefix
    start = torch.randn(clients, 3, 4, generator=generator)
    grads = torch.randn(max(steps), clients, 3, 4, generator=generator)
    references = []
    for k in range(clients):
        param = torch.nn.Parameter(start[k].clone())
        optimizer = getattr(torch.optim, name)([param], **kwargs)
        for s in range(steps[k]):
            param.grad = grads[s, k].clone()
            optimizer.step()
        references.append(param.detach())
    stacked = start.clone()
    optimizer = StackedOptimizer(spec_of(getattr(torch.optim, name)([torch.nn.Parameter(start[0])], **kwargs)),
                                 [stacked])
    for s in range(max(steps)):
        active = sum(n > s for n in steps)
        for a in range(0, active, 2):
            b = min(active, a + 2)
            optimizer.apply(s + 1, [grads[s, a:b]], [(a, b)])
    for k in range(clients):
        assert torch.allclose(stacked[k], references[k], rtol=1e-6, atol=1e-7), k
