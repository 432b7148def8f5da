"""The admission queue against CONTRACT.md "Queue semantics", on a simulated clock.

The documented order (stream_server/admission/policy.py) is earliest deadline first: a ticket's key
is ``joined_at + max_wait_s`` of its tier, ties by arrival, with max_wait_s non-decreasing from vip
to low. The in-process queue never awaits, so every call is driven to completion with ``run``
below; a method that did suspend would break the atomic check-and-reserve the backend promises, and
``run`` fails on it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from stream_server.admission.admission import Admission
from stream_server.admission.eta import MIN_ETA_S
from stream_server.admission.memory import MemoryAdmissionStore
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import AdmissionPolicy, IdentityBusy, QueueFull
from stream_server.admission.store import NewTicket
from stream_server.settings import QueueSettings, TierSettings

TIERS = ("vip", "normal", "low")
RANK = {t: i for i, t in enumerate(TIERS)}  # smaller is higher priority


def run(coro):
    """Drive a coroutine that must not suspend (the memory backend's atomicity)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("an admission call suspended: its check and its update are not one step")


def make_settings(
    *,
    global_cap: int = 1000,
    per_identity_cap: int = 1,
    grace: float = 30.0,
    caps: tuple[int, int, int] = (1000, 1000, 1000),
    max_waits: tuple[float, float, float] = (120.0, 600.0, 1200.0),  # the shipped defaults
) -> QueueSettings:
    # Settings.check refuses anything else; the order below relies on it
    assert list(max_waits) == sorted(max_waits), "max_wait_s must not decrease from vip to low"
    return QueueSettings(
        global_cap=global_cap,
        per_identity_cap=per_identity_cap,
        resume_grace_s=grace,
        tiers={t: TierSettings(cap=c, max_wait_s=w) for t, c, w in zip(TIERS, caps, max_waits, strict=True)},
    )


Queue = Admission[TicketOwner]


def make_queue(cfg: QueueSettings, slots: int) -> Queue:
    """The policy on the in-memory store: the single-node admission."""
    return Admission(AdmissionPolicy(cfg), MemoryAdmissionStore(list(cfg.tiers), slots))


def waiting_ids(q: Queue, now: float) -> list[str]:
    return [t.id for t in run(q.view(now)).waiting]


# --------------------------------------------------------------------------------------------
# 1. Random operation sequences against an independent model
# --------------------------------------------------------------------------------------------


@dataclass
class Rec:
    id: str
    identity: str
    tier: str
    joined_at: float
    arrival: int  # global arrival counter, the model's own notion of "joined later"
    mode: str = "clip"
    state: str = "waiting"  # waiting | detached | busy | done
    until: float = 0.0  # resume deadline while detached
    granted_at: float = 0.0


# Only the differences between the tiers' maximum waits shape the order. A common base far above
# any wait this machine can produce keeps every estimated wait under every tier's maximum, so the
# estimate refusal (section 3 tests it) never fires here; the steps below are comparable to the
# machine's clock steps, and 0 makes two or three tiers share a maximum wait.
MAX_WAIT_BASE = 1e6
MAX_WAIT_STEP = st.sampled_from([0.0, 0.0, 0.5, 4.0, 20.0, 60.0])
MAX_WAITS = st.tuples(MAX_WAIT_STEP, MAX_WAIT_STEP).map(
    lambda d: (MAX_WAIT_BASE, MAX_WAIT_BASE + d[0], MAX_WAIT_BASE + d[0] + d[1])
)


class AdmissionMachine(RuleBasedStateMachine):
    """Every step is checked against a model that knows only the contract's rules and the
    documented order (deadline = join time + tier max wait, ties by arrival), never the queue's
    internals."""

    @initialize(
        global_cap=st.integers(1, 6),
        caps=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
        per_identity_cap=st.integers(1, 2),
        grace=st.sampled_from([1.0, 5.0, 30.0]),
        max_waits=MAX_WAITS,
        slots=st.integers(1, 3),
    )
    def setup(self, global_cap, caps, per_identity_cap, grace, max_waits, slots):
        self.cfg = make_settings(
            global_cap=global_cap,
            caps=caps,
            per_identity_cap=per_identity_cap,
            grace=grace,
            max_waits=max_waits,
        )
        self.q = self.make_queue(self.cfg, slots)
        self.slots = slots
        self.now = 1000.0
        self.recs: dict[str, Rec] = {}
        self.ids = itertools.count()
        self.arrivals = itertools.count()
        self.clip_measured = False  # a clip's estimate needs a served clip; a live one has an expectation
        self.entered: list[str] = []  # tickets put into the line by the current step
        self.entered_by_join = False
        self.prev_order: list[str] = []

    # ----- the store under test (tests/cluster/ runs the same machine on the Redis store) -----

    def make_queue(self, cfg: QueueSettings, slots: int) -> Queue:
        return make_queue(cfg, slots)

    def run(self, coro):
        return run(coro)

    def identities(self) -> dict[str, int]:
        return self.q.store.identities

    def detached_count(self) -> int:
        return self.q.store.detached_count

    # ----- model helpers -----

    def _wait(self, r: Rec) -> float:
        return self.cfg.tiers[r.tier].max_wait_s

    def _key(self, r: Rec) -> tuple[float, int]:
        return (r.joined_at + self._wait(r), r.arrival)  # the deadline, ties by arrival

    def _expire(self) -> None:
        for r in self.recs.values():
            if r.state == "detached" and r.until <= self.now:
                r.state = "done"

    def _in(self, *states: str) -> list[Rec]:
        return [r for r in self.recs.values() if r.state in states]

    def _model_order(self) -> list[str]:
        return [r.id for r in sorted(self._in("waiting"), key=self._key)]

    def _pick(self, i: int) -> str:
        ids = sorted(self.recs, key=lambda s: int(s[1:]))
        return ids[i % len(ids)] if ids and i % 11 else "t-unknown"

    def _step(self) -> None:
        self.entered = []
        self.entered_by_join = False

    # ----- rules -----

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 4.0, 15.0, 45.0]))
    def advance(self, dt):
        self._step()
        self.now += dt

    @rule(
        identity=st.sampled_from(["a", "b", "c", "d", "e"]),
        tier=st.sampled_from(TIERS),
        mode=st.sampled_from(["clip", "clip", "live"]),
    )
    def join(self, identity, tier, mode):
        self._step()
        self._expire()
        tid = f"t{next(self.ids)}"
        active = sum(1 for r in self._in("waiting", "busy") if r.identity == identity)
        superseded = [r for r in self._in("detached") if r.identity == identity]
        held = self._in("waiting") + [r for r in self._in("detached") if r.identity != identity]
        if active >= self.cfg.per_identity_cap:
            expected = IdentityBusy
        elif len(held) >= self.cfg.global_cap or (sum(1 for r in held if r.tier == tier) >= self.cfg.tiers[tier].cap):
            expected = QueueFull
        else:
            expected = None
        try:
            ticket = self.run(self.q.join(tid, identity, tier, "avatar", self.now, mode=mode))
        except (QueueFull, IdentityBusy) as exc:
            assert expected is type(exc), f"join raised {exc!r}, the model expected {expected}"
            if isinstance(exc, QueueFull):
                assert exc.retry_after_s > 0
            return  # a rejected join changes nothing, superseded tickets included
        assert expected is None, f"join was admitted, the model expected {expected.__name__}"
        assert (ticket.id, ticket.identity, ticket.tier, ticket.joined_at, ticket.mode) == (
            tid, identity, tier, self.now, mode
        )
        for r in superseded:
            r.state = "done"
        self.recs[tid] = Rec(tid, identity, tier, self.now, next(self.arrivals), mode)
        self.entered = [tid]
        self.entered_by_join = True

    @rule(i=st.integers(0, 10_000))
    def leave(self, i):
        self._step()
        tid = self._pick(i)
        r = self.recs.get(tid)
        got = self.run(self.q.leave(tid))
        if r is not None and r.state == "waiting":
            assert got is not None and got.id == tid
            r.state = "done"
        else:
            assert got is None
            if r is not None and r.state == "detached":
                r.state = "done"  # cancelling a detached ticket forgets it

    @rule(i=st.integers(0, 10_000))
    def detach(self, i):
        self._step()
        tid = self._pick(i)
        r = self.recs.get(tid)
        got = self.run(self.q.detach(tid, self.now))
        if r is not None and r.state == "waiting":
            assert got is not None and got.id == tid
            r.state, r.until = "detached", self.now + self.cfg.resume_grace_s
        else:
            assert got is None  # a busy, finished or already detached ticket is left as it is

    @rule(i=st.integers(0, 10_000))
    def reattach(self, i):
        self._step()
        self._expire()
        tid = self._pick(i)
        r = self.recs.get(tid)
        got = self.run(self.q.reattach(tid, r.identity if r is not None else "a", self.now))
        if r is not None and r.state == "detached":
            assert got is not None and got.id == tid and got.joined_at == r.joined_at
            r.state = "waiting"
            self.entered = [tid]
        else:
            assert got is None

    @rule()
    def grant(self):
        self._step()
        self._expire()
        before = [t.id for t in self.run(self.q.view(self.now)).waiting]
        busy = len(self._in("busy"))
        g = self.run(self.q.grant(self.now))
        if busy >= self.slots or not before:
            assert g is None, "granted without a free slot or from an empty line"
            return
        assert g is not None, "a slot is free and tickets wait, yet nothing was granted"
        x = self.recs[g.ticket.id]
        # (c) what view() called position 1 is what grant() hands out
        assert g.ticket.id == before[0] and g.ticket.mode == x.mode
        assert g.granted_at == self.now and g.waited_s == self.now - x.joined_at
        for y in self._in("waiting"):
            if y is x:
                continue
            # earliest deadline first: nobody still waiting is due before the ticket granted
            assert self._key(y) > self._key(x), f"{x.id} granted before {y.id} whose deadline is earlier"
            # (a) rule 1: no higher-tier ticket that joined earlier is passed over
            assert not (RANK[y.tier] < RANK[x.tier] and y.arrival < x.arrival), (
                f"{x.tier} {x.id} granted before {y.tier} {y.id} that joined earlier"
            )
            # (b) rule 3: arrival order within a tier
            assert not (y.tier == x.tier and y.arrival < x.arrival), (
                f"{x.id} granted before {y.id} of the same tier that joined earlier"
            )
        x.state, x.granted_at = "busy", self.now

    @rule(i=st.integers(0, 10_000), served=st.booleans())
    def release(self, i, served):
        self._step()
        busy = self._in("busy")
        tid = busy[i % len(busy)].id if busy and i % 3 else self._pick(i)
        r = self.recs.get(tid)
        self.run(self.q.release(tid, self.now, served=served))
        if r is not None and r.state == "busy":
            r.state = "done"
            self.clip_measured = self.clip_measured or (served and r.mode == "clip")

    @rule(n=st.integers(0, 4))
    def set_slots(self, n):
        self._step()
        self.run(self.q.set_slots(n))
        self.slots = max(1, n)

    # ----- invariants, after every step -----

    @invariant()
    def line_matches_model(self):
        self._expire()
        view = self.run(self.q.view(self.now))
        order = [t.id for t in view.waiting]
        # (c) positions 1..n are distinct and follow the documented order
        assert len(set(order)) == len(order)
        assert order == self._model_order()
        # (d) rule 4: a ticket only moves back when something entered ahead of it, and a join
        # only moves back tickets whose tier waits strictly longer (a deadline now + w_e before
        # joined_at + w_t, with joined_at <= now, needs w_e < w_t), so of a strictly lower tier
        # and never one of a tier sharing the joiner's max_wait_s; relative order never changes
        prev = [tid for tid in self.prev_order if tid in order]
        assert prev == [tid for tid in order if tid in prev], "two waiting tickets swapped places"
        old_pos = {tid: p for p, tid in enumerate(self.prev_order)}
        for pos, tid in enumerate(order):
            if tid not in old_pos or pos <= old_pos[tid]:
                continue
            ahead = [e for e in self.entered if order.index(e) < pos]
            assert pos - old_pos[tid] <= len(ahead), f"{tid} moved back with nobody entering ahead"
            if self.entered_by_join:
                for e in ahead:
                    joiner, moved = self.recs[e], self.recs[tid]
                    assert self._wait(joiner) < self._wait(moved), (
                        f"{joiner.tier} join moved {moved.tier} {tid} back with no shorter max wait"
                    )
                    assert RANK[joiner.tier] < RANK[moved.tier], f"{joiner.tier} join moved {moved.tier} {tid} back"
        self.prev_order = order
        # (g) slots
        busy = self._in("busy")
        assert view.slots_busy == len(busy) and view.slots_total == self.slots
        assert len(view.busy) == len(busy)
        # ETAs: one per ticket. Unknown while a clip ahead of it (busy, or waiting before it) has
        # no measured clip to go by; a live session always has an expectation. Never under the
        # floor, never decreasing with the position.
        assert len(view.eta_s) == len(order)
        unknown = []
        clip_ahead = any(r.mode == "clip" for r in busy)
        for tid in order:
            unknown.append(clip_ahead and not self.clip_measured)
            clip_ahead = clip_ahead or self.recs[tid].mode == "clip"
        assert [e is None for e in view.eta_s] == unknown
        known = [e for e in view.eta_s if e is not None]
        assert all(e >= MIN_ETA_S for e in known)
        assert all(a <= b for a, b in itertools.pairwise(known))

    @invariant()
    def caps_hold(self):
        self._expire()
        self.run(self.q.view(self.now))  # expires what the grace is over for
        # (e) rule 5 and rule 7, counting places held for a resume
        held = self._in("waiting", "detached")
        assert len(self._in("waiting")) <= len(held) <= self.cfg.global_cap
        for t in TIERS:
            assert sum(1 for r in held if r.tier == t) <= self.cfg.tiers[t].cap
        expected: dict[str, int] = {}
        for r in self._in("waiting", "busy"):
            expected[r.identity] = expected.get(r.identity, 0) + 1
        assert self.identities() == expected
        assert all(n <= self.cfg.per_identity_cap for n in expected.values())
        assert self.detached_count() == len(self._in("detached"))

    def teardown(self):
        if not hasattr(self, "q"):
            return
        # (c) grant everything: the order is exactly the last view's
        last = [t.id for t in self.run(self.q.view(self.now)).waiting]
        self.run(self.q.set_slots(len(last) + len(self._in("busy")) + 1))
        granted = []
        while (g := self.run(self.q.grant(self.now))) is not None:
            granted.append(g.ticket.id)
        assert granted == last
        # (f) no leaks once everything is released and every resume grace is over
        for tid in [*granted, *(r.id for r in self._in("busy"))]:
            self.run(self.q.release(tid, self.now + 1))
        self.now += self.cfg.resume_grace_s + 1
        view = self.run(self.q.view(self.now))
        assert view.waiting == [] and view.slots_busy == 0 and view.busy == []
        assert self.detached_count() == 0
        assert self.identities() == {}
        # and every identity can take a ticket again
        for n, ident in enumerate("abcde"):
            self.run(self.q.join(f"final{n}", ident, "vip", "avatar", self.now))
            assert self.run(self.q.leave(f"final{n}")) is not None


AdmissionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAdmissionMachine = AdmissionMachine.TestCase


# --------------------------------------------------------------------------------------------
# 2. No starvation under sustained higher-tier load
# --------------------------------------------------------------------------------------------

SERVICE = 10.0  # every simulated session holds its slot this long, so every estimate is exact


@dataclass
class Outcome:
    tier: dict[str, str] = field(default_factory=dict)
    joined: dict[str, float] = field(default_factory=dict)  # admitted tickets
    refused: list[tuple[float, str]] = field(default_factory=list)  # (time, tier)
    granted: dict[str, float] = field(default_factory=dict)

    def waited(self, tid: str) -> float:
        return self.granted[tid] - self.joined[tid]


def every(tier: str, first: float, period: float, until: float) -> list[tuple[float, str, str]]:
    n = int((until - first) // period) + 1
    return [(first + i * period, f"{tier}{i}", tier) for i in range(n)]


async def drive(q: Queue, joins: list[tuple[float, str, str]], until: float) -> Outcome:
    """Open-loop load: each (time, id, tier) joins at its time under its own identity; a free slot
    is granted at once and held SERVICE seconds. At one instant: releases, then joins in list
    order, then grants."""
    joins = sorted(joins, key=lambda j: j[0])  # stable: list order at equal times
    out, running, i, now = Outcome(), {}, 0, 0.0
    while now <= until:
        for tid, end in list(running.items()):
            if end <= now:
                await q.release(tid, now)
                del running[tid]
        while i < len(joins) and joins[i][0] <= now:
            _, tid, tier = joins[i]
            i += 1
            out.tier[tid] = tier
            try:
                await q.join(tid, tid, tier, "a", now)
                out.joined[tid] = now
            except QueueFull as exc:
                assert exc.retry_after_s > 0
                out.refused.append((now, tier))
        while len(running) < q.store.slots_total and (g := await q.grant(now)) is not None:
            running[g.ticket.id] = now + SERVICE
            out.granted[g.ticket.id] = now
        upcoming = [*running.values(), *([joins[i][0]] if i < len(joins) else [])]
        if not upcoming:
            break
        now = min(upcoming)
    return out


def higher_tier_load(tiers: tuple[str, ...], until: float) -> list[tuple[float, str, str]]:
    """vip every 4 s, normal every 5 s: each alone is 2.5x (2x) what the one slot serves."""
    period = {"vip": (0.0, 4.0), "normal": (1.0, 5.0)}
    return [j for t in tiers for j in every(t, *period[t], until)]




@pytest.mark.parametrize(
    ("loaded", "low_at"),
    [
        pytest.param(("vip",), 600.0, id="vip-load"),
        pytest.param(("vip",), 780.5, id="vip-load-mid-service"),
        pytest.param(("vip",), 2222.2, id="vip-load-steady"),
        pytest.param(("vip", "normal"), 600.0, id="vip+normal-load"),
        pytest.param(("vip", "normal"), 2000.0, id="vip+normal-load-steady"),
        pytest.param(
            ("vip", "normal"),
            791.5,
            id="vip+normal-load-late-normals",
        ),
    ],
)
async def test_admitted_low_ticket_is_granted_within_its_max_wait_under_sustained_higher_tier_load(loaded, low_at):
    cfg = make_settings()
    w = {t: cfg.tiers[t].max_wait_s for t in TIERS}
    q = make_queue(cfg, 1)
    until = low_at + w["low"] + 300
    out = await drive(q, [(low_at, "low", "low"), *higher_tier_load(loaded, until)], until)

    assert "low" in out.joined, "the low ticket was refused"
    assert "low" in out.granted, "the low ticket starved"
    waited = out.waited("low")
    # rule 2, with one service time of slack. It is not the estimates that lag (every session
    # lasts SERVICE, so they are exact); grants are not preemptive. Only tickets due before the
    # low one go ahead of it: vips that join less than low.max_wait_s - vip.max_wait_s after it
    # (normals: less than low.max_wait_s - normal.max_wait_s). Nothing overtakes a vip, so each is
    # granted by its deadline, at the latest just before the low ticket's, and still holds the
    # slot for up to one SERVICE when that deadline passes. Normals have no such guarantee (vips
    # admitted after them overtake them); admission keeps a reserve for that overtaking and refuses
    # a join that would make a waiting ticket late, so the normals ahead are on time too.
    assert waited <= w["low"] + SERVICE, f"the low ticket waited {waited} s"
    # the load was real: higher tiers overtook it for the whole window, and joins were turned away
    assert waited >= w["low"] - w["vip"]
    ahead = [tid for tid, at in out.granted.items() if low_at <= at < out.granted["low"]]
    assert len(ahead) >= 100 and len(out.refused) > 50
    # and only tickets due no later than the low ticket went ahead of it
    deadline = low_at + w["low"]
    assert all(out.joined[tid] + w[out.tier[tid]] <= deadline for tid in ahead)
    assert {out.tier[tid] for tid in ahead} == set(loaded)


@pytest.mark.parametrize(("high", "low"), [("vip", "low"), ("vip", "normal"), ("normal", "low")])
async def test_a_higher_tier_ticket_joining_more_than_the_max_wait_difference_later_queues_behind(high, low):
    cfg = make_settings()
    gap = cfg.tiers[low].max_wait_s - cfg.tiers[high].max_wait_s  # 1080 s for vip over low
    q = make_queue(cfg, 1)
    await q.join("L", "l", low, "a", 0.0)
    await q.join("H-early", "h1", high, "a", gap - 1)  # due 1 s before L: ahead of it
    await q.join("H-tie", "h2", high, "a", gap)  # due with L: arrival decides, L was first
    await q.join("H-late", "h3", high, "a", gap + 1)  # due 1 s after L: behind it
    assert waiting_ids(q, gap + 1) == ["H-early", "L", "H-tie", "H-late"]


async def test_an_admitted_vip_is_granted_within_its_max_wait_under_any_load():
    # Nothing can overtake a vip (a later ticket's deadline is at least its join + vip.max_wait_s),
    # so its estimate at admission holds: no slack at all, whatever the lower tiers do.
    cfg = make_settings()
    q = make_queue(cfg, 1)
    until = 3000.0
    load = [*higher_tier_load(("vip", "normal"), until), *every("low", 2.0, 6.0, until)]
    load += [(1500.0, f"burst{n}", t) for n, t in enumerate(["low", "normal"] * 20)]
    out = await drive(q, load, until + 1500)
    vips = [tid for tid in out.joined if out.tier[tid] == "vip"]
    assert len(vips) > 50 and any(t == "vip" for _, t in out.refused)
    assert all(tid in out.granted for tid in vips), "an admitted vip was never granted"
    assert max(out.waited(tid) for tid in vips) <= cfg.tiers["vip"].max_wait_s
    assert {out.tier[tid] for tid in out.granted} == set(TIERS)


async def test_vip_is_not_refused_while_normal_joins_are_admitted():
    # Sustained normal load (2x what the slot serves) and an occasional vip (1/6 of it). Found:
    # from t=962.5 on every vip is refused (all 33 after t=1000, estimates up to ~200 s) while
    # about half the normal joins get in; the vips admitted before had made the normals late
    # (waits up to 670 s). Even with no vip before, a vip is refused with an estimate of 127-130 s:
    # the normals due before its deadline fill its 120 s, plus the session holding the slot.
    cfg = make_settings()
    q = make_queue(cfg, 1)
    until = 3000.0
    out = await drive(q, [*every("normal", 0.0, 5.0, until), *every("vip", 2.5, 60.0, until)], until)
    normal_in = [tid for tid, at in out.joined.items() if out.tier[tid] == "normal" and at > 1000]
    normal_out = [at for at, t in out.refused if t == "normal" and at > 1000]
    assert normal_in and normal_out  # the normal line is full, and normals still get in
    vip_out = [at for at, t in out.refused if t == "vip"]
    assert vip_out == [], f"{len(vip_out)} vips refused while normal joins were admitted"


async def test_an_admitted_normal_ticket_is_not_pushed_past_its_max_wait_by_later_vips():
    # One slot, vip 20 s, normal 100 s. Ten normals join at t=10 with estimates 0..90 s (all under
    # 100); then one vip 0.5 s after each grant, never more than the slot serves. Each vip is
    # admitted (estimate 9.5 s) and overtakes the normals, until at t=90.5 the overdue normals
    # count ahead of it and the vip is refused; N9 is granted at t=180: it waited 170 s.
    cfg = make_settings(max_waits=(20.0, 100.0, 1000.0))
    q = make_queue(cfg, 1)
    load = [(0.0, "m", "normal")]  # measures SERVICE before the rest joins
    load += [(10.0, f"N{n}", "normal") for n in range(10)]
    load += [(10.5 + 10 * k, f"V{k}", "vip") for k in range(9)]
    out = await drive(q, load, 400.0)
    assert all(f"N{n}" in out.joined for n in range(10))
    worst = max(out.waited(f"N{n}") for n in range(10))
    assert worst <= cfg.tiers["normal"].max_wait_s + SERVICE, f"a normal waited {worst} s"


# --------------------------------------------------------------------------------------------
# 3. Wait estimates
# --------------------------------------------------------------------------------------------


async def test_a_clip_estimate_is_unknown_until_a_served_clip_is_measured():
    q = make_queue(make_settings(), slots=1)
    for n in range(3):
        await q.join(f"t{n}", f"u{n}", "normal", "a", float(n))
    # nothing is ahead of the first (it is about to be granted); a clip is ahead of the others
    assert (await q.view(3.0)).eta_s == [MIN_ETA_S, None, None]
    g = await q.grant(3.0)
    assert (await q.view(3.0)).eta_s == [None, None], "an unmeasured clip holds the slot"
    await q.release(g.ticket.id, 50.0, served=False)  # a failed session measures nothing
    await q.grant(50.0)
    assert (await q.view(50.0)).eta_s == [None]
    await q.release("t1", 60.0)  # served: 10 s
    await q.grant(60.0)
    await q.join("t3", "u3", "normal", "a", 60.0)
    assert (await q.view(64.0)).eta_s == pytest.approx([6.0])
    # past its mean, the busy clip still counts for a tenth of it, and no estimate is under 1 s
    assert (await q.view(75.0)).eta_s == pytest.approx([MIN_ETA_S])


LIVE_S = 80.0  # queue.live_expected_s in the tests below (the default is 60 s)


async def check_live_holders_count_for_their_expectation(q: Queue) -> None:
    """Four live sessions hold the four slots, a clip waits behind them (no clip measured): it is
    told the rest of their expected hold time, never 0 s; the measured live mean replaces the
    expectation, and a live session's hold time does not change the clip mean. Shared with the
    Redis store (tests/cluster/test_redis_store.py)."""
    for n in range(4):
        await q.join(f"live{n}", f"l{n}", "vip", "a", 0.0, mode="live")
        assert (await q.grant(0.0)) is not None
    await q.join("clip", "c", "normal", "a", 10.0)
    assert (await q.view(10.0)).eta_s == pytest.approx([LIVE_S - 10.0]), "4 x 50 s of live work over 4 slots"
    assert (await q.view(40.0)).eta_s == pytest.approx([LIVE_S - 40.0])
    # past their expectation they still count for a tenth of it: not 0 s
    assert (await q.view(100.0)).eta_s == pytest.approx([LIVE_S * 0.1])
    # one ends at 120 s: the live mean is measured (120 s) and replaces the expectation
    await q.release("live0", 120.0)
    await q.join("live4", "l4", "vip", "a", 120.0, mode="live")
    grant = await q.grant(120.0)
    assert grant is not None and grant.ticket.id == "live4" and grant.ticket.mode == "live"
    # 3 x 12 s (a tenth of 120 s, they have run 120 s) + 120 s - 10 s for live4, over 4 slots
    assert (await q.view(130.0)).eta_s == pytest.approx([(3 * 12.0 + 110.0) / 4])
    # the clip's own hold time is measured apart from the live ones
    for n in range(1, 5):
        await q.release(f"live{n}", 130.0)
    g = await q.grant(130.0)
    assert g is not None and g.ticket.id == "clip" and g.ticket.mode == "clip"
    await q.release("clip", 140.0)  # a 10 s clip
    await q.join("clip2", "c", "normal", "a", 140.0)
    await q.grant(140.0)
    await q.join("clip3", "c3", "normal", "a", 141.0)
    assert (await q.view(142.0)).eta_s == pytest.approx([8.0 / 4]), "the clip mean is 10 s, not mixed with 120 s"


def live_settings() -> QueueSettings:
    cfg = make_settings()
    cfg.live_expected_s = LIVE_S
    return cfg


async def test_live_holders_count_for_their_expectation_less_their_time_so_far():
    await check_live_holders_count_for_their_expectation(make_queue(live_settings(), slots=4))


async def test_a_clip_behind_a_waiting_live_session_counts_its_expectation():
    q = make_queue(live_settings(), slots=1)
    await q.join("m", "m", "normal", "a", 0.0)
    await q.release((await q.grant(0.0)).ticket.id, 10.0)  # clips take 10 s
    await q.join("busy", "b", "normal", "a", 10.0)
    await q.grant(10.0)
    await q.join("live", "l", "normal", "a", 10.0, mode="live")
    await q.join("clip", "c", "normal", "a", 11.0)
    assert (await q.view(12.0)).eta_s == pytest.approx([8.0, 8.0 + LIVE_S])


async def test_eta_grows_with_position_and_shrinks_with_more_slots():
    q = make_queue(make_settings(), slots=1)
    await q.join("m", "m", "normal", "a", 0.0)
    await q.release((await q.grant(0.0)).ticket.id, 10.0)  # one session of 10 s measured
    for n in range(6):
        await q.join(f"t{n}", f"u{n}", "normal", "a", 10.0 + n)
    await q.grant(16.0)  # one slot busy from now on
    one = (await q.view(16.0)).eta_s
    assert one == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0])
    await q.set_slots(2)
    two = (await q.view(16.0)).eta_s
    assert all(b < a for a, b in zip(one, two, strict=True))
    assert all(a <= b for a, b in itertools.pairwise(two))
    # the busy slot's remainder shrinks as it runs
    later = (await q.view(20.0)).eta_s
    assert later[0] < two[0]


