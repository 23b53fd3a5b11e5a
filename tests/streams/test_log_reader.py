"""Encoding logs: formats, hashing into requests, online standardisation, bad rows, and the
agreement between what replay sends, what the joiner builds and what log_examples yields."""

import json
import subprocess
import sys

import msgpack
import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from streams.events import (ExampleBatch, Impression, SchemaError, Watermark, decode_dead_letter,
                            decode_event, encode_impression)
from streams.join_build import ClosedRequest, build_examples
from streams.join_state import PendingAction
from streams.kafka_consumer import read_topic
from streams.kafka_io import topic_names
from streams.log_infer import infer_schema
from streams.log_reader import EncodedLog, encode_log, log_examples, log_requests
from streams.log_schema import ColumnSpec, LogSchema, entity_ids, feature_ids
from tests.streams.log_fixtures import write_real_shaped_csv


def write(path, text):
    path.write_text(text)
    return path


def assert_same_log(a: EncodedLog, b: EncodedLog) -> None:
    for name in ("user_id", "item_id", "label", "ts_ms", "dense"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.truth_p, b.truth_p)
    assert a.sparse.keys() == b.sparse.keys()
    for slot in a.sparse:
        np.testing.assert_array_equal(a.sparse[slot].values, b.sparse[slot].values, err_msg=slot)
        np.testing.assert_array_equal(a.sparse[slot].lengths, b.sparse[slot].lengths, err_msg=slot)


def test_csv_gz_and_parquet_encode_exactly_like_the_csv(tmp_path):
    plain = write_real_shaped_csv(tmp_path / "log.csv", time_format="iso")
    gz = write_real_shaped_csv(tmp_path / "log.csv.gz", time_format="iso")
    parquet = tmp_path / "log.parquet"  # typed columns: ints, nullable ints, a UTC timestamp
    pq.write_table(pa_csv.read_csv(plain), parquet, row_group_size=64)
    schema, _ = infer_schema(plain)
    assert infer_schema(gz)[0] == infer_schema(parquet)[0] == schema
    base = encode_log(plain, schema, chunk_rows=50)
    assert len(base) == 300 and base.dense.shape == (300, 4)
    assert np.all(np.diff(base.ts_ms) >= 0)  # sorted by event time
    for other in (encode_log(gz, schema), encode_log(parquet, schema, chunk_rows=37)):
        assert_same_log(base, other)
    np.testing.assert_array_equal(encode_log(parquet, schema).source_line + 1, base.source_line)


