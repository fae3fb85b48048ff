"""Building a flow: errors at build time (clear, naming the operator and the user's line),
validation of the whole graph, and the physical plan (fusion and channel placement).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.errors import FlowDefinitionError
from sluiceway.plan import plan

HERE = "test_flow_build.py"


def f(x: Any) -> Any:
    return x


def g(x: Any) -> Any:
    return x


def this_line() -> int:
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    return frame.f_back.f_lineno


def src(values: Any = (1, 2, 3)) -> sw.sources.Iterable[Any]:
    return sw.sources.Iterable(list(values))


# -- whole-graph validation -----------------------------------------------------------


def test_no_source() -> None:
    flow = sw.Flow("empty")
    with pytest.raises(FlowDefinitionError, match=r"flow 'empty' has no source.*flow\.source"):
        flow.validate()
    with pytest.raises(FlowDefinitionError, match="no source"):
        sw.run(flow, handle_signals=False)


def test_no_sink() -> None:
    flow = sw.Flow("sinkless")
    flow.source(src()).map(f)
    with pytest.raises(FlowDefinitionError, match=r"flow 'sinkless' has no sink.*\.sink\("):
        flow.validate()
    with pytest.raises(FlowDefinitionError, match="no sink"):
        plan(flow)


def test_an_unconsumed_stream_names_the_operator_and_the_users_line() -> None:
    flow = sw.Flow("dangling")
    s = flow.source(src())
    s.map(f).sink(sw.sinks.Collect())
    s.filter(g)
    line = this_line() - 1
    with pytest.raises(FlowDefinitionError) as info:
        flow.validate()
    msg = str(info.value)
    assert "'filter_g'" in msg
    assert f"{HERE}:{line}" in msg
    assert "never consumed" in msg
    assert "'dangling'" in msg


def test_an_unconsumed_branch_output_is_reported() -> None:
    flow = sw.Flow("half")
    yes, _no = flow.source(src()).branch(f, name="split")
    yes.sink(sw.sinks.Collect())
    with pytest.raises(FlowDefinitionError, match="'split_false'"):
        flow.validate()


def test_the_error_is_raised_before_anything_runs() -> None:
    opened: list[str] = []

    class Watch(sw.sinks.Sink):
        async def open(self, ctx: sw.sinks.SinkContext) -> None:
            opened.append("sink")

        async def write(self, batch: sw.Batch) -> None:
            raise AssertionError("never")

    flow = sw.Flow("invalid")
    s = flow.source(src())
    s.sink(Watch())
    s.map(f)  # dangling
    with pytest.raises(FlowDefinitionError):
        sw.testing.run_flow(flow)
    assert opened == []


def test_definition_errors_are_value_errors() -> None:
    assert issubclass(FlowDefinitionError, ValueError)
    assert issubclass(FlowDefinitionError, sw.SluicewayError)


def test_operators_remember_where_they_were_defined() -> None:
    flow = sw.Flow("where")
    m = flow.source(src()).map(f)
    line = this_line() - 1
    assert m.node.where == f"{HERE}:{line}"
    assert f"defined at {HERE}:{line}" in m.node.describe()


# -- sources and sinks used twice -----------------------------------------------------


def test_the_same_sink_object_twice() -> None:
    flow = sw.Flow("twice")
    out = sw.sinks.Collect()
    s = flow.source(src())
    s.map(f).sink(out, name="first")
    with pytest.raises(FlowDefinitionError) as info:
        s.map(g).sink(out)
    msg = str(info.value)
    assert "Collect" in msg
    assert "'first'" in msg
    assert "merge" in msg  # names the fix


def test_the_same_source_object_twice() -> None:
    flow = sw.Flow("twice")
    source = src()
    flow.source(source, name="orig")
    with pytest.raises(FlowDefinitionError, match=r"already used by 'orig'.*one source object"):
        flow.source(source)


# -- names ----------------------------------------------------------------------------


def test_duplicate_explicit_names() -> None:
    flow = sw.Flow("names")
    s = flow.source(src(), name="x")
    with pytest.raises(FlowDefinitionError, match=r"operator name 'x' is already used in flow"):
        s.map(f, name="x")
    with pytest.raises(FlowDefinitionError, match="'x'"):
        s.sink(sw.sinks.Collect(), name="x")
    assert [n.name for n in flow.nodes] == ["x"]


@pytest.mark.parametrize("bad", ["", 5])
def test_invalid_names(bad: Any) -> None:
    flow = sw.Flow("names")
    with pytest.raises(TypeError, match="operator name must be a non-empty string"):
        flow.source(src()).map(f, name=bad)


def test_auto_names_are_deduplicated() -> None:
    flow = sw.Flow("auto")
    s = flow.source(src())
    a = s.map(f)
    b = a.map(f)
    c = b.map(f)
    d = c.filter(lambda x: True)
    e = d.filter(lambda x: True)
    h = e.merge(flow.source(src()))
    c2 = h.branch(g)
    c2[0].sink(sw.sinks.Collect())
    c2[1].sink(sw.sinks.Collect())
    names = [n.name for n in flow.nodes]
    assert names == [
        "source_Iterable",
        "map_f",
        "map_f_2",
        "map_f_3",
        "filter_lambda",
        "filter_lambda_2",
        "source_Iterable_2",
        "merge",
        "branch_g",
        "branch_g_true",
        "branch_g_false",
        "sink_Collect",
        "sink_Collect_2",
    ]
    assert len(set(names)) == len(names)


def test_auto_names_skip_explicit_ones() -> None:
    flow = sw.Flow("auto")
    s = flow.source(src()).map(g, name="map_f")
    assert s.map(f).node.name == "map_f_2"


def test_callable_objects_and_partials_get_readable_names() -> None:
    class Enrich:
        def __call__(self, x: Any) -> Any:
            return x

    flow = sw.Flow("auto")
    s = flow.source(src()).map(Enrich())
    assert s.node.name == "map_Enrich"


# -- argument types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s: s.map(5), TypeError, "map() expects a callable, got int 5"),
        (lambda s: s.filter("x"), TypeError, "filter() expects a callable, got str 'x'"),
        (lambda s: s.flat_map(None), TypeError, "flat_map() expects a callable, got NoneType"),
        (lambda s: s.inspect([]), TypeError, "inspect() expects a callable, got list []"),
        (lambda s: s.key_by(3), TypeError, "key_by() expects a callable, got int 3"),
        (lambda s: s.branch(1.5), TypeError, "branch() expects a callable, got float 1.5"),
        (lambda s: s.batch("3"), TypeError, "batch max_size must be an int, got str '3'"),
        (lambda s: s.buffer(0), ValueError, "buffer capacity must be >= 1, got 0"),
        (lambda s: s.buffer("10"), TypeError, "buffer capacity must be an int, got str '10'"),
        (
            lambda s: s.buffer(10, overflow="drop"),
            TypeError,
            "buffer overflow must be an sw.Overflow (BLOCK, DROP_NEWEST, DROP_OLDEST, FAIL), "
            "got 'drop'",
        ),
        (lambda s: s.merge(), TypeError, "merge() needs at least one other stream"),
        (lambda s: s.merge([1]), TypeError, "merge() expects streams, got list [1]"),
        (lambda s: s.merge(s), FlowDefinitionError, "the same stream is given twice"),
        (lambda s: s.sink([]), TypeError, "sink() expects a sluiceway Sink"),
        (lambda s: s.sink(print), TypeError, "sink() expects a sluiceway Sink"),
        (
            lambda s: s.map(f, on_error="retry"),
            TypeError,
            "map(): on_error must be sw.Fail(), sw.Retry(...) or sw.DeadLetter(sink), got 'retry'",
        ),
        (
            lambda s: s.sink(sw.sinks.Collect(), on_error=3),
            TypeError,
            "sink(): on_error must be",
        ),
        (
            lambda s: s.flow.source(src(), on_error=sw.Retry(3)),
            TypeError,
            "a malformed record cannot be retried",
        ),
    ],
)
def test_wrong_arguments_are_rejected_where_they_are_given(
    call: Any, error: type[Exception], message: str
) -> None:
    flow = sw.Flow("args")
    s = flow.source(src())
    before = len(flow.nodes)
    with pytest.raises(error) as info:
        call(s)
    assert message in str(info.value)
    assert len(flow.nodes) == before


def test_merge_capacity_is_checked() -> None:
    flow = sw.Flow("cap")
    a, b = flow.source(src()), flow.source(src())
    with pytest.raises(ValueError, match="merge capacity must be >= 1, got 0"):
        a.merge(b, capacity=0)


def test_flow_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="non-empty string"):
        sw.Flow("")
    with pytest.raises(ValueError, match="channel_capacity must be >= 1, got 0"):
        sw.Flow("x", channel_capacity=0)


def test_a_plain_list_as_source_gets_a_hint() -> None:
    flow = sw.Flow("hint")
    with pytest.raises(TypeError) as info:
        flow.source([1, 2, 3])  # type: ignore[arg-type]
    msg = str(info.value)
    assert "got list" in msg
    assert "flow.source(sw.sources.Iterable(...))" in msg
    with pytest.raises(TypeError, match="got int") as info2:
        flow.source(5)  # type: ignore[arg-type]
    assert "wrap it" not in str(info2.value)  # no misleading hint for a non-iterable


# -- merge ----------------------------------------------------------------------------


def test_merging_streams_of_different_flows() -> None:
    a, b = sw.Flow("a"), sw.Flow("b")
    sa, sb = a.source(src()), b.source(src())
    with pytest.raises(FlowDefinitionError, match=r"belongs to flow 'b', not 'a'"):
        sa.merge(sb)


def test_merging_keyed_with_unkeyed() -> None:
    flow = sw.Flow("mixed")
    keyed = flow.source(src()).key_by(f)
    plain = flow.source(src())
    with pytest.raises(FlowDefinitionError, match="all keyed or all unkeyed"):
        keyed.merge(plain)
    with pytest.raises(FlowDefinitionError, match="all keyed or all unkeyed"):
        plain.merge(keyed)
    assert isinstance(keyed.merge(flow.source(src()).key_by(g)), sw.KeyedStream)


# -- cycles ---------------------------------------------------------------------------


def _chain() -> tuple[sw.Flow, Any, Any]:
    flow = sw.Flow("loop")
    m1 = flow.source(src(), name="src").map(f, name="m1")
    m2 = m1.map(g, name="m2")
    m2.sink(sw.sinks.Collect(), name="out")
    return flow, m1.node, m2.node


def test_a_cycle_is_reported_naming_its_operators() -> None:
    flow, m1, m2 = _chain()
    m1.inputs.append(m2)
    m2.consumers.append(m1)
    with pytest.raises(FlowDefinitionError) as info:
        flow.validate()
    msg = str(info.value)
    assert "cycle" in msg
    assert "m1" in msg
    assert "m2" in msg
    assert "'loop'" in msg
    with pytest.raises(FlowDefinitionError, match="cycle"):
        plan(flow)


def test_a_self_loop_is_a_cycle() -> None:
    flow, m1, _ = _chain()
    m1.inputs.append(m1)
    m1.consumers.append(m1)
    with pytest.raises(FlowDefinitionError, match=r"cycle through operators m1"):
        flow.validate()


def test_a_cycle_through_the_source_is_a_cycle() -> None:
    flow, _, m2 = _chain()
    source = flow.nodes[0]
    source.inputs.append(m2)
    m2.consumers.append(source)
    with pytest.raises(FlowDefinitionError, match=r"cycle through operators src, m1, m2"):
        flow.validate()


def test_topological_order_puts_every_node_after_its_inputs() -> None:
    flow = sw.Flow("topo")
    a = flow.source(src(), name="a")
    b = flow.source(src(), name="b")
    m = b.map(f, name="mb").merge(a.map(g, name="ma"), name="merge")
    yes, no = m.branch(f, name="br")
    yes.sink(sw.sinks.Collect(), name="y")
    no.sink(sw.sinks.Collect(), name="n")
    order = flow.topological_order()
    pos = {n.name: i for i, n in enumerate(order)}
    assert len(order) == len(flow.nodes)
    for n in flow.nodes:
        for i in n.inputs:
            assert pos[i.name] < pos[n.name]


# -- plan: fusion and channels --------------------------------------------------------


def test_a_linear_chain_with_fan_out_is_one_stage() -> None:
    flow = sw.Flow("fused")
    s = flow.source(src(), name="src").map(f, name="m").filter(g, name="keep")
    s.flat_map(lambda x: [x], name="fm").inspect(f, name="look").sink(sw.sinks.Collect(), name="a")
    yes, no = s.key_by(f, name="k").branch(g, name="br")
    yes.batch(2, name="b").sink(sw.sinks.Collect(), name="bb")
    no.sink(sw.sinks.Collect(), name="c")
    s.sink(sw.sinks.Collect(), name="d")
    p = plan(flow)
    assert len(p.stages) == 1
    assert p.channels == []
    (stage,) = p.stages
    assert stage.head.name == "src"
    assert stage.channel is None
    assert stage.source is not None
    assert {n.name for n in stage.nodes} == {n.name for n in flow.nodes}
    assert set(p.stage_of.values()) == {0}
    text = p.describe()
    assert text.startswith("flow 'fused': 1 stage(s)")
    assert "stage 0: src -> m -> keep" in text


def test_merge_gets_a_stage_and_a_channel_with_one_writer_per_input() -> None:
    flow = sw.Flow("fanin")
    a = flow.source(src(), name="a").map(f, name="ma")
    b = flow.source(src(), name="b")
    c = flow.source(src(), name="c").filter(g, name="fc")
    a.merge(b, c, name="m").map(g, name="after").sink(sw.sinks.Collect(), name="out")
    p = plan(flow)
    assert [[n.name for n in st.nodes] for st in p.stages] == [
        ["a", "ma"],
        ["b"],
        ["c", "fc"],
        ["m", "after", "out"],
    ]
    (ch,) = p.channels
    assert ch.name == "m.in"
    assert ch.target.name == "m"
    assert [w.name for w in ch.writers] == ["ma", "b", "fc"]
    assert ch.capacity == 1024  # the flow's default
    assert ch.overflow is sw.Overflow.BLOCK
    assert p.stages[3].channel is ch
    assert p.stages[3].source is None
    assert "channel 'm.in': ma, b, fc => m (capacity 1024, block)" in p.describe()


def test_merge_capacity_and_the_flows_default_capacity() -> None:
    flow = sw.Flow("caps", channel_capacity=64)
    a, b = flow.source(src()), flow.source(src())
    c, d = flow.source(src()), flow.source(src())
    a.merge(b, name="m1").sink(sw.sinks.Collect())
    c.merge(d, name="m2", capacity=5).sink(sw.sinks.Collect())
    caps = {ch.name: ch.capacity for ch in plan(flow).channels}
    assert caps == {"m1.in": 64, "m2.in": 5}


@pytest.mark.parametrize("overflow", list(sw.Overflow))
def test_buffer_creates_a_channel_with_its_capacity_and_overflow(overflow: sw.Overflow) -> None:
    flow = sw.Flow("buffered")
    (
        flow.source(src(), name="src")
        .map(f, name="m")
        .buffer(7, overflow, name="buf")
        .map(g, name="after")
        .sink(sw.sinks.Collect(), name="out")
    )
    p = plan(flow)
    assert [[n.name for n in st.nodes] for st in p.stages] == [
        ["src", "m"],
        ["buf", "after", "out"],
    ]
    (ch,) = p.channels
    assert (ch.name, ch.capacity, ch.overflow, [w.name for w in ch.writers]) == (
        "buf.in",
        7,
        overflow,
        ["m"],
    )
    assert f"channel 'buf.in': m => buf (capacity 7, {overflow.value})" in p.describe()


def test_fan_out_across_a_boundary_keeps_the_other_branch_fused() -> None:
    flow = sw.Flow("split")
    s = flow.source(src(), name="src")
    s.buffer(3, name="buf").sink(sw.sinks.Collect(), name="slow")
    s.map(f, name="m").sink(sw.sinks.Collect(), name="fast")
    p = plan(flow)
    assert [[n.name for n in st.nodes] for st in p.stages] == [
        ["src", "m", "fast"],
        ["buf", "slow"],
    ]


def test_building_runs_nothing() -> None:
    calls: list[Any] = []
    flow = sw.Flow("lazy")
    flow.source(sw.sources.Generator(lambda: calls.append("factory") or iter([]))).map(
        calls.append
    ).sink(sw.sinks.Collect())
    plan(flow)
    assert calls == []


# -- numbers that used to get past the build: NaN, infinity, absurd ratios --------------

_NAN, _INF = float("nan"), float("inf")


def _it() -> Any:
    return iter([])


BAD_NUMBERS = [
    (lambda: sw.sources.Generator(_it, rate=_INF), r"rate must be a finite number > 0.*inf"),
    (lambda: sw.sources.Generator(_it, rate=_NAN), r"rate must be a finite number > 0.*nan"),
    (lambda: sw.Backoff(initial=_NAN), r"Backoff initial must be a finite number, got nan"),
    (lambda: sw.Backoff(multiplier=_INF), r"Backoff multiplier must be a finite number"),
    (lambda: sw.Backoff(max_delay=_NAN), r"Backoff max_delay must be a finite number"),
    (lambda: sw.Retry(_INF), r"Retry attempts must be a whole number of tries, got inf"),  # type: ignore[arg-type]
    (
        lambda: sw.windows.Sliding(10, 1e-6),
        r"Sliding\(10, 1e-06\) puts every record into 10,000,000 windows.*"
        r"slide of at least 0.001 s",
    ),
    (lambda: sw.windows.Tumbling(10, offset=_NAN), r"Tumbling offset must be a finite"),
    (lambda: sw.windows.Sliding(10, 5, offset=_INF), r"Sliding offset must be a finite"),
    (lambda: sw.Adaptive(tolerance=_INF), r"tolerance=...\) must be a finite number > 1.0"),
    (lambda: sw.Adaptive(baseline_rounds=_NAN), r"baseline_rounds=...\) must be an int >= 1"),  # type: ignore[arg-type]
    (lambda: sw.VirtualClock(start=_NAN), r"VirtualClock start must be a finite number"),
    (lambda: sw.sources.JsonLines("x", poll_interval=_INF), r"poll_interval must be a finite"),
    (
        lambda: sw.sources.NatsJetStream("nats://h", "S", "s", durable="d", ack_wait=_NAN),
        r"ack_wait must be a finite number > 0 seconds, got nan",
    ),
    (
        lambda: sw.sources.RabbitMQ("amqp://h", "q", reconnect_timeout=_INF),
        r"reconnect_timeout must be a finite number > 0 seconds or None \(no limit\), got inf",
    ),
    (
        lambda: sw.sources.Mqtt("h", "t", client_id="c", session_expiry=_INF),
        r"session_expiry must be a finite number of seconds > 0 \(None: no limit\), got inf",
    ),
    (
        lambda: sw.sinks.Parquet("out", max_file_age=_INF),
        r"max_file_age must be a finite number > 0 seconds or None",
    ),
    (
        lambda: sw.sinks.Delta("out", flush_interval=_INF),
        r"flush_interval must be a finite number > 0 seconds, got inf",
    ),
    (
        lambda: sw.sinks.Postgres("postgresql://h/db", "t", reconnect_timeout=_INF),
        r"reconnect_timeout must be a finite number >= 0 seconds or None",
    ),
]


@pytest.mark.parametrize(("make", "message"), BAD_NUMBERS)
def test_nan_infinite_and_absurd_numbers_are_refused_when_built(make: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_a_run_refuses_an_infinite_grace_period() -> None:
    flow = sw.Flow("grace")
    flow.source(sw.sources.Iterable([1])).sink(sw.sinks.Collect())
    with pytest.raises(ValueError, match="grace_period must be a finite number >= 0"):
        sw.run(flow, grace_period=_NAN, clock=sw.VirtualClock())


def test_a_backoff_past_its_cap_never_overflows() -> None:
    assert sw.Backoff(initial=0.5, max_delay=4.0, jitter=0.0).delay(5_000) == 4.0
    assert sw.Backoff(initial=0.0, max_delay=4.0, jitter=0.0).delay(5_000) == 0.0