async def test_join_over_the_tiers_max_wait_is_refused_with_retry_after():
    cfg = make_settings(max_waits=(20.0, 35.0, 900.0))
    q = make_queue(cfg, 1)
    await q.join("m", "m", "normal", "a", 0.0)
    await q.release((await q.grant(0.0)).ticket.id, 10.0)
    await q.join("busy", "busy", "normal", "a", 10.0)
    await q.grant(10.0)  # 10 s left on the slot
    for n in range(3):  # estimated waits 10, 20, 30: all under 35
        await q.join(f"t{n}", f"u{n}", "normal", "a", 10.0)
    with pytest.raises(QueueFull) as info:  # the fourth would wait 40 s
        await q.join("t3", "u3", "normal", "a", 10.0)
    assert info.value.retry_after_s > 0
    assert "estimated wait" in info.value.reason
    assert waiting_ids(q, 10.0) == ["t0", "t1", "t2"]
    assert "u3" not in q.store.identities
    # a vip is due (t=30) before the normals (t=45): only the busy slot is ahead of it (10 s, under
    # its 20 s), but it would push t2 from 40 s to 50 s, past t2's deadline: refused, so that
    # tickets already waiting keep their maximum wait. A low ticket is due after them (40 s, under
    # its 900 s) and is admitted where the normal was not.
    with pytest.raises(QueueFull) as late:
        await q.join("v", "u3", "vip", "a", 10.0)
    assert "miss their maximum wait" in late.value.reason
    await q.join("l", "u3", "low", "a", 10.0)
    assert (await q.view(10.0)).eta_s[-1] == pytest.approx(40.0)
    await q.leave("l")
    await q.leave("t2")
    await q.join("v", "u3", "vip", "a", 10.0)
    assert waiting_ids(q, 10.0) == ["v", "t0", "t1"]
    assert (await q.view(10.0)).eta_s[0] == pytest.approx(10.0)
    await q.leave("v")
    # and the refused client gets in once the line has moved
    await q.release("busy", 20.0)
    await q.grant(20.0)
    await q.join("t3", "u3", "normal", "a", 20.0)