def test_time_in_epoch_seconds_ms_and_iso_gives_the_same_event_times(tmp_path):
    logs = [encode_log(p, infer_schema(p)[0]) for p in
            (write_real_shaped_csv(tmp_path / f"log_{f}.csv", time_format=f) for f in ("s", "ms", "iso"))]
    np.testing.assert_array_equal(logs[0].ts_ms // 1000, logs[2].ts_ms // 1000)
    np.testing.assert_array_equal(logs[1].ts_ms, logs[2].ts_ms)  # ms and ISO keep the ms
    assert logs[0].ts_ms[0] >= 1_574_553_634_000


LOG = """\
user_id,item_id,label,ts,genres,price,gender,device
alice,10,0,1000,Comedy|Romance,3.5,F,web
bob,sku-7,1,1000,Drama,,M,ios
alice,11,1,1000,,4.5,F,ios
alice,10,1,999,Comedy|Romance,3.5,F,android
bob,10,0,1001,Comedy|Romance,3.5,M,web
"""


def test_only_canonical_integer_ids_are_kept_so_zero_padded_codes_do_not_merge():
    ids = entity_ids("item_id", ["7", "007", "0", "-5", "+5", "-0", "9223372036854775807",
                                 "9223372036854775808"]).tolist()
    assert ids[0] == 7 and ids[2] == 0 and ids[3] == -5 and ids[6] == 2**63 - 1  # their own ids
    hashed = [int(feature_ids("item_id", [c])[0]) for c in ("007", "+5", "-0", "9223372036854775808")]
    assert [ids[1], ids[4], ids[5], ids[7]] == hashed  # strings: "007" is not item 7
    assert len(set(ids)) == len(ids)
    # pandas writes an integer column with an empty cell as floats: 123.0 is still user 123
    floats = entity_ids("user_id", ["123.0", "123", "0.0", "-5.00", "123.5", "1e3", "007.0"]).tolist()
    assert floats[:4] == [123, 123, 0, -5]
    assert floats[4:] == [int(feature_ids("user_id", [c])[0]) for c in ("123.5", "1e3", "007.0")]


def test_ids_requests_and_sides_of_a_string_valued_log(tmp_path):
    f = write(tmp_path / "shop.csv", LOG)
    schema, _ = infer_schema(f)
    assert schema.user_slots() == ("gender", "device") and schema.item_slots() == ("genres",)
    enc = encode_log(f, schema)
    alice, bob = entity_ids("user_id", ["alice", "bob"]).tolist()
    assert enc.user_id.tolist() == [alice, alice, bob, alice, bob]  # stable sort by time
    assert enc.item_id.tolist() == [10, 10, int(feature_ids("item_id", ["sku-7"])[0]), 11, 10]
    reqs = list(log_requests(enc, "shop"))
    assert [(imp.user_id, imp.items) for imp, _ in reqs] == [
        (alice, [10]), (alice, [10]), (bob, [enc.item_id[2]]), (alice, [11]), (bob, [10])]
    imp, clicks = reqs[0]
    assert imp.request_id == f"shop:{alice}:999000:0" and imp.event_time_ms == 999_000
    assert imp.user_sparse == {"gender": feature_ids("gender", ["F"]).tolist(),
                               "device": feature_ids("device", ["android"]).tolist()}
    assert imp.item_sparse == {"genres": [feature_ids("genres", ["Comedy", "Romance"]).tolist()]}
    assert [(c.item_id, c.event_time_ms) for c in clicks] == [(10, 999_001)]
    # An empty multi cell is the slot's missing id; an empty numeric cell is 0 plus indicator 1.
    assert reqs[3][0].item_sparse == {"genres": [feature_ids("genres", [""]).tolist()]}
    assert reqs[2][0].dense == [[0.0, 1.0]] and schema.dense_names() == ("price", "price:missing")


def test_user_side_slots_take_the_first_row_of_their_request(tmp_path):
    f = write(tmp_path / "ctx.csv",
              "user_id,item_id,label,ts,device\n1,5,0,7,web\n1,6,0,7,ios\n2,5,0,8,ios\n")
    schema = LogSchema(columns=(ColumnSpec("device", "categorical", "user"),))
    enc = encode_log(f, schema)
    web, ios = feature_ids("device", ["web", "ios"]).tolist()
    assert enc.sparse["device"].values.tolist() == [web, web, ios]
    assert next(log_requests(enc, "ctx"))[0].user_sparse == {"device": [web]}


def test_online_standardisation_never_looks_ahead(tmp_path):
    rng = np.random.default_rng(0)
    price = rng.lognormal(3, 1, 60).round(2).astype(object)
    price[rng.random(60) < 0.2] = ""
    rows = [f"{i % 5},{i},0,{1000 + i},{p}" for i, p in enumerate(price)]
    schema = LogSchema(columns=(ColumnSpec("price", "numeric", "item"),))
    header = "user_id,item_id,label,ts,price\n"
    enc = encode_log(write(tmp_path / "a.csv", header + "\n".join(rows)), schema)
    rows[-1] = rows[-1].rsplit(",", 1)[0] + ",1e9"  # change only the last row in time
    later = encode_log(write(tmp_path / "b.csv", header + "\n".join(rows)), schema)
    np.testing.assert_array_equal(enc.dense[:-1], later.dense[:-1])
    assert enc.dense[-1, 0] != later.dense[-1, 0]
    x = np.array([float(p) if p != "" else np.nan for p in price])
    for t in range(60):  # the definition, row by row: mean/std of the values strictly before t
        prev = x[:t][~np.isnan(x[:t])]
        missing = np.isnan(x[t])
        want = 0.0 if missing or len(prev) < 2 else np.clip((x[t] - prev.mean()) / prev.std(), -5, 5)
        assert enc.dense[t, 0] == pytest.approx(want, rel=1e-4, abs=1e-5), t
        assert enc.dense[t, 1] == float(missing)


@pytest.mark.parametrize("row, column, reason", [
    ("1,5,0", "ts", "3 cells, the header has 4"),
    ("1,5,0,7,extra", "#5", "5 cells, the header has 4"),
    ("1,5,2,7", "label", "label '2' is not 0 or 1"),
    ("1,5,yes,7", "label", "label 'yes' is not 0 or 1"),
    ("1,5,1,yesterday", "ts", "time 'yesterday' does not parse"),
    ("1,5,1,2019-13-45", "ts", "does not parse"),
    ("1,5,1,", "ts", "empty time"),
    (",5,1,7", "user_id", "empty id"),
    ("1,,1,7", "item_id", "empty id"),
])
def test_a_bad_row_is_an_error_naming_file_line_and_column(tmp_path, row, column, reason):
    f = write(tmp_path / "bad.csv", f"user_id,item_id,label,ts\n1,4,0,6\n{row}\n2,6,1,9\n")
    with pytest.raises(SchemaError) as err:
        encode_log(f, LogSchema())
    assert str(err.value).startswith(f"{f}, line 3, column {column!r}: ") and reason in str(err.value)


def test_a_non_number_in_a_numeric_column_is_a_bad_row(tmp_path):
    f = write(tmp_path / "n.csv", "user_id,item_id,label,ts,price\n1,4,0,6,2.5\n1,5,0,7,cheap\n")
    with pytest.raises(SchemaError, match="line 3, column 'price': 'cheap' is not a finite number"):
        encode_log(f, LogSchema(columns=(ColumnSpec("price", "numeric"),)))


def test_dead_letter_mode_keeps_the_good_rows_and_lists_every_bad_one(tmp_path):
    f = write(tmp_path / "mixed.csv", "user_id,item_id,label,ts,genre\n"
              "1,4,0,6,a\n1,5,1\n2,6,3,9,b\n2,7,1,10,c\n3,8,1,noon,d\n,9,0,11,e\n4,10,1,12,f\n")
    enc = encode_log(f, infer_schema(f)[0], on_bad_row="dead-letter", chunk_rows=2)
    assert [(b.line, b.column) for b in enc.bad_rows] == [
        (3, "ts"), (4, "label"), (6, "ts"), (7, "user_id")]
    assert enc.bad_rows[0].raw == "1,5,1" and enc.bad_rows[1].raw == "2,6,3,9,b"
    assert enc.item_id.tolist() == [4, 7, 10] and enc.source_line.tolist() == [2, 5, 8]


def test_a_log_whose_every_row_is_bad_says_so_and_the_cli_prints_no_traceback(tmp_path):
    # KuaiRec's watch_ratio named as the label with no threshold: a number on every row.
    rows = "".join(f"{14 + i % 3},{148 + i},{1593878903.438 + i},{0.72 + 0.11 * i:.2f}\n" for i in range(25))
    f = write(tmp_path / "kuai.csv", "user_id,video_id,timestamp,watch_ratio\n" + rows)
    with pytest.raises(SchemaError, match=r"every row of .* is bad \(25 rows; the first: .*line 2, column "
                       r"'watch_ratio': label '0.72' is not 0 or 1 \(a score or a rating\? set positive_threshold\)"):
        encode_log(f, LogSchema(item_col="video_id", label_col="watch_ratio", time_col="timestamp"), "dead-letter")
    out = subprocess.run([sys.executable, "-m", "headwater", "bench", "learning", "--json", "--no-vw",
                          "--dataset", str(f), "--label-col", "watch_ratio", "--on-bad-row", "dead-letter"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "headwater bench: every row of" in out.stderr


def test_a_row_logged_twice_is_one_example_and_a_view_row_with_its_click_row_one_positive(tmp_path):
    f = write(tmp_path / "twice.csv", "user_id,item_id,label,ts,genre\n"
              "1,10,1,100,a\n1,10,1,100,a\n1,11,0,100,b\n2,10,0,200,a\n2,10,1,200,a\n2,10,0,300,a\n")
    enc = encode_log(f, infer_schema(f)[0])
    assert enc.duplicate_rows == 2
    assert enc.item_id.tolist() == [10, 11, 10, 10] and enc.label.tolist() == [1, 0, 1, 0]
    assert enc.source_line.tolist() == [2, 4, 5, 7]  # the first copy's line; a later time is a new event
    batch = next(iter(log_examples(enc, "t")))
    assert len(set(batch.example_id.tolist())) == len(batch.example_id) == 4
    assert [list(imp.items) for imp, _ in log_requests(enc, "t")] == [[10, 11], [10], [10]]
    assert [len(acts) for _, acts in log_requests(enc, "t")] == [1, 1, 0]


def test_once_each_keeps_the_first_copy_of_every_user_item_time_with_the_copies_largest_label():
    from streams.log_merge import once_each as _once_each

    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(0, 60))
        ts = np.sort(rng.integers(0, 8, n))
        user, item = rng.integers(0, 3, n), rng.integers(0, 3, n)
        label = rng.integers(0, 2, n).astype(np.float32)
        best: dict[tuple, float] = {}
        firsts = []
        for i, key in enumerate(zip(user.tolist(), item.tolist(), ts.tolist())):
            if key not in best:
                firsts.append(i)
            best[key] = max(best.get(key, 0.0), float(label[i]))
        keep, merged = _once_each(user, item, ts, label)
        assert keep.tolist() == firsts
        assert merged.tolist() == [best[(user[i], item[i], ts[i])] for i in firsts]


def joiner_examples(enc: EncodedLog, source: str) -> ExampleBatch:
    """What the joiner builds from the requests replay would send (wire maps, as it stores them)."""
    closed = [ClosedRequest(msgpack.unpackb(encode_impression(imp), raw=False),
                            [PendingAction(a.item_id, a.kind, a.value, a.event_time_ms, a.user_id)
                             for a in acts])
              for imp, acts in log_requests(enc, source)]
    batch, unjoined, dropped = build_examples(closed, 600_000, frozenset({"click"}), 1.0,
                                              enc.dense.shape[1])
    assert not unjoined and dropped == 0
    return batch


def assert_same_examples(a: ExampleBatch, b: ExampleBatch) -> None:
    for name, _ in ExampleBatch._COLUMNS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.dense, b.dense)
    assert a.sparse.keys() == b.sparse.keys()
    for slot in a.sparse:
        np.testing.assert_array_equal(a.sparse[slot].values, b.sparse[slot].values, err_msg=slot)
        np.testing.assert_array_equal(a.sparse[slot].lengths, b.sparse[slot].lengths, err_msg=slot)


def test_log_examples_are_what_the_joiner_builds_from_the_replayed_requests(tmp_path):
    f = write_real_shaped_csv(tmp_path / "log.csv")
    enc = encode_log(f, infer_schema(f)[0])
    mine = ExampleBatch.concat(list(log_examples(enc, "log", batch_rows=64)))
    assert len(mine) == 300 and mine.dense.shape == (300, 4)
    assert set(mine.sparse) == {"user_id", "item_id", "genres", "gender", "occupation", "device"}
    assert_same_examples(mine, joiner_examples(enc, "log"))


def test_log_examples_match_the_joiner_on_repeated_items_and_truth(tmp_path):
    # Item 5 twice in one request, the click on the second row: one event (a view row and its
    # click row), one positive example with the first row's cells. truth_p travels per
    # impression (empty in one row: unknown for its request).
    f = write(tmp_path / "dup.csv", "user_id,item_id,label,ts,truth_p,brand\n"
              "1,5,0,100,0.2,x\n1,5,1,100,0.3,x\n1,6,0,100,0.1,y\n2,5,1,200,,x\n2,6,0,200,0.5,y\n")
    enc = encode_log(f, infer_schema(f)[0])
    mine = ExampleBatch.concat(list(log_examples(enc, "dup", batch_rows=2)))
    assert mine.label.tolist() == [1, 0, 1, 0]
    assert np.isnan(mine.truth_p[2:]).all() and mine.truth_p[:2] == pytest.approx([0.2, 0.1])
    assert_same_examples(mine, joiner_examples(enc, "dup"))


SHOP = """\
user_id,item_id,label,ts,genres,gender
alice,hat,0,2019-11-24T10:00:00Z,Clothes|Summer,F
alice,cap,1,2019-11-24T10:00:00Z,Clothes,F
bob,hat,1,2019-11-24T10:05:00Z,Clothes|Summer,M
bob,cap,maybe,2019-11-24T10:06:00Z,Clothes,M
carol,scarf,0,2019-11-24T10:07:00Z,,F
"""


def test_replay_sends_a_bad_row_to_the_dead_letter_topic_with_its_reason(kafka_topics, tmp_path):
    f = write(tmp_path / "shop.csv", SHOP)
    topics = topic_names(kafka_topics.topic_prefix)

    def replay(*flags):
        return subprocess.run([sys.executable, "-m", "headwater", "replay", str(f),
                               "--bootstrap-servers", kafka_topics.bootstrap_servers,
                               "--topic-prefix", kafka_topics.topic_prefix, *flags],
                              capture_output=True, text=True, timeout=120)

    refused = replay()  # default: a clear error and nothing sent
    assert refused.returncode == 2 and f"{f}, line 5, column 'label'" in refused.stderr
    assert read_topic(kafka_topics, topics.impressions, idle_s=0.5) == []
    out = replay("--on-bad-row", "dead-letter")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"events": 6, "dead_lettered": 1,
                                                               "item_updates": 3}
    assert "1 bad rows" in out.stderr  # logged, not printed
    dead = [decode_dead_letter(r.value) for r in read_topic(kafka_topics, topics.dlq, idle_s=0.5)]
    assert len(dead) == 1 and dead[0].offset == 5 and dead[0].topic == str(f)
    assert "column 'label': label 'maybe' is not 0 or 1" in dead[0].reason
    assert dead[0].payload == b"bob,cap,maybe,2019-11-24T10:06:00Z,Clothes,M"
    events = [decode_event(r.value) for r in read_topic(kafka_topics, topics.impressions, idle_s=0.5)]
    imps = [e for e in events if isinstance(e, Impression)]
    alice, bob, carol = entity_ids("user_id", ["alice", "bob", "carol"]).tolist()
    assert [(i.user_id, len(i.items)) for i in imps] == [(alice, 2), (bob, 1), (carol, 1)]
    assert isinstance(events[-1], Watermark)
    assert imps[0].items == entity_ids("item_id", ["hat", "cap"]).tolist()
    # Item-side features reach hw.items once per item (hat's second showing is unchanged).
    from streams.item_features import decode_item_features

    items = [decode_item_features(r.value) for r in read_topic(kafka_topics, topics.items, idle_s=0.5)]
    hat, cap, scarf = entity_ids("item_id", ["hat", "cap", "scarf"]).tolist()
    assert [f.item_id for f in items] == [hat, cap, scarf]
    assert sorted(items[0].sparse["genres"]) == sorted(feature_ids("genres", ["Clothes", "Summer"]).tolist())
    assert items[2].sparse["genres"] == feature_ids("genres", [""]).tolist()


