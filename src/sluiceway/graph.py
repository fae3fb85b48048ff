"""Export a flow's graph as Mermaid or Graphviz DOT, with its fused stages visible.

Every operator is a node labelled with its name and kind; every stage of the physical plan
(:func:`sluiceway.plan.plan`) is a Mermaid ``subgraph`` or a DOT ``cluster`` holding the
operators fused into it.  Edges inside a stage are plain calls; an edge into a stage's
head crosses a channel and is drawn bold, labelled with the channel's name, capacity and
overflow policy.  Side outputs are labelled: a branch's ``true``/``false`` ports and a
window's ``late`` output.

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

from sluiceway.flow import Flow, Node
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.stateless import LateOutputSpec, PortSpec
from sluiceway.plan import ChannelPlan, PhysicalPlan, plan

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


def _node_id(node: Node) -> str:
    return f"n{node.id}"


def _port_label(node: Node) -> str | None:
    """The label of the edge into a side-output node, or None for an ordinary edge."""
    spec = node.spec
    if isinstance(spec, LateOutputSpec):
        return "late"
    if isinstance(spec, PortSpec):
        return "true" if spec.port == 0 else "false"
    return None


def _channel_label(channel: ChannelPlan) -> str:
    return f"{channel.name} (capacity {channel.capacity}, {channel.overflow.value})"


def _edges(physical: PhysicalPlan) -> list[tuple[Node, Node, str | None, ChannelPlan | None]]:
    """``(from, to, side-output label, channel)`` for every edge, in plan order."""
    channel_of = {id(ch.target): ch for ch in physical.channels}
    edges: list[tuple[Node, Node, str | None, ChannelPlan | None]] = []
    for stage in physical.stages:
        for node in stage.nodes:
            channel = channel_of.get(id(node))
            for upstream in node.inputs:
                edges.append((upstream, node, _port_label(node), channel))
    return edges


def to_mermaid(flow: Flow) -> str:
    """The flow as a Mermaid ``flowchart``: one ``subgraph`` per stage.

    Raises:
        FlowDefinitionError: when the flow is not valid (as :func:`sluiceway.plan.plan`).
    """
    physical = plan(flow)
    lines = [
        f"%% flow {_mermaid_text(flow.name)}: {len(physical.stages)} stage(s)",
        "flowchart LR",
    ]
    ports: list[str] = []
    for stage in physical.stages:
        lines.append(f'    subgraph stage_{stage.index}["stage {stage.index}"]')
        for node in stage.nodes:
            label = f"{_mermaid_text(node.name)}<br/>{_mermaid_text(node.kind)}"
            if isinstance(node.spec, SourceSpec | SinkSpec):
                lines.append(f'        {_node_id(node)}(["{label}"])')
            else:
                lines.append(f'        {_node_id(node)}["{label}"]')
            if isinstance(node.spec, PortSpec):
                ports.append(_node_id(node))
        lines.append("    end")
    for upstream, node, port, channel in _edges(physical):
        a, b = _node_id(upstream), _node_id(node)
        if channel is not None:
            lines.append(f'    {a} ==>|"{_mermaid_text(_channel_label(channel))}"| {b}')
        elif port is not None:
            lines.append(f'    {a} -->|"{port}"| {b}')
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
    physical = plan(flow)
    lines = [
        f'digraph "{_dot_text(flow.name)}" {{',
        "    rankdir=LR;",
        '    node [shape=box, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
    ]
    for stage in physical.stages:
        lines.append(f"    subgraph cluster_{stage.index} {{")
        lines.append(f'        label="stage {stage.index}";')
        lines.append("        style=rounded;")
        for node in stage.nodes:
            label = f"{_dot_text(node.name)}\\n{_dot_text(node.kind)}"
            attrs = [f'label="{label}"']
            if isinstance(node.spec, SourceSpec | SinkSpec):
                attrs.append("shape=oval")
            elif isinstance(node.spec, PortSpec):
                attrs.append("style=dashed")
            lines.append(f"        {_node_id(node)} [{', '.join(attrs)}];")
        lines.append("    }")
    for upstream, node, port, channel in _edges(physical):
        edge = f"    {_node_id(upstream)} -> {_node_id(node)}"
        if channel is not None:
            label = _dot_text(_channel_label(channel))
            lines.append(f'{edge} [label="{label}", style=bold, penwidth=2];')
        elif port is not None:
            lines.append(f'{edge} [label="{port}", style=dashed];')
        else:
            lines.append(f"{edge};")
    lines.append("}")
    return "\n".join(lines)


def render(flow: Flow, format: str = "mermaid") -> str:
    """The flow's graph in ``format`` (one of :data:`FORMATS`)."""
    if format == "mermaid":
        return to_mermaid(flow)
    if format == "dot":
        return to_dot(flow)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
