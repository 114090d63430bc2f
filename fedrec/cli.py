"""``fedrec`` command line: synth, preprocess, train, simulate, report, sweep.

Every job reads a YAML config (``--config``); the seed's flags (``--batch_size 256``) and
``--set section.key=value`` override it. Errors in the config or the data end the run
with one clear message (exit status 2), not a traceback (``-v`` adds it); Ctrl-C ends it
with "interrupted; resume with: ..." (exit status 130). :func:`user_error` is the one
place that turns exceptions into those messages.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from fedrec.utilities.config import FL_FLAG_PATHS, FLAG_PATHS, ConfigError, load_config

# Flag name -> argparse options, for the seed's flat flags.
_INT_FLAGS = (
    "eval_every_n", "report_every_n", "save_every_n", "keep_every_n", "batch_size",
    "eval_batch_size", "data_seed", "init_seed", "model_seed", "num_batches", "num_epochs",
    "num_eval_batches", "max_ind_range",
)
_BOOL_FLAGS = ("eval_on_train", "no_eval_on_val", "log_gradients", "pin_memory")
_FL_INT_FLAGS = ("num_rounds", "client_num_per_round", "local_epochs", "local_steps",
                 "local_batch_size", "eval_every_n_rounds", "seed")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/dlrm.yml")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set train.config.batch_size=256")
    parser.add_argument("--datafile", help="raw Criteo-format file (model.preproc.datafile)")
    parser.add_argument("--output_file", help="processed data folder (model.preproc.output_file)")
    parser.add_argument("--max_ind_range", type=int, help="hash categoricals modulo this (> 0)")


def _add_train_flags(parser: argparse.ArgumentParser, with_num_workers: bool) -> None:
    for flag in _INT_FLAGS:
        if flag != "max_ind_range":
            parser.add_argument(f"--{flag}", type=int)
    for flag in _BOOL_FLAGS:
        parser.add_argument(f"--{flag}", action="store_const", const=True)
    if with_num_workers:
        parser.add_argument("--num_workers", type=int, help="background threads preparing batches")
    parser.add_argument("--devices", nargs="+", help="e.g. cpu or cuda:0")
    parser.add_argument("--logdir", required=True, help="where metrics, events and checkpoints go")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --logdir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic Criteo-format TSV with a planted click model")
    synth.add_argument("--rows", type=int, required=True)
    synth.add_argument("--out", required=True, help="output TSV path")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num_users", type=int, default=1000, help="latent users (for natural FL splits)")

    ratings = sub.add_parser("synth-ratings", help="write synthetic MovieLens-format ratings from planted "
                             "user and item factors (for scale; the oracle HR@10 is in <out>.meta.json)")
    ratings.add_argument("--users", type=int, required=True)
    ratings.add_argument("--items", type=int, default=2000)
    ratings.add_argument("--per_user", type=int, default=20, help="mean ratings per user (at least 3)")
    ratings.add_argument("--dim", type=int, default=16, help="dimension of the planted factors")
    ratings.add_argument("--seed", type=int, default=0)
    ratings.add_argument("--out", required=True, help="output csv path (userId,movieId,rating,timestamp)")

    pre = sub.add_parser("preprocess", help="Criteo TSV (plain or .gz) -> memory-mapped arrays")
    _add_common(pre)
    pre.add_argument("--skip_bad_lines", action="store_const", const=True,
                     help="skip and count malformed lines instead of stopping")

    train = sub.add_parser("train", help="standard (centralized) training")
    _add_common(train)
    _add_train_flags(train, with_num_workers=True)

    sim = sub.add_parser("simulate", help="federated simulation over many simulated workers")
    _add_common(sim)
    _add_train_flags(sim, with_num_workers=False)
    sim.add_argument("--num_workers", type=int, help="number of simulated FL workers (fl.num_workers)")
    for flag in _FL_INT_FLAGS:
        sim.add_argument(f"--{flag}", type=int)
    sim.add_argument("--local_lr", type=float)
    sim.add_argument("--backend", choices=["local", "mpi"])
    sim.add_argument("--embedding_updates", choices=["dense", "sparse"])
    sim.add_argument("--embedding_aggregation", choices=["dense_equivalent", "per_row"])

    rep = sub.add_parser("report", help="an HTML page (and PNGs) of runs' metrics, overlaid and compared")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or a folder of runs, e.g. a sweep's)")
    rep.add_argument("--out", required=True, help="folder for report.html, png/ and report.json")
    rep.add_argument("--group_seeds", action="store_true",
                     help="draw runs that differ only in seeds as one line: mean and std")
    rep.add_argument("--title", help="the page's title")
    rep.add_argument("--no_png", action="store_true", help="only the HTML page")

    sweep = sub.add_parser("sweep", help="a grid of runs from one config: parallel, resumable, one report")
    sweep.add_argument("--config", required=True, help="the base YAML config")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                       help="a config key and its values; repeat for more keys (cartesian product)")
    sweep.add_argument("--seeds", type=int, default=1, help="runs per point, seeds 0..N-1 (fl.seed)")
    sweep.add_argument("--logdir", required=True, help="one run folder per point goes here, and report/")
    sweep.add_argument("--jobs", type=int, default=1, help="points run at once (each in its own process)")
    sweep.add_argument("--command", choices=["simulate", "train"], default="simulate", dest="run_command",
                       help="what each point runs (default: simulate)")
    sweep.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a base config key for every point")

    from fedrec.plans.cli import add_plan_parser

    add_plan_parser(sub, _add_common)
    return parser


_NOT_FLAGS = {"command", "config", "sets", "logdir", "resume", "verbose", "rows", "out", "num_users", "argv"}


def _flags(args: argparse.Namespace, paths: Dict[str, str]) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """Split given flags into seed flags (mapped by ``paths``) and direct dotted keys."""
    out = {}
    for key, value in vars(args).items():
        if key in _NOT_FLAGS or value is None:
            continue
        if key == "skip_bad_lines":
            out["model.preproc.skip_bad_lines"] = value
            continue
        out[key] = value
    direct = {k: v for k, v in out.items() if "." in k}
    flags = {k: v for k, v in out.items() if "." not in k}
    unknown = sorted(set(flags) - set(paths))
    if unknown:
        raise ConfigError(f"flags {unknown} do not apply to this command")
    return flags, direct


# Flags that bound the same thing: giving one on the command line clears the other.
_ALTERNATIVES = {"num_batches": "num_epochs", "num_epochs": "num_batches",
                 "local_steps": "local_epochs", "local_epochs": "local_steps"}


def _config_from(args: argparse.Namespace, paths: Dict[str, str]) -> Dict[str, Any]:
    flags, direct = _flags(args, paths)
    cleared = [f"{paths[_ALTERNATIVES[f]]}=null" for f in flags
               if f in _ALTERNATIVES and _ALTERNATIVES[f] not in flags and _ALTERNATIVES[f] in paths]
    sets = cleared + list(args.sets) + [f"{k}={v}" for k, v in direct.items()]
    return load_config(args.config, sets=sets, flags=flags, flag_paths=paths)


def _refuse_foreign_out(out: str, marker: str) -> None:
    """A synthetic file replaces only an earlier one (it has the ``marker`` beside it),
    never some other file at that path."""
    path = Path(out)
    if path.exists() and not Path(f"{out}{marker}").is_file():
        raise ConfigError(f"--out {out} already exists and was not written by fedrec synth (no {path.name}{marker} "
                          "beside it); choose a new path or remove it yourself")


def _cmd_synth(args: argparse.Namespace) -> None:
    from fedrec.data import synthesize

    _refuse_foreign_out(args.out, ".meta.json")
    meta = synthesize(args.rows, args.out, seed=args.seed, num_users=args.num_users)
    print(f"wrote {meta['rows']:,} rows to {args.out} (CTR {meta['ctr']:.3f}, "
          f"optimal AUC {meta['optimal_auc']:.4f}); users in {args.out}.users.npy")


def _cmd_synth_ratings(args: argparse.Namespace) -> None:
    from fedrec.data.synthetic_ratings import synthesize_ratings

    _refuse_foreign_out(args.out, ".meta.json")
    try:
        meta = synthesize_ratings(args.out, num_users=args.users, num_items=args.items,
                                  mean_per_user=args.per_user, dim=args.dim, seed=args.seed)
    except ValueError as err:  # a bad count: one line, exit status 2
        raise ConfigError(str(err)) from None
    print(f"wrote {meta['rows']:,} ratings of {args.users:,} users to {args.out} (oracle sampled HR@10 "
          f"{meta['oracle_hr@10']:.3f}, NDCG@10 {meta['oracle_ndcg@10']:.3f}); metadata in {args.out}.meta.json")


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from fedrec.runner import run_preprocess

    run_preprocess(_config_from(args, FLAG_PATHS), config_path=args.config)


def _cmd_train(args: argparse.Namespace) -> None:
    from fedrec.runner import run_train

    run_train(_config_from(args, FLAG_PATHS), args.logdir, resume=args.resume, config_path=args.config)


def _cmd_simulate(args: argparse.Namespace) -> Optional[int]:
    from fedrec.federated.run import run_simulation
    from fedrec.federated.spawn_watch import as_watched_child, needs_watcher, run_watched

    as_watched_child()
    config = _config_from(args, FL_FLAG_PATHS)
    if needs_watcher(config):  # spawned MPI workers: see fedrec/federated/spawn_watch.py
        from fedrec.federated.mpi_backend import require_mpi4py

        require_mpi4py(import_mpi=False)
        return run_watched(args.argv, Path(args.logdir), resume_command(args))
    run_simulation(config, args.logdir, resume=args.resume, config_path=args.config)
    return None


def _cmd_report(args: argparse.Namespace) -> None:
    from fedrec.report import write_report

    page = write_report(args.runs, args.out, group_seeds=args.group_seeds, title=args.title, pngs=not args.no_png)
    print(f"report: {page}")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedrec.sweep import run_sweep

    outcomes, page = run_sweep(args.config, args.grid, args.logdir, seeds=args.seeds, jobs=args.jobs,
                               command=args.run_command, sets=args.sets)
    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    print(f"sweep: {done} run, {skipped} finished before, {len(failed)} failed")
    for outcome in failed:
        print(f"  failed: {outcome.point.name}: {outcome.message}", file=sys.stderr)
    if page is not None:
        print(f"report: {page}")
    return 1 if failed else 0


def _cmd_plan(args: argparse.Namespace) -> Optional[int]:
    from fedrec.plans.cli import run_plan_command

    return run_plan_command(args, lambda a: _config_from(a, FL_FLAG_PATHS))


COMMANDS: Dict[str, Callable[[argparse.Namespace], Optional[int]]] = {
    "synth": _cmd_synth,
    "synth-ratings": _cmd_synth_ratings,
    "preprocess": _cmd_preprocess,
    "train": _cmd_train,
    "simulate": _cmd_simulate,
    "report": _cmd_report,
    "sweep": _cmd_sweep,
    "plan": _cmd_plan,
}


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the same arguments plus ``--resume``."""
    argv = list(args.argv)
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["fedrec", *argv])


