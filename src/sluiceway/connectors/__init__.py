"""Connectors: sources and sinks (memory, files, stdio, and brokers)."""
