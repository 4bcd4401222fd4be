"""Group assignment of a sharded round, sans-I/O: who aggregates with whom.

A sharded round (Bonawitz et al., "Towards Federated Learning at Scale", SysML 2019,
section 4: one secure-aggregation instance per aggregator) splits the joined clients into
``G`` groups; each group runs one ordinary round (:class:`secagg.server.SecAggServer`) and
the coordinator adds the group results. Privacy holds per group, so neither the coordinator
nor any client may steer who lands in which group. The assignment is a commit-reveal coin
toss, the pattern of :mod:`secagg.rounds.reveal_nonces`:

1. every client sends :class:`JoinCommit`: a SHA-256 commitment to a fresh 256-bit nonce,
   signed (Ed25519) with its identity key;
2. the coordinator closes the join roster and sends it to all (:class:`JoinRoster`); its
   digest fixes every commitment before any nonce is known;
3. each client checks its own entry and opens its nonce (:class:`NonceOpen`, signed, bound
   to the roster digest);
4. the coordinator forwards every opening (:class:`NonceOpens`); the assignment seed is
   ``SHA-256(tag || roster digest || nonces in roster order)`` (:func:`assignment_seed`) and
   the groups are the keyed Fisher-Yates permutation of :func:`secagg.graph.permutation`
   (ChaCha20, rejection sampling) cut into ``G`` balanced slices (:func:`assign`).

One honest nonce, committed before the roster closed and opened after, makes the seed
uniform and independent of every key, nonce and roster choice of the others. Every client
recomputes the assignment from the transcript it was given and checks the group round its
aggregator hands it (:func:`check_group_invite`): the member list, the group round id
(bound to the seed) and the round's parameters under its own :class:`ClientPolicy`
(``min_contributors`` included). A roster member that does not open its commitment aborts
the assignment, naming it, so the last opener gets one extra draw per aborted assignment
(R aborted assignments, R draws), as for the graph seed (docs/sharding.md).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from secagg import graph
from secagg.errors import (
    ConfigurationError,
    InvalidSignature,
    MalformedMessage,
    ProtocolViolation,
    RoundAborted,
    ServerMisbehaviour,
    UnknownClient,
)
from secagg.keys import IdentityKey, constant_time_equal, random_seed, verify_signature
from secagg.params import MAX_CLIENTS, ROUND_ID_BYTES, Mode, RoundParams
from secagg.policy import ClientPolicy
from secagg.wire import Reader, Writer

__all__ = [
    "ASSIGNMENT_TAG",
    "MAX_GROUPS",
    "Assignment",
    "AssignmentAborted",
    "GroupCoordinator",
    "GroupJoinClient",
    "GroupResults",
    "GroupRow",
    "JoinCommit",
    "JoinRoster",
    "NonceOpen",
    "NonceOpens",
    "assign",
    "assignment_seed",
    "check_group_invite",
    "group_round_id",
    "join_commitment",
    "sharded_he_clients",
    "verify_transcript",
]

ASSIGNMENT_TAG = b"secagg/v1/group-assignment"
"""Domain tag of the assignment seed (keeps it apart from every graph seed)."""
MAX_GROUPS = 4096
"""Most groups of one sharded round."""
NONCE_BYTES = 32
"""256-bit nonces from :mod:`secrets`: one honest nonce makes the seed uniform."""
_MAGIC = b"SAGJ"
_SIG = 64
_COMMIT, _OPEN, _ROSTER, _OPENS, _RESULTS = 1, 2, 3, 4, 5
_MAX_TEXT = 1024
_MAX_SUMS = 1 << 31
_MAX_CIPHERTEXTS = 1 << 16
_MAX_EPOCH = 64
"""Bound on a key-epoch fingerprint in :class:`GroupResults` (16 bytes today)."""


class AssignmentAborted(RoundAborted):
    """The group assignment ended without groups (a missing opening, too few joiners)."""


def join_commitment(round_id: bytes, sender: int, nonce: bytes) -> bytes:
    """SHA-256 commitment to a join nonce (hiding: 256 random bits; binding: collisions)."""
    return hashlib.sha256(
        ASSIGNMENT_TAG + b"/nonce" + round_id + sender.to_bytes(4, "big") + nonce
    ).digest()


def _commit_payload(round_id: bytes, groups: int, sender: int, commit: bytes) -> bytes:
    return ASSIGNMENT_TAG + b"/join" + round_id + groups.to_bytes(4, "big") + sender.to_bytes(
        4, "big"
    ) + commit  # fmt: skip


def _open_payload(round_id: bytes, roster_hash: bytes, sender: int, nonce: bytes) -> bytes:
    return ASSIGNMENT_TAG + b"/open" + round_id + roster_hash + sender.to_bytes(4, "big") + nonce


def _header(w: Writer, kind: int, round_id: bytes) -> Writer:
    return w.raw(_MAGIC).u8(kind).fixed(round_id, ROUND_ID_BYTES)


def _read_header(data: bytes, kind: int) -> tuple[Reader, bytes]:
    r = Reader(data)
    if r.fixed(4) != _MAGIC or r.u8() != kind:
        raise MalformedMessage("not a group-assignment message of the expected kind")
    return r, r.fixed(ROUND_ID_BYTES)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class JoinCommit:
    """Client -> coordinator: the signed commitment to a fresh join nonce."""

    round_id: bytes
    groups: int
    sender: int
    commit: bytes
    signature: bytes

    def body(self, w: Writer) -> Writer:
        return (
            w.u32(self.groups).u32(self.sender).fixed(self.commit, 32).fixed(self.signature, _SIG)
        )

    def encode(self) -> bytes:
        return self.body(_header(Writer(), _COMMIT, self.round_id)).getvalue()

    @classmethod
    def read(cls, r: Reader, round_id: bytes) -> JoinCommit:
        return cls(round_id, r.u32(), r.u32(), r.fixed(32), r.fixed(_SIG))

    @classmethod
    def decode(cls, data: bytes) -> JoinCommit:
        r, rid = _read_header(data, _COMMIT)
        msg = cls.read(r, rid)
        r.end()
        return msg

    def verify(self, public_key: bytes) -> None:
        payload = _commit_payload(self.round_id, self.groups, self.sender, self.commit)
        _verify(public_key, payload, self.signature, self.sender)


@dataclass(frozen=True)
class NonceOpen:
    """Client -> coordinator: the nonce opening the commitment, signed, bound to the roster."""

    round_id: bytes
    sender: int
    roster_hash: bytes
    nonce: bytes
    signature: bytes

    def body(self, w: Writer) -> Writer:
        w.u32(self.sender).fixed(self.roster_hash, 32).fixed(self.nonce, NONCE_BYTES)
        return w.fixed(self.signature, _SIG)

    def encode(self) -> bytes:
        return self.body(_header(Writer(), _OPEN, self.round_id)).getvalue()

    @classmethod
    def read(cls, r: Reader, round_id: bytes) -> NonceOpen:
        return cls(round_id, r.u32(), r.fixed(32), r.fixed(NONCE_BYTES), r.fixed(_SIG))

    @classmethod
    def decode(cls, data: bytes) -> NonceOpen:
        r, rid = _read_header(data, _OPEN)
        msg = cls.read(r, rid)
        r.end()
        return msg

    def verify(self, public_key: bytes) -> None:
        payload = _open_payload(self.round_id, self.roster_hash, self.sender, self.nonce)
        _verify(public_key, payload, self.signature, self.sender)


@dataclass(frozen=True)
class JoinRoster:
    """Coordinator -> clients: the closed join roster, entries in id order."""

    round_id: bytes
    groups: int
    entries: tuple[JoinCommit, ...]

    def encode(self) -> bytes:
        w = _header(Writer(), _ROSTER, self.round_id).u32(self.groups).u32(len(self.entries))
        for e in self.entries:
            e.body(w)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> JoinRoster:
        r, rid = _read_header(data, _ROSTER)
        groups, count = r.u32(), r.u32()
        if count > MAX_CLIENTS:
            raise MalformedMessage(f"join roster of {count} entries exceeds {MAX_CLIENTS}")
        entries = tuple(JoinCommit.read(r, rid) for _ in range(count))
        r.end()
        return cls(rid, groups, entries)

    def digest(self) -> bytes:
        """SHA-256 over the encoding: fixes every commitment (and ``G``) before any opening."""
        return hashlib.sha256(ASSIGNMENT_TAG + b"/roster" + self.encode()).digest()


@dataclass(frozen=True)
class NonceOpens:
    """Coordinator -> clients: every roster member's opening, in roster order."""

    round_id: bytes
    roster_hash: bytes
    opens: tuple[NonceOpen, ...]

    def encode(self) -> bytes:
        w = _header(Writer(), _OPENS, self.round_id).fixed(self.roster_hash, 32)
        w.u32(len(self.opens))
        for o in self.opens:
            o.body(w)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> NonceOpens:
        r, rid = _read_header(data, _OPENS)
        roster_hash, count = r.fixed(32), r.u32()
        if count > MAX_CLIENTS:
            raise MalformedMessage(f"{count} openings exceed {MAX_CLIENTS}")
        opens = tuple(NonceOpen.read(r, rid) for _ in range(count))
        r.end()
        return cls(rid, roster_hash, opens)


