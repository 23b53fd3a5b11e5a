"""The log world as a user would bring a real log: a CSV/Parquet file and its schema TOML.

Why: the log reader, schema inference and ``headwater replay`` are developed against files, so
the synthetic log is written the way a real one arrives, with the schema a user would write.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from streams.log_schema import ColumnSpec, LogSchema
from streams.log_world import generate_log
from streams.log_world_config import LogWorldConfig


def log_world_schema() -> LogSchema:
    """The schema of ``generate_log``'s table, as a user would write it for their own log."""
    return LogSchema(columns=(
        ColumnSpec("gender", "categorical", side="user"),
        ColumnSpec("age", "numeric", side="user"),
        ColumnSpec("occupation", "categorical", side="user"),
        ColumnSpec("brand", "categorical", side="item"),
        ColumnSpec("genres", "multi", side="item"),
        ColumnSpec("year", "numeric", side="item"),
    ))


def schema_path_for(path: str | Path) -> Path:
    """``log.csv.gz`` -> ``log.schema.toml`` (next to the log)."""
    path = Path(path)
    stem = path.name
    for ext in (".csv.gz", ".csv", ".parquet"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return path.with_name(stem + ".schema.toml")


def write_log(cfg: LogWorldConfig, path: str | Path) -> tuple[Path, Path]:
    """Writes the log to ``path`` (``.csv``, ``.csv.gz`` or ``.parquet``, by extension) and its
    schema TOML beside it (:func:`schema_path_for`); returns (log path, schema path)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".csv", ".csv.gz", ".parquet")):
        raise ValueError(f"{path}: the extension must be .csv, .csv.gz or .parquet")
    table = generate_log(cfg)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        import pyarrow.csv as pacsv

        if name.endswith(".gz"):
            with pa.CompressedOutputStream(str(path), "gzip") as out:
                pacsv.write_csv(table, out)
        else:
            pacsv.write_csv(table, path)
    schema_path = schema_path_for(path)
    schema_path.write_text(log_world_schema().to_toml())
    return path, schema_path
