"""Flow graph export (`sluiceway.graph`, `sluiceway graph`): Mermaid and DOT."""

from __future__ import annotations

import html
import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sluiceway as sw
from sluiceway import cli, graph
from sluiceway.demo import build_demo_flow
from sluiceway.plan import plan

# A name with characters special to Mermaid and DOT (quotes, brackets, pipes, braces,
# backslash, a newline, semicolons, `end`), to check the escaping.
NASTY = 'we"ird [x] |y| {z} <b>&#;\\ end\nline'


def hand_built() -> sw.Flow:
    """Two sources merged, a branch, a buffer, a keyed window with a late output."""
    flow = sw.Flow("hand built", channel_capacity=64)
    a = flow.source(sw.sources.Iterable([1, 2, 3]), name="a")
    b = flow.source(sw.sources.Iterable([4, 5]), name="b")
    merged = a.merge(b, name="join", capacity=16)
    big, small = merged.branch(lambda x: x > 2, name="split")
    small.sink(sw.sinks.Collect(), name="smalls")
    buffered = big.buffer(8, sw.Overflow.DROP_OLDEST, name="buf")
    timed = buffered.with_timestamps(float, name="ts")
    windows = (
        timed.key_by(lambda x: x % 2)
        .window(sw.windows.Tumbling(1.0))
        .reduce(lambda x, y: x + y, name="sum_1s")
    )
    windows.sink(sw.sinks.Collect(), name="sums")
    windows.late().map(lambda r: r, name=NASTY).sink(sw.sinks.Collect(), name="late_sink")
    return flow


# -- parsing the output back ----------------------------------------------------------

MERMAID_NODE = re.compile(r'^\s*n(\d+)(?:\(\[|\[)"([^"]*)"(?:\]\)|\])$')
MERMAID_EDGE = re.compile(r'^\s*n(\d+) (-->|==>)(?:\|"([^"]*)"\|)? n(\d+)$')
DOT_NODE = re.compile(r'^\s*n(\d+) \[label="((?:[^"\\]|\\.)*)"(?:, [^\]]*)?\];$')
DOT_EDGE = re.compile(r'^\s*n(\d+) -> n(\d+)(?: \[label="((?:[^"\\]|\\.)*)"([^\]]*)\])?;$')


def mermaid_stages(text: str) -> dict[int, list[int]]:
    """Stage index -> node ids declared inside its subgraph."""
    stages: dict[int, list[int]] = {}
    current: int | None = None
    for line in text.splitlines():
        if m := re.match(r'^\s*subgraph stage_(\d+)\["stage \d+"\]$', line):
            current = int(m.group(1))
            stages[current] = []
        elif line.strip() == "end":
            current = None
        elif m := MERMAID_NODE.match(line):
            assert current is not None, f"node outside a stage: {line}"
            stages[current].append(int(m.group(1)))
    return stages


def dot_stages(text: str) -> dict[int, list[int]]:
    stages: dict[int, list[int]] = {}
    current: int | None = None
    for line in text.splitlines():
        if m := re.match(r"^\s*subgraph cluster_(\d+) \{$", line):
            current = int(m.group(1))
            stages[current] = []
        elif line.strip() == "}":
            current = None
        elif m := DOT_NODE.match(line):
            assert current is not None, f"node outside a cluster: {line}"
            stages[current].append(int(m.group(1)))
    return stages


def expected_stages(flow: sw.Flow) -> dict[int, list[int]]:
    return {st.index: [n.id for n in st.nodes] for st in plan(flow).stages}


def expected_edges(flow: sw.Flow) -> set[tuple[int, int]]:
    return {(i.id, n.id) for n in flow.nodes for i in n.inputs}


FLOWS = {"demo": build_demo_flow, "hand_built": hand_built}


@pytest.fixture(params=sorted(FLOWS))
def flow(request: pytest.FixtureRequest) -> sw.Flow:
    return FLOWS[request.param]()


# -- Mermaid --------------------------------------------------------------------------


def test_mermaid_has_each_operator_once_in_its_stage(flow: sw.Flow) -> None:
    text = graph.to_mermaid(flow)
    assert text.splitlines()[1] == "flowchart LR"
    stages = mermaid_stages(text)
    assert stages == expected_stages(flow)
    declared = [i for ids in stages.values() for i in ids]
    assert sorted(declared) == sorted(n.id for n in flow.nodes)  # each exactly once
    labels = [m.group(2) for line in text.splitlines() if (m := MERMAID_NODE.match(line))]
    for node in flow.nodes:
        wanted = f"{graph._mermaid_text(node.name)}<br/>{node.kind}"
        assert labels.count(wanted) == 1, node.name


