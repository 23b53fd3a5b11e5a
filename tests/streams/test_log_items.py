"""An item attributes table beside the log (``items_file``): joined on the item id as the log is
read, it must encode exactly like the same log with the item columns already in it."""

import csv
import json

import pytest

from streams.events import SchemaError
from streams.log_infer import infer_schema
from streams.log_reader import encode_log
from streams.log_schema import LogSchema
from streams.replay import ReplayConfig, log_schema
from tests.streams.log_fixtures import write_real_shaped_csv
from tests.streams.test_log_reader import assert_same_log

ITEM_COLS = ("genres", "year")


def _split(full, tmp_path, items_name="items.tsv", key="item_id"):
    """The log without its item columns, and an item table (one row per item, shuffled)."""
    rows = list(csv.DictReader(open(full, newline="")))
    log = tmp_path / "events.csv"
    with open(log, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c not in ITEM_COLS])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k not in ITEM_COLS} for r in rows)
    items = {r["item_id"]: {key: f" {r['item_id']} ", **{c: r[c] for c in ITEM_COLS}} for r in rows}
    table = tmp_path / items_name
    ordered = [items[k] for k in sorted(items, reverse=True)]
    if items_name.endswith(".jsonl"):
        table.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    else:
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[key, *ITEM_COLS], delimiter="\t")
            w.writeheader()
            w.writerows(ordered)
    return log, table


@pytest.mark.parametrize("items_name, key", [("items.tsv", "item_id"), ("items.jsonl", "sku")])
def test_a_log_and_its_item_table_encode_like_the_joined_log(tmp_path, items_name, key):
    full = write_real_shaped_csv(tmp_path / "full.csv")
    schema, _ = infer_schema(full)
    log, table = _split(full, tmp_path, items_name, key)
    names = {"items_file": str(table), **({"items_key": key} if key != "item_id" else {})}
    joined, _ = infer_schema(log, **names)
    assert {c.name: c for c in joined.columns} == {c.name: c for c in schema.columns}
    assert_same_log(encode_log(full, schema), encode_log(log, joined, chunk_rows=45))
    # The schema file keeps the table (absolute), and a reader of that file joins it again.
    saved = tmp_path / "elsewhere" / "schema.toml"
    saved.parent.mkdir()
    saved.write_text(joined.to_toml())
    again = LogSchema.from_toml(saved)
    assert again == joined and again.items_file == str(table.resolve())
    cfg = ReplayConfig(schema=str(saved))
    assert log_schema(log, cfg) == joined


def test_an_item_missing_from_the_table_reads_empty_cells(tmp_path):
    log = tmp_path / "e.csv"
    log.write_text("user_id,item_id,label,ts\n1,10,1,5\n1,11,0,6\n2,12,0,7\n")
    table = tmp_path / "items.csv"
    table.write_text("item_id,brand,price\n10,acme,2.5\n12,bolt,\n")
    schema, stats = infer_schema(log, LogSchema(items_file=str(table)))
    assert "items_file: 1 of the 3 rows (33.3%) name an item items.csv does not list" in stats.summary()
    enc = encode_log(log, schema)
    brand = dict(zip(enc.item_id.tolist(), enc.sparse["brand"].values.tolist()))
    assert brand[10] != brand[12] and brand[11] not in (brand[10], brand[12])  # the missing id


def test_ids_match_as_ids_so_a_pandas_float_id_finds_its_row(tmp_path):
    log = tmp_path / "e.csv"  # pandas wrote the log's item ids as floats (an empty cell elsewhere)
    log.write_text("user_id,item_id,label,ts\n1,10.0,1,5\n1,12.0,0,6\n2,,0,7\n")
    table = tmp_path / "items.csv"
    table.write_text("item_id,brand\n10,acme\n12,bolt\n")
    schema, _ = infer_schema(log, LogSchema(items_file=str(table)))
    enc = encode_log(log, schema, on_bad_row="dead-letter")
    assert enc.item_id.tolist() == [10, 12] and [b.line for b in enc.bad_rows] == [4]
    plain = tmp_path / "plain.csv"
    plain.write_text("user_id,item_id,label,ts,brand\n1,10,1,5,acme\n1,12,0,6,bolt\n")
    assert enc.sparse["brand"].values.tolist() == encode_log(plain, infer_schema(plain)[0]).sparse["brand"].values.tolist()


@pytest.mark.parametrize("text, error", [
    ("item_id,brand\n10,a\n10,b\n", "item '10' is listed twice (lines 2 and 3)"),
    ("item_id,brand\n10,a\n ,b\n", "line 3: empty 'item_id'"),
    ("item_id,brand\n10,a\n10.0,b\n", "'10' and '10.0' are one item, listed twice"),
    ("code,brand\n10,a\n", "no id column 'item_id'"),  # no usual item name either (sku would be taken)
    ("item_id,brand\n10,a,extra\n", "line 2"),
])
def test_a_bad_item_table_is_an_error_naming_it(tmp_path, text, error):
    log = tmp_path / "e.csv"
    log.write_text("user_id,item_id,label,ts\n1,10,1,5\n")
    table = tmp_path / "items.csv"
    table.write_text(text)
    with pytest.raises(SchemaError, match="item table") as err:
        infer_schema(log, LogSchema(items_file=str(table)))
    assert error in str(err.value)
    with pytest.raises(SchemaError, match="No such file"):
        infer_schema(log, LogSchema(items_file=str(tmp_path / "none.csv")))


