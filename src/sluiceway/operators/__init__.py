"""Operators: logical specs (what the user asked for) and the steps that run them.

Every operator is a frozen *spec* in the logical graph and builds a :class:`Step` for the
runtime.  A step receives micro-batches with :meth:`Step.push`, control messages with
:meth:`Step.control` and end of input with :meth:`Step.finish`, and hands its output to
its children -- fused steps call each other directly, a channel boundary is just a child
that sends into a channel.
"""
