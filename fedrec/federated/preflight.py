"""Checking a simulation's config before anything is written to its logdir.

``fedrec simulate`` creates the logdir, writes the config and starts the logs before it
builds the simulation, whose components validate themselves. Values that can be
checked without data or a model (the ``fl`` section, the algorithm's keys and its
``check_config``, postprocessors, attack and sampler) are checked here first, so that a
bad config fails with one line naming the key and leaves the logdir untouched.
"""

from __future__ import annotations

from typing import Any, Dict

from fedrec.utilities.config import ConfigError


def check_simulation_config(config: Dict[str, Any]) -> None:
    """Raise the config error a simulation built from ``config`` would raise early on."""
    from fedrec.federated.attacks import build_attack
    from fedrec.federated.client_runner import algorithm_config
    from fedrec.federated.config import fl_config_from, import_modules
    from fedrec.federated.postprocessors import build_chain
    from fedrec.utilities import registry

    fl = fl_config_from(config)
    import_modules(fl.imports)
    algorithm = registry.lookup("fl_algo", fl.fl_algo)
    values = algorithm_config(algorithm, fl.fl_algo)
    try:
        algorithm.check_config(values, fl)
    except (ValueError, TypeError) as err:
        if isinstance(err, registry.ConfigTypeError):
            raise
        raise ConfigError(f"fl.fl_algo {fl.fl_algo.get('name')!r}: {err}") from None
    build_chain(fl.postprocessors)
    build_attack(fl.attack, fl.num_workers, fl.seed)
    registry.construct("sampler", fl.sampler)