def user_error(err: BaseException, args: argparse.Namespace) -> Optional[Tuple[int, str]]:
    """(exit status, message) for an exception the user can act on; None for a bug.

    Config, data and checkpoint problems, a busy or unwritable logdir, a full disk and a
    diverged model are exit status 2; a failed client 1; Ctrl-C 130.
    """
    from fedrec.data.errors import DataError
    from fedrec.federated.client_runner import ClientError
    from fedrec.federated.mpi_backend import MPIProcessError
    from fedrec.plans.format import PlanError
    from fedrec.report.runs import ReportError
    from fedrec.utilities.checkpoint import CheckpointError
    from fedrec.utilities.divergence import DivergedError
    from fedrec.utilities.registry import ConfigTypeError, RegistryError
    from fedrec.utilities.run_dir import LogdirBusyError

    command = f"fedrec {args.command}"
    resumable = args.command in ("train", "simulate")
    if isinstance(err, KeyboardInterrupt) and args.command == "sweep":
        return 130, f"{command}: interrupted; run the same command again to finish the sweep (finished points are kept)"
    if isinstance(err, KeyboardInterrupt):
        return 130, f"{command}: interrupted" + (f"; resume with: {resume_command(args)}" if resumable else "")
    if isinstance(err, (ClientError, MPIProcessError)) and _client_diverged(err):
        return 2, (f"{command}: error: the simulation diverged: {err}; lower fl.local_lr (or the local "
                   "optimizer's lr) and start a fresh run")
    if isinstance(err, (ClientError, MPIProcessError)):
        # the message names the rank, round and client; the last round's checkpoint is intact
        return 1, (f"{command}: a client failed: {err}\n  the last round's checkpoint is intact: "
                   f"fix the cause and resume with: {resume_command(args)}")
    if isinstance(err, (ConfigError, ConfigTypeError, DataError, RegistryError, CheckpointError,
                        DivergedError, LogdirBusyError, ReportError, PlanError)):
        return 2, f"{command}: error: {err}"
    if isinstance(err, OSError):
        return 2, f"{command}: error: {_os_error(err, args)}"
    return None