@dataclass(frozen=True)
class GroupRow:
    """One group's line in :class:`GroupResults`: size, survivors, status, abort reason."""

    group: int
    size: int
    survivors: int
    completed: bool
    reason: str = ""


@dataclass(frozen=True)
class GroupResults:
    """Coordinator -> clients, last on the front-door stream of a sharded round over gRPC:
    the published sum of the completed groups (lane sums, contributors, total weight) and
    every group's status, or the round's abort (``completed`` false, ``stage``/``reason``).
    Per-group sums are not sent: a client learns the total only, as in a single round.
    ``ckks``/``hybrid``: ``sums`` is empty and ``ciphertexts`` is the encrypted total the
    front door added from the group ciphertexts (SEAL serializations; the key holders
    decrypt it); encoded after the rows, absent in ``masked``. ``key_epoch``: with
    ciphertexts, the fingerprint of the CKKS key epoch the total was added under
    (:attr:`secagg.ckks_budget.KeyEpoch.fingerprint`), which a key holder checks against its
    own before decrypting; encoded after the ciphertexts."""

    round_id: bytes
    completed: bool
    stage: str
    reason: str
    contributors: tuple[int, ...]
    total_weight: int
    sums: bytes
    """Little-endian u64 lane sums (empty when aborted)."""
    rows: tuple[GroupRow, ...]
    ciphertexts: tuple[bytes, ...] = ()
    key_epoch: bytes = b""

    def encode(self) -> bytes:
        w = _header(Writer(), _RESULTS, self.round_id).u8(int(self.completed))
        w.var(self.stage.encode()[:_MAX_TEXT]).var(self.reason.encode()[:_MAX_TEXT])
        w.ids(list(self.contributors)).u64(self.total_weight).var(self.sums)
        w.u32(len(self.rows))
        for row in self.rows:
            w.u32(row.group).u32(row.size).u32(row.survivors).u8(int(row.completed))
            w.var(row.reason.encode()[:_MAX_TEXT])
        if self.ciphertexts:
            w.u32(len(self.ciphertexts))
            for ct in self.ciphertexts:
                w.var(ct)
            if self.key_epoch:
                w.var(self.key_epoch)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> GroupResults:
        r, rid = _read_header(data, _RESULTS)
        completed = r.u8()
        stage = r.var(_MAX_TEXT).decode(errors="replace")
        reason = r.var(_MAX_TEXT).decode(errors="replace")
        contributors = r.ids(MAX_CLIENTS)
        total_weight, sums = r.u64(), r.var(_MAX_SUMS)
        count = r.u32()
        if count > MAX_GROUPS or completed > 1 or len(sums) % 8:
            raise MalformedMessage("malformed group results")
        rows = []
        for _ in range(count):
            g, size, surv, ok = r.u32(), r.u32(), r.u32(), r.u8()
            rows.append(
                GroupRow(g, size, surv, bool(ok), r.var(_MAX_TEXT).decode(errors="replace"))
            )
        cts: tuple[bytes, ...] = ()
        if r.remaining:
            n_cts = r.u32()
            if not 1 <= n_cts <= _MAX_CIPHERTEXTS:
                raise MalformedMessage(f"group results with {n_cts} ciphertexts")
            cts = tuple(r.var(_MAX_SUMS) for _ in range(n_cts))
        epoch = r.var(_MAX_EPOCH) if cts and r.remaining else b""
        r.end()
        return cls(
            rid, bool(completed), stage, reason, contributors, total_weight, sums, tuple(rows),
            cts, epoch,
        )  # fmt: skip


