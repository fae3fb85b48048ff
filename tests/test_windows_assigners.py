"""Window assigners and session merging, checked against deliberately simple oracles."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.windows import Session, Sliding, Tumbling, seconds, ticks

instants = st.integers(-(10**12), 10**12)  # ticks (microseconds), both sides of the epoch
sizes = st.integers(1, 10**7)


def test_window_bounds_are_exact_where_float_modulo_is_not() -> None:
    assert Tumbling(0.1).windows(0.3) == [(0.3, 0.4)]
    assert Tumbling(0.1).windows(0.29999) == [(0.2, 0.3)]
    assert Tumbling(10).windows(1_700_000_009.999999) == [(1_700_000_000.0, 1_700_000_010.0)]


def test_half_open_bounds() -> None:
    assert Tumbling(10).windows(10.0) == [(10.0, 20.0)]
    assert Tumbling(10).windows(9.999999) == [(0.0, 10.0)]
    assert Tumbling(10, offset=3).windows(2.0) == [(-7.0, 3.0)]
    assert Tumbling(timedelta(minutes=1)).windows(61.0) == [(60.0, 120.0)]


@given(t=instants, size=sizes, offset=st.integers(-(10**8), 10**8))
def test_tumbling_matches_the_grid_oracle(t: int, size: int, offset: int) -> None:
    w = Tumbling(seconds(size), offset=seconds(offset))
    start = w.start_of(t)
    assert start <= t < start + w.size_ticks
    assert (start - offset) % w.size_ticks == 0


@given(t=instants, slide=st.integers(1, 1000), factor=st.integers(1, 7), extra=st.integers(0, 999))
def test_sliding_matches_a_brute_force_enumeration(
    t: int, slide: int, factor: int, extra: int
) -> None:
    size = slide * factor + min(extra, slide - 1) if factor > 1 else slide
    w = Sliding(seconds(size), seconds(slide))
    got = w.starts_of(t)
    # Oracle: every grid start within reach of t, tested one by one.
    first = (t - size) - (t - size) % slide
    expected = [s for s in range(first, t + 1, slide) if s <= t < s + size]
    assert sorted(got) == expected
    assert got == sorted(got, reverse=True)


def test_sliding_counts_and_guards() -> None:
    assert len(Sliding(30, 10).windows(25.0)) == 3
    assert Sliding(10, 10).windows(5.0) == Tumbling(10).windows(5.0)
    with pytest.raises(ValueError, match=r"slide .* must be <= size"):
        Sliding(10, 20)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Tumbling(0), "Tumbling size must be a finite duration of at least 1 micro"),
        (lambda: Tumbling(-5), r"got -5"),
        (lambda: Tumbling(float("inf")), "finite"),
        (lambda: Tumbling("10"), "seconds .float. or a timedelta, got '10'"),  # type: ignore[arg-type]
        (lambda: Session(0), "Session gap must be"),
        (lambda: Sliding(10, 0), "Sliding slide must be"),
    ],
)
def test_bad_durations_are_explained(make: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()  # type: ignore[operator]


def session_oracle(times: list[int], gap: int) -> list[tuple[int, int]]:
    """Sort, then cut wherever two consecutive records are gap or more apart."""
    out: list[tuple[int, int]] = []
    for t in sorted(times):
        if out and t < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], t + gap))
        else:
            out.append((t, t + gap))
    return out


def session_windows(times: list[int], gap: int) -> list[tuple[int, int]]:
    """The final sessions the window operator finds for records at ``times`` (ticks),
    arriving in that order, with a watermark bound that makes none of them late."""
    flow = sw.Flow("sessions")
    out: sw.sinks.Collect[sw.WindowResult] = sw.sinks.Collect()
    (
        flow.source(sw.sources.Iterable(times))
        .with_timestamps(seconds, max_out_of_orderness=10_000.0)
        .window(Session(seconds(gap)))
        .aggregate(sw.agg.count())
        .sink(out)
    )
    sw.testing.run_flow(flow, max_batch_size=7)
    return [(ticks(r.start), ticks(r.end)) for r in out.items if r.final]


@given(times=st.lists(st.integers(0, 500), max_size=60), gap=st.integers(1, 40))
def test_sessions_in_any_arrival_order_match_the_sorted_oracle(times: list[int], gap: int) -> None:
    assert session_windows(times, gap) == session_oracle(times, gap)


def test_a_late_record_bridges_two_sessions() -> None:
    two_s = ticks(2.0)
    assert session_windows([ticks(0.0), ticks(3.0)], two_s) == [
        (ticks(0.0), ticks(2.0)),
        (ticks(3.0), ticks(5.0)),
    ]
    # 1.5 s is less than 2 s from both: one session
    assert session_windows([ticks(0.0), ticks(3.0), ticks(1.5)], two_s) == [
        (ticks(0.0), ticks(5.0))
    ]