def test_line_numbers_stay_exact_across_chunks_around_skipped_rows(tmp_path):
    rows, bad_lines = [], []
    for i in range(20_000):  # about 400 KiB: several 64 KiB CSV blocks
        if i % 997 == 5:
            rows.append(f"{i},{i}")  # too few cells: the parser skips the row
            bad_lines.append(i + 2)
        else:
            rows.append(f"{i},{i},{i % 2},{1000 + i},padding-{i:08d}")
    f = write(tmp_path / "long.csv", "user_id,item_id,label,ts,note\n" + "\n".join(rows) + "\n")
    enc = encode_log(f, LogSchema(columns=(ColumnSpec("note", "ignore"),)), "dead-letter", chunk_rows=1000)
    assert [b.line for b in enc.bad_rows] == bad_lines
    np.testing.assert_array_equal(enc.source_line, enc.user_id + 2)  # row i sits on line i + 2


def test_numeric_features_are_constant_within_a_request_and_per_item(tmp_path):
    """One Recommend call carries one user-side dense vector, and hw.items one tail per item:
    the encoded log must agree with both, or serving would see other values than training."""
    f = write_real_shaped_csv(tmp_path / "log.csv", rows=400, seed=3)
    log = encode_log(f, infer_schema(f)[0])
    names = log.schema.dense_names()
    width = log.schema.item_dense_width()
    user_part, item_part = log.dense[:, :len(names) - width], log.dense[:, len(names) - width:]
    assert user_part.shape[1] and item_part.shape[1]
    _, request = np.unique(np.stack([log.user_id, log.ts_ms], 1), axis=0, return_inverse=True)
    for r in np.unique(request):
        rows = user_part[request.ravel() == r]
        assert (rows == rows[0]).all()
    for i in np.unique(log.item_id):
        rows = item_part[log.item_id == i]
        assert (rows == rows[0]).all()
    assert np.abs(item_part[:, 0]).max() > 0  # standardised, not all zero


def test_a_user_side_number_is_the_requests_so_a_sampled_negative_cannot_tell_its_positive(tmp_path):
    # Diginetica: the time within a session (timeframe) differs on every view of one session-day,
    # one request; a log of views only, so each row gets sampled negatives.
    rng = np.random.default_rng(0)
    rows = "".join(f"s{u},{rng.integers(1, 10**6)},{(u * 7 + k) % 40},2016-05-{1 + u % 9:02d}\n"
                   for u in range(30) for k in range(3))
    f = write(tmp_path / "views.csv", "sessionId,timeframe,itemId,eventdate\n" + rows)
    schema = infer_schema(f, user_col="sessionId", item_col="itemId", time_col="eventdate")[0]
    assert schema.implicit and schema.column("timeframe").kind == "numeric"
    enc = encode_log(f, schema)
    assert enc.label.sum() == 90 and len(enc) > 90  # the views and their negatives
    value = enc.dense[:, schema.dense_names().index("timeframe")]
    for key in set(zip(enc.user_id.tolist(), enc.ts_ms.tolist())):
        rows_of = (enc.user_id == key[0]) & (enc.ts_ms == key[1])
        assert len(set(value[rows_of].tolist())) == 1  # positives and negatives alike
