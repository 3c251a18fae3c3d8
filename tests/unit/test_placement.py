"""Placement (domain/placement.py): each filter's verdict and words, the weighing, the scheduler's choice."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.placement import (
    DEFAULT_FILTERS,
    AntiAffinity,
    Candidate,
    Capacity,
    FewestServers,
    FreeCapacity,
    GiB,
    Labels,
    Pin,
    Placement,
    PlacementRequest,
    Scheduler,
    TemplateVersion,
    UpEnabled,
    filters_from_names,
    normalise,
    weighers_from_names,
)


def appliance(name: str, *, capacity_gib: float = 100, placed_gib: float = 0, servers: int = 0, up: bool = True,
              disabled: str = "", labels: dict[str, str] | None = None,
              templates: frozenset[str] = frozenset({"tiny@v3"})) -> Candidate:
    return Candidate(name=name, up=up, disabled=bool(disabled), disabled_reason=disabled, labels=labels or {},
                     capacity_bytes=int(capacity_gib * GiB), placed_bytes=int(placed_gib * GiB), servers=servers,
                     templates=templates)


def request(*, os_gib: float = 2, data_gib: float = 10, labels: dict[str, str] | None = None,
            avoid: frozenset[str] = frozenset(), pin: str = "") -> PlacementRequest:
    return PlacementRequest("tiny", "v3", int(os_gib * GiB), int(data_gib * GiB), labels or {}, avoid, pin)


# --- filters -----------------------------------------------------------------------------------------------

def test_pin_lets_only_the_named_appliance_through() -> None:
    assert Pin().reason(appliance("a"), request()) is None
    assert Pin().reason(appliance("a"), request(pin="a")) is None
    assert Pin().reason(appliance("b"), request(pin="a")) == "the request is pinned to a"


def test_up_enabled_rejects_a_silent_or_disabled_appliance() -> None:
    assert UpEnabled().reason(appliance("a"), request()) is None
    assert UpEnabled().reason(appliance("a", up=False), request()) == "down: no heartbeat"
    assert UpEnabled().reason(appliance("a", disabled="maintenance"), request()) == "disabled: maintenance"
    unexplained = dataclasses.replace(appliance("a"), disabled=True)
    assert UpEnabled().reason(unexplained, request()) == "disabled: no reason given"


def test_template_version_wants_a_ready_copy_of_that_version() -> None:
    assert TemplateVersion().reason(appliance("a"), request()) is None
    assert (TemplateVersion().reason(appliance("a", templates=frozenset({"tiny@v2"})), request())
            == "does not hold tiny@v3 (no ready copy)")


def test_capacity_counts_os_and_data_bytes_against_what_is_promised() -> None:
    assert Capacity().reason(appliance("a", capacity_gib=12), request()) is None  # exactly fits
    assert (Capacity().reason(appliance("a", capacity_gib=20, placed_gib=16.5), request())
            == "needs 12.0 GiB, 3.5 GiB free")
    # Overcommit stretches the capacity; lowered below what is placed, nothing is said to be free.
    assert Capacity(overcommit=1.5).reason(appliance("a", capacity_gib=20, placed_gib=16.5), request()) is None
    assert (Capacity(overcommit=0.5).reason(appliance("a", capacity_gib=20, placed_gib=16.5), request())
            == "needs 12.0 GiB, 0.0 GiB free")
    with pytest.raises(ValueError, match="overcommit must be a positive number"):
        Capacity(overcommit=0)


def test_labels_must_all_match() -> None:
    rack3 = appliance("a", labels={"rack": "3", "row": "b"})
    assert Labels().reason(rack3, request(labels={"rack": "3"})) is None
    assert Labels().reason(rack3, request()) is None
    assert (Labels().reason(appliance("a", labels={"rack": "2"}), request(labels={"rack": "3"}))
            == "label rack=3 wanted, has rack=2")
    assert Labels().reason(appliance("a"), request(labels={"rack": "3"})) == "label rack=3 wanted, has no rack"


def test_anti_affinity_avoids_the_named_appliances() -> None:
    assert AntiAffinity().reason(appliance("a"), request(avoid=frozenset({"b"}))) is None
    assert (AntiAffinity().reason(appliance("a"), request(avoid=frozenset({"a"})))
            == "the request avoids it (its group is already there)")


def test_candidate_labels_do_not_change_under_it() -> None:
    labels = {"rack": "3"}
    c = appliance("a", labels=labels)
    labels["rack"] = "4"
    assert c.labels == {"rack": "3"}


# --- weighing ----------------------------------------------------------------------------------------------

def test_normalise_maps_lowest_to_0_and_highest_to_1_and_equal_values_to_0() -> None:
    assert normalise([10.0, 20.0, 15.0]) == [0.0, 1.0, 0.5]
    assert normalise([-3.0, -1.0]) == [0.0, 1.0]
    assert normalise([7.0, 7.0, 7.0]) == [0.0, 0.0, 0.0]
    assert normalise([7.0]) == [0.0]
    assert normalise([]) == []


def test_weights_are_normalised_per_weigher_then_multiplied_and_summed() -> None:
    # a: most free, most servers; b: least free, fewest servers; c: in between on both.
    a = appliance("a", capacity_gib=300, servers=6)
    b = appliance("b", capacity_gib=100, servers=2)
    c = appliance("c", capacity_gib=200, servers=4)
    p = Scheduler(DEFAULT_FILTERS, [FreeCapacity(1.0), FewestServers(0.5)]).place([a, b, c], request())
    assert p.weights == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.75})
    assert p.chosen == "a" and p.rejected == {}


def test_multipliers_change_the_choice() -> None:
    roomy = appliance("roomy", capacity_gib=500, servers=9)
    quiet = appliance("quiet", capacity_gib=100, servers=1)
    by_room = Scheduler(weighers=weighers_from_names({"free_capacity": 1.0, "fewest_servers": 0.5}))
    by_count = Scheduler(weighers=weighers_from_names({"free_capacity": 1.0, "fewest_servers": 2.0}))
    assert by_room.place([roomy, quiet], request()).chosen == "roomy"
    assert by_count.place([roomy, quiet], request()).chosen == "quiet"
    # A negative multiplier stacks instead of spreading.
    stack = Scheduler(weighers=[FreeCapacity(-1.0)])
    assert stack.place([roomy, quiet], request()).chosen == "quiet"


def test_a_tie_goes_to_the_first_name_whatever_the_order() -> None:
    twins = [appliance("b"), appliance("c"), appliance("a")]
    for order in (twins, twins[::-1]):
        p = Scheduler().place(order, request())
        assert p.chosen == "a"
        assert p.weights == {"a": 0.0, "b": 0.0, "c": 0.0}  # all equal: every weigher gives 0


# --- the scheduler's answer --------------------------------------------------------------------------------

def test_rejections_name_the_first_filter_and_explain_says_it_all_in_one_line() -> None:
    p = Scheduler().place([appliance("a", capacity_gib=20, placed_gib=16.5), appliance("b"),
                           appliance("c", disabled="maintenance", placed_gib=99)], request())
    assert p.chosen == "b"
    # c is also full, but the first filter to reject it is the reason given.
    assert p.rejected == {"a": "capacity: needs 12.0 GiB, 3.5 GiB free", "c": "up_enabled: disabled: maintenance"}
    assert p.explain() == ("placed on b (weight 0.00); a: capacity: needs 12.0 GiB, 3.5 GiB free; "
                           "c: up_enabled: disabled: maintenance")
    assert p.as_dict() == {"chosen": "b", "weights": {"b": 0.0}, "rejected": p.rejected, "explain": p.explain()}


def test_a_request_pinned_to_a_rejected_appliance_is_refused_with_why() -> None:
    p = Scheduler().place([appliance("a"), appliance("b", up=False)], request(pin="b"))
    assert p.chosen is None and p.weights == {}
    assert p.rejected == {"a": "pin: the request is pinned to b", "b": "up_enabled: down: no heartbeat"}
    assert p.explain() == "not placed: a: pin: the request is pinned to b; b: up_enabled: down: no heartbeat"
    assert Scheduler().place([appliance("a"), appliance("b")], request(pin="b")).chosen == "b"


def test_a_request_pinned_to_an_unknown_appliance_says_so() -> None:
    p = Scheduler().place([appliance("a")], request(pin="zz"))
    assert p.chosen is None
    assert p.rejected["zz"] == "pin: no appliance named zz"


def test_no_candidates_places_nothing_and_says_why() -> None:
    p = Scheduler().place([], request())
    assert p == Placement(None, {}, {})
    assert p.explain() == "not placed: no appliance to place on"
    assert p.as_dict()["chosen"] is None


def test_candidate_names_must_not_repeat() -> None:
    with pytest.raises(ValueError, match="candidate names repeat: a"):
        Scheduler().place([appliance("a"), appliance("b"), appliance("a")], request())


def test_six_requests_in_a_row_spread_by_capacity_over_three_sizes() -> None:
    fleet = {n: appliance(n, capacity_gib=g) for n, g in (("small", 100), ("medium", 200), ("large", 300))}
    scheduler = Scheduler(weighers=[FreeCapacity()])
    chosen = []
    for _ in range(6):
        r = request(os_gib=10, data_gib=30)
        p = scheduler.place(list(fleet.values()), r)
        assert p.chosen is not None
        chosen.append(p.chosen)
        c = fleet[p.chosen]
        fleet[p.chosen] = dataclasses.replace(c, placed_bytes=c.placed_bytes + r.needed_bytes, servers=c.servers + 1)
    # Free after placement: large 260 220 180 | medium 160 | large 140 | medium 120 (small stays at 60).
    assert chosen == ["large", "large", "large", "medium", "large", "medium"]
    assert {n: c.placed_bytes // GiB for n, c in fleet.items()} == {"small": 0, "medium": 80, "large": 160}


# --- configuration -----------------------------------------------------------------------------------------

def test_filters_and_weighers_from_config_names() -> None:
    assert filters_from_names(["up_enabled", "capacity"], overcommit=2.0) == [UpEnabled(), Capacity(2.0)]
    assert filters_from_names(["pin", "up_enabled", "template_version", "capacity", "labels", "anti_affinity"]
                              ) == list(DEFAULT_FILTERS)
    assert weighers_from_names({"free_capacity": 1.0, "fewest_servers": 0.5}) == [FreeCapacity(1.0),
                                                                                   FewestServers(0.5)]


def test_unknown_names_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown placement filter 'ram'; known: anti_affinity, capacity, "
                                         r"labels, pin, template_version, up_enabled"):
        filters_from_names(["capacity", "ram"])
    with pytest.raises(ValueError, match=r"unknown placement weigher 'cpu'; known: fewest_servers, free_capacity"):
        weighers_from_names({"cpu": 1.0})
    with pytest.raises(ValueError, match="fewest_servers: multiplier must be a finite number"):
        weighers_from_names({"fewest_servers": float("nan")})


# --- property ----------------------------------------------------------------------------------------------

candidates = st.lists(
    st.builds(appliance, st.sampled_from("abcdefgh"), capacity_gib=st.integers(0, 64), placed_gib=st.integers(0, 64),
              servers=st.integers(0, 20), up=st.booleans(), disabled=st.sampled_from(["", "", "", "drain"]),
              labels=st.dictionaries(st.just("rack"), st.sampled_from("12"), max_size=1),
              templates=st.sets(st.sampled_from(["tiny@v3", "tiny@v2"])).map(frozenset)),
    max_size=8, unique_by=lambda c: c.name)
requests = st.builds(request, os_gib=st.integers(0, 8), data_gib=st.integers(0, 16),
                     labels=st.dictionaries(st.just("rack"), st.sampled_from("12"), max_size=1),
                     avoid=st.sets(st.sampled_from("abcdefgh"), max_size=3).map(frozenset),
                     pin=st.sampled_from(["", "", "", "a", "z"]))
multipliers = st.floats(-2, 2, allow_nan=False)


@given(candidates, requests, multipliers, multipliers)
def test_the_chosen_appliance_passes_every_filter_and_weighs_the_most(
        fleet: list[Candidate], r: PlacementRequest, free_m: float, count_m: float) -> None:
    scheduler = Scheduler(weighers=[FreeCapacity(free_m), FewestServers(count_m)])
    p = scheduler.place(fleet, r)
    names = {c.name for c in fleet}
    assert set(p.weights) | (set(p.rejected) & names) == names and not set(p.weights) & set(p.rejected)
    if p.chosen is None:
        assert p.weights == {} and p.explain().startswith("not placed: ")
        return
    chosen = next(c for c in fleet if c.name == p.chosen)
    assert all(f.reason(chosen, r) is None for f in DEFAULT_FILTERS)
    assert p.weights[p.chosen] == max(p.weights.values())
    assert p.chosen == min(n for n, w in p.weights.items() if w == p.weights[p.chosen])
