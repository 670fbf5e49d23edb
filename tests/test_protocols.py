"""Every registered method's protocol, two rounds through the real `HeteroRankStrategy`, against an
independent numpy implementation of that paper's server written here.

Server → clients → server → clients → server → clients, with FIXED client updates (seeded
factors per client and round, no training): after each round the factors every client is sent,
the global update the server keeps and the bytes it counts must be the paper's. Nothing below
calls raflora's aggregation code; the references follow the papers (and `Method` docstrings):

- FedIT: ``B̄ = Σ p_k B_k``, ``Ā = Σ p_k A_k``, sent back unchanged (equal ranks);
- zero-padding / HetLoRA / RB-LoRA: the padded factors averaged with weights p_k /
  ‖B_k A_k‖_F / ``n_k / Σ_{r_k' > j} n_k'`` (column j); a client of rank r gets ``B̄[:, :r]``,
  ``Ā[:r]`` (``*_svd``: the best rank-r truncation of ``B̄ Ā``);
- FlexLoRA: ``ΔW = Σ p_k B_k A_k``, best rank-r truncation; ``flexlora_nm`` rescales it to
  raFLoRA's norm;
- raFLoRA: partition j of the ranks averaged over the clients covering it; best rank-r
  truncation; carry-over (this project's addition) keeps directions (r_sampled, r_max] of the
  previous update under partial participation;
- FLoRA: ``D_t = D_{t-1} + Σ p_k B_k A_k`` merged into the base; clients get no LoRA factors.

Bytes: Flower's `ArrayRecord.count_bytes` counts, per array, its float32 data (4 bytes a float)
plus its npy header (128 bytes for these 2-D arrays) plus its key's length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from helpers.fakegrid import task_identity
from helpers.replies import train_reply
from raflora.config import config_from_dict
from raflora.federation import messages as msg
from raflora.federation.client import method_prune
from raflora.federation.strategy import HeteroRankStrategy, NodeInfo
from raflora.federation.validation import expectation_for
from raflora.math import available_methods, get_method
from raflora.math.round import GlobalState

MODULES = {"layer.0.query": (20, 18), "layer.1.value": (18, 22)}  # m ≠ n; Σ r_k = 14 ≤ min
NPY_HEADER = 128  # bytes of the npy v1 header Flower stores with every 2-D float32 array
Pair = tuple[np.ndarray, np.ndarray]


@pytest.fixture(autouse=True)
def _identity():
    with task_identity():
        yield


# --------------------------------------------------------------------------- the papers' servers


def weights(sizes: list[int]) -> np.ndarray:
    return np.asarray(sizes, np.float64) / float(sum(sizes))


def padded(pairs: list[Pair], q: np.ndarray) -> Pair:
    """Σ_k [B_k 0] diag(q_k), Σ_k diag(q_k) [A_k; 0]; q (K, r_max)."""
    r_max = max(A.shape[0] for _, A in pairs)
    m, n = pairs[0][0].shape[0], pairs[0][1].shape[1]
    B, A = np.zeros((m, r_max)), np.zeros((r_max, n))
    for k, (Bk, Ak) in enumerate(pairs):
        r = Ak.shape[0]
        B[:, :r] += Bk * q[k, :r]
        A[:r] += q[k, :r, None] * Ak
    return B, A


def per_client(q: np.ndarray, pairs: list[Pair]) -> np.ndarray:
    r_max = max(A.shape[0] for _, A in pairs)
    return np.repeat(np.asarray(q, np.float64)[:, None], r_max, axis=1)


def fedit(pairs: list[Pair], sizes: list[int]) -> Pair:
    """FedIT: B̄ = Σ p_k B_k, Ā = Σ p_k A_k (all r_k equal)."""
    assert len({A.shape[0] for _, A in pairs}) == 1
    p = weights(sizes)
    return sum(pk * B for pk, (B, _) in zip(p, pairs, strict=True)), sum(
        pk * A for pk, (_, A) in zip(p, pairs, strict=True)
    )


def zeropad(pairs: list[Pair], sizes: list[int]) -> Pair:
    """Zero-padding: every index weighted p_k."""
    return padded(pairs, per_client(weights(sizes), pairs))


def hetlora(pairs: list[Pair], sizes: list[int]) -> Pair:
    """HetLoRA (Cho et al. 2024, sparsity-weighted aggregation): q_k ∝ ‖B_k A_k‖_F."""
    norms = np.array([np.linalg.norm(B @ A) for B, A in pairs])
    return padded(pairs, per_client(norms / norms.sum(), pairs))


def rblora(pairs: list[Pair], sizes: list[int]) -> Pair:
    """RB-LoRA's code: column j = Σ_{r_k > j} n_k B_k[:, j] / Σ_{r_k > j} n_k (A likewise)."""
    r_max = max(A.shape[0] for _, A in pairs)
    q = np.zeros((len(pairs), r_max))
    for j in range(r_max):
        holders = [k for k, (_, A) in enumerate(pairs) if A.shape[0] > j]
        for k in holders:
            q[k, j] = sizes[k] / sum(sizes[h] for h in holders)
    return padded(pairs, q)


