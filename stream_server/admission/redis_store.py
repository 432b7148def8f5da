"""The shared admission store: one line for every node, in Redis (``queue.store = "redis"``).

Each step of ``AdmissionStore`` is one Lua script (``redis_scripts.py``), so it is atomic across
nodes. Every node registers itself with its slots, pool and URL, and renews a lease
(``heartbeat``); a node whose lease runs out is dead to the others: its slots come back and the
waiting tickets of its clients are held for a resume on any node, at their places. A grant pops
the first ticket and reserves a slot on a live node that has one, the ticket's own node first;
when that is another node, the grant carries a single-use handoff id that expires with its slot.

A node keeps a copy of the line (``redis_line.LineCopy``) that every read of it (a join's
snapshot, the dispatcher's view) brings up to date with the changes since, so a read carries the
whole line only when the copy is too far behind. The uses of each avatar are counted here too
(``hot_window_s``), in the join's snapshot, so the hot boost is the same on every node.

Times are the caller's clock, which must be shared by every node (``time.time`` in a cluster).
A lost connection raises ``StoreUnavailable`` with the cause.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from stream_server.admission import redis_scripts as lua
from stream_server.admission.eta import CLIP, BusySlot, OfferedWork, ServiceTimes
from stream_server.admission.policy import JoinSnapshot, Ticket
from stream_server.admission.redis_line import LineCopy, LineLogGap
from stream_server.admission.store import AdmissionStore, Grant, LineState, NewTicket, StoreUnavailable

OFFERED_HORIZON_S = 300.0
SERVICE_ALPHA = 0.2


def decode_ticket(member: str | bytes) -> Ticket:
    return _decode(member.decode() if isinstance(member, bytes) else member)


@functools.lru_cache(maxsize=16384)
def _decode(text: str) -> Ticket:
    """A member never changes while its ticket lives: a line read decodes only the new ones."""
    ticket_id, identity, tier, joined_at, key, avatar, node, resume_key, request, mode = json.loads(text[15:])
    return Ticket(
        id=ticket_id,
        identity=identity,
        tier=tier,
        joined_at=float(joined_at),
        key=float(key),
        seq=int(text[:15]),
        avatar=avatar,
        meta={"node": node, "resume_key": resume_key, "request": request},
        mode=mode,
    )


def encode_ticket(ticket: Ticket, node: str) -> str:
    """The member ``decode_ticket`` reads (``redis_scripts``: the layout)."""
    fields = [ticket.id, ticket.identity, ticket.tier, repr(ticket.joined_at), repr(ticket.key), ticket.avatar, node,
              ticket.meta.get("resume_key", ""), ticket.meta.get("request", ""), ticket.mode]
    return f"{ticket.seq:015d}" + json.dumps(fields)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _times(flat: list[Any]) -> ServiceTimes:
    """The ``times`` hash: ``mode:tier`` -> mean, and ``mode:*`` -> the mode's mean over every tier."""
    means: dict[tuple[str, str], float] = {}
    overall: dict[str, float] = {}
    for field, value in _pairs(flat).items():
        mode, colon, tier = field.partition(":")
        if not colon:
            raise ValueError(f"service-time field {field!r} has no mode: an older version wrote it (redis_scripts.py)")
        if tier == "*":
            overall[mode] = float(value)
        else:
            means[mode, tier] = float(value)
    return ServiceTimes.restore(means, overall, SERVICE_ALPHA)


