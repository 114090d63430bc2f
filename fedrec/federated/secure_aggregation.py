"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020) as a postprocessor.

``fl.postprocessors: [..., {name: secure_aggregation, clip_range: 1.0}]`` (always last in
the chain) makes the server learn only the cohort's sum:

* each client scales its update by ``1 / max_weight`` (so that its weight is in [0, 1]; by
  default 1 after a DP mechanism, else the largest client's sample count),
  clamps the values to ``[-clip_range, clip_range]``, quantizes them with
  ``quantization_bits`` bits by seeded, unbiased stochastic rounding, and its weight on
  its own grid over [0, 1] (one more masked number): integers in the ring
  Z_{2^field_bits};
* it adds a pairwise mask for each neighbour (+ for a larger id, - for a smaller one),
  expanded by AES-256-CTR from an X25519 shared secret through HKDF-SHA256, and a self mask
  from its own seed b_u (double masking); the pairwise masks cancel in the sum;
* it Shamir-shares (pycryptodome, GF(2^128)) b_u and the seed of its masking key pair
  with its neighbours, each share encrypted with AES-GCM under a second, channel key pair;
* clients drop out with probability ``dropout_rate`` after the sharing (their masked
  upload never arrives); on rank 0 the survivors' shares give back the survivors' self-mask
  seeds and the dropped clients' masking keys, and the server removes every mask.

Simulated, not real: the key advertisement (every process derives any client's key pairs
from (run seed, round, client), so any process can compute any member's public key), the
transport of messages, and the clients' sharing round and share decryption, which rank 0
plays on their behalf with the real primitives (its cost is ``secagg_seconds_sharing``).
Real: X25519, HKDF, the AES-CTR PRG, AES-GCM, Shamir, and the masked integer sums, which
make the result identical for any block layout and backend.

``neighbours: null`` is SecAgg (every pair of the cohort); an even ``neighbours: k`` is
SecAgg+ (a Harary graph: each client masks with the k/2 clients on either side of it on a
seeded ring over the cohort), so that 1,000 clients per round stay affordable.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Annotated, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pydantic
import torch
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrec.federated.context import ClientContext, RoundContext
from fedrec.federated.postprocessors import Postprocessor
from fedrec.federated.update import WeightedUpdate
from fedrec.utilities import registry
from fedrec.utilities.random_state import derive_seed

PositiveFloat = Annotated[float, pydantic.Field(gt=0)]
UnitFraction = Annotated[float, pydantic.Field(gt=0, le=1)]
DropoutRate = Annotated[float, pydantic.Field(ge=0, lt=1)]

_ROUND_STREAM = 0x5EC466  # stochastic rounding
_DROP_STREAM = 0x5EC467  # who drops out
_GRAPH_STREAM = 0x5EC468  # SecAgg+'s neighbour ring
WEIGHT_KEY = "secagg.weight"  # the masked weight travels as one more dense "tensor"
ID_BYTES = 4  # a client id on the wire
KEY_BYTES = 32  # an X25519 public key
SHARE_BYTES = 16  # a Shamir share of a 16-byte secret (pycryptodome, GF(2^128))
NONCE_BYTES, TAG_BYTES = 12, 16  # AES-GCM
#: one encrypted share message u -> v: ids of u and v, a share of b_u and one of u's key seed
SHARE_MESSAGE_BYTES = NONCE_BYTES + 2 * ID_BYTES + 2 * SHARE_BYTES + TAG_BYTES + ID_BYTES  # + routing id


class SecureAggregationError(RuntimeError):
    """A round the protocol cannot complete (too few survivors to recover the masks)."""


# -- keys, seeds and the PRG -------------------------------------------------------------------
def _hkdf(material: bytes, length: int, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"fedrec-secagg", info=info).derive(material)


def client_secret(seed: int, round_idx: int, client: int, label: str) -> bytes:
    """A client's 16-byte secret of one round (``label``: "b" self-mask seed, "s" masking
    key seed, "c" channel key seed). Derived from the run's seed so that every process can
    play the key advertisement (a deployment draws it from ``os.urandom``)."""
    material = struct.pack("<q", int(seed) & 0x7FFFFFFFFFFFFFFF)
    return _hkdf(material, 16, f"client-secret|{label}|{int(round_idx)}|{int(client)}".encode())


def private_key(secret: bytes) -> X25519PrivateKey:
    """The X25519 key pair of a 16-byte seed: sharing the seed shares the key."""
    return X25519PrivateKey.from_private_bytes(_hkdf(secret, 32, b"x25519-private-key"))


def public_bytes(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(own: X25519PrivateKey, other_public: bytes, info: bytes) -> bytes:
    """A 32-byte key from a real X25519 exchange, through HKDF-SHA256."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_public))
    return _hkdf(shared, 32, info)


def prg(key: bytes, size: int, field_bits: int) -> np.ndarray:
    """``size`` uniform elements of Z_{2^field_bits} (int64) from AES-256-CTR keyed by ``key``.

    AES-CTR rather than numpy's Philox: the masks must be computationally
    indistinguishable from uniform to whoever sees a masked upload, which a cryptographic
    PRG gives and Philox (a fast statistical generator) does not claim; with AES-NI it
    costs about as much as Philox per byte. Each key is used once (one pair or client and
    one round), so the all-zero nonce is safe."""
    width = 4 if field_bits <= 32 else 8
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(size * width)) + encryptor.finalize()
    values = np.frombuffer(stream, dtype=np.uint32 if width == 4 else np.int64).astype(np.int64)
    return values & ((1 << field_bits) - 1)


def self_mask_key(b_seed: bytes) -> bytes:
    return _hkdf(b_seed, 32, b"self-mask")


def pair_info(round_idx: int, purpose: str) -> bytes:
    return f"{purpose}|{int(round_idx)}".encode()


# -- the round's plan: neighbours, dropouts, thresholds ----------------------------------------
class RoundPlan:
    """Who masks with whom, who drops out, and each client's share threshold, for one round
    (the same on every process: a function of the seed, the round and the cohort)."""

    def __init__(self, context: RoundContext, neighbours: Optional[int], dropout_rate: float,
                 threshold: Optional[int], threshold_fraction: float) -> None:
        self.round_idx, self.seed = context.round_idx, context.seed
        self.cohort = [int(c) for c in context.cohort]
        n = len(self.cohort)
        self.complete = neighbours is None or 2 * (neighbours // 2) >= n - 1
        self._ring: Dict[int, List[int]] = {}
        if not self.complete:
            rng = np.random.default_rng(derive_seed(self.seed, self.round_idx, _GRAPH_STREAM))
            order = [self.cohort[i] for i in rng.permutation(n)]
            half = int(neighbours) // 2
            for pos, cid in enumerate(order):
                near = {order[(pos + d) % n] for d in range(1, half + 1)} | {order[(pos - d) % n]
                                                                            for d in range(1, half + 1)}
                self._ring[cid] = sorted(near)
        self.dropped = {c for c in self.cohort if is_dropped(self.seed, self.round_idx, c, dropout_rate)}
        self.survivors = [c for c in self.cohort if c not in self.dropped]
        self._threshold, self._fraction = threshold, threshold_fraction
        self._holders: Dict[int, List[int]] = {}
        self._index: Dict[Tuple[int, int], int] = {}

    def neighbours(self, client: int) -> List[int]:
        if self.complete:
            return [c for c in self.cohort if c != client]
        return self._ring[client]

    def holders(self, client: int) -> List[int]:
        """Who holds shares of ``client``'s secrets: its neighbours and itself (share index
        = position here + 1)."""
        if client not in self._holders:
            self._holders[client] = sorted(self.neighbours(client) + [client])
        return self._holders[client]

    def share_index(self, owner: int, holder: int) -> int:
        """The Shamir x-coordinate of ``holder``'s share of ``owner``'s secrets (1-based)."""
        if (owner, holder) not in self._index:
            self._index.update({(owner, h): i + 1 for i, h in enumerate(self.holders(owner))})
        return self._index[(owner, holder)]

    def threshold(self, client: int) -> int:
        """Shares needed to recover ``client``'s secrets: ``threshold`` or a strict
        ``threshold_fraction`` of its holders (floor(f * holders) + 1, at most all)."""
        holders = len(self.holders(client))
        if self._threshold is not None:
            return int(self._threshold)
        return min(holders, math.floor(self._fraction * holders) + 1)


def is_dropped(seed: int, round_idx: int, client: int, dropout_rate: float) -> bool:
    """Whether ``client`` drops out after the sharing round (seeded: every backend agrees)."""
    if dropout_rate <= 0:
        return False
    return bool(np.random.default_rng(derive_seed(seed, round_idx, client, _DROP_STREAM)).random() < dropout_rate)


# -- quantization ----------------------------------------------------------------------------
def flatten(dense: Mapping[str, torch.Tensor]) -> Tuple[List[str], torch.Tensor]:
    names = sorted(dense)
    flat = torch.cat([dense[n].reshape(-1) for n in names]) if names else torch.zeros(0)
    return names, flat


def stochastic_round(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unbiased rounding to integers: floor(x) + 1 with probability frac(x)."""
    floor = torch.floor(values)
    up = torch.rand(values.shape, generator=generator, dtype=values.dtype) < (values - floor)
    return floor.to(torch.int64) + up.to(torch.int64)


# -- the postprocessor -------------------------------------------------------------------------
@registry.load("postprocessor", "secure_aggregation")
class SecureAggregation(Postprocessor):
    """Clients upload quantized, double-masked integers; the server unmasks only the sum."""

    name = "secure_aggregation"

    def __init__(self, clip_range: PositiveFloat = 1.0,
                 quantization_bits: Annotated[int, pydantic.Field(ge=2, le=40)] = 16,
                 field_bits: Annotated[int, pydantic.Field(ge=8, le=48)] = 32,
                 max_weight: Optional[PositiveFloat] = None,
                 neighbours: Optional[Annotated[int, pydantic.Field(ge=2)]] = None,
                 threshold: Optional[Annotated[int, pydantic.Field(ge=1)]] = None,
                 threshold_fraction: UnitFraction = 0.5,
                 dropout_rate: DropoutRate = 0.0) -> None:
        self.clip_range = float(clip_range)
        self.quantization_bits = int(quantization_bits)
        self.field_bits = int(field_bits)
        self.max_weight_setting = max_weight
        self.max_weight = 1.0 if max_weight is None else float(max_weight)
        self.largest_client = 0
        self.neighbours = neighbours
        self.threshold = threshold
        self.threshold_fraction = float(threshold_fraction)
        self.dropout_rate = float(dropout_rate)
        self.levels = (1 << self.quantization_bits) - 1  # integers 0..levels per value
        self.step = 2.0 * self.clip_range / self.levels  # in units of max_weight
        self.max_clients = 0
        self._plan: Optional[Tuple[Tuple[int, int, Tuple[int, ...]], RoundPlan]] = None
        self._public: Dict[Tuple[int, int, int, str], bytes] = {}
        self._server_metrics: Dict[str, float] = {}

    @property
    def modulus(self) -> int:
        return 1 << self.field_bits

    @property
    def value_bytes(self) -> int:
        return -(-self.field_bits // 8)

    # -- set-up checks ---------------------------------------------------------------------------
    def bind_client_sizes(self, sizes: Sequence[int]) -> None:
        self.largest_client = max(sizes, default=0)

    def _default_max_weight(self, names: Sequence[Any]) -> float:
        """1 after a DP mechanism (every user counts once), else the largest client's
        sample count (FedAvg's weight): the smallest bound no client exceeds."""
        from fedrec.federated.privacy import GaussianMechanism

        earlier = [registry.lookup("postprocessor", {"name": n}) for n in names[:-1] if isinstance(n, str)]
        if any(isinstance(cls, type) and issubclass(cls, GaussianMechanism) for cls in earlier):
            return 1.0
        return float(max(self.largest_client, 1))

    def setup(self, fl: Any, sampler: Any, sparse: bool = False) -> None:
        from fedrec.federated.samplers import PoissonSampler

        if sparse:
            raise ValueError("secure_aggregation needs fl.embedding_updates: dense (clients' row sets differ, "
                             "so masks over rows would not cancel, and the row ids would show the server what "
                             "each client touched)")
        names = [p.get("name") if isinstance(p, Mapping) else p for p in fl.postprocessors]
        if names.count(self.name) != 1 or names[-1] != self.name:
            raise ValueError(f"secure_aggregation must be the last entry of fl.postprocessors (it turns values "
                             f"into masked integers), got fl.postprocessors {names}")
        if self.max_weight_setting is None:
            self.max_weight = self._default_max_weight(names)
        mode = registry.lookup("fl_algo", fl.fl_algo).aggregation_mode()
        if mode != "sum":
            raise ValueError(f"secure_aggregation reveals only the cohort's sum, but fl.fl_algo "
                             f"{fl.fl_algo.get('name')!r} aggregates {mode} (robust aggregators need every "
                             "client's update): use a linear algorithm such as fed_avg")
        expected = sampler.expected_cohort(fl.num_workers, fl.client_num_per_round)
        if isinstance(sampler, PoissonSampler):  # the cohort varies: leave 3x headroom
            expected = 3 * expected
        self.max_clients = min(fl.num_workers, max(1, math.ceil(expected)))
        self._check_field(self.max_clients)

    def _check_field(self, clients: int) -> None:
        """``clients`` sums of values up to ``levels`` must not wrap around the ring, nor
        overflow int64 while a block adds them up."""
        need = (clients * self.levels).bit_length()
        if need > self.field_bits or clients * self.modulus >= 1 << 63:
            raise ValueError(f"field_bits {self.field_bits} is too small for up to {clients} clients per round "
                             f"at quantization_bits {self.quantization_bits}: use field_bits: {max(need, 8)} "
                             f"(at most 48) or fewer quantization_bits")

    # -- per-round plan (cached per process) -----------------------------------------------------
    def plan(self, context: RoundContext) -> RoundPlan:
        key = (context.seed, context.round_idx, tuple(context.cohort))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, RoundPlan(context, self.neighbours, self.dropout_rate, self.threshold,
                                         self.threshold_fraction))
            self._public.clear()
        return self._plan[1]

    def public_key(self, plan: RoundPlan, client: int, label: str) -> bytes:
        """``client``'s advertised public key (the simulated key-advertisement round)."""
        key = (plan.seed, plan.round_idx, client, label)
        if key not in self._public:
            self._public[key] = public_bytes(private_key(client_secret(plan.seed, plan.round_idx, client, label)))
        return self._public[key]

    # -- client side -------------------------------------------------------------------------------
    def postprocess_client(self, update: WeightedUpdate, context: ClientContext) -> WeightedUpdate:
        if update.aux or update.scalars or update.rows:
            raise ValueError(f"secure_aggregation masks the dense model delta only, but this algorithm also "
                             f"uploads {sorted(update.aux) + sorted(update.scalars) + sorted(update.rows)}")
        round_ = context.round
        cid = int(context.client_id)
        if cid not in round_.cohort:
            raise ValueError(f"client {cid} is not in the round's cohort (RoundContext.cohort)")
        plan = self.plan(round_)
        neighbours = plan.neighbours(cid)
        context.upload_value_bytes = self.value_bytes
        self._count_protocol_bytes(context, len(neighbours), cid in plan.dropped)
        dropped = float(cid in plan.dropped)
        context.metrics["secagg_dropped"] = context.metrics.get("secagg_dropped", 0.0) + dropped
        if dropped:  # it advertised keys and shared its secrets, then vanished
            return WeightedUpdate()
        publics = [self.public_key(plan, v, "s") for v in neighbours]  # what the server forwarded
        start = time.perf_counter()
        own = private_key(client_secret(plan.seed, plan.round_idx, cid, "s"))
        info = pair_info(plan.round_idx, "pairwise-mask")
        pair_keys = [agree(own, public, info) for public in publics]
        keys_done = time.perf_counter()
        masked = self.mask(update, context, neighbours, pair_keys)
        done = time.perf_counter()
        for key, value in (("secagg_seconds_keys", keys_done - start), ("secagg_seconds_masking", done - keys_done)):
            context.metrics[key] = context.metrics.get(key, 0.0) + value
        return masked

    def quantize(self, update: WeightedUpdate, context: ClientContext) -> Tuple[List[str], np.ndarray]:
        """The update (values and weight, scaled by 1 / max_weight) as integers in [0, levels]."""
        if update.weight < 0 or update.weight > self.max_weight:
            raise ValueError(f"the client's weight {update.weight:g} is outside [0, max_weight = "
                             f"{self.max_weight:g}]: set secure_aggregation's max_weight to at least the "
                             f"largest client weight (fed_avg weighs a client by its samples)")
        names, flat = flatten(update.dense)
        scaled = flat.to(torch.float64) / self.max_weight
        clamped = int((scaled.abs() > self.clip_range).sum())
        context.metrics["secagg_clamped"] = context.metrics.get("secagg_clamped", 0.0) + clamped
        generator = torch.Generator().manual_seed(
            derive_seed(context.round.seed, context.round.round_idx, context.client_id, _ROUND_STREAM))
        values = (scaled.clamp_(-self.clip_range, self.clip_range) + self.clip_range) / self.step
        weight = torch.tensor([update.weight / self.max_weight * self.levels], dtype=torch.float64)
        quantized = stochastic_round(torch.cat([values, weight]), generator).clamp_(0, self.levels)
        return names, quantized.numpy()

    def mask(self, update: WeightedUpdate, context: ClientContext, neighbours: Sequence[int],
             pair_keys: Sequence[bytes]) -> WeightedUpdate:
        """Quantize, then add the self mask and the pairwise masks (+ for larger ids)."""
        names, total = self.quantize(update, context)
        cid, round_ = int(context.client_id), context.round
        b_seed = client_secret(round_.seed, round_.round_idx, cid, "b")
        total = total + prg(self_mask_key(b_seed), total.size, self.field_bits)
        for other, key in zip(neighbours, pair_keys):
            mask = prg(key, total.size, self.field_bits)
            total = total + mask if other > cid else total - mask
        total &= self.modulus - 1
        return self._unflatten(update.dense, names, torch.from_numpy(total), weight=0.0, clients=1)

    @staticmethod
    def _unflatten(like: Mapping[str, torch.Tensor], names: Sequence[str], flat: torch.Tensor, weight: float,
                   clients: int) -> WeightedUpdate:
        dense, offset = {}, 0
        for name in names:
            size = like[name].numel()
            dense[name] = flat[offset:offset + size].reshape(like[name].shape)
            offset += size
        dense[WEIGHT_KEY] = flat[offset:offset + 1]
        return WeightedUpdate(dense, {}, weight, clients)

    def _count_protocol_bytes(self, context: ClientContext, neighbours: int, dropped: bool) -> None:
        """The protocol's messages beside the masked upload (semi-honest SecAgg, no signatures):
        advertise 2 public keys and receive the neighbours'; send and receive one encrypted
        share message per neighbour; a survivor then receives its neighbours' status and
        sends one share per neighbour and its own."""
        down = neighbours * (ID_BYTES + 2 * KEY_BYTES) + neighbours * SHARE_MESSAGE_BYTES
        up = 2 * KEY_BYTES + neighbours * SHARE_MESSAGE_BYTES
        if not dropped:
            down += neighbours * ID_BYTES
            up += (neighbours + 1) * (ID_BYTES + SHARE_BYTES)
        context.extra_bytes_down += down
        context.extra_bytes_up += up

    # -- server side (rank 0) --------------------------------------------------------------------
    def postprocess_server(self, update: WeightedUpdate, context: RoundContext) -> WeightedUpdate:
        self._server_metrics = {}
        if not context.cohort:
            return update
        plan = self.plan(context)
        self._check_recoverable(plan)
        if update.num_clients != len(plan.survivors):
            raise SecureAggregationError(f"round {plan.round_idx}: {update.num_clients} masked uploads arrived "
                                         f"for {len(plan.survivors)} survivors")
        if len(plan.survivors) * self.levels >= self.modulus:
            raise SecureAggregationError(
                f"round {plan.round_idx}: {len(plan.survivors)} survivors' sums overflow the ring of field_bits "
                f"{self.field_bits}: raise field_bits to {(len(plan.survivors) * self.levels).bit_length()}")
        start = time.perf_counter()
        messages = self.share_keys(plan)
        shared = time.perf_counter()
        secrets = self.unmasking_round(plan, messages)
        unmasked = self.unmask(update, plan, secrets)
        done = time.perf_counter()
        self._server_metrics = {"secagg_seconds_sharing": shared - start, "secagg_seconds_recovery": done - shared}
        return unmasked

    def _check_recoverable(self, plan: RoundPlan) -> None:
        if len(plan.cohort) < 2:
            raise SecureAggregationError(f"round {plan.round_idx}: a cohort of {len(plan.cohort)} client cannot be "
                                         "securely aggregated (its sum is its update); sample more clients")
        for client in plan.cohort:
            holders = plan.holders(client)
            threshold = plan.threshold(client)
            alive = [h for h in holders if h not in plan.dropped]
            if threshold > len(holders) or len(alive) < threshold:
                raise SecureAggregationError(
                    f"round {plan.round_idx}: secure aggregation cannot complete: {len(plan.survivors)} of "
                    f"{len(plan.cohort)} clients survived, and client {client}'s secrets need threshold "
                    f"{threshold} of its {len(holders)} share holders, of which {len(alive)} survived "
                    "(lower dropout_rate, threshold or threshold_fraction)")

    def share_keys(self, plan: RoundPlan) -> Dict[Tuple[int, int], bytes]:
        """The clients' sharing round, played on rank 0 with the real primitives: each client
        splits b_u and its masking-key seed (Shamir, threshold t_u) among its holders and
        encrypts each neighbour's pair of shares (AES-GCM under the channel keys)."""
        import os

        messages: Dict[Tuple[int, int], bytes] = {}
        for u in plan.cohort:
            holders = plan.holders(u)
            t = plan.threshold(u)
            b_shares = Shamir.split(t, len(holders), client_secret(plan.seed, plan.round_idx, u, "b"))
            s_shares = Shamir.split(t, len(holders), client_secret(plan.seed, plan.round_idx, u, "s"))
            channel = private_key(client_secret(plan.seed, plan.round_idx, u, "c"))
            for v, (_, b_share), (_, s_share) in zip(holders, b_shares, s_shares):
                plain = struct.pack("<ii", u, v) + b_share + s_share
                if v == u:  # its own shares stay with it
                    messages[(u, v)] = plain
                    continue
                key = agree(channel, self.public_key(plan, v, "c"), pair_info(plan.round_idx, "share-channel"))
                nonce = os.urandom(NONCE_BYTES)
                messages[(u, v)] = nonce + AESGCM(key).encrypt(nonce, plain, struct.pack("<i", plan.round_idx))
        return messages

    def unmasking_round(self, plan: RoundPlan, messages: Mapping[Tuple[int, int], bytes]
                        ) -> Dict[str, Dict[int, bytes]]:
        """Each survivor decrypts what it holds and reveals, for each neighbour, the share of
        b_u (u survived) or of the masking-key seed (u dropped), never both; the server
        combines the first t_u revealed shares."""
        revealed: Dict[int, List[Tuple[int, bytes]]] = {u: [] for u in plan.cohort}
        for v in plan.survivors:
            channel = private_key(client_secret(plan.seed, plan.round_idx, v, "c"))
            for u in plan.holders(v):
                data = messages[(u, v)]
                if u != v:
                    key = agree(channel, self.public_key(plan, u, "c"), pair_info(plan.round_idx, "share-channel"))
                    data = AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:],
                                               struct.pack("<i", plan.round_idx))
                owner, holder = struct.unpack("<ii", data[:8])
                if (owner, holder) != (u, v):
                    raise SecureAggregationError(f"round {plan.round_idx}: share message {u}->{v} names {owner}->{holder}")
                share = data[8:24] if u not in plan.dropped else data[24:40]
                revealed[u].append((plan.share_index(u, v), share))
        secrets: Dict[str, Dict[int, bytes]] = {"b": {}, "s": {}}
        for u in plan.cohort:
            t = plan.threshold(u)
            secrets["s" if u in plan.dropped else "b"][u] = Shamir.combine(revealed[u][:t])
        return secrets

    def unmask(self, update: WeightedUpdate, plan: RoundPlan, secrets: Mapping[str, Mapping[int, bytes]]
               ) -> WeightedUpdate:
        """Remove the survivors' self masks and the masks survivors shared with dropped
        clients (from their recovered keys), then map the integers back to floats."""
        weight = update.dense.pop(WEIGHT_KEY)
        names, flat = flatten(update.dense)
        total = torch.cat([flat, weight]).numpy().astype(np.int64)
        size = total.size
        for u in plan.survivors:
            total -= prg(self_mask_key(secrets["b"][u]), size, self.field_bits)
        info = pair_info(plan.round_idx, "pairwise-mask")
        for u in sorted(plan.dropped):
            key = private_key(secrets["s"][u])
            for v in plan.neighbours(u):
                if v in plan.dropped:
                    continue
                mask = prg(agree(key, self.public_key(plan, v, "s"), info), size, self.field_bits)
                total = total - mask if u > v else total + mask  # v had added +mask for u > v
        total &= self.modulus - 1
        return self._dequantize(update.dense, names, total, len(plan.survivors))

    def _dequantize(self, like: Mapping[str, torch.Tensor], names: Sequence[str], total: np.ndarray,
                    clients: int) -> WeightedUpdate:
        """Sum of ``clients`` quantized values back to floats: sum(q) * step - clients * clip_range,
        times max_weight; the weight sum(q_w) / levels * max_weight."""
        values = (total[:-1].astype(np.float64) * self.step - clients * self.clip_range) * self.max_weight
        weight = float(total[-1]) / self.levels * self.max_weight
        dtype = torch.get_default_dtype()
        dense, offset = {}, 0
        for name in names:
            size = like[name].numel()
            dense[name] = torch.from_numpy(values[offset:offset + size]).to(dtype).reshape(like[name].shape)
            offset += size
        return WeightedUpdate(dense, {}, weight, clients)

    # -- reporting ---------------------------------------------------------------------------------
    def describe(self) -> str:
        graph = "SecAgg, every pair of the cohort" if self.neighbours is None else \
            f"SecAgg+, {2 * (self.neighbours // 2)} neighbours on a seeded ring"
        threshold = (f"threshold {self.threshold}" if self.threshold is not None else
                     f"threshold floor({self.threshold_fraction:g} x holders) + 1")
        return (f"secure_aggregation ({graph}): ring Z_2^{self.field_bits}, {self.quantization_bits}-bit "
                f"quantization of [-{self.clip_range:g}, {self.clip_range:g}] x max_weight {self.max_weight:g} "
                f"(step {self.step * self.max_weight:.3g}), {threshold}, dropout_rate {self.dropout_rate:g}; "
                f"room for {self.max_clients} clients per round")

    def round_metrics(self, rounds_done: int) -> Dict[str, float]:
        return dict(self._server_metrics)