def flexlora(pairs: list[Pair], sizes: list[int]) -> np.ndarray:
    """FlexLoRA / FLoRA: ΔW = Σ p_k B_k A_k."""
    return sum(pk * (B @ A) for pk, (B, A) in zip(weights(sizes), pairs, strict=True))


def raflora(pairs: list[Pair], sizes: list[int]) -> np.ndarray:
    """raFLoRA: partition (ρ_{j-1}, ρ_j] of the distinct ranks, averaged over r_k > ρ_{j-1}."""
    bounds = sorted({A.shape[0] for _, A in pairs})
    W = np.zeros((pairs[0][0].shape[0], pairs[0][1].shape[1]))
    for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True):
        members = [k for k, (_, A) in enumerate(pairs) if A.shape[0] > lo]
        total = sum(sizes[k] for k in members)
        for k in members:
            B, A = pairs[k]
            W += sizes[k] / total * (B[:, lo:hi] @ A[lo:hi])
    return W


def flexlora_nm(pairs: list[Pair], sizes: list[int]) -> np.ndarray:
    """FlexLoRA's ΔW rescaled to ‖raFLoRA's ΔW‖_F (a control of this project)."""
    W = flexlora(pairs, sizes)
    return W * np.linalg.norm(raflora(pairs, sizes)) / np.linalg.norm(W)


@dataclass(frozen=True)
class Paper:
    """One paper's server protocol. ``aggregate`` returns the kept factors (B̄, Ā) of a
    factor-averaging method or the product ΔW of a product-averaging one; ``receive`` is what
    a client of rank r starts from: "factors" (B̄, Ā) unchanged, "slice" (B̄[:, :r], Ā[:r]),
    "svd" the best rank-r truncation, "merge" nothing but the merged update."""

    aggregate: Callable[[list[Pair], list[int]], Pair | np.ndarray]
    receive: str
    carry_over: bool = False


PAPERS = {
    "fedit": Paper(fedit, "factors"),
    "zeropad": Paper(zeropad, "slice"),
    "zeropad_svd": Paper(zeropad, "svd"),
    "hetlora": Paper(hetlora, "slice"),
    "hetlora_svd": Paper(hetlora, "svd"),
    "rblora": Paper(rblora, "slice"),
    "rblora_svd": Paper(rblora, "svd"),
    "flexlora": Paper(flexlora, "svd"),
    "flexlora_nm": Paper(flexlora_nm, "svd"),
    "flora": Paper(flexlora, "merge"),
    "raflora": Paper(raflora, "svd", carry_over=True),
}


