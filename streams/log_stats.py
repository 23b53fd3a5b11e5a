"""What one pass over a log saw (:func:`streams.log_infer.infer_schema` counts it), and the
editable TOML that ``headwater replay --inspect`` prints from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.log_schema import LogSchema

__all__ = ["ColumnStats", "LogStats", "LABEL_VALUES", "inspection_toml"]


@dataclass
class ColumnStats:
    """What one pass over the log saw in one column (``distinct`` is exact up to ``cap``)."""

    name: str
    distinct: int = 0
    distinct_capped: bool = False  # True: at least ``distinct`` values (counting stopped)
    cells: int = 0
    empty: int = 0
    with_separator: int = 0  # non-empty cells containing the multi-value separator
    with_other: dict[str, int] = field(default_factory=dict)  # cells with another list separator
    separator: str = ""  # the inferred list separator ("": not a multi-valued column)
    with_space: int = 0  # non-empty cells with a space between words (a title, a description)
    numeric: bool = True  # every non-empty cell parses as a finite float
    comma_decimal: bool = True  # every non-empty cell is a number with a decimal comma, or an integer
    integer: bool = True  # every non-empty cell is an integer
    varies_within_item: bool = False
    varies_within_user: bool = False

    def describe(self, sides: bool = True) -> str:
        d = f">= {self.distinct}" if self.distinct_capped else str(self.distinct)
        extra = f", {self.with_separator} cells with a separator" if self.with_separator else ""
        if self.separator not in ("", "|"):
            extra = f", {self.with_other[self.separator]} cells with the separator {self.separator!r}"
        if not sides:
            return f"distinct {d}, empty {self.empty}"
        return (f"distinct {d}, empty {self.empty}{extra}; varies within an item: "
                f"{'yes' if self.varies_within_item else 'no'}, within a user: "
                f"{'yes' if self.varies_within_user else 'no'}")


@dataclass
class LogStats:
    """Counts of one pass over a log: what ``headwater replay --inspect`` shows."""

    rows: int = 0
    bad_rows: int = 0
    skipped_rows: int = 0  # without a user or item, skipped (skip_empty_ids)
    bad_examples: list[str] = field(default_factory=list)  # the first few, "line N, column C: why"
    columns: dict[str, ColumnStats] = field(default_factory=dict)
    time_min: str | None = None  # ISO-8601, UTC
    time_max: str | None = None
    label_rate: float = float("nan")
    # The label column's most common cells, when they are not 0/1 (counted where the label
    # column has at most LABEL_VALUES distinct cells): what positive_values or
    # positive_threshold should say.
    label_values: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was guessed (streams.log_names)

    def summary(self) -> str:
        skipped = f", skipped {self.skipped_rows} (no user or item)" if self.skipped_rows else ""
        lines = [f"rows {self.rows}, bad rows {self.bad_rows}{skipped}, label rate {self.label_rate:.4f}",
                 f"time {self.time_min} .. {self.time_max}"]
        lines += [f"bad: {b}" for b in self.bad_examples]
        lines += [f"guessed: {n}" for n in self.notes]
        if self.label_values:
            cells = ", ".join(f"{v!r} {n}" for v, n in self.label_values)
            numeric = all(_is_number(v) for v, _ in self.label_values)
            lines.append(f"label cells: {cells}: set " + (
                "positive_threshold (label = value >= it)" if numeric else
                "positive_values = [the cells that count as positive]"))
        return "\n".join(lines)


LABEL_VALUES = 50


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def inspection_toml(schema: LogSchema, stats: LogStats) -> str:
    """The schema as editable TOML with the counts as comments (``headwater replay --inspect``)."""
    notes = {"": "Inferred by headwater replay --inspect; edit and pass back with --schema FILE.\n"
                 + stats.summary()}
    if schema.implicit:
        notes[""] += (f"\nno label column: every row is a positive, with {schema.negatives} sampled "
                      "negatives (name the label column with --label-col if the log has one)")
    if not schema.time_col:
        notes[""] += "\nno time column: the rows are taken in file order (name it with --time-col if there is one)"
    for name, cs in stats.columns.items():
        notes[name] = cs.describe()
    reserved = "\n".join(f"{col}: {stats.columns[col].describe(sides=False)}" for col in schema.reserved()
                         if col in stats.columns)
    if reserved:
        notes[""] += "\n" + reserved
    return schema.to_toml(notes)