async def test_full_queue_is_refused_at_once_with_retry_after():
    q = make_queue(make_settings(global_cap=3, caps=(1000, 1, 1000)), slots=1)
    await q.join("n0", "u0", "normal", "a", 0.0)
    with pytest.raises(QueueFull) as tier_full:
        await q.join("n1", "u1", "normal", "a", 0.0)
    await q.join("v0", "u1", "vip", "a", 0.0)
    await q.join("v1", "u2", "vip", "a", 0.0)
    with pytest.raises(QueueFull) as full:
        await q.join("v2", "u3", "vip", "a", 0.0)
    assert tier_full.value.retry_after_s > 0 and full.value.retry_after_s > 0
    with pytest.raises(IdentityBusy):
        await q.join("v3", "u0", "vip", "a", 0.0)


# --------------------------------------------------------------------------------------------
# 4. Resume
# --------------------------------------------------------------------------------------------


async def test_reattach_within_grace_gets_the_same_place_back():
    q = make_queue(make_settings(), slots=1)
    for n, name in enumerate("ABCD"):
        await q.join(name, name.lower(), "normal", "x", float(n))
    await q.grant(4.0)  # A streams
    assert waiting_ids(q, 4.0) == ["B", "C", "D"]
    await q.detach("C", 5.0)
    assert waiting_ids(q, 5.0) == ["B", "D"]
    await q.join("E", "e", "normal", "x", 6.0)
    await q.leave("B")
    got = await q.reattach("C", "c", 34.0)  # 29 s later, inside the 30 s grace
    assert got is not None and got.id == "C"
    assert waiting_ids(q, 34.0) == ["C", "D", "E"]  # still ahead of D, and of E who came later
    assert q.store.identities == {"a": 1, "c": 1, "d": 1, "e": 1}