def truncation(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-r approximation of W (Eckart–Young) and its r singular values."""
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    assert S[r - 1] - (S[r] if r < len(S) else 0.0) > 1e-4 * S[0], "truncation not unique"
    return (U[:, :r] * S[:r]) @ Vt[:r], S[:r]


@dataclass
class PaperServer:
    """The paper's server for every module: what it keeps and what it sends."""

    paper: Paper
    r_cap: int  # the federation's largest rank (carry-over's upper end)
    carry_over: bool
    factors: dict[str, Pair] = field(default_factory=dict)  # factor-averaging methods
    update: dict[str, np.ndarray] = field(default_factory=dict)  # ΔW (adapter) or D (merge)
    last: dict[str, np.ndarray] = field(default_factory=dict)  # the last round's aggregate

    def send(self, rank: int) -> dict[str, Pair | np.ndarray]:
        """Per module: the factors (factors/slice), the truncated product (svd) or the merged
        update D (merge) a client of rank ``rank`` is sent; empty before round 1."""
        out: dict[str, Pair | np.ndarray] = {}
        for name, W in self.update.items():
            if self.paper.receive == "factors":
                out[name] = self.factors[name]
            elif self.paper.receive == "slice":
                B, A = self.factors[name]
                out[name] = (B[:, :rank], A[:rank])
            elif self.paper.receive == "svd":
                out[name] = truncation(W, rank)[0]
            else:
                out[name] = W
        return out

    def step(self, replies: dict[int, tuple[dict[str, Pair], int]]) -> None:
        """One round: aggregate the replies {pid: (factors, n_k)} module by module."""
        pids = sorted(replies)
        sizes = [replies[pid][1] for pid in pids]
        sampled_max = max(next(iter(replies[pid][0].values()))[1].shape[0] for pid in pids)
        for name in MODULES:
            pairs = [tuple(x.astype(np.float64) for x in replies[pid][0][name]) for pid in pids]
            kept = self.paper.aggregate(pairs, sizes)
            if isinstance(kept, tuple):
                self.factors[name] = kept
                kept = kept[0] @ kept[1]
            self.last[name] = kept
            if self.paper.receive == "merge":
                kept = self.update.get(name, 0.0) + kept
            elif self.carry_over and name in self.update and sampled_max < self.r_cap:
                U, S, Vt = np.linalg.svd(self.update[name], full_matrices=False)
                tail = slice(sampled_max, self.r_cap)  # directions (r_s, r_cap], 1-based
                kept = kept + (U[:, tail] * S[tail]) @ Vt[tail]
                if name in self.factors:
                    raise NotImplementedError("carry-over of kept factors is not modelled here")
            self.update[name] = kept


# --------------------------------------------------------------------------- the federation


def node_id(pid: int) -> int:
    return 2**63 + 1000 - 7 * pid  # uint64-sized, not in partition-id order


def client_factors(pid: int, server_round: int, rank: int) -> dict[str, Pair]:
    """What client ``pid`` sends back in ``server_round``: fixed seeded factors of its rank,
    scaled by client so that norms (HetLoRA's weights) differ."""
    rng = np.random.default_rng([pid, server_round, rank])
    return {
        name: (
            (rng.standard_normal((m, rank)) * (1 + pid)).astype(np.float32),
            rng.standard_normal((rank, n)).astype(np.float32),
        )
        for name, (m, n) in MODULES.items()
    }


def make_strategy(
    method: str, ranks: list[int], sizes: list[int], **federation
) -> HeteroRankStrategy:
    """The real strategy of a run with these clients (no dense head), registered as the
    server registers the nodes its query round finds."""
    config = config_from_dict(
        {
            "run": {"seed": federation.pop("seed", 0)},
            "clients": {"num_clients": len(ranks), "ranks": ranks},
            "federation": {"method": method, **federation},
        }
    )
    s = HeteroRankStrategy(
        config=config,
        state=GlobalState(0, {}, {}, {}, {}),
        expectation=expectation_for(config, dict(MODULES), {}),
    )
    s.register_nodes(
        NodeInfo(node_id(pid), pid, rank, size)
        for pid, (rank, size) in enumerate(zip(ranks, sizes, strict=True))
    )
    return s


def framing(keys: list[str]) -> int:
    """Bytes `count_bytes` adds to the floats: an npy header and the key, per array."""
    return sum(NPY_HEADER + len(key) for key in keys)


def lora_bytes(floats: int) -> int:
    """One record of LoRA factors of every module: 4 bytes per float plus the framing."""
    return 4 * floats + framing_of_reply()


def factor_floats(rank: int) -> int:
    """Floats of one client's rank-r factors, all modules: Σ_modules r (m + n)."""
    return sum(rank * (m + n) for m, n in MODULES.values())


def close(x: np.ndarray, y: np.ndarray, rtol: float = 2e-5) -> bool:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return x.shape == y.shape and np.linalg.norm(x - y) <= rtol * max(np.linalg.norm(y), 1e-12)


def check_received(
    method: str,
    server: PaperServer,
    lora: dict,
    merged: dict,
    rank: int,
    round_: int,
    flora_stack: bool = False,
) -> None:
    """(a) what one client was sent equals what the paper's server sends it."""
    expected = server.send(rank)
    receive = server.paper.receive
    if not expected:  # round 1: nothing to start from but the client's own initialisation
        assert lora == {} and merged == {}, method
        return
    if receive == "merge":
        # FLoRA: no LoRA factors; the clients merge the server's update into their base. Before
        # round 2 that update is D_1 = ΔW_1, whether the server sends D or the round's stack.
        assert lora == {}
        if round_ == 2 or flora_stack:  # the paper: the previous round's ΔW, as its stack
            assert set(merged) == set(MODULES)
            for name, delta in server.last.items():
                assert close(merged[name][0].astype(np.float64) @ merged[name][1], delta), name
        return
    assert merged == {} and set(lora) == set(MODULES)
    for name, (m, n) in MODULES.items():
        B, A = (x.astype(np.float64) for x in lora[name])
        assert B.shape == (m, rank) and A.shape == (rank, n), (name, B.shape, A.shape)
        if receive in ("factors", "slice"):
            Bref, Aref = expected[name]
            assert close(B, Bref) and close(A, Aref), (method, name, rank)
        else:  # svd: products and singular values (the factors' signs are arbitrary)
            best = expected[name]
            assert close(B @ A, best), (method, name, rank)
            S = np.linalg.svd(B @ A, compute_uv=False)[:rank]
            np.testing.assert_allclose(S, truncation(server.update[name], rank)[1], rtol=2e-5)


def check_kept(method: str, s: HeteroRankStrategy, server: PaperServer) -> None:
    """(b) the server's global update (and kept factors) equal the paper's."""
    for name in MODULES:
        if server.paper.receive == "merge":
            assert s.state.adapter == {}
            kept = s.state.merged[name]
            assert close((kept.U * kept.S).astype(np.float64) @ kept.Vt, server.update[name])
            continue
        B, A = (x.astype(np.float64) for x in s.state.adapter[name].whole())
        assert close(B @ A, server.update[name]), (method, name)
        if name in server.factors:  # factor-averaging: the kept factors are the paper's
            assert close(B, server.factors[name][0]) and close(A, server.factors[name][1])


def run_protocol(
    method: str,
    ranks: list[int],
    sizes: list[int],
    rounds: int = 2,
    flora_stack: bool = False,
    **federation,
) -> tuple[HeteroRankStrategy, PaperServer, list[dict]]:
    """Drive the strategy and the paper's server side by side for ``rounds`` rounds, then send
    once more; check (a), (b) and (c) at every step (FLoRA's payloads after round 2 only with
    ``flora_stack``). Returns a log of each round."""
    s = make_strategy(method, ranks, sizes, **federation)
    paper = PAPERS[method]
    carry = federation.get("carry_over", paper.carry_over)
    server = PaperServer(paper, r_cap=max(ranks), carry_over=carry)
    rank = dict(enumerate(ranks))
    log = []
    for server_round in range(1, rounds + 2):
        out = list(s.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid=None))
        sampled = s.current.sampled
        assert sorted(m.metadata.dst_node_id for m in out) == sorted(map(node_id, sampled))
        floats, keys = 0, []
        for message in out:
            pid = next(p for p in sampled if node_id(p) == message.metadata.dst_node_id)
            assert message.content[msg.CONFIG][msg.RANK] == rank[pid]
            payload = msg.unpack_payload(message.content[msg.ARRAYS])
            lora, dense = payload.lora, payload.dense
            # merged updates travel round by round: the rounds this client has not confirmed
            # (every client confirms each round it merged, so that is the previous round alone)
            assert sorted(payload.rounds) == ([server_round - 1] if payload.rounds else [])
            merged = payload.rounds.get(server_round - 1, payload.merged)
            assert dense == {}
            check_received(method, server, lora, merged, rank[pid], server_round, flora_stack)
            keys += list(message.content[msg.ARRAYS])
            previous = [rank[p] for p in log[-1]["ok"]] if log else []
            floats += paper_floats(server, rank[pid], previous)
        # (c) bytes sent: 4 per float the paper sends + the framing of the arrays sent. FLoRA
        # after round 2: raflora sends the whole D_{t-1} (rank up to 2 Σ r_k), the paper the
        # round's stack (test_flora_sends_only_the_rounds_stack_from_round_3, xfail until then)
        if paper.receive != "merge" or server_round <= 2 or flora_stack:
            assert s.current.bytes_sent == 4 * floats + framing(keys), (method, server_round)
        if server_round > rounds:
            break
        replies = {
            pid: (client_factors(pid, server_round, rank[pid]), sizes[pid]) for pid in sampled
        }
        through = {msg.MERGED_THROUGH: server_round - 1} if server_round > 1 else {}
        messages = [
            train_reply(node_id(pid), f, n, extra=through) for pid, (f, n) in replies.items()
        ]
        s.aggregate_train(server_round, messages)
        assert s.current.ok == sampled and not s.current.rejected, s.current.rejected
        server.step(replies)
        check_kept(method, s, server)
        assert s.current.bytes_received == sum(lora_bytes(factor_floats(rank[p])) for p in sampled)
        log.append({"round": server_round, "ok": sampled, "sent": s.current.bytes_sent})
    return s, server, log