class RedisAdmissionStore(AdmissionStore):
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        node_id: str,
        tiers: list[str],
        slots: int,
        resume_grace_s: float,
        grant_ttl_s: float,
        pool: str = "default",
        url: str = "",
        tier_pools: dict[str, list[str]] | None = None,
        overflow: dict[str, list[str]] | None = None,
        lease_client: aioredis.Redis | None = None,
        hot_window_s: float = 0.0,
    ) -> None:
        self.client = client
        self.lease_client = lease_client or client
        """Renews the lease and hears the line's changes: its own connections, so that a node busy
        with a thousand joins still renews its lease in time."""
        self.prefix = prefix
        self.node_id = node_id
        self.tiers = tiers
        self.slots_total = max(1, slots)
        self.resume_grace_s = resume_grace_s
        self.grant_ttl_s = grant_ttl_s
        self.pool = pool
        self.url = url
        self._tier_pools = json.dumps(tier_pools or {})
        self._overflow = json.dumps(overflow or {})
        self.hot_window_s = hot_window_s
        """Joins count their avatar's uses within this window in the store (0: they do not)."""
        self._scripts: dict[str, AsyncScript] = {}
        self.calls: Counter[str] = Counter()
        """Scripts run, by name: each is one round trip to Redis."""
        self.line_copy = LineCopy(decode_ticket)
        self._reading = asyncio.Lock()
        """One read of the line at a time: each brings the copy from its version to the next."""

    async def _run(self, name: str, *args: str | int, lease: bool = False) -> Any:
        key = f"{name}:lease" if lease else name
        script = self._scripts.get(key)
        if script is None:
            client = self.lease_client if lease else self.client
            script = self._scripts[key] = client.register_script(getattr(lua, name))
        self.calls[name] += 1
        try:
            return await cast(Awaitable[Any], script(args=[self.prefix, *args]))
        except ResponseError as exc:
            if "already active" in str(exc):
                raise ValueError(str(exc)) from None
            raise
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"the shared queue store (Redis) is unreachable: {exc}") from exc

    async def _read(self, name: str, args: Callable[[str, int], list[str | int]]) -> list[Any]:
        """Run a script that reads the line (``line_since`` first in its reply) with the copy's
        ``(epoch, version)``, and bring the copy to the version it read. The copy stays as it is
        until the caller's next ``await``."""
        async with self._reading:
            copy = self.line_copy
            reply: list[Any] = await self._run(name, *args(copy.epoch, copy.version))
            try:
                copy.update(reply[0])
            except LineLogGap:
                reply = await self._run(name, *args(copy.epoch, copy.version))
                copy.update(reply[0])
            return reply

    def _busy(self, entries: list[Any], now: float) -> list[BusySlot]:
        out = []
        for raw in entries:
            member, since, _node = json.loads(_text(raw))
            ticket = decode_ticket(member)
            out.append(BusySlot(ticket.tier, ticket.mode, now - float(since)))
        return out

    def _grant(self, raw: list[Any]) -> Grant:
        member, since, node, handoff, size, url, left = (_text(x) for x in raw)
        ticket = decode_ticket(member)
        return Grant(
            ticket, float(since), int(size), node=node, owner_node=ticket.meta["node"], handoff=handoff, node_url=url,
            more=int(left) > 0,
        )

    # ----- cluster membership -----

    async def heartbeat(self, now: float, lease_s: float) -> bool:
        """Renew this node's lease (and its slots, pool and URL); True if it was not registered
        (its first heartbeat, a Redis that restarted empty, or a lease that had run out)."""
        new = await self._run(
            "HEARTBEAT", self.node_id, repr(now + lease_s), self.slots_total, self.pool, self.url, lease=True
        )
        return bool(new)

    async def drop_idle_connections(self) -> None:
        """Close the connections idle in the pools: after Redis restarted they lead nowhere, and
        the next step on one would fail once before a new one is opened."""
        for client in (self.client, self.lease_client):
            await client.connection_pool.disconnect(inuse_connections=False)

    async def drain(self) -> None:
        """This node takes no new grants (it is shutting down)."""
        await self._run("DRAIN", self.node_id)

    async def consume_grant(self, handoff: str, now: float) -> Ticket | None:
        """Take up a grant made for a slot of this node: once only, before it expires."""
        member = await self._run("CONSUME_GRANT", handoff, self.node_id, repr(now))
        return None if member is None else decode_ticket(member)

    # ----- AdmissionStore -----

    async def expire(self, now: float) -> list[Ticket]:
        members = await self._run("EXPIRE", repr(now), repr(self.resume_grace_s))
        return [decode_ticket(m) for m in members]

    async def join_snapshot(
        self, identity: str, tier: str, now: float, *, mode: str = CLIP, ticket_id: str = "", avatar: str = ""
    ) -> tuple[JoinSnapshot, int]:
        window = self.hot_window_s if avatar else 0.0
        since, total, active, times, offered, uses = await self._read(
            "JOIN_SNAPSHOT",
            lambda epoch, version: [
                identity, tier, repr(now), repr(OFFERED_HORIZON_S), epoch, version, ticket_id, avatar, repr(window),
                mode,
            ],
        )
        work = OfferedWork(OFFERED_HORIZON_S)
        raw = _pairs(offered)
        for name in self.tiers:
            if name in raw:
                work.restore(name, float(raw[name]), float(raw[f"{name}@"]))
        copy = self.line_copy
        snapshot = JoinSnapshot(
            waiting=copy.waiting,
            held=[t for t in copy.detached.values() if t.identity != identity],
            busy=self._busy(list(copy.busy.values()), now),
            slots_total=max(1, int(total)),
            identity_active=int(active),
            times=_times(times),
            offered={name: work.rate(name, now) for name in self.tiers},
            avatar_uses=int(uses) if window > 0 else None,
        )
        return snapshot, int(since[1])

    async def insert(self, ticket: NewTicket, version: int) -> tuple[Ticket, list[Ticket]] | None:
        reply = await self._run(
            "INSERT",
            str(version),
            ticket.id,
            ticket.identity,
            ticket.tier,
            repr(ticket.joined_at),
            repr(ticket.key),
            ticket.avatar,
            self.node_id,
            ticket.resume_key,
            ticket.request,
            ticket.mode,
        )
        if _text(reply[0]) == "stale":
            return None
        return decode_ticket(reply[1]), [decode_ticket(m) for m in reply[2:]]

    async def remove(self, ticket_id: str) -> Ticket | None:
        member = await self._run("REMOVE", ticket_id)
        return None if member is None else decode_ticket(member)

    async def detach(self, ticket_id: str, until: float) -> Ticket | None:
        member = await self._run("DETACH", ticket_id, repr(until))
        return None if member is None else decode_ticket(member)

    async def reattach(self, ticket_id: str, identity: str) -> Ticket | None:
        member = await self._run("REATTACH", ticket_id, identity, self.node_id)
        return None if member is None else decode_ticket(member)

    async def pop_and_reserve(self, now: float) -> Grant | None:
        ttl = self.grant_ttl_s
        raw = await self._run(
            "POP_AND_RESERVE",
            repr(now),
            self.node_id,
            secrets.token_urlsafe(18),
            repr(now + ttl),
            max(1, int(ttl * 1000)),
            self._tier_pools,
            self._overflow,
        )
        return None if raw is None else self._grant(raw)

    async def delivered(self) -> list[Grant]:
        entries = await self._run("DELIVERED", self.node_id)
        return [self._grant(json.loads(_text(e))) for e in entries]

    async def release(self, ticket_id: str, now: float, *, served: bool) -> Ticket | None:
        member = await self._run("RELEASE", ticket_id, repr(now), "1" if served else "0", repr(SERVICE_ALPHA))
        return None if member is None else decode_ticket(member)

    async def line(self, now: float) -> LineState:
        _, total, times, nodes = await self._read("LINE", lambda epoch, version: [repr(now), epoch, version])
        busy = list(self.line_copy.busy.values())
        node_pool: dict[str, str] = {}
        pool_slots: dict[str, int] = {}
        for i in range(0, len(nodes), 3):
            node, pool, slots = _text(nodes[i]), _text(nodes[i + 1]), int(nodes[i + 2])
            node_pool[node] = pool
            pool_slots[pool] = pool_slots.get(pool, 0) + slots
        busy_nodes = [json.loads(_text(e))[2] for e in busy]
        return LineState(
            waiting=self.line_copy.waiting,
            busy=self._busy(busy, now),
            slots_total=max(1, int(total)),
            times=_times(times),
            pool_slots=pool_slots,
            busy_pools=[node_pool.get(n, "") for n in busy_nodes],
        )

    async def set_slots(self, total: int) -> None:
        self.slots_total = max(1, total)
        await self._run("SET_SLOTS", self.node_id, self.slots_total)

    async def restore_busy(self, grants: list[Grant], now: float) -> None:
        args: list[str | int] = [self.node_id]
        for grant in grants:
            args += [encode_ticket(grant.ticket, self.node_id), repr(grant.granted_at)]
        await self._run("RESTORE_BUSY", *args)

    async def find_detached(self, resume_key: str) -> str | None:
        found = await self._run("FIND_DETACHED", resume_key)
        return None if found is None else _text(found)

    # ----- introspection for tests -----

    async def identities(self) -> dict[str, int]:
        raw = await cast(Awaitable[dict[bytes, bytes]], self.client.hgetall(self.prefix + "ident"))
        return {_text(k): int(v) for k, v in raw.items()}

    async def detached_count(self) -> int:
        return int(await self.client.hlen(self.prefix + "det"))