async def test_resumed_ticket_keeps_its_place_behind_a_vip_that_joined_meanwhile():
    q = make_queue(make_settings(), slots=1)
    await q.join("N1", "n1", "normal", "x", 0.0)
    await q.join("N2", "n2", "normal", "x", 1.0)
    await q.detach("N2", 2.0)
    await q.join("V", "v", "vip", "x", 3.0)  # due at 123, before N1 (600) and N2 (601)
    await q.reattach("N2", "n2", 4.0)
    assert waiting_ids(q, 4.0) == ["V", "N1", "N2"]


async def test_reattach_after_grace_fails_and_the_identity_may_join_again():
    q = make_queue(make_settings(grace=30.0), slots=1)
    await q.join("A", "alice", "normal", "x", 0.0)
    await q.detach("A", 1.0)
    assert await q.reattach("A", "alice", 31.5) is None
    assert q.store.detached_count == 0 and q.store.identities == {}
    await q.join("A2", "alice", "normal", "x", 32.0)
    assert waiting_ids(q, 32.0) == ["A2"]


async def test_a_new_join_by_the_same_identity_supersedes_its_detached_ticket():
    q = make_queue(make_settings(per_identity_cap=1), slots=1)
    await q.join("A", "alice", "normal", "x", 0.0)
    await q.join("B", "bob", "normal", "x", 1.0)
    await q.detach("A", 2.0)
    await q.join("A2", "alice", "normal", "x", 3.0)  # not IdentityBusy
    assert await q.reattach("A", "alice", 4.0) is None
    assert q.store.detached_count == 0
    assert waiting_ids(q, 4.0) == ["B", "A2"]  # the new ticket has the new ticket's place
    assert q.store.identities == {"alice": 1, "bob": 1}


