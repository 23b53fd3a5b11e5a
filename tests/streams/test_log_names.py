"""A log exported by someone else runs as it is: its user, item, time and label columns found by
their usual names, and a rating scale or event types read as the labels they mean."""

import subprocess
import sys
import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streams.events import SchemaError
from streams.log_infer import infer_schema, schema_for
from streams.log_reader import encode_log
from streams.log_schema import LogSchema
from streams.log_stats import inspection_toml

# MovieLens' own spelling: camelCase ids, a half-star rating, epoch seconds.
MOVIELENS = """\
userId,movieId,rating,timestamp,genres
1,31,2.5,1260759144,Drama
1,1029,3.0,1260759179,Animation|Children
1,1061,4.0,1260759182,Thriller
2,31,5.0,1260759200,Drama
2,1061,0.5,1260759210,Thriller
3,1029,4.5,1260759220,Animation|Children
3,31,3.5,1260759230,Drama
"""

# A shop's event log: who looked at what, put it in a cart, bought it.
EVENTS = """\
timestamp,visitorid,event,itemid,transactionid
1433221332117,257597,view,355908,
1433224214164,992329,view,248676,
1433221999827,111016,addtocart,318965,
1433221955914,483717,view,253185,
1433221337106,951259,transaction,367447,4000
1433223291897,257597,view,248676,
"""


def _roles(schema: LogSchema) -> tuple[str, str, str, str]:
    return schema.user_col, schema.item_col, schema.label_col, schema.time_col


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_movielens_export_runs_as_it_is_with_rating_4_and_up_as_positives(tmp_path):
    path = _write(tmp_path, "ratings.csv", MOVIELENS)
    schema = schema_for(path)
    assert _roles(schema) == ("userId", "movieId", "rating", "timestamp")
    assert schema.positive_threshold == 4.0 and not schema.implicit
    log = encode_log(path, schema)
    assert len(log) == 7 and not log.bad_rows
    by_line = dict(zip(log.source_line.tolist(), log.label.tolist()))
    ratings = [2.5, 3.0, 4.0, 5.0, 0.5, 4.5, 3.5]
    assert [by_line[i + 2] for i in range(7)] == [float(r >= 4) for r in ratings]  # line 1: the header
    assert [c.name for c in schema.columns] == ["genres"]


def test_inspect_says_what_it_guessed_and_the_toml_reads_back_to_the_same_schema(tmp_path):
    path = _write(tmp_path, "ratings.csv", MOVIELENS)
    schema, stats = infer_schema(path)
    text = inspection_toml(schema, stats)
    for line in ("guessed: user_col = 'userId'", "guessed: label_col = 'rating'",
                 "guessed: positive_threshold = 4: the label 'rating' is a scale of 7 values from 0.5 to 5"):
        assert line in text, text
    assert stats.bad_rows == 0 and stats.label_rate == pytest.approx(3 / 7)
    back = LogSchema.from_mapping(tomllib.loads(text))
    assert back == schema
    assert schema_for(path, back) == schema  # as a schema file: nothing left to guess


@pytest.mark.parametrize("scale, threshold", [(range(1, 6), 4.0), (range(1, 11), 8.0), (range(0, 101, 10), 80.0)])
def test_the_threshold_is_the_top_quarter_of_the_scale(tmp_path, scale, threshold):
    rows = "\n".join(f"u{i % 3},i{i},{v},{1000 + i}" for i, v in enumerate(scale))
    path = _write(tmp_path, "r.csv", "user_id,item_id,stars,ts\n" + rows + "\n")
    assert schema_for(path).positive_threshold == threshold


def test_event_types_make_engagements_positive_and_exposures_negative(tmp_path):
    path = _write(tmp_path, "events.csv", EVENTS)
    schema = schema_for(path)
    assert _roles(schema) == ("visitorid", "itemid", "event", "timestamp")
    assert schema.positive_values == ("addtocart", "transaction")
    log = encode_log(path, schema)
    by_line = dict(zip(log.source_line.tolist(), log.label.tolist()))
    assert [by_line[i] for i in range(2, 8)] == [0, 0, 1, 0, 1, 0]