def paper_floats(server: PaperServer, rank: int, previous: list[int]) -> int:
    """Floats the paper's server sends a client of rank r, all modules: r (m + n) (FedIT:
    its r (m + n), slices and truncations alike); FLoRA: the round's stack, Σ_k r_k (m + n)
    over the previous round's clients; nothing before round 1."""
    if not server.update:
        return 0
    if server.paper.receive == "merge":
        return factor_floats(sum(previous))
    return factor_floats(rank)


def framing_of_reply() -> int:
    return framing([name + suffix for name in MODULES for suffix in (msg.LORA_B, msg.LORA_A)])


# --------------------------------------------------------------------------- tests


# methods whose two-round protocol test against a numpy reference of their paper lives in
# their own file (their protocols need hooks this file's PaperServer does not model)
OWN_PROTOCOL_TESTS = {
    "fedex": "test_fedex.py",  # the residual folded into the base
    "ffa_lora": "test_new_methods.py",  # A frozen at a shared seeded init, B-only wire
    "florist": "test_new_methods.py",  # thresholded compact SVD, merged
}


def test_every_registered_method_has_a_reference() -> None:
    """A new method must bring its paper's protocol: here, or in its own test file."""
    assert set(PAPERS) | set(OWN_PROTOCOL_TESTS) == set(available_methods())
    assert not set(PAPERS) & set(OWN_PROTOCOL_TESTS)
    for method, name in OWN_PROTOCOL_TESTS.items():
        assert method in (Path(__file__).parent / name).read_text(), (method, name)