async def test_a_refused_join_does_not_cost_the_detached_ticket_its_resume():
    q = make_queue(make_settings(caps=(1000, 1000, 1)), slots=1)
    await q.join("L", "lou", "low", "x", 0.0)
    await q.join("A", "alice", "normal", "x", 1.0)
    await q.detach("A", 2.0)
    with pytest.raises(QueueFull):
        await q.join("A2", "alice", "low", "x", 3.0)  # the low tier is full
    got = await q.reattach("A", "alice", 4.0)
    assert got is not None
    assert waiting_ids(q, 4.0) == ["A", "L"]


async def test_detaching_twice_keeps_the_resume():
    q = make_queue(make_settings(), slots=1)
    await q.join("A", "alice", "normal", "x", 0.0)
    assert await q.detach("A", 1.0) is not None
    assert await q.detach("A", 2.0) is None
    assert (await q.reattach("A", "alice", 3.0)) is not None
    assert waiting_ids(q, 3.0) == ["A"]


async def test_a_resume_is_never_refused_for_a_full_queue():
    q = make_queue(make_settings(global_cap=2), slots=1)
    await q.join("A", "alice", "normal", "x", 0.0)
    await q.detach("A", 1.0)
    await q.join("B", "bob", "normal", "x", 2.0)
    with pytest.raises(QueueFull):  # A's place is held for its resume
        await q.join("C", "carol", "normal", "x", 3.0)
    assert await q.reattach("A", "alice", 4.0) is not None
    assert waiting_ids(q, 4.0) == ["A", "B"]
    # once the grace is over the held place is free again
    await q.detach("A", 5.0)
    await q.join("C", "carol", "normal", "x", 40.0)
    assert waiting_ids(q, 40.0) == ["B", "C"]


