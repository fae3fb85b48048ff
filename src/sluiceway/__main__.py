"""``python -m sluiceway``: the same as the ``sluiceway`` command."""

from sluiceway.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
