"""Logs in the other shapes users bring them: tab- and semicolon-separated text, JSON Lines
(typed values, lists, booleans, nulls, keys in any order, a malformed line), boolean labels.
Each must encode exactly like the same log written as a comma-separated CSV."""

import csv
import gzip
import json

import numpy as np
import pytest

from streams.events import SchemaError
from streams.log_formats import csv_delimiter, is_json_lines, is_parquet, source_name
from streams.log_infer import infer_schema, schema_for
from streams.log_reader import encode_log
from tests.streams.log_fixtures import write_real_shaped_csv
from tests.streams.test_log_reader import assert_same_log

_NUMERIC = ("user_id", "item_id", "label", "ts", "year", "age")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rewrite(rows, path, delimiter):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def _as_json(row, i):
    """The row as an event log writes it: numbers typed, genres a list, the label a boolean,
    empty cells null or absent, keys in another order for every other row."""
    obj = {}
    for k, v in row.items():
        if v == "":
            if i % 2:
                obj[k] = None
            continue
        if k == "genres":
            obj[k] = v.split("|")
        elif k == "label":
            obj[k] = v == "1"
        elif k in _NUMERIC:
            obj[k] = int(v)
        else:
            obj[k] = v
    return dict(reversed(obj.items())) if i % 2 else obj


@pytest.fixture()
def base(tmp_path):
    path = write_real_shaped_csv(tmp_path / "log.csv")
    schema, _ = infer_schema(path)
    return path, schema, encode_log(path, schema)


@pytest.mark.parametrize("name, delimiter", [("log.tsv", "\t"), ("log.tab", "\t"),
                                             ("log.txt", "\t"), ("semi.csv", ";")])
def test_tab_and_semicolon_separated_logs_encode_like_the_csv(tmp_path, base, name, delimiter):
    path, schema, expected = base
    other = _rewrite(_rows(path), tmp_path / name, delimiter)
    assert csv_delimiter(other) == delimiter
    assert infer_schema(other)[0] == schema
    assert_same_log(expected, encode_log(other, schema, chunk_rows=40))