def test_flower_frames_each_array_with_a_128_byte_header_and_its_key() -> None:
    for shape in [(20, 2), (18, 8), (8, 22), (384, 16)]:
        array = Array(np.zeros(shape, np.float32))
        assert len(array.data) == NPY_HEADER + 4 * math.prod(shape)
    record = msg.pack(lora={"layer.0.query": (np.zeros((20, 2)), np.zeros((2, 18)))})
    assert record.count_bytes() == 4 * 2 * (20 + 18) + framing(list(record))


@pytest.mark.parametrize("method", sorted(PAPERS))
def test_two_rounds_follow_the_papers_protocol(method: str) -> None:
    """Fixed updates of ranks 2, 4, 8 (FedIT: 4, 4, 4) and unequal data sizes: every client's
    payload, the global update and the bytes of rounds 1 and 2 are the paper's."""
    ranks = [4, 4, 4] if get_method(method).equal_ranks else [2, 4, 8]
    s, _, log = run_protocol(method, ranks, sizes=[10, 30, 20])
    assert [entry["ok"] for entry in log] == [[0, 1, 2], [0, 1, 2]]
    assert log[0]["sent"] == 0  # round 1: no global update yet, no head
    assert s.state.ranks == dict(enumerate(ranks))


def test_flora_sends_only_the_rounds_stack_from_round_3() -> None:
    """FLoRA (Wang et al. 2024): every round the clients receive that round's stacked factors
    and merge them, so round 3's payload is ΔW_2 (Σ r_k (m + n) floats), not D_2."""
    run_protocol("flora", [2, 4, 8], [10, 30, 20], flora_stack=True)


