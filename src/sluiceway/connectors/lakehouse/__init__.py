"""Lakehouse connectors: Parquet files, Delta Lake and Apache Iceberg tables.

One module per format, each importing its library (pyarrow, deltalake, pyiceberg) only
when used, so ``import sluiceway`` needs none of them; :mod:`.arrow` turns records into
Arrow tables for all three.  See ``docs/connectors/lakehouse.md``.
"""
