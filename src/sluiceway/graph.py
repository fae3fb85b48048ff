"""Export a flow's graph as Mermaid or Graphviz DOT, with its fused stages visible.

Every operator is a node labelled with its name and kind; every stage of the physical plan
is a Mermaid ``subgraph`` or a DOT ``cluster`` holding the operators fused into it.  Edges
inside a stage are plain calls; an edge into a stage's head crosses a channel and is drawn
bold, labelled with the channel's name, capacity and overflow policy.  Side outputs are
labelled: a branch's ``true``/``false`` ports and a window's ``late`` output.  All of it is
read from the plan's plain description of the flow (:func:`sluiceway.plan.topology`).

>>> import sluiceway as sw
>>> flow = sw.Flow("tiny")
>>> flow.source(sw.sources.Iterable([1]), name="nums").sink(sw.sinks.Collect(), name="out")
>>> print(to_mermaid(flow))
%% flow tiny: 1 stage(s)
flowchart LR
    subgraph stage_0["stage 0"]
        n0(["nums<br/>source"])
        n1(["out<br/>sink"])
    end
    n0 --> n1

Operator names are user text: node identifiers are generated (``n<id>``) and names appear
only in escaped, quoted labels, so any name is safe in either format.
"""

from __future__ import annotations

from sluiceway.core.topology import Topology, TopologyChannel, TopologyEdge, TopologyNode
from sluiceway.flow import Flow
from sluiceway.plan import topology

__all__ = ["FORMATS", "render", "to_dot", "to_mermaid"]

FORMATS = ("mermaid", "dot")
"""The formats :func:`render` (and ``sluiceway graph --format``) accepts."""

_MERMAID_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:/()+=*'"
)


def _mermaid_text(text: str) -> str:
    """``text`` for a quoted Mermaid label: anything unusual as an entity code (``#35;``)."""
    return "".join(c if c in _MERMAID_SAFE else f"#{ord(c)};" for c in text)


def _dot_text(text: str) -> str:
    """``text`` for a double-quoted DOT string: backslashes and quotes escaped, and ``&``
    as ``&amp;`` (Graphviz reads entity references such as ``&lt;`` in labels)."""
    escaped = text.replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return escaped.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


def _node_id(node_id: int) -> str:
    return f"n{node_id}"


def _edges(topo: Topology) -> list[tuple[TopologyEdge, TopologyChannel | None]]:
    """Every edge with the channel it crosses (None: a call inside a stage), in plan order."""
    channels = {ch.name: ch for ch in topo.channels}
    return [(e, None if e.channel is None else channels[e.channel]) for e in topo.edges]


def _members(topo: Topology) -> dict[int, list[TopologyNode]]:
    """The nodes of each stage, in order."""
    by_id = {n.id: n for n in topo.nodes}
    return {st.index: [by_id[i] for i in st.nodes] for st in topo.stages}


def to_mermaid(flow: Flow) -> str:
    """The flow as a Mermaid ``flowchart``: one ``subgraph`` per stage.

    Raises:
        FlowDefinitionError: when the flow is not valid (as :func:`sluiceway.plan.plan`).
    """
    topo = topology(flow)
    members = _members(topo)
    lines = [
        f"%% flow {_mermaid_text(flow.name)}: {len(topo.stages)} stage(s)",
        "flowchart LR",
    ]
    ports: list[str] = []
    for stage in topo.stages:
        lines.append(f'    subgraph stage_{stage.index}["stage {stage.index}"]')
        for node in members[stage.index]:
            label = f"{_mermaid_text(node.name)}<br/>{_mermaid_text(node.kind)}"
            if node.endpoint:
                lines.append(f'        {_node_id(node.id)}(["{label}"])')
            else:
                lines.append(f'        {_node_id(node.id)}["{label}"]')
            if node.side_output:
                ports.append(_node_id(node.id))
        lines.append("    end")
    for edge, channel in _edges(topo):
        a, b = _node_id(edge.source), _node_id(edge.target)
        if channel is not None:
            lines.append(f'    {a} ==>|"{_mermaid_text(channel.label())}"| {b}')
        elif edge.port is not None:
            lines.append(f'    {a} -->|"{edge.port}"| {b}')
        else:
            lines.append(f"    {a} --> {b}")
    if ports:
        lines.append("    classDef side stroke-dasharray: 4 3")
        lines.append(f"    class {','.join(ports)} side")
    return "\n".join(lines)


def to_dot(flow: Flow) -> str:
    """The flow as a Graphviz ``digraph``: one ``cluster`` subgraph per stage.

    Raises:
        FlowDefinitionError: when the flow is not valid (as :func:`sluiceway.plan.plan`).
    """
    topo = topology(flow)
    members = _members(topo)
    lines = [
        f'digraph "{_dot_text(flow.name)}" {{',
        "    rankdir=LR;",
        '    node [shape=box, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
    ]
    for stage in topo.stages:
        lines.append(f"    subgraph cluster_{stage.index} {{")
        lines.append(f'        label="stage {stage.index}";')
        lines.append("        style=rounded;")
        for node in members[stage.index]:
            label = f"{_dot_text(node.name)}\\n{_dot_text(node.kind)}"
            attrs = [f'label="{label}"']
            if node.endpoint:
                attrs.append("shape=oval")
            elif node.side_output:
                attrs.append("style=dashed")
            lines.append(f"        {_node_id(node.id)} [{', '.join(attrs)}];")
        lines.append("    }")
    for edge, channel in _edges(topo):
        line = f"    {_node_id(edge.source)} -> {_node_id(edge.target)}"
        if channel is not None:
            label = _dot_text(channel.label())
            lines.append(f'{line} [label="{label}", style=bold, penwidth=2];')
        elif edge.port is not None:
            lines.append(f'{line} [label="{edge.port}", style=dashed];')
        else:
            lines.append(f"{line};")
    lines.append("}")
    return "\n".join(lines)


def render(flow: Flow, format: str = "mermaid") -> str:
    """The flow's graph in ``format`` (one of :data:`FORMATS`)."""
    if format == "mermaid":
        return to_mermaid(flow)
    if format == "dot":
        return to_dot(flow)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