STAGE_MEMBERS = {
    "demo": [
        ["clicks", "enrich", "event_time", "drop_bots", "is_purchase", "is_purchase_true",
         "is_purchase_false", "price"],
        ["merge", "window_1s", "summarize", "window_1s_late", "summaries", "late_clicks"],
    ],
    "hand_built": [
        ["a"],
        ["b"],
        ["join", "split", "split_true", "split_false", "smalls"],
        ["buf", "ts", "key_by_lambda", "sum_1s", "sums", "sum_1s_late", NASTY, "late_sink"],
    ],
}  # fmt: skip


@pytest.mark.parametrize("which", sorted(FLOWS))
def test_stage_members_by_name(which: str) -> None:
    flow = FLOWS[which]()
    names = {n.id: n.name for n in flow.nodes}
    for text, parse in ((graph.to_mermaid(flow), mermaid_stages), (graph.to_dot(flow), dot_stages)):
        stages = parse(text)
        got = [sorted(names[i] for i in stages[k]) for k in sorted(stages)]
        assert got == [sorted(members) for members in STAGE_MEMBERS[which]]


def test_mermaid_edges_channels_and_side_outputs(flow: sw.Flow) -> None:
    text = graph.to_mermaid(flow)
    edges = [m.groups() for line in text.splitlines() if (m := MERMAID_EDGE.match(line))]
    assert {(int(a), int(b)) for a, _, _, b in edges} == expected_edges(flow)
    assert len(edges) == len(expected_edges(flow))
    physical = plan(flow)
    thick = {(int(a), int(b)): label for a, arrow, label, b in edges if arrow == "==>"}
    want = {
        (w.id, ch.target.id): f"{ch.name} (capacity {ch.capacity}, {ch.overflow.value})"
        for ch in physical.channels
        for w in ch.writers
    }
    assert thick == want
    by_name = {n.name: n.id for n in flow.nodes}
    labelled = {(int(a), int(b)): label for a, arrow, label, b in edges if arrow == "-->"}
    if flow.name == "hand built":
        assert labelled[(by_name["split"], by_name["split_true"])] == "true"
        assert labelled[(by_name["split"], by_name["split_false"])] == "false"
        assert labelled[(by_name["sum_1s"], by_name["sum_1s_late"])] == "late"
        assert set(want.values()) == {
            "join.in (capacity 16, block)",
            "buf.in (capacity 8, drop_oldest)",
        }
    else:
        assert labelled[(by_name["is_purchase"], by_name["is_purchase_true"])] == "true"
        assert labelled[(by_name["window_1s"], by_name["window_1s_late"])] == "late"
        assert set(want.values()) == {"merge.in (capacity 1024, block)"}


def test_mermaid_escapes_names() -> None:
    text = graph.to_mermaid(hand_built())
    body = text.split("\n", 2)[2]  # past the comment and the header
    for ch in '"[]|{}<>&\\\n':
        assert ch not in graph._mermaid_text(NASTY)
    # The only quotes, brackets and pipes are the syntax's own: every line parses.
    for line in body.splitlines():
        assert (
            MERMAID_NODE.match(line)
            or MERMAID_EDGE.match(line)
            or re.match(r'^\s*(subgraph stage_\d+\["stage \d+"\]|end|classDef .*|class .*)$', line)
        ), line
    assert "we#34;ird #91;x#93; #124;y#124; #123;z#125;" in text
    assert graph._mermaid_text("a\nb") == "a#10;b"
    assert "%% flow hand built: 4 stage(s)" in text


# -- DOT ------------------------------------------------------------------------------


def test_dot_has_each_operator_once_clusters_and_channels(flow: sw.Flow) -> None:
    text = graph.to_dot(flow)
    assert text.startswith(f'digraph "{flow.name}" {{\n')
    assert text.endswith("\n}")
    stages = dot_stages(text)
    assert stages == expected_stages(flow)
    assert sorted(i for ids in stages.values() for i in ids) == sorted(n.id for n in flow.nodes)
    edges = [m.groups() for line in text.splitlines() if (m := DOT_EDGE.match(line))]
    assert {(int(a), int(b)) for a, b, _, _ in edges} == expected_edges(flow)
    bold = {(int(a), int(b)): label for a, b, label, rest in edges if "style=bold" in (rest or "")}
    want = {
        (w.id, ch.target.id): f"{ch.name} (capacity {ch.capacity}, {ch.overflow.value})"
        for ch in plan(flow).channels
        for w in ch.writers
    }
    assert bold == want
    labels = [m.group(2) for line in text.splitlines() if (m := DOT_NODE.match(line))]
    for node in flow.nodes:
        assert labels.count(f"{graph._dot_text(node.name)}\\n{node.kind}") == 1


