"""The core: contracts and in-band types every other layer imports, importing none of them.

See ``docs/architecture.md`` ("Layers and imports").
"""
