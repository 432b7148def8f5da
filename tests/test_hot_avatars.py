"""Hot avatars: the sliding use count, the bounded queue boost (a property test over any tier
set-up) and the worker choice that keeps a hot avatar's streams where it is loaded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.avatars.hot import HotAvatars
from inference.pool import choose_worker
from stream_server.admission.admission import Admission
from stream_server.admission.memory import MemoryAdmissionStore
from stream_server.admission.owner import TicketOwner
from stream_server.admission.policy import HOT_BOOST_MARGIN_S, AdmissionPolicy
from stream_server.settings import QueueSettings, TierSettings
from tests.test_admission import run


def test_an_avatar_is_hot_after_more_than_the_threshold_within_the_window() -> None:
    hot = HotAvatars(hot_after=3, window_s=10.0)
    for t in (0.0, 1.0, 2.0):
        hot.record("a", now=t)
    assert not hot.is_hot("a", now=2.0)  # 3 uses: not more than 3
    hot.record("a", now=3.0)
    assert hot.is_hot("a", now=3.0) and hot.uses("a", now=3.0) == 4
    assert not hot.is_hot("a", now=10.5)  # the first use left the window
    assert hot.uses("a", now=20.0) == 0
    for t in range(5):
        hot.record("b", now=30.0 + t)
        hot.record("c", now=30.0 + t)
    hot.record("c", now=35.0)
    hot.record("d", now=35.0)
    assert hot.hottest(5, now=35.0) == ["c", "b"]
    hot.forget("c")
    assert hot.hottest(5, now=35.0) == ["b"]


waits = st.lists(st.floats(min_value=0.0, max_value=5000.0, allow_nan=False), min_size=1, max_size=4).map(sorted)


@settings(max_examples=300, deadline=None)
@given(
    waits=waits,
    boost=st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False),
    joined=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    later=st.floats(min_value=0.0, max_value=5000.0, allow_nan=False),
    data=st.data(),
)
def test_the_boost_is_bounded_and_never_passes_a_higher_tier(
    waits: list[float], boost: float, joined: float, later: float, data: st.DataObject
) -> None:
    names = [f"t{i}" for i in range(len(waits))]
    tiers = {n: TierSettings(max_wait_s=w) for n, w in zip(names, waits, strict=True)}
    policy = AdmissionPolicy(QueueSettings(hot_boost_s=boost, tiers=tiers))
    low = data.draw(st.integers(min_value=0, max_value=len(names) - 1))
    plain = policy.order_key(names[low], joined)
    boosted = policy.order_key(names[low], joined, hot=True)
    # within its own tier: earlier by at most hot_boost_s, never later, never before its join
    assert plain - boost - 1e-6 <= boosted <= plain
    assert boosted >= joined - 1e-6
    # never ahead of a higher-tier ticket (hot or not) that joined at the same time or before it:
    # keys at most equal (then the earlier arrival goes first), strictly after once boosted
    for high in names[:low]:
        for hot in (False, True):
            for key in (policy.order_key(high, joined - later, hot=hot), policy.order_key(high, joined, hot=hot)):
                assert key <= boosted
                assert key < boosted or boosted == plain


def test_the_default_tiers_give_the_full_boost_within_their_bands() -> None:
    policy = AdmissionPolicy(QueueSettings())
    assert policy.hot_boost("vip") == policy.hot_boost("normal") == policy.hot_boost("low") == 30.0
    tight = AdmissionPolicy(
        QueueSettings(tiers={"vip": TierSettings(max_wait_s=100), "normal": TierSettings(max_wait_s=110),
                             "low": TierSettings(max_wait_s=110)})
    )
    assert abs(tight.hot_boost("normal") - (10 - HOT_BOOST_MARGIN_S)) < 1e-9
    assert tight.hot_boost("low") == 0.0  # no room above it: no boost


def test_a_stream_goes_to_the_worker_holding_its_avatar_unless_that_lengthens_the_wait() -> None:
    assert choose_worker([0, 0], [False, True]) == 1
    assert choose_worker([2, 3], [False, True]) == 1  # one stream more: still there
    assert choose_worker([2, 4], [False, True]) == 0  # two more: the least loaded
    assert choose_worker([1, 0], [False, False]) == 1
    assert choose_worker([3, 2, 2], [True, False, True]) == 2


def test_a_hot_ticket_passes_its_own_tier_within_the_bound_but_never_a_higher_tier() -> None:
    cfg = QueueSettings(hot_boost_s=30.0)
    queue: Admission[TicketOwner] = Admission(AdmissionPolicy(cfg), MemoryAdmissionStore(list(cfg.tiers), 1))
    run(queue.join("busy", "u0", "normal", "a", 0.0))
    assert run(queue.grant(0.0)) is not None  # the only slot is taken
    run(queue.join("early", "u1", "normal", "cold", 0.0))
    run(queue.join("too-late", "u2", "normal", "cold", 1.0))
    run(queue.join("vip", "u3", "vip", "cold", 20.0))
    run(queue.join("hot", "u4", "normal", "hot", 20.0, hot=True))  # 20 s after "early": within 30 s
    run(queue.join("hot-late", "u5", "normal", "hot", 40.0, hot=True))  # 40 s after: not ahead of it
    order = [t.id for t in run(queue.view(40.0)).waiting]
    assert order == ["vip", "hot", "early", "too-late", "hot-late"]