async def test_resumed_ticket_stays_ahead_of_one_that_joined_at_the_same_instant_after_it():
    q = make_queue(make_settings(), slots=1)
    await q.join("A", "alice", "normal", "x", 5.0)
    await q.join("B", "bob", "normal", "x", 5.0)  # same join time: arrival decides
    await q.detach("A", 6.0)
    await q.reattach("A", "alice", 7.0)
    assert waiting_ids(q, 7.0) == ["A", "B"]


async def test_a_resume_by_another_identity_leaves_the_owners_ticket_detached():
    q = make_queue(make_settings(), slots=1)
    await q.join("A", "alice", "normal", "x", 0.0)
    await q.join("B", "bob", "normal", "x", 1.0)
    await q.detach("A", 2.0)
    assert await q.reattach("A", "mallory", 3.0) is None
    assert q.store.detached_count == 1
    got = await q.reattach("A", "alice", 4.0)  # the owner's own resume, a second later
    assert got is not None and got.id == "A"
    assert waiting_ids(q, 4.0) == ["A", "B"]


async def test_a_join_decided_on_a_stale_snapshot_is_not_inserted():
    # The store's join is snapshot -> policy -> conditional insert (WATCH/MULTI on a shared
    # store): a line that changed in between makes the insert fail, and the join is decided again.
    store = MemoryAdmissionStore(list(TIERS), 1)
    policy = AdmissionPolicy(make_settings(caps=(1000, 1, 1000)))
    snapshot, version = await store.join_snapshot("a", "normal", 0.0)
    key = policy.admit("normal", 0.0, snapshot)
    rival = NewTicket("B", "b", "normal", "x", 0.0, key)
    assert await store.insert(rival, version) is not None  # another node's join got in first
    assert await store.insert(NewTicket("A", "a", "normal", "x", 0.0, key), version) is None
    assert [t.id for t in (await store.line(0.0)).waiting] == ["B"] and store.identities == {"b": 1}
    snapshot, version = await store.join_snapshot("a", "normal", 0.0)
    with pytest.raises(QueueFull):  # decided again: the normal tier (cap 1) is full now
        policy.admit("normal", 0.0, snapshot)
