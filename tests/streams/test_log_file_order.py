"""A log without a time column is taken to be in time order: its rows one second apart, in file
order, whatever the format; a time column that is named but missing stays an error."""

import json

import numpy as np
import pytest

from streams.events import SchemaError
from streams.log_reader import encode_log, log_requests
from streams.log_schema import LogSchema
from streams.log_source import FILE_ORDER_EPOCH_MS
from streams.replay import ReplayConfig, log_schema
from tests.streams.log_fixtures import without_column, write_real_shaped_csv


def test_a_log_without_times_is_read_in_file_order_one_second_apart(tmp_path):
    full = write_real_shaped_csv(tmp_path / "full.csv", rows=200)
    path = without_column(full, tmp_path / "untimed.csv", "ts")
    schema = log_schema(path, ReplayConfig())
    assert schema.time_col == "" and not schema.implicit
    (tmp_path / "s.toml").write_text(schema.to_toml())
    assert LogSchema.from_toml(tmp_path / "s.toml") == schema
    log = encode_log(path, schema)
    assert len(log) == 200
    np.testing.assert_array_equal(log.source_line, np.arange(2, 202))  # file order kept
    np.testing.assert_array_equal(log.ts_ms, FILE_ORDER_EPOCH_MS + log.source_line * 1000)
    requests = list(log_requests(log, "untimed"))
    assert len(requests) == 200  # every row its own request
    # The same rows as JSON Lines: the same times (a line's number is its record's here too).
    lines = full.read_text().splitlines()
    header = lines[0].split(",")
    jsonl = tmp_path / "untimed.jsonl"
    with open(jsonl, "w") as f:
        f.write("\n".join(json.dumps({k: v for k, v in zip(header, r.split(",")) if k != "ts"})
                          for r in lines[1:] if "\"" not in r) + "\n")
    other = encode_log(jsonl, log_schema(jsonl, ReplayConfig()))
    assert np.all(np.diff(other.ts_ms) == 1000)


def test_a_log_of_user_and_item_only_is_positives_in_file_order(tmp_path):
    path = tmp_path / "plays.csv"
    path.write_text("user_id,item_id\n" + "".join(f"{u % 7},{i % 11}\n" for u, i in
                                                  zip(range(300), range(5, 305))))
    schema = log_schema(path, ReplayConfig())
    assert schema.implicit and schema.time_col == ""
    log = encode_log(path, schema)
    assert int(log.label.sum()) == 300 and len(log) > 300
    # A negative's item was seen on an earlier line than its positive's.
    first_line = {}
    for item, line, y in zip(log.item_id.tolist(), log.source_line.tolist(), log.label.tolist()):
        if y:
            first_line.setdefault(item, line)
    for item, line, y in zip(log.item_id.tolist(), log.source_line.tolist(), log.label.tolist()):
        if not y:
            assert first_line[item] < line


def test_a_named_time_column_that_is_missing_stays_an_error(tmp_path):
    full = write_real_shaped_csv(tmp_path / "full.csv", rows=20)
    path = without_column(full, tmp_path / "untimed.csv", "ts")
    with pytest.raises(SchemaError, match=r"missing columns \['when'\]"):
        log_schema(path, ReplayConfig(time_col="when"))