def test_the_same_guesses_on_parquet_whose_rating_is_a_float_column(tmp_path):
    table = pa.table({"UserID": ["a", "a", "b", "b"], "Product ID": ["p1", "p2", "p1", "p3"],
                      "Rating": [1.0, 5.0, 4.0, 2.0], "event_time": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "r.parquet")
    schema = schema_for(tmp_path / "r.parquet")
    assert _roles(schema) == ("UserID", "Product ID", "Rating", "event_time")
    assert schema.positive_threshold == 4.0
    assert encode_log(tmp_path / "r.parquet", schema).label.tolist() == [0, 1, 1, 0]


def test_what_the_caller_names_is_never_second_guessed(tmp_path):
    path = _write(tmp_path, "ratings.csv", MOVIELENS)
    # a named label keeps its name and its given rule; a named user column is not replaced
    schema = schema_for(path, label_col="rating", positive_threshold=3.0, user_col="userId")
    assert schema.label_col == "rating" and schema.positive_threshold == 3.0
    # a schema file's label_col = "" keeps the log implicit even though it has a rating column
    implicit = schema_for(path, LogSchema(label_col="", negatives=4))
    assert implicit.implicit and implicit.negatives == 4
    assert "rating" in [c.name for c in implicit.columns]
    with pytest.raises(SchemaError, match="missing columns"):
        schema_for(path, user_col="customer")


def test_labels_that_are_already_0_1_or_boolean_get_no_rule_and_unknown_words_none(tmp_path):
    booleans = _write(tmp_path, "b.csv", "user,item,clicked,ts\nu,a,True,1\nu,b,false,2\nv,a,TRUE,3\n")
    schema = schema_for(booleans)
    assert schema.label_col == "clicked" and schema.positive_threshold is None and not schema.positive_values
    assert encode_log(booleans, schema).label.tolist() == [1, 0, 1]
    stray = _write(tmp_path, "s.csv", "user,item,label,ts\nu,a,0,1\nu,b,1,2\nv,a,3,3\nv,c,1,4\nw,a,0,5\n")
    assert schema_for(stray).positive_threshold is None  # a 0/1 label with a typo is no scale of 0..3
    assert [b.column for b in encode_log(stray, schema_for(stray), on_bad_row="dead-letter").bad_rows] == ["label"]
    words = _write(tmp_path, "w.csv", "user,item,action,ts\nu,a,foo,1\nu,b,bar,2\n")
    schema, stats = infer_schema(words)
    assert schema.label_col == "action" and not schema.positive_values and schema.positive_threshold is None
    assert stats.bad_rows == 2 and "positive_values" in stats.summary()  # says what to set


def test_a_log_without_usual_names_still_says_which_columns_are_missing(tmp_path):
    path = _write(tmp_path, "odd.csv", "who,what,when\n1,2,3\n")
    with pytest.raises(SchemaError, match=r"missing columns \['user_id', 'item_id'\].*name the column with "
                                          r"--user-col, --item-col"):
        schema_for(path)
    # a log of positives only with usual names stays one (no column looks like a label)
    plain = _write(tmp_path, "plain.csv", "customer_id,sku,date\nc1,s1,2020-01-01\nc2,s1,2020-01-02\n")
    schema = schema_for(plain)
    assert (schema.user_col, schema.item_col, schema.time_col) == ("customer_id", "sku", "date")
    assert schema.implicit


def test_headwater_replay_inspect_reads_a_movielens_export_without_flags(tmp_path):
    path = _write(tmp_path, "ratings.csv", MOVIELENS)
    out = subprocess.run([sys.executable, "-m", "headwater", "replay", "--inspect", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    back = LogSchema.from_mapping(tomllib.loads(out.stdout))
    assert (back.user_col, back.label_col, back.positive_threshold) == ("userId", "rating", 4.0)
    assert "reading label_col = 'rating'" in out.stderr
    assert np.isclose(float(out.stdout.split("label rate ")[1].split()[0]), 3 / 7, atol=1e-4)


def test_movielens_u_data_without_a_header_line_reads_user_item_rating_time_by_position(tmp_path):
    path = _write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
                  "244\t51\t2\t880606923\n166\t346\t1\t886397596\n298\t474\t4\t884182806\n115\t265\t5\t881171488\n")
    schema, stats = infer_schema(path)
    assert _roles(schema) == ("column_1", "column_2", "column_3", "column_4")
    assert schema.positive_threshold == 4.0
    assert "guessed: label_col = 'column_3': the log has no header line; column 3 reads as the label" in stats.summary()
    enc = encode_log(path, schema)
    assert sorted(enc.source_line.tolist()) == list(range(1, 8))  # no header: the first line is row 1
    assert dict(zip(enc.source_line.tolist(), enc.label.tolist())) == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1, 7: 1}
    assert dict(zip(enc.source_line.tolist(), enc.user_id.tolist()))[1] == 196


def test_taobao_user_behavior_without_a_header_and_its_bad_lines(tmp_path):
    path = _write(tmp_path, "UserBehavior.csv", "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,pv,1511561733\n"
                  "1,2576651,149192\n2,3830808,4181361,buy,1511593493\n3,4365585,2520377,cart,1511596146\n")
    schema = schema_for(path)
    assert _roles(schema) == ("column_1", "column_2", "column_4", "column_5")
    assert schema.positive_values == ("buy", "cart")
    enc = encode_log(path, schema, on_bad_row="dead-letter")
    assert [(b.line, b.column) for b in enc.bad_rows] == [(3, "column_4")]
    assert sorted(zip(enc.source_line.tolist(), enc.label.tolist())) == [(1, 0), (2, 0), (4, 1), (5, 1)]
    named = schema_for(path, user_col="column_2")  # what the caller names wins, and is taken
    assert (named.user_col, named.item_col, named.label_col) == ("column_2", "column_1", "column_4")
    with pytest.raises(SchemaError, match="its first line is data, not a header: name the columns"):
        schema_for(_write(tmp_path, "one.csv", "1\n2\n"))


def test_taobao_and_amazon_spellings(tmp_path):
    taobao = _write(tmp_path, "t.csv", "user_id,item_id,category_id,behavior_type,timestamp\n"
                    "1,10,5,pv,1511544070\n1,11,5,cart,1511544071\n2,10,5,buy,1511544072\n2,12,6,fav,1511544073\n")
    schema = schema_for(taobao)
    assert schema.label_col == "behavior_type" and schema.positive_values == ("buy", "cart", "fav")
    amazon = _write(tmp_path, "a.csv", "reviewerID,asin,overall,unixReviewTime,reviewTime\n"
                    "A1,B01,5.0,1400000000,\"05 13, 2014\"\nA2,B01,3.0,1400000100,\"05 13, 2014\"\n"
                    "A2,B02,1.0,1400000200,\"05 13, 2014\"\n")
    schema = schema_for(amazon)
    assert _roles(schema) == ("reviewerID", "asin", "overall", "unixReviewTime")
    assert schema.positive_threshold == 5.0  # a scale of 1, 3, 5: its top quarter


def test_a_label_column_with_one_positive_value_is_a_log_of_positives_only(tmp_path):
    rows = "".join(f"c{i % 4},s{i % 7},purchase,2020-01-{1 + i:02d}\n" for i in range(20))
    path = _write(tmp_path, "orders.csv", "customer_id,sku,event,date\n" + rows)
    schema, stats = infer_schema(path)
    assert schema.implicit and schema.negatives == 4 and schema.recent_items == 10
    assert [c.name for c in schema.columns if c.kind != "ignore"] == []  # 'event' is constant
    assert "every cell of 'event' is 'purchase'" in inspection_toml(schema, stats)
    enc = encode_log(path, schema)
    assert enc.label.sum() == 20 and len(enc) > 20  # the rows, and their sampled negatives
    plays = _write(tmp_path, "plays.csv", "user,item,rating,ts\nu,a,,1\nu,b,4,2\nv,a,,3\nv,c,,4\n")
    schema, stats = infer_schema(plays)
    assert schema.implicit and "'rating' is empty on 3 of its first 4 rows, so it is no label" in stats.summary()
    assert [c.name for c in schema.columns] == ["rating"]  # a feature now
    ones = _write(tmp_path, "ones.csv", "user,item,clicked,ts\nu,a,1,1\nv,b,1,2\n")
    assert schema_for(ones).implicit
    assert not schema_for(ones, label_col="clicked").implicit  # named: taken as it is


def test_movielens_1m_ratings_dat_with_its_double_colons(tmp_path):
    rows = ["1::1193::5::978300760", "1::661::3::978302109", "1::914::1::978301968", "2::3408::4::978300275",
            "2::2355::2::978824291", "3::1193::4::978300761"]
    path = _write(tmp_path, "ratings.dat", "\n".join(rows) + "\n")
    schema = schema_for(path)
    assert _roles(schema) == ("column_1", "column_2", "column_3", "column_4")  # "::" is one delimiter
    assert schema.positive_threshold == 4.0
    enc = encode_log(path, schema)
    assert not enc.bad_rows and sorted(zip(enc.source_line.tolist(), enc.item_id.tolist(), enc.label.tolist())) == [
        (1, 1193, 1), (2, 661, 0), (3, 914, 0), (4, 3408, 1), (5, 2355, 0), (6, 1193, 1)]


def test_a_headerless_log_of_string_ids_and_iso_times(tmp_path):
    path = _write(tmp_path, "shop.csv", "alice,hat,click,2019-11-24T10:00:00Z\nbob,cap,view,2019-11-24T10:05:00Z\n"
                  "alice,cap,view,2019-11-24T10:06:00Z\n")
    schema = schema_for(path)
    assert _roles(schema) == ("column_1", "column_2", "column_3", "column_4")
    assert schema.positive_values == ("click",)
    assert encode_log(path, schema).label.tolist() == [1, 0, 0]


def test_a_rating_whose_not_rated_zero_fills_most_rows_is_still_a_scale(tmp_path):
    # Goodreads' interactions: 0 = shelved, not rated, on most rows; 1-5 otherwise.
    ratings = [0, 0, 5, 0, 3, 0, 4, 0, 2, 0, 1, 0]
    rows = "".join(f"u{i % 3},b{i},1,{r},0\n" for i, r in enumerate(ratings))
    path = _write(tmp_path, "goodreads.csv", "user_id,book_id,is_read,rating,is_reviewed\n" + rows)
    schema, stats = infer_schema(path)
    assert schema.positive_threshold == 4.0
    assert "(0, on 58% of the rows, likely 'not rated', is a negative)" in stats.summary()
    enc = encode_log(path, schema)
    assert not enc.bad_rows and sorted(zip(enc.source_line.tolist(), enc.label.tolist())) == [
        (i + 2, int(r >= 4)) for i, r in enumerate(ratings)]


def test_event_words_as_shops_spell_them_and_retractions(tmp_path):
    # REES46: remove_from_cart is an event, not an engagement; add_to_cart is addtocart.
    path = _write(tmp_path, "rees.csv", "event_time,event_type,product_id,user_id\n"
                  "2019-10-01 00:00:00 UTC,view,1,7\n2019-10-01 00:00:01 UTC,add_to_cart,1,7\n"
                  "2019-10-01 00:00:02 UTC,remove_from_cart,1,7\n2019-10-01 00:00:03 UTC,purchase,2,8\n")
    schema = schema_for(path)
    assert schema.positive_values == ("add_to_cart", "purchase")
    enc = encode_log(path, schema)  # the cart is the view's label (streams.log_merge): one positive
    assert enc.label.tolist() == [1, 0, 1] and enc.folded_engagements == 1
    # Steam-200k: every row a purchase or a play, both engagements: a log of positives only.
    steam = _write(tmp_path, "steam.csv", "151603712,The Elder Scrolls V,purchase,1.0\n"
                   "151603712,The Elder Scrolls V,play,273.0\n151603712,Fallout 4,purchase,1.0\n")
    schema, stats = infer_schema(steam)
    assert schema.implicit and (schema.user_col, schema.item_col) == ("column_1", "column_2")
    assert "every cell of 'column_3' names an engagement (play, purchase)" in stats.summary()
    assert schema.column("column_3").kind == "ignore"  # a play or a purchase: unknown when serving


def test_a_headerless_log_takes_complete_columns_as_ids_and_the_schemas_names(tmp_path):
    # Last.fm 1K: user, time, artist id (empty on some rows), artist, track id, track.
    path = _write(tmp_path, "lastfm.tsv",
                  "user_000001\t2009-05-04T23:08:57Z\tf1b1cf71\tDeep Dish\t\tFuck Me Im Famous\n"
                  "user_000001\t2009-05-04T13:54:10Z\t\tRyuichi Sakamoto\t\tComposition 0919\n"
                  "user_000002\t2009-05-04T13:52:04Z\ta7f7df4a\tUnderworld\tb7ffd2af\tBoy, Boy, Boy\n")
    schema = schema_for(path)
    assert (schema.user_col, schema.item_col, schema.time_col) == ("column_1", "column_4", "column_2")
    from_file = schema_for(path, LogSchema(item_col="column_6"))  # a schema file naming the track wins
    assert (from_file.user_col, from_file.item_col) == ("column_1", "column_6")


def test_a_log_without_times_whose_rows_are_grouped_by_user_says_what_its_order_measures(tmp_path):
    grouped = "".join(f"{u},{(u * 7 + k) % 13},{(u + k) % 6}\n" for u in range(4) for k in range(10))
    schema, stats = infer_schema(_write(tmp_path, "anime.csv", "user_id,anime_id,rating\n" + grouped))
    assert schema.time_col == ""
    assert "the rows are grouped by user (4 users, 4 runs of rows): file order is no time order" in stats.summary()
    mixed = "".join(f"{k % 4},{(k * 7) % 13},{k % 6}\n" for k in range(40))
    _, stats = infer_schema(_write(tmp_path, "mixed.csv", "user_id,anime_id,rating\n" + mixed))
    assert "grouped by user" not in stats.summary()


def test_a_user_column_empty_on_most_rows_gives_way_to_the_session(tmp_path):
    # Diginetica's train-item-views: userId only for logged-in sessions.
    rows = "".join(f"{s};{'' if s % 4 else s // 4};{100 + (s * 3 + k) % 17};{k};2016-05-{1 + s % 9:02d}\n"
                   for s in range(1, 13) for k in range(3))
    path = _write(tmp_path, "train-item-views.csv", "sessionId;userId;itemId;timeframe;eventdate\n" + rows)
    schema, stats = infer_schema(path)
    assert (schema.user_col, schema.item_col, schema.time_col) == ("sessionId", "itemId", "eventdate")
    assert "'userId' is empty on 75% of its first rows" in stats.summary()
    assert not stats.bad_rows