def test_dot_escapes_names() -> None:
    text = graph.to_dot(hand_built())
    assert graph._dot_text(NASTY) == 'we\\"ird [x] |y| {z} <b>&amp;#;\\\\ end\\nline'
    assert graph._dot_text(NASTY) in text
    assert graph._dot_text('say "hi"') == 'say \\"hi\\"'
    # every line is a known statement: nothing leaked out of a quoted string
    for line in text.splitlines()[4:-1]:
        assert (
            DOT_NODE.match(line)
            or DOT_EDGE.match(line)
            or re.match(
                r'^\s*(subgraph cluster_\d+ \{|label="stage \d+";|style=rounded;|\})$', line
            )
        ), line


def test_dot_is_valid_for_graphviz(flow: sw.Flow) -> None:
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("Graphviz `dot` is not installed: cannot validate the DOT output")
    proc = subprocess.run(
        [dot, "-Tsvg"],
        input=graph.to_dot(flow),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.count('class="cluster"') == len(plan(flow).stages)
    assert proc.stdout.count('class="node"') == len(flow.nodes)
    assert proc.stdout.count('class="edge"') == len(expected_edges(flow))
    for node in flow.nodes:  # names arrive intact (a newline starts a new text line)
        for part in node.name.split("\n"):
            assert f">{html.escape(part)}</text>" in proc.stdout, node.name


def test_render_and_invalid_flows() -> None:
    flow = hand_built()
    assert graph.render(flow) == graph.to_mermaid(flow)
    assert graph.render(flow, "dot") == graph.to_dot(flow)
    with pytest.raises(ValueError, match="format must be one of mermaid, dot"):
        graph.render(flow, "svg")
    dangling = sw.Flow("dangling")
    dangling.source(sw.sources.Iterable([1]))
    with pytest.raises(sw.FlowDefinitionError, match="has no sink"):
        graph.to_mermaid(dangling)


# -- the command ----------------------------------------------------------------------

JOBS = """
import sluiceway as sw

flow = sw.Flow("small")
flow.source(sw.sources.Iterable(range(5)), name="nums").map(
    lambda x: x * 10, name="times_ten").sink(sw.sinks.Stdout(), name="out")

def dangling():
    f = sw.Flow("dangling")
    f.source(sw.sources.Iterable([1]))
    return f
"""


@pytest.fixture(autouse=True)
def _no_global_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "graphjobs.py").write_text(JOBS)
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("graphjobs", None)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_graph_demo_defaults_to_mermaid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["graph", "sluiceway.demo:build_demo_flow"], capsys)
    assert (code, err) == (0, "")
    assert out == graph.to_mermaid(build_demo_flow()) + "\n"


def test_cli_graph_dot(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["graph", "graphjobs:flow", "--format", "dot"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith('digraph "small" {')
    assert 'n1 [label="times_ten\\nmap"];' in out
    code, out, _ = run_cli(["graph", "graphjobs.py:flow", "--format", "mermaid"], capsys)
    assert code == 0
    assert 'n1["times_ten<br/>map"]' in out


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("no_such_module_xyz:flow", 2),
        ("graphjobs:nothing", 2),
        ("graphjobs", 2),
        ("missing.py:flow", 2),
        ("graphjobs:dangling", 1),
    ],
)
def test_cli_graph_bad_target_matches_run(
    workdir: Path, capsys: pytest.CaptureFixture[str], target: str, code: int
) -> None:
    got, out, err = run_cli(["graph", target], capsys)
    assert got == code
    assert out == ""
    assert err.startswith("sluiceway: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert (got, err) == run_cli(["run", target, "--describe"], capsys)[::2]


def test_cli_graph_bad_format_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["graph", "sluiceway.demo:build_demo_flow", "--format", "svg"])
    assert info.value.code == 2
    assert "invalid choice: 'svg'" in capsys.readouterr().err
