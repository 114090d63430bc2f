"""Update postprocessors (registry kind ``postprocessor``): transform updates around the sum.

``fl.postprocessors: [{name: l2_clip, bound: 1.0}, ...]`` is a chain. Each client's
update passes through every ``postprocess_client`` in order before it joins its block's
sum (on whichever process ran the client); the reduced sum passes through every
``postprocess_server`` in reverse order on rank 0, before the aggregator's server step.
This is where clipping, norm bounding, and later differential-privacy noise, compression
and secure-aggregation masks go: per-client transforms before the sum, their server-side
counterparts after it.

A postprocessor with state (an adaptive clipping bound) keeps it on rank 0
(``state_dict`` goes into the checkpoint) and sends what clients need with the round
(``broadcast``, read back on the clients with :meth:`Postprocessor.received`: every
process builds its own chain, so a client must never read rank 0's state directly).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Dict, List, Mapping, Optional, Sequence

import pydantic

from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry

PositiveFloat = Annotated[float, pydantic.Field(gt=0)]


class Postprocessor:
    """Identity by default; override the side(s) a transform needs."""

    name = "postprocessor"
    #: index in the configured chain (set by :func:`build_chain`): the prefix of this
    #: postprocessor's keys in ``RoundContext.postprocessor_values``
    position: int = 0

    def postprocess_client(self, update: WeightedUpdate, context: ClientContext) -> WeightedUpdate:
        """One client's update (``num_clients == 1``) before the block sum."""
        return update

    def postprocess_server(self, update: WeightedUpdate, context: RoundContext) -> WeightedUpdate:
        """The cohort's reduced update on rank 0, before the server step."""
        return update

    def setup(self, fl: Any, sampler: Any, sparse: bool = False) -> None:
        """Called once per process with the run's ``fl`` settings and client sampler
        (e.g. a DP mechanism calibrates its noise from the sampling rate and rounds);
        raise ``ValueError`` naming the key for a setting it cannot work with."""

    def bind_tables(self, tables: Mapping[str, int]) -> None:
        """The model's embedding tables, ``{parameter name: rows}``, given before ``setup``
        (a mechanism that works on rows the clients did not send needs their sizes)."""

    def bind_client_sizes(self, sizes: Sequence[int]) -> None:
        """Every client's sample count, given before ``setup`` (e.g. the largest weight a
        FedAvg client can upload)."""

    def round_metrics(self, rounds_done: int) -> Dict[str, float]:
        """Numbers for the metrics line after ``rounds_done`` rounds (e.g. epsilon)."""
        return {}

    def round_byte_corrections(self) -> Dict[str, int]:
        """Bytes to add to the round's ``bytes_up``/``bytes_down`` (negative: fewer) that
        only the server side knows after this round's sum (e.g. a second protocol phase
        that sends fewer rows than the clients counted); called on rank 0."""
        return {}

    def resume_fingerprint(self) -> Dict[str, Any]:
        """Values derived from the config that a resumed run must share with the earlier
        rounds (e.g. a calibrated noise multiplier); compared like the config on --resume."""
        return {}

    def describe(self) -> str:
        """A line for the run log at start (settings the user did not spell out)."""
        return ""

    def max_rounds(self) -> Any:
        """The most rounds this postprocessor allows (a privacy budget), or None."""
        return None

    def broadcast(self) -> Dict[str, float]:
        """Values clients need this round (keys are prefixed with the chain position)."""
        return {}

    def received(self, context: RoundContext, key: str) -> float:
        """This postprocessor's own broadcast value ``key`` for the round (client side)."""
        name = broadcast_key(self.position, key)
        try:
            return context.postprocessor_values[name]
        except KeyError:
            raise KeyError(f"{self.name}: the round carries no broadcast value {name!r} "
                           f"(has {sorted(context.postprocessor_values)})") from None

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def clip_to_norm(update: WeightedUpdate, bound: float) -> bool:
    """Scale one client's update so that its unweighted delta has L2 norm <= ``bound``
    (MLPs and embedding rows together, ``aux`` untouched); True when it was clipped."""
    weight = update.weight if update.weight else 1.0
    norm = math.sqrt(update.sq_norm()) / abs(weight)
    if norm > bound:
        update.scale_(bound / norm)
        return True
    return False