@lru_cache(maxsize=1 << 16)
def _verify(public_key: bytes, payload: bytes, signature: bytes, sender: int) -> None:
    """Ed25519 verification, memoised: a pure function of its bytes, so a process that
    simulates many clients verifies each entry once (a failure raises and is not cached)."""
    verify_signature(public_key, payload, signature, client_id=sender)


# --------------------------------------------------------------------------- assignment


def assignment_seed(roster_hash: bytes, nonces: Sequence[bytes]) -> bytes:
    """``SHA-256(ASSIGNMENT_TAG || roster digest || nonce_1 || ... || nonce_n)``, nonces in
    roster (id) order: the 256-bit key of the permutation."""
    h = hashlib.sha256(ASSIGNMENT_TAG + roster_hash)
    for nonce in nonces:
        h.update(nonce)
    return h.digest()


@lru_cache(maxsize=16)
def assign(ids: tuple[int, ...], groups: int, seed: bytes) -> tuple[tuple[int, ...], ...]:
    """The ``groups`` member lists: :func:`secagg.graph.permutation` of ``ids`` under
    ``seed``, cut into consecutive slices; slice ``g`` holds positions
    ``floor(g n / G) .. floor((g+1) n / G) - 1``, so sizes differ by at most one.
    Each list is returned sorted."""
    n = len(ids)
    if not 1 <= groups <= min(n, MAX_GROUPS):
        raise ConfigurationError(f"groups={groups} must be in 1..min(n={n}, {MAX_GROUPS})")
    perm = graph.permutation(ids, seed)
    return tuple(
        tuple(sorted(perm[g * n // groups : (g + 1) * n // groups])) for g in range(groups)
    )


def group_round_id(seed: bytes, group: int) -> bytes:
    """Round id of group ``group``'s round: bound to this assignment, so an aggregator
    cannot replay a group round of another assignment to the clients."""
    digest = hashlib.sha256(ASSIGNMENT_TAG + b"/round" + seed + group.to_bytes(4, "big"))
    return digest.digest()[:ROUND_ID_BYTES]


@dataclass(frozen=True)
class Assignment:
    """The outcome of the coin toss: seed and member lists (from a checked transcript)."""

    roster_hash: bytes
    seed: bytes
    groups: tuple[tuple[int, ...], ...]

    def group_of(self, cid: int) -> int:
        g = _group_index(self.groups).get(cid)
        if g is None:
            raise UnknownClient(f"client {cid} is in no group of this assignment", client_id=cid)
        return g


@lru_cache(maxsize=8)
def _group_index(groups: tuple[tuple[int, ...], ...]) -> dict[int, int]:
    return {cid: g for g, members in enumerate(groups) for cid in members}


@lru_cache(maxsize=8)
def _decode_roster(data: bytes) -> tuple[JoinRoster, bytes, dict[int, int]]:
    """A roster, its digest and its id -> position index, decoded once per process."""
    roster = JoinRoster.decode(data)
    return roster, roster.digest(), {e.sender: k for k, e in enumerate(roster.entries)}


@lru_cache(maxsize=8)
def _transcript(roster_bytes: bytes, opens_bytes: bytes) -> tuple[JoinRoster, Assignment]:
    """Decode and check a transcript once per process (it is the same bytes for every
    simulated client): ids distinct and sorted, every opening bound to this roster and
    opening its commitment, then the assignment."""
    roster, digest, _ = _decode_roster(roster_bytes)
    opens_msg = NonceOpens.decode(opens_bytes)
    ids = tuple(e.sender for e in roster.entries)
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise ServerMisbehaviour("the join roster is not in strictly increasing id order")
    if opens_msg.round_id != roster.round_id:
        raise ServerMisbehaviour("the nonce openings are for another round")
    opens = opens_msg
    if opens.round_id != roster.round_id or not constant_time_equal(opens.roster_hash, digest):
        raise ServerMisbehaviour("the nonce openings are bound to another join roster")
    if tuple(o.sender for o in opens.opens) != ids:
        raise ServerMisbehaviour("the nonce openings do not name exactly the roster, in order")
    for e, o in zip(roster.entries, opens.opens, strict=True):
        if o.roster_hash != digest:
            raise ServerMisbehaviour(f"the opening of client {o.sender} is for another roster")
        if not constant_time_equal(join_commitment(roster.round_id, o.sender, o.nonce), e.commit):
            raise ServerMisbehaviour(f"the nonce of client {o.sender} does not open its commitment")
    seed = assignment_seed(digest, [o.nonce for o in opens.opens])
    return roster, Assignment(digest, seed, assign(ids, roster.groups, seed))


def verify_transcript(
    cid: int,
    nonce: bytes,
    sent: bytes,
    roster_bytes: bytes,
    opens_bytes: bytes,
    directory: Mapping[int, bytes],
) -> Assignment:
    """What a client checks before it trusts an assignment; returns it.

    ``sent`` is the encoded :class:`JoinCommit` the client sent and ``nonce`` its nonce.
    The roster must carry ``sent`` byte for byte and only clients of ``directory``; the
    openings must open every commitment; the join and opening signatures of the client's
    own group are verified (the members it will aggregate with).

    Raises
    ------
    ServerMisbehaviour
        Naming what the coordinator got wrong.
    """
    _, asg = _transcript(roster_bytes, opens_bytes)
    roster, _, index = _decode_roster(roster_bytes)
    own = JoinCommit.decode(sent)
    k = index.get(cid)
    if k is None or roster.entries[k] != own:
        raise ServerMisbehaviour("the join roster does not carry this client's commitment as sent")
    if own.groups != roster.groups:
        raise ServerMisbehaviour(
            f"the roster has {roster.groups} groups; this client joined {own.groups}"
        )
    members = asg.groups[asg.group_of(cid)]
    opened = _openings(opens_bytes)
    if opened[k].nonce != nonce:
        raise ServerMisbehaviour("the openings carry another nonce for this client")
    for m in members:
        if m not in directory:
            raise ServerMisbehaviour(f"the join roster lists client {m}, absent from the directory")
        try:
            roster.entries[index[m]].verify(directory[m])
            opened[index[m]].verify(directory[m])
        except InvalidSignature:
            raise ServerMisbehaviour(f"the join entry of client {m} is not signed by it") from None
    return asg


@lru_cache(maxsize=8)
def _openings(opens_bytes: bytes) -> tuple[NonceOpen, ...]:
    return NonceOpens.decode(opens_bytes).opens


def sharded_he_clients(mode: Mode, total: int, groups: int) -> int:
    """Summands the CKKS parameters of every group round of a sharded ``ckks``/``hybrid``
    round are sized for (:attr:`secagg.params.RoundParams.he_clients`); ``0`` in ``masked``.

    The coordinator adds the ``G`` group ciphertexts, so the total must decrypt exactly:
    ``ckks`` lanes hold the sum of all ``total`` inputs (headroom ``ceil(log2 total)``);
    ``hybrid`` adds one plaintext (the dropped clients' negated masks) per group, so a slot
    sum stays below ``(total + G) 2^mask_bits`` and the noise covers ``total`` fresh
    ciphertexts and ``G`` plaintexts: sizing for ``total + G - 1`` summands (carry bits
    ``ceil(log2(total + G))``, one plaintext already allowed for) covers both.
    """
    if mode is Mode.MASKED:
        return 0
    return total if mode is Mode.CKKS else total + groups - 1


def check_group_invite(
    asg: Assignment,
    cid: int,
    params: RoundParams,
    invited: Sequence[int],
    policy: ClientPolicy,
) -> tuple[int, ...]:
    """A client's check of the group round its aggregator hands it; returns the members.

    The invited roster must equal the client's own group as recomputed from the transcript,
    the round id must be :func:`group_round_id` of that group, and the parameters must pass
    the client's policy (``check_params``) with the group at least
    ``max(t, min_contributors)`` strong (``check_set``): the same checks as a single round.
    In ``ckks``/``hybrid`` the CKKS parameters must be sized for the whole sharded round
    (``he_clients`` at least :func:`sharded_he_clients` of the assignment's total), so the
    coordinator's sum of the group ciphertexts cannot overflow a lane or the noise bound.

    Raises
    ------
    ServerMisbehaviour
        A grouping or round id other than the assignment's.
    PolicyViolation
        Parameters or a group size the client's policy refuses.
    """
    g = asg.group_of(cid)
    members = asg.groups[g]
    if tuple(sorted(invited)) != members:
        extra = sorted(set(invited) - set(members))
        missing = sorted(set(members) - set(invited))
        raise ServerMisbehaviour(
            f"group {g}'s invited roster differs from the assignment (extra {extra[:5]},"
            f" missing {missing[:5]}): refusing the group round",
            client_id=cid,
        )
    if params.round_id != group_round_id(asg.seed, g):
        raise ServerMisbehaviour(f"group {g}'s round id is not bound to this assignment")
    if params.n_clients != len(members):
        raise ServerMisbehaviour(
            f"group {g}'s round is for n={params.n_clients} clients; the group has {len(members)}"
        )
    total = sum(len(m) for m in asg.groups)
    want = sharded_he_clients(params.mode, total, len(asg.groups))
    if params.he_clients < want or (want == 0 and params.he_clients):
        raise ServerMisbehaviour(
            f"group {g}'s round sizes its CKKS parameters for he_clients={params.he_clients};"
            f" the {len(asg.groups)} groups of {total} clients need at least {want}"
        )
    policy.check_params(params)
    policy.check_set(f"group {g}", len(members), params)
    return members


# --------------------------------------------------------------------------- the parties


class Phase(Enum):
    JOINING = "joining"
    OPENING = "opening"
    ASSIGNED = "assigned"
    ABORTED = "aborted"


class GroupJoinClient:
    """One client's side of the assignment: commit, check the roster, open, check."""

    def __init__(
        self,
        cid: int,
        identity: IdentityKey,
        round_id: bytes,
        groups: int,
        directory: Mapping[int, bytes],
        *,
        nonce: bytes | None = None,
    ) -> None:
        self.cid = cid
        self.identity = identity
        self.round_id = round_id
        self.groups = groups
        self.directory = directory
        self.nonce = nonce if nonce is not None else random_seed()
        self.assignment: Assignment | None = None
        self._roster: bytes = b""
        commit = join_commitment(round_id, cid, self.nonce)
        sig = identity.sign(_commit_payload(round_id, groups, cid, commit))
        self.sent = JoinCommit(round_id, groups, cid, commit, sig).encode()

    def start(self) -> bytes:
        return self.sent

    def receive_roster(self, data: bytes) -> bytes:
        """Check the closed roster carries our commitment as sent; return our opening."""
        roster, h, index = _decode_roster(data)
        if roster.round_id != self.round_id:
            raise ServerMisbehaviour("the join roster is for another round", client_id=self.cid)
        k = index.get(self.cid)
        if k is None or roster.entries[k].encode() != self.sent:
            raise ServerMisbehaviour(
                "the join roster does not carry this client's commitment as sent",
                client_id=self.cid,
            )
        self._roster = data
        sig = self.identity.sign(_open_payload(self.round_id, h, self.cid, self.nonce))
        return NonceOpen(self.round_id, self.cid, h, self.nonce, sig).encode()

    def receive_opens(self, data: bytes) -> Assignment:
        """Check the openings and recompute the assignment (:func:`verify_transcript`)."""
        self.assignment = verify_transcript(
            self.cid, self.nonce, self.sent, self._roster, data, self.directory
        )
        return self.assignment


class GroupCoordinator:
    """The coordinator's side: collect commitments, close the roster, collect openings.

    ``min_group`` is the smallest group it will form (each group must pass its clients'
    ``min_contributors``); it aborts the assignment when too few clients joined.
    """

    def __init__(
        self,
        round_id: bytes,
        groups: int,
        directory: Mapping[int, bytes],
        *,
        min_group: int = 3,
        now: float = 0.0,
        timeout: float = 30.0,
    ) -> None:
        if not 1 <= groups <= MAX_GROUPS:
            raise ConfigurationError(f"groups={groups} must be in 1..{MAX_GROUPS}")
        self.round_id, self.groups, self.directory = round_id, groups, directory
        self.min_group, self.timeout = min_group, timeout
        self.phase = Phase.JOINING
        self.deadline = now + timeout
        self.commits: dict[int, JoinCommit] = {}
        self.opens: dict[int, NonceOpen] = {}
        self.roster: JoinRoster | None = None
        self.roster_bytes = b""
        self.roster_hash = b""
        self.opens_bytes = b""
        self.assignment: Assignment | None = None
        self.error: AssignmentAborted | None = None

    def receive(self, cid: int, data: bytes, now: float) -> list[tuple[int, bytes]]:
        """One message from ``cid`` (authenticated by the transport); returns broadcasts.

        Raises
        ------
        ProtocolViolation
            A malformed, unsigned, misbound or unexpected message (the sender is ignored).
        """
        if cid not in self.directory:
            raise UnknownClient(f"client {cid} is not in the directory", client_id=cid)
        if self.phase is Phase.JOINING:
            msg = JoinCommit.decode(data)
            if msg.sender != cid or msg.round_id != self.round_id or msg.groups != self.groups:
                raise ProtocolViolation(
                    "join commitment for another client, round or G", client_id=cid
                )
            if cid in self.commits:
                raise ProtocolViolation(f"client {cid} joined twice", client_id=cid)
            msg.verify(self.directory[cid])
            self.commits[cid] = msg
        elif self.phase is Phase.OPENING:
            assert self.roster is not None
            o = NonceOpen.decode(data)
            if o.sender != cid or cid not in self.commits or cid in self.opens:
                raise ProtocolViolation(f"unexpected opening from client {cid}", client_id=cid)
            if o.roster_hash != self.roster_hash:
                raise ProtocolViolation(f"client {cid} opened for another roster", client_id=cid)
            if join_commitment(self.round_id, cid, o.nonce) != self.commits[cid].commit:
                raise ProtocolViolation(
                    f"client {cid}'s nonce does not open its commitment", client_id=cid
                )
            o.verify(self.directory[cid])
            self.opens[cid] = o
        else:
            raise ProtocolViolation(
                f"no message expected in phase {self.phase.value}", client_id=cid
            )
        return self.tick(now)

    def tick(self, now: float) -> list[tuple[int, bytes]]:
        """Close the roster when everyone joined or the deadline passed; finish the
        assignment when every roster member opened, abort naming the rest at the deadline."""
        if self.phase is Phase.JOINING and (
            len(self.commits) == len(self.directory) or now >= self.deadline
        ):
            need = self.groups * self.min_group
            if len(self.commits) < need:
                return self._abort(
                    f"{len(self.commits)} clients joined; {self.groups} groups of at least"
                    f" {self.min_group} need {need}"
                )
            ids = sorted(self.commits)
            self.roster = JoinRoster(
                self.round_id, self.groups, tuple(self.commits[c] for c in ids)
            )
            self.roster_bytes = self.roster.encode()
            self.roster_hash = self.roster.digest()
            self.phase, self.deadline = Phase.OPENING, now + self.timeout
            return [(c, self.roster_bytes) for c in ids]
        if self.phase is Phase.OPENING and (
            len(self.opens) == len(self.commits) or now >= self.deadline
        ):
            missing = sorted(set(self.commits) - set(self.opens))
            if missing:
                return self._abort(
                    f"clients {missing[:20]} ({len(missing)} in all) did not open their join"
                    f" nonces; the openings must cover the whole roster of {len(self.commits)}"
                    " (exclude them next round)"
                )
            assert self.roster is not None
            ids = sorted(self.commits)
            opens = NonceOpens(self.round_id, self.roster_hash, tuple(self.opens[c] for c in ids))
            self.opens_bytes = opens.encode()
            _, self.assignment = _transcript(self.roster_bytes, self.opens_bytes)
            self.phase = Phase.ASSIGNED
            return [(c, self.opens_bytes) for c in ids]
        return []

    def _abort(self, reason: str) -> list[tuple[int, bytes]]:
        self.phase = Phase.ABORTED
        self.error = AssignmentAborted("group_assignment", reason)
        return []
