"""``fedrec plan ...``: export a plan, cut client data files, run a plan, deploy it.

Kept beside the plans so that ``fedrec/cli.py`` only registers the command.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def _non_negative(text: str) -> int:
    """An argparse type: a client id or round index (argparse words the error in one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _check_update_out(path: str) -> None:
    """``plan run --out`` may replace only an update file an earlier ``plan run`` wrote."""
    import os

    from fedrec.plans.format import PlanError

    if os.path.isdir(path):
        raise PlanError(f"--out {path} is a folder; give the update file's path, e.g. {path}/update.safetensors")
    if os.path.exists(path):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                ours = "plan" in (handle.metadata() or {})
        except Exception:  # noqa: BLE001 - anything unreadable is not ours
            ours = False
        if not ours:
            raise PlanError(f"--out {path} already exists and is not an update written by fedrec plan run; "
                            "choose a new path or remove it yourself")


def add_plan_parser(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    plan = sub.add_parser("plan", help="FL plans: export a client's computation, run it, deploy it over Flower")
    inner = plan.add_subparsers(dest="plan_command", required=True)

    export = inner.add_parser("export", help="write a plan: train step, validate and test as torch.export "
                              "programs, weights, hyper-parameters, schema, checksum")
    add_common(export)
    export.add_argument("--logdir", help="a simulate run: the plan starts from its newest checkpoint's global "
                        "model (default: the initial model)")
    export.add_argument("--out", required=True, help="the plan file to write, e.g. runs/fl/client.plan")

    data = inner.add_parser("data", help="write clients' local data files (and held-out splits) from a "
                            "processed dataset, in the simulation's partition")
    add_common(data)
    data.add_argument("--logdir", help="a simulate run whose partition.npz to use (default: split as the config says)")
    data.add_argument("--out", required=True, help="folder for client-<id>.safetensors and <split>.safetensors")
    data.add_argument("--clients", type=_non_negative, nargs="*", default=[], help="client ids")
    data.add_argument("--splits", nargs="*", default=[], choices=["val", "test"], help="held-out splits to write")

    info = inner.add_parser("info", help="check a plan and print its manifest")
    info.add_argument("plan")

    run = inner.add_parser("run", help="one client's round from a plan: no config, no simulator")
    run.add_argument("--plan", required=True)
    run.add_argument("--data", required=True, help="the client's data file (safetensors: dense, sparse, label)")
    run.add_argument("--client", type=_non_negative, required=True, help="the client's id (seeds its data order)")
    run.add_argument("--round", type=_non_negative, default=0, help="the round index (seeds its data order)")
    run.add_argument("--weights", help="global weights (safetensors; default: the plan's)")
    run.add_argument("--out", help="write the update here (safetensors)")

    evaluate = inner.add_parser("evaluate", help="validate or test a model with a plan on a data file")
    evaluate.add_argument("--plan", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--weights", help="global weights (safetensors; default: the plan's)")

    from fedrec.plans.deploy import add_deploy_parsers

    add_deploy_parsers(inner, add_common)


def run_plan_command(args: argparse.Namespace, config_from: Callable[[argparse.Namespace], dict[str, Any]]
                     ) -> int | None:
    command = args.plan_command
    common = ("config", "sets", "datafile", "output_file", "max_ind_range")
    if hasattr(args, "config"):  # only the common flags are config keys
        inner = config_from
        config_from = lambda a: inner(argparse.Namespace(**{k: getattr(a, k) for k in common}))
    if command == "export":
        from fedrec.plans.export import describe, export_plan

        manifest = export_plan(config_from(args), args.out, logdir=args.logdir, config_path=args.config)
        print(f"wrote {args.out}: {describe(manifest)}")
    elif command == "data":
        from fedrec.plans.data import export_client_data

        written = export_client_data(config_from(args), args.logdir, args.out, args.clients, args.splits)
        for path in written:
            print(f"wrote {path}")
    elif command == "info":
        from fedrec.plans.format import read_plan

        plan = read_plan(args.plan)
        print(json.dumps(dict(plan.manifest, checksum=plan.checksum), indent=1, sort_keys=True))
    elif command == "run":
        _run(args)
    elif command == "evaluate":
        from fedrec.plans.data import read_client_data
        from fedrec.plans.runner import PlanRunner

        runner = PlanRunner(args.plan)
        data = read_client_data(args.data, runner.manifest)
        print(json.dumps(runner.evaluate(_weights(runner, args.weights), data), indent=1))
    else:
        from fedrec.plans.deploy import run_deploy_command

        return run_deploy_command(args, config_from)
    return None


def _weights(runner: Any, path: str | None) -> dict[str, Any]:
    if path is None:
        return runner.initial_weights()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fedrec.plans.format import PlanError

    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise PlanError(f"--weights {path} is not a readable safetensors file ({err})") from None


def _run(args: argparse.Namespace) -> None:
    import time

    from fedrec.plans.data import read_client_data
    from fedrec.plans.runner import PlanRunner

    if args.out:
        _check_update_out(args.out)  # before any work, so a bad path costs nothing
    runner = PlanRunner(args.plan)
    data = read_client_data(args.data, runner.manifest)
    weights = _weights(runner, args.weights)
    start = time.perf_counter()
    result = runner.train(weights, data, args.round, args.client)
    seconds = time.perf_counter() - start
    if args.out:
        from safetensors.torch import save_file

        tensors = {f"dense/{k}": v.contiguous() for k, v in result.update.dense.items()}
        for name, rows in result.update.rows.items():
            tensors[f"rows/{name}/ids"] = rows.ids.contiguous()
            tensors[f"rows/{name}/values"] = rows.values.contiguous()
        import os

        tmp = f"{args.out}.tmp-{os.getpid()}"  # never a half-written update under its name
        try:
            save_file(tensors, tmp, metadata={"weight": str(result.update.weight), "client": str(args.client),
                                              "round": str(args.round), "plan": runner.checksum})
            os.replace(tmp, args.out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    print(json.dumps({"client": args.client, "round": args.round, "sample_num": result.sample_num,
                      "steps": result.num_steps, "mean_loss": result.mean_loss, "bytes_up": result.bytes_up,
                      "bytes_down": runner.download_bytes(data), "seconds": round(seconds, 4),
                      "update": args.out}, indent=1))