def _client_diverged(err: BaseException) -> bool:
    """A client's training reached nan: the cause is kept in this process, while from an
    MPI worker only the message arrives (it names the exception type)."""
    from fedrec.utilities.divergence import DivergedError

    cause: Optional[BaseException] = err
    while cause is not None:
        if isinstance(cause, DivergedError):
            return True
        cause = cause.__cause__
    return f"{DivergedError.__name__}:" in str(err)


def _os_error(err: OSError, args: argparse.Namespace) -> str:
    """A file-system error in one line, naming the path and what to do."""
    logdir = getattr(args, "logdir", None)
    path = err.filename or logdir
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        text = f"no space left on device while writing {path}"
        if logdir:
            from fedrec.utilities.checkpoint import CheckpointManager

            newest = CheckpointManager(Path(logdir) / "checkpoints").latest()
            text += f"; the last good checkpoint, {newest}, is intact" if newest else ""
            text += f": free some space and resume with: {resume_command(args)}"
        return text
    in_logdir = bool(logdir and path and Path(path).resolve().is_relative_to(Path(logdir).resolve()))
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and in_logdir:
        reason = err.strerror.lower() if err.strerror else "permission denied"
        return f"cannot write {path}: {reason} (the --logdir must be a folder you can write to)"
    if err.errno in (errno.EEXIST, errno.ENOTDIR) and err.filename and not Path(err.filename).is_dir():
        # the file in the way: the path itself, or (ENOTDIR) the first of its folders that is a file
        blocker = next((p for p in reversed(Path(err.filename).parents) if p.is_file()), Path(err.filename))
        return f"{blocker} is a file, where a folder was expected: choose another path"
    if err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status = COMMANDS[args.command](args)
    except BaseException as err:  # noqa: BLE001 - sorted by user_error; others re-raised
        handled = user_error(err, args)
        if handled is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(handled[1], file=sys.stderr)
        return handled[0]
    return status or 0


def script_main(command: str, default_config: str, argv: Optional[List[str]] = None) -> int:
    """Entry point of the seed's scripts (``python train_fl.py --num_workers 1000``).

    The scripts take the same flags as the subcommand; ``--config`` defaults to the
    shipped config so the seed's bare commands work from the project root.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        argv = ["--config", default_config, *argv]
    if command in ("train", "simulate") and "--logdir" not in argv and not any(
            a.startswith("--logdir=") for a in argv):
        argv = [*argv, "--logdir", f"runs/{command}"]
    return main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