def carry_over_seed(ranks: list[int]) -> int:
    """A run seed whose sample has the largest rank in round 1 and not in round 2."""
    top = max(ranks)
    for seed in range(200):
        s = make_strategy("raflora", ranks, [1] * len(ranks), fraction_train=0.5, seed=seed)
        first, second = ({ranks[p] for p in s.sample(r)} for r in (1, 2))
        if top in first and top not in second:
            return seed
    raise AssertionError("no seed samples the top rank in round 1 only")


@pytest.mark.parametrize("carry_over", [True, False])
def test_raflora_partial_participation_with_and_without_carry_over(carry_over: bool) -> None:
    """Half the clients per round; round 2's sample lacks rank 8. With carry-over (this
    project's addition) directions (r_s, 8] of ΔW_1 stay in ΔW_2; without, ΔW_2 is the
    round's aggregate alone, and the two differ."""
    ranks, sizes = [2, 4, 8, 4], [10, 30, 20, 40]
    seed = carry_over_seed(ranks)
    s, server, log = run_protocol(
        "raflora", ranks, sizes, fraction_train=0.5, carry_over=carry_over, seed=seed
    )
    assert 8 not in {ranks[p] for p in log[1]["ok"]}
    assert s.settings.carry_over is carry_over
    other = PaperServer(PAPERS["raflora"], r_cap=8, carry_over=not carry_over)
    for entry in log:
        other.step(
            {p: (client_factors(p, entry["round"], ranks[p]), sizes[p]) for p in entry["ok"]}
        )
    for name in MODULES:
        assert not close(other.update[name], server.update[name], rtol=1e-2)


# --------------------------------------------------------------------------- HetLoRA pruning


def paper_pruned_rank(B: np.ndarray, A: np.ndarray, gamma: float, threshold: float) -> int:
    """HetLoRA's self-pruning: while ‖B[:, ⌊γr⌋:r]‖_F ‖A[⌊γr⌋:r]‖_F < threshold, r ← ⌊γr⌋."""
    r = B.shape[1]
    while r > 1:
        s = math.floor(gamma * r)
        if np.linalg.norm(B[:, s:r]) * np.linalg.norm(A[s:r]) >= threshold:
            break
        r = max(1, s)
    return r


def with_faint_tail(factors: dict[str, Pair], start: int) -> dict[str, Pair]:
    """The same factors with directions start.. scaled by 1e-4 (a tail HetLoRA prunes)."""
    out = {}
    for name, (B, A) in factors.items():
        B, A = B.copy(), A.copy()
        B[:, start:] *= 1e-4
        A[start:] *= 1e-4
        out[name] = (B, A)
    return out


HETLORA_PRUNING = {"gamma": 0.5, "prune_threshold": 1e-2}


def test_hetlora_client_hook_prunes_a_faint_tail_to_floor_gamma_r() -> None:
    config = config_from_dict(
        {"federation": {"method": "hetlora", "options": HETLORA_PRUNING}, "clients": {"ranks": [8]}}
    )
    faint = with_faint_tail(client_factors(2, 1, 8), start=4)
    pruned = method_prune(config, faint)  # what the client calls after training
    options = get_method("hetlora").build_options(**HETLORA_PRUNING)
    hook = get_method("hetlora").prune(options, faint)  # the method's own hook
    for name, (B, A) in faint.items():
        assert (
            paper_pruned_rank(B.astype(np.float64), A.astype(np.float64), 0.5, 1e-2) == 4
        )  # ⌊0.5 · 8⌋
        for got in (pruned[name], hook[name]):
            assert np.array_equal(got[0], B[:, :4]) and np.array_equal(got[1], A[:4])
    healthy = client_factors(2, 1, 8)
    for B, A in method_prune(config, healthy).values():
        assert paper_pruned_rank(B.astype(np.float64), A.astype(np.float64), 0.5, 1e-2) == 8
        assert B.shape[1] == A.shape[0] == 8