@registry.load("postprocessor", "l2_clip")
class L2Clip(Postprocessor):
    """Clip each client's whole update to L2 norm ``bound`` (the clipping of DP-FedAvg,
    McMahan et al. 2018); the round's metrics count the clipped clients (``clipped``)."""

    name = "l2_clip"

    def __init__(self, bound: PositiveFloat) -> None:
        self.bound = float(bound)

    def postprocess_client(self, update, context):
        clipped = clip_to_norm(update, self.bound)
        context.metrics[f"{self.name}_clipped"] = context.metrics.get(f"{self.name}_clipped", 0.0) + float(clipped)
        return update


@registry.load("postprocessor", "norm_bound")
class NormBound(L2Clip):
    """Norm bounding against model poisoning (Sun et al. 2019, "Can you really backdoor
    federated learning?"): a client update longer than ``bound`` is scaled down to it, so
    no single client can move the average by more than ``bound * weight / total``. Same
    maths as ``l2_clip``; reported as ``norm_bound_clipped``."""

    name = "norm_bound"


def build_chain(configs: Sequence[Mapping[str, Any]], fl: Any = None, sampler: Any = None,
                sparse: bool = False, tables: Optional[Mapping[str, int]] = None,
                client_sizes: Optional[Sequence[int]] = None) -> List[Postprocessor]:
    """The configured chain, each validated by the registry (unknown names list the known)
    and, given the run's ``fl`` settings, set up for them (:meth:`Postprocessor.setup`;
    ``tables`` are the embedding tables' row counts, for :meth:`Postprocessor.bind_tables`,
    ``client_sizes`` the clients' sample counts, for :meth:`Postprocessor.bind_client_sizes`)."""
    chain = []
    for index, config in enumerate(configs):
        if not isinstance(config, Mapping) or "name" not in config:
            raise registry.RegistryError(
                f"fl.postprocessors[{index}] must be a mapping with a 'name' key "
                f"(one of {registry.known('postprocessor')}), got {config!r}")
        try:
            postprocessor = registry.construct("postprocessor", config)
            postprocessor.position = index
            postprocessor.bind_tables(dict(tables or {}))
            if client_sizes is not None:
                postprocessor.bind_client_sizes(client_sizes)
            if fl is not None:
                postprocessor.setup(fl, sampler, sparse=sparse)
            chain.append(postprocessor)
        except (ValueError, TypeError) as err:
            if isinstance(err, (registry.ConfigTypeError, registry.RegistryError)):
                raise
            from fedrec.utilities.config import ConfigError

            raise ConfigError(f"fl.postprocessors[{index}] ({config['name']}): {err}") from None
    return chain


def broadcast_key(position: int, key: str) -> str:
    """The name a broadcast value ``key`` of the chain's ``position``-th postprocessor has
    in ``RoundContext.postprocessor_values``."""
    return f"{position}.{key}"


def chain_broadcast(chain: Sequence[Postprocessor]) -> Dict[str, float]:
    return {broadcast_key(i, k): v for i, p in enumerate(chain) for k, v in p.broadcast().items()}


def run_client_chain(chain: Sequence[Postprocessor], update: WeightedUpdate,
                     context: ClientContext) -> WeightedUpdate:
    for postprocessor in chain:
        update = postprocessor.postprocess_client(update, context)
    return update


def run_server_chain(chain: Sequence[Postprocessor], update: WeightedUpdate,
                     context: RoundContext) -> WeightedUpdate:
    for postprocessor in reversed(chain):
        update = postprocessor.postprocess_server(update, context)
    return update
