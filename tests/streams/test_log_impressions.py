"""An impression log (MIND's behaviors.tsv: the items a page showed, ``-1`` where clicked) is
read as one row per shown item, all of one request."""

import numpy as np
import pytest

from streams.events import SchemaError
from streams.log_infer import infer_schema, schema_for
from streams.log_reader import encode_log, request_ids
from streams.log_schema import LogSchema


def _mind_rows(n: int = 300, seed: int = 0) -> list[list[str]]:
    """impression id, user, time (US, 12-hour), history (spaces), impressions (ITEM-LABEL)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        user = f"U{rng.integers(40)}"
        hour = i % 12 + 1
        when = f"11/{9 + i // 100}/2019 {hour}:{i % 60:02d}:{i % 47:02d} {'AM' if i % 2 else 'PM'}"
        history = " ".join(f"N{x}" for x in rng.integers(0, 30, rng.integers(0, 4)))
        shown = rng.choice(60, rng.integers(2, 6), replace=False)
        clicked = rng.integers(len(shown))
        impressions = " ".join(f"N{s}-{int(k == clicked)}" for k, s in enumerate(shown))
        rows.append([str(i + 1), user, when, history, impressions])
    return rows


def _write_tsv(path, rows, header=None):
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


HEADER = ["impression_id", "user_id", "time", "history", "impressions"]


def test_mind_behaviors_read_as_one_row_per_shown_item_with_its_label(tmp_path):
    rows = _mind_rows()
    path = _write_tsv(tmp_path / "behaviors.tsv", rows, HEADER)
    schema, stats = infer_schema(path)
    assert schema.impressions_col == "impressions" and schema.item_col == "item_id" and schema.label_col == "label"
    assert schema.time_col == "time" and schema.time_format == "%m/%d/%Y %I:%M:%S %p"
    assert not schema.implicit and stats.bad_rows == 0
    assert schema.column("history").kind == "multi" and schema.column("history").separator == " "
    assert schema.column("impression_id").kind == "ignore"  # one value per page: a row's own id
    assert any(n.startswith("impressions_col = 'impressions'") for n in stats.notes)
    log = encode_log(path, schema)
    shown = [t for r in rows for t in r[4].split()]
    assert len(log) == len(shown) and not log.bad_rows
    assert log.label.sum() == len(rows)  # one click per page
    # Every page is one request, its items' rows one line of the file.
    starts, _ = request_ids(log, "t")
    assert len(starts) - 1 == len(rows)
    for lo, hi in zip(starts[:20], starts[1:21]):
        assert len(np.unique(log.source_line[lo:hi])) == 1
    # A shown item's label is its token's end, on the line it came from (line 1: the header).
    for line in (2, 50, 301):
        want = sorted(int(t.rsplit("-", 1)[1]) for t in rows[line - 2][4].split())
        assert sorted(log.label[log.source_line == line].astype(int).tolist()) == want
    # 11/9/2019 1:00:00 PM is 13:00 UTC.
    first = log.ts_ms[log.source_line == 2][0]
    assert np.datetime64(int(first), "ms") == np.datetime64("2019-11-09T13:00:00")


def test_a_headerless_mind_export_finds_its_impressions_user_and_time_by_content(tmp_path):
    path = _write_tsv(tmp_path / "behaviors.tsv", _mind_rows())
    schema = schema_for(path)
    # column_1 numbers every page (all distinct): not the user.
    assert (schema.user_col, schema.time_col, schema.impressions_col) == ("column_2", "column_3", "column_5")
    assert schema.time_format.startswith("%m/%d/%Y")
    assert len(encode_log(path, schema)) == sum(len(r[4].split()) for r in _mind_rows())


def test_an_impressions_list_beside_the_clicked_item_labels_that_item_only(tmp_path):
    text = "user_id,ts,item_id,impressions\n" + "\n".join(
        f"u{i % 7},{1_600_000_000 + i},{i % 5 + 1},1|2|3|4|5" for i in range(40)) + "\n"
    path = tmp_path / "clickouts.csv"
    path.write_text(text)
    schema = schema_for(path)
    assert schema.impressions_col == "impressions" and schema.label_col == "label"
    log = encode_log(path, schema)
    assert len(log) == 200 and log.label.sum() == 40
    clicked = {line: str(i % 5 + 1) for i, line in enumerate(range(2, 42))}
    item_of = {}  # item ids are hashed: map each back through the lines that click it
    for line, item in clicked.items():
        rows = np.flatnonzero((log.source_line == line) & (log.label == 1))
        assert len(rows) == 1
        item_of.setdefault(item, log.item_id[rows[0]])
        assert log.item_id[rows[0]] == item_of[item]


def test_a_shown_item_without_its_label_is_a_bad_row_naming_its_line(tmp_path):
    rows = _mind_rows(250)
    rows[9][4] += " N99"  # a test split's unlabelled item
    path = _write_tsv(tmp_path / "behaviors.tsv", rows, HEADER)
    schema = schema_for(path)
    with pytest.raises(SchemaError, match="line 11.*label"):
        encode_log(path, schema)
    log = encode_log(path, schema, on_bad_row="dead-letter")
    assert [b.line for b in log.bad_rows] == [11]


def test_an_item_table_keyed_by_a_usual_item_name_joins_the_listed_items(tmp_path):
    rows = _mind_rows()
    path = _write_tsv(tmp_path / "behaviors.tsv", rows, HEADER)
    news = _write_tsv(tmp_path / "news.tsv", [[f"N{i}", ["sports", "news", "food"][i % 3]] for i in range(60)],
                      ["news_id", "category"])
    schema, stats = infer_schema(path, LogSchema(items_file=str(news)))
    assert schema.items_key == "news_id" and schema.column("category").side == "item"
    assert any(n.startswith("items_key = 'news_id'") for n in stats.notes)
    log = encode_log(path, schema)
    assert "category" in log.sparse and len(log) == sum(len(r[4].split()) for r in rows)