def test_hetlora_server_accepts_a_pruned_rank_and_keeps_it() -> None:
    """Client 2 (rank 8) prunes to ⌊γ 8⌋ = 4 in round 1; the server aggregates its rank-4
    factors (padded to the sampled r_max = 4), records rank 4, sends it rank-4 slices in round
    2, refuses a rank-8 reply from it then, and keeps rank 4 into round 3."""
    ranks, sizes = [2, 4, 8], [10, 30, 20]
    s = make_strategy("hetlora", ranks, sizes, options=HETLORA_PRUNING)
    config = s.config
    server = PaperServer(PAPERS["hetlora"], r_cap=8, carry_over=False)
    list(s.configure_train(1, ArrayRecord(), ConfigRecord(), None))
    replies = {}
    for pid, rank in enumerate(ranks):
        factors = client_factors(pid, 1, rank)
        if pid == 2:
            factors = with_faint_tail(factors, start=4)
        replies[pid] = (method_prune(config, factors), sizes[pid])
    assert [next(iter(f.values()))[1].shape[0] for f, _ in replies.values()] == [2, 4, 4]
    s.aggregate_train(1, [train_reply(node_id(p), f, n) for p, (f, n) in replies.items()])
    assert s.current.ok == [0, 1, 2] and s.state.ranks == {0: 2, 1: 4, 2: 4}
    assert s.current.bytes_received == 3 * framing_of_reply() + 4 * sum(
        factor_floats(r) for r in (2, 4, 4)
    )
    server.step(replies)
    check_kept("hetlora", s, server)
    for name in MODULES:
        assert s.state.adapter[name].whole()[0].shape[1] == 4  # padded to the largest reply

    out = {m.metadata.dst_node_id: m for m in s.configure_train(2, None, ConfigRecord(), None)}
    for pid, rank in {0: 2, 1: 4, 2: 4}.items():
        message = out[node_id(pid)]
        assert message.content[msg.CONFIG][msg.RANK] == rank
        lora, merged, _ = msg.unpack(message.content[msg.ARRAYS])
        check_received("hetlora", server, lora, merged, rank, 2)
    assert s.current.bytes_sent == sum(lora_bytes(factor_floats(r)) for r in (2, 4, 4))
    too_big = client_factors(2, 2, 8)  # it may not grow back
    second = {0: client_factors(0, 2, 2), 1: client_factors(1, 2, 4)}
    s.aggregate_train(
        2,
        [train_reply(node_id(p), f, sizes[p]) for p, f in second.items()]
        + [train_reply(node_id(2), too_big, sizes[2])],
    )
    assert "allocated rank 4" in s.current.rejected[2]
    assert s.state.ranks[2] == 4
    out = {m.metadata.dst_node_id: m for m in s.configure_train(3, None, ConfigRecord(), None)}
    lora, _, _ = msg.unpack(out[node_id(2)].content[msg.ARRAYS])
    assert all(B.shape[1] == A.shape[0] == 4 for B, A in lora.values())


@pytest.mark.parametrize(
    "method", [m for m in sorted(PAPERS) if not get_method(m).ranks_may_shrink]
)
def test_methods_whose_ranks_may_not_shrink_reject_a_lower_rank(method: str) -> None:
    ranks = [4, 4, 4] if get_method(method).equal_ranks else [2, 4, 8]
    s = make_strategy(method, ranks, [10, 30, 20])
    list(s.configure_train(1, ArrayRecord(), ConfigRecord(), None))
    replies = [train_reply(node_id(p), client_factors(p, 1, r), 10) for p, r in enumerate(ranks)]
    replies[2] = train_reply(node_id(2), client_factors(2, 1, ranks[2] // 2), 10)
    s.aggregate_train(1, replies)
    assert f"allocated rank {ranks[2]}" in s.current.rejected[2]