def test_a_single_column_or_plain_csv_stays_comma_separated(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("user_id\n1\n2\n")
    assert csv_delimiter(one) == ","
    assert csv_delimiter(write_real_shaped_csv(tmp_path / "log.csv")) == ","


@pytest.mark.parametrize("name", ["log.jsonl", "log.ndjson.gz", "log.json"])
def test_json_lines_encode_like_the_csv(tmp_path, base, name):
    path, schema, expected = base
    out = tmp_path / name
    text = "".join(json.dumps(_as_json(r, i)) + "\n" + ("\n" if i == 5 else "")
                   for i, r in enumerate(_rows(path)))
    if name.endswith(".gz"):
        out.write_bytes(gzip.compress(text.encode()))
    else:
        out.write_text(text)
    assert is_json_lines(out) and not is_parquet(out) and source_name(out) == "log"
    assert infer_schema(out)[0] == schema
    got = encode_log(out, schema, chunk_rows=33)
    assert_same_log(expected, got)
    lines = np.array(sorted(got.source_line))
    assert lines[-1] == len(expected) + 1  # physical lines: the blank line after row 5 counts


def test_a_malformed_json_line_is_a_bad_row_with_its_line(tmp_path):
    f = tmp_path / "events.jsonl"
    f.write_text('{"user_id": 1, "item_id": "a", "label": 0, "ts": 6}\n'
                 '{"user_id": 1, "item_id": 5, "label": 1, "ts": 7\n'
                 '[1, 2]\n'
                 '{"user_id": 2, "item_id": 6, "label": true, "ts": 9, "later": "x"}\n')
    with pytest.raises(SchemaError, match=r"events.jsonl, line 2, column '\(line\)': not JSON"):
        encode_log(f, infer_schema(f)[0])
    enc = encode_log(f, infer_schema(f)[0], on_bad_row="dead-letter")
    assert [(b.line, b.reason.split(":")[0]) for b in enc.bad_rows] == [
        (2, "not JSON"), (3, "a JSON list, not an object (one object per line)")]
    assert enc.source_line.tolist() == [1, 4] and enc.label.tolist() == [0.0, 1.0]


def test_a_json_array_file_is_refused_with_what_to_do(tmp_path):
    f = tmp_path / "dump.json"
    f.write_text('[{"user_id": 1, "item_id": 2, "label": 0, "ts": 6}]\n')
    with pytest.raises(SchemaError, match="JSON array, not JSON Lines: write one object per line"):
        infer_schema(f)


def test_python_dict_lines_are_refused_saying_what_they_are(tmp_path):
    f = tmp_path / "australian_user_reviews.json"  # Steam's reviews, written with Python's repr
    f.write_text("{'user_id': '76561197970982479', 'reviews': [{'item_id': '1250', 'recommend': True}]}\n")
    with pytest.raises(SchemaError, match=r"no JSON object in its first lines \(line 1: not JSON: .*\); its "
                       "lines look like Python dicts"):
        infer_schema(f)


def test_the_netflix_prize_block_format_is_refused_saying_what_it_is(tmp_path):
    f = tmp_path / "combined_data_1.txt"
    f.write_text("1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n2:\n2059652,4,2005-09-05\n")
    with pytest.raises(SchemaError, match="a first line 'ID:' is the Netflix Prize's block format"):
        infer_schema(f)


def test_boolean_labels_as_exports_write_them(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("user_id,item_id,label,ts\n1,4,true,6\n1,5,FALSE,7.5\n2,6, t ,9\n2,7,f,10\n3,8,yes,11\n")
    enc = encode_log(f, infer_schema(f)[0], on_bad_row="dead-letter")
    assert enc.label.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert enc.ts_ms.tolist() == [6000, 7500, 9000, 10000]
    assert [(b.line, b.column) for b in enc.bad_rows] == [(6, "label")]


def test_parquet_nested_columns_read_as_their_json_lines_twin(tmp_path):
    """A struct and a JSON object flatten alike (``meta.a``); a Parquet map, whose keys vary
    by row, is one categorical (its compact JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"user_id": 1, "item_id": 3, "label": True, "ts": 1_700_000_000_000,
             "meta": {"a": 1, "b": "x"}, "tags": ["x", "y"], "m": {"k": 1}},
            {"user_id": 2, "item_id": 4, "label": False, "ts": 1_700_000_001_500,
             "meta": {"a": 2, "b": None}, "tags": [], "m": {}},
            {"user_id": 2, "item_id": 3, "label": False, "ts": 1_700_000_002_000,
             "meta": {"a": 1, "b": "x"}, "tags": ["y"], "m": {"k": 1}}]
    table = pa.table({
        "user_id": [r["user_id"] for r in rows], "item_id": [r["item_id"] for r in rows],
        "label": [r["label"] for r in rows],
        "ts": pa.array([r["ts"] for r in rows], pa.timestamp("ms")),
        "meta": [r["meta"] for r in rows], "tags": [r["tags"] for r in rows],
        "m": pa.array([list(r["m"].items()) for r in rows], pa.map_(pa.string(), pa.int64()))})
    parquet = tmp_path / "nested.parquet"
    pq.write_table(table, parquet)
    twin = tmp_path / "nested.jsonl"
    twin.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "m"}) + "\n" for r in rows))
    schema, _ = infer_schema(parquet)
    assert {c.name: c.kind for c in schema.columns} == {"meta.a": "numeric", "meta.b": "categorical",
                                                        "tags": "multi", "m": "categorical"}
    assert schema.column("meta.a").side == "item"
    plain = tmp_path / "plain.parquet"
    pq.write_table(table.drop_columns(["m"]), plain)
    assert infer_schema(twin)[0] == infer_schema(plain)[0]
    assert_same_log(encode_log(twin, infer_schema(twin)[0]), encode_log(plain, infer_schema(twin)[0]))


def test_an_event_type_column_is_the_label_with_positive_values(tmp_path):
    from streams.log_schema import LogSchema

    f = tmp_path / "events.csv"  # RetailRocket's shape: timestamp, visitor, event, item
    # (the cart is of another item than the view: a cart of the viewed item would be its label, test_log_merge)
    f.write_text("timestamp,visitorid,event,itemid\n1433221332117,1,view,5\n1433221332118,1,addtocart,8\n"
                 "1433221332119,2, transaction ,6\n1433221332120,2,,7\n1433221332121,3,view,7\n")
    names = dict(user_col="visitorid", item_col="itemid", label_col="event", time_col="timestamp")
    schema = LogSchema(positive_values=("addtocart", "transaction"), **names)
    enc = encode_log(f, infer_schema(f, schema)[0], on_bad_row="dead-letter")
    assert enc.label.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert [(b.line, b.reason) for b in enc.bad_rows] == [(5, "label '' is not an event type")]
    toml = tmp_path / "s.toml"
    toml.write_text(schema.to_toml())
    assert 'positive_values = ["addtocart", "transaction"]' in toml.read_text()
    assert LogSchema.from_toml(toml) == schema
    with pytest.raises(SchemaError, match="give one"):
        LogSchema(positive_values=("buy",), positive_threshold=4.0)
    toml.write_text('positive_values = "buy"\n')
    with pytest.raises(SchemaError, match="positive_values has a bad value"):
        LogSchema.from_toml(toml)


def test_year_first_slash_dates_parse_and_ambiguous_ones_are_bad_rows(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("user_id,item_id,label,ts\n1,4,1,2024/01/02 12:00:01\n1,5,0,2024-01-02T12:00:01Z\n"
                 "2,6,0,01/02/2024 12:00\n")
    enc = encode_log(f, infer_schema(f)[0], on_bad_row="dead-letter")
    assert enc.ts_ms.tolist() == [1704196801000, 1704196801000]
    assert [(b.line, b.column) for b in enc.bad_rows] == [(4, "ts")]
    assert "'01/02/2024 12:00' does not parse" in enc.bad_rows[0].reason


def test_times_ending_in_utc_or_gmt_parse_as_bigquery_exports_write_them(tmp_path):
    f = tmp_path / "bq.csv"
    f.write_text("user_id,item_id,label,ts\n1,4,1,2024-01-02 12:00:01 UTC\n1,5,0,2024-01-02 12:00:01.5 utc\n"
                 "2,6,0,2024/01/02 12:00:01 GMT\n3,7,0,UTC\n")
    enc = encode_log(f, infer_schema(f)[0], on_bad_row="dead-letter")
    assert enc.ts_ms.tolist() == [1704196801000, 1704196801000, 1704196801500]  # in time order
    assert [(b.line, b.column) for b in enc.bad_rows] == [(5, "ts")]


def test_inspect_names_the_label_cells_and_what_to_set(tmp_path):
    events = tmp_path / "rr.csv"
    # (cells streams.log_names does not know: it reads view/addtocart/transaction by itself)
    events.write_text("timestamp,visitorid,event,itemid\n1,1,seen,5\n2,1,kept,5\n3,2,seen,6\n")
    names = dict(user_col="visitorid", item_col="itemid", label_col="event", time_col="timestamp")
    _, stats = infer_schema(events, **names)
    assert stats.label_values == [("seen", 2), ("kept", 1)]
    assert "label cells: 'seen' 2, 'kept' 1: set positive_values" in stats.summary()
    ratings = tmp_path / "r.csv"  # a continuous score, no scale (a scale gets its threshold guessed)
    ratings.write_text("user_id,item_id,label,ts\n" + "".join(f"1,{i},{i / 7:.3f},{i}\n" for i in range(2, 30)))
    assert "set positive_threshold" in infer_schema(ratings)[1].summary()
    assert infer_schema(write_real_shaped_csv(tmp_path / "ok.csv"))[1].label_values == []  # 0/1


def test_a_legacy_windows_1252_export_reads_like_its_utf8_twin(tmp_path, caplog):
    # Book-Crossing's shape: semicolons, quoted cells, a Western legacy encoding (é = 0xe9).
    text = ('"User-ID";"ISBN";"Book-Rating";"Title"\n"1";"034545104X";"5";"Café Society"\n'
            '"2";"0155061224";"0";"Crème brûlée"\n"1";"0155061224";"1";"Crème brûlée"\n')
    legacy, utf8 = tmp_path / "bx.csv", tmp_path / "bx-utf8.csv"
    legacy.write_bytes(text.encode("cp1252"))
    utf8.write_text(text, encoding="utf-8")
    names = dict(user_col="User-ID", item_col="ISBN", label_col="Book-Rating", positive_threshold=5.0)
    a, b = encode_log(legacy, schema_for(legacy, **names)), encode_log(utf8, schema_for(utf8, **names))
    np.testing.assert_array_equal(a.item_id, b.item_id)
    assert a.label.tolist() == b.label.tolist() == [1, 0, 0]
    assert sorted(a.item_text.values()) == sorted(b.item_text.values()) == ["Café Society", "Crème brûlée"]
    assert "is not UTF-8 (byte 0xe9 at offset" in caplog.text and "read as cp1252" in caplog.text


def test_a_directory_of_hive_partitioned_parquet_files_is_one_log_in_path_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    export = tmp_path / "events"
    for day, rows in (("2020-01-02", {"user_id": ["b", "a"], "item_id": ["y", "x"], "label": [0, 1], "ts": [300, 400]}),
                      ("2020-01-01", {"user_id": ["a", "b"], "item_id": ["x", "z"], "label": [1, 0], "ts": [100, 200]})):
        (export / f"dt={day}").mkdir(parents=True)
        pq.write_table(pa.table(rows), export / f"dt={day}" / "part-00000.parquet")
    (export / "_SUCCESS").write_text("")
    (export / "dt=2020-01-01" / ".part-00000.parquet.crc").write_text("junk")
    schema, stats = infer_schema(export)
    assert stats.rows == 4 and stats.bad_rows == 0
    assert [c.name for c in schema.columns] == ["dt"]  # the partition column
    enc = encode_log(export, schema)
    assert enc.ts_ms.tolist() == [100_000, 200_000, 300_000, 400_000]
    assert enc.source_line.tolist() == [1, 2, 3, 4]  # rows numbered across the files, in path order
    assert enc.label.tolist() == [1, 0, 0, 1]


def test_a_directory_of_csv_shards_is_one_log_with_lines_counted_across_its_files(tmp_path):
    export = tmp_path / "bq"
    export.mkdir()
    (export / "events-000000000000.csv").write_text("user_id,item_id,label,ts\na,x,1,100\nb,z,0,200\n")
    (export / "events-000000000001.csv").write_text("user_id,item_id,label,ts\nb,y,0,300\na,x,maybe,350\na,x,1,400\n")
    (export / "_SUCCESS").write_text("")
    enc = encode_log(export, infer_schema(export)[0], on_bad_row="dead-letter")
    assert enc.ts_ms.tolist() == [100_000, 200_000, 300_000, 400_000]
    assert enc.source_line.tolist() == [2, 3, 5, 7]  # as if concatenated, a header line each
    assert [(b.line, b.column) for b in enc.bad_rows] == [(6, "label")]
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.csv").write_text("user_id,item_id,label,ts\na,x,1,100\n")
    (short / "b.csv").write_text("user_id,item_id,label,ts\nb,y\n")
    bad = encode_log(short, infer_schema(short)[0], on_bad_row="dead-letter").bad_rows
    assert [(b.line, b.reason) for b in bad] == [(4, "2 cells, the header has 4 (no 'label') (b.csv, line 2)")]


def test_a_directory_of_json_lines_and_what_a_directory_may_not_be(tmp_path):
    export = tmp_path / "j"
    export.mkdir()
    (export / "part-1.jsonl").write_text('{"user_id": "a", "item_id": "x", "label": 1, "ts": 100}\n')
    (export / "part-2.jsonl").write_text('{"user_id": "b", "item_id": "x", "label": 0, "ts": 200}\n')
    assert encode_log(export, infer_schema(export)[0]).label.tolist() == [1, 0]
    (export / "part-3.csv").write_text("user_id,item_id,label,ts\nc,x,1,300\n")
    with pytest.raises(SchemaError, match="mixes formats"):
        infer_schema(export)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.csv").write_text("user_id,item_id,label,ts\na,x,1,100\n")
    (other / "b.csv").write_text("user,item_id,label,ts\na,x,1,100\n")
    with pytest.raises(SchemaError, match="differ from a.csv's"):
        infer_schema(other)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(SchemaError, match="an empty directory"):
        infer_schema(empty)


def test_a_mysql_null_is_an_empty_cell(tmp_path):
    f = tmp_path / "export.csv"  # SELECT ... INTO OUTFILE writes NULL as \N
    f.write_text("user_id,item_id,label,ts,price,platform\n1,4,0,6,2.5,\\N\n1,5,1,7,\\N,web\n2,4,1,8,3.0,app\n")
    schema = infer_schema(f)[0]
    assert schema.column("price").kind == "numeric"
    enc = encode_log(f, schema)
    assert not enc.bad_rows and enc.dense[:, schema.dense_names().index("price") + 1].tolist() == [0.0, 1.0, 0.0]