def test_an_item_listed_twice_identically_is_read_once(tmp_path):
    from streams.log_items import ItemTable

    table = tmp_path / "meta.csv"  # Amazon's metadata repeats some products, cell for cell
    table.write_text("asin,brand,category\nB1,acme,Books|Fiction\nB2,zeta,Books\nB1,acme,Books|Fiction\n")
    items = ItemTable(table, "asin")
    assert len(items.keys) == 2 and items.table.column("brand").to_pylist() == ["acme", "zeta"]


def test_an_item_table_column_the_log_has_too_is_read_as_item_dot_name(tmp_path):
    """Amazon 2023's reviews and metadata both have a ``title``: the product's is ``item.title``."""
    log = tmp_path / "reviews.csv"
    log.write_text("user_id,parent_asin,asin,label,ts,title\n" + "".join(
        f"u{i % 5},P{i % 7},A{i % 11},{i % 2},{1_700_000_000 + i},review {i % 3}\n" for i in range(60)))
    meta = tmp_path / "meta.csv"
    meta.write_text("parent_asin,title,store\n" + "".join(f"P{i},product {i},s{i % 2}\n" for i in range(7)))
    schema, stats = infer_schema(log, LogSchema(items_file=str(meta)))
    # The metadata lists parents: the log's item is its parent_asin (not asin, the usual name's first).
    assert schema.item_col == "parent_asin" and not schema.items_key
    assert any(n.startswith("item_col = 'parent_asin'") for n in stats.notes)
    assert schema.column("item.title").side == "item" and schema.column("title").side == "user"
    enc = encode_log(log, schema)
    assert len(enc) == 60 and "store" in enc.sparse


def test_a_user_table_joins_user_attributes_by_user_id(tmp_path):
    """H&M's transactions beside its customers.csv: the customer's age and status are user features."""
    log = tmp_path / "transactions_train.csv"
    log.write_text("t_dat,customer_id,article_id,price\n" + "".join(
        f"2020-09-{1 + i // 40:02d},c{i % 23},{100 + i % 31},0.0{i % 9 + 1}\n" for i in range(400)))
    customers = tmp_path / "customers.csv"
    customers.write_text("customer_id,age,club_member_status,price\n" + "".join(
        f"c{i},{20 + i},{'ACTIVE' if i % 3 else 'PRE-CREATE'},{i}\n" for i in range(20)))  # c20..c22 unlisted
    schema, stats = infer_schema(log, LogSchema(users_file=str(customers)))
    assert schema.user_col == "customer_id" and schema.users_file == str(customers)
    assert schema.column("age").side == "user" and schema.column("club_member_status").side == "user"
    assert schema.column("user.price") is not None  # the log has a price too
    assert any(n.startswith("users_file: 51 of the 400 rows") for n in stats.notes)
    enc = encode_log(log, schema)
    assert "club_member_status" in enc.sparse and (enc.label == 1).sum() == 400
    # A customer's status is the same on each of its rows, and differs between ACTIVE and PRE-CREATE ones.
    status = enc.sparse["club_member_status"]
    first = {}
    for row, user in enumerate(enc.user_id.tolist()):
        first.setdefault(user, status.values[status.offsets[row]])
        assert status.values[status.offsets[row]] == first[user]
    assert len(set(first.values())) == 3  # ACTIVE, PRE-CREATE, and the unlisted customers' empty cell
    toml = tmp_path / "s.toml"
    toml.write_text(schema.to_toml())
    assert LogSchema.from_toml(toml) == schema


def test_movielens_1m_and_100k_attribute_tables_without_header_lines(tmp_path):
    """ML-1M's movies.dat ("::", a title's own colon kept) and users.dat; ML-100K's pipe-separated
    u.item: keyed by their first column, joined onto a headerless log."""
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("".join(f"{1 + i % 9}::{1 + i % 6}::{1 + i % 5}::{978300000 + i}\n" for i in range(240)))
    movies = tmp_path / "movies.dat"
    genres = ["Action|Sci-Fi", "Comedy", "Drama|Comedy"]
    movies.write_bytes("".join(f"{m}::Star Wars: Episode {m} (197{m})::{genres[m % 3]}\n" for m in range(1, 7))
                       .replace("Episode 3", "Caf\u00e9 3").encode("latin-1"))
    users = tmp_path / "users.dat"
    users.write_text("".join(f"{u}::{'MF'[u % 2]}::{18 + u}::{u % 4}::0{u}000\n" for u in range(1, 10)))
    schema, stats = infer_schema(ratings, LogSchema(items_file=str(movies), users_file=str(users)))
    assert (schema.user_col, schema.item_col) == ("column_1", "column_2") and schema.items_key == "column_1"
    assert schema.column("item.column_3").kind == "multi"  # the genres
    assert schema.column("user.column_2").side == "user" and stats.bad_rows == 0
    enc = encode_log(ratings, schema)
    assert len(enc) == 240 and "item.column_3" in enc.sparse
    u_item = tmp_path / "u.item"
    u_item.write_text("".join(f"{m}|Movie {m} (1995)|01-Jan-1995||http://imdb/{m}|{m % 2}|{1 - m % 2}\n"
                              for m in range(1, 7)))
    u_data = tmp_path / "u.data"
    u_data.write_text("".join(f"{1 + i % 9}\t{1 + i % 6}\t{1 + i % 5}\t{881250949 + i}\n" for i in range(240)))
    schema, _ = infer_schema(u_data, LogSchema(items_file=str(u_item)))
    assert schema.items_key == "column_1" and schema.column("column_6").side == "item"
    assert len(encode_log(u_data, schema)) == 240
