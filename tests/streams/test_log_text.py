"""A log's ``text`` columns: item texts for the LLM rerank, never model features, replayed on
hw.items with each item's features (real broker)."""

import json
import subprocess
import sys

import pytest

from streams.events import SchemaError
from streams.item_features import MAX_TEXT_CHARS, decode_item_features
from streams.kafka_consumer import read_topic
from streams.kafka_io import topic_names
from streams.log_reader import encode_log
from streams.log_schema import ColumnSpec, LogSchema, entity_ids

LOG = """user_id,item_id,label,ts,title,blurb,genres
u1,hat,1,2020-01-01T00:00:03Z,Sun Hat,  wide brim ,Summer
u2,hat,0,2020-01-01T00:00:01Z,Old Hat,,Summer
u1,cap,0,2020-01-01T00:00:02Z,,,Sport
u3,cap,1,2020-01-01T00:00:04Z,Base Cap,cotton,Sport
u3,bag,0,2020-01-01T00:00:05Z,,,Travel
"""

SCHEMA = """
[columns.title]
kind = "text"
side = "item"

[columns.blurb]
kind = "text"
side = "item"

[columns.genres]
kind = "categorical"
side = "item"
"""


@pytest.fixture
def shop(tmp_path):
    (tmp_path / "shop.csv").write_text(LOG)
    (tmp_path / "shop.toml").write_text(SCHEMA)
    return tmp_path / "shop.csv", tmp_path / "shop.toml"


def test_each_item_gets_the_text_of_its_earliest_row_that_has_one(shop):
    log, schema = shop
    enc = encode_log(log, LogSchema.from_toml(schema))
    hat, cap, bag = entity_ids("item_id", ["hat", "cap", "bag"]).tolist()
    # hat: the row at 00:00:01 is earlier than the file's first row; its empty blurb is left out.
    # cap: the earlier row has no text at all, so the later one's. bag: none.
    assert enc.item_text == {hat: "Old Hat", cap: "Base Cap. cotton"}
    assert set(enc.sparse) == {"genres"}  # text is no feature
    assert enc.dense.shape[1] == 0


def test_a_text_column_is_item_side_and_survives_the_toml_round_trip(tmp_path):
    with pytest.raises(SchemaError, match="'bio'.*text column describes the item"):
        ColumnSpec("bio", "text", "user")
    s = LogSchema(columns=(ColumnSpec("title", "text", "item"), ColumnSpec("genres", "multi", "item")))
    assert s.text_columns() == ("title",) and s.item_slots() == ("genres",)
    (tmp_path / "s.toml").write_text(s.to_toml())
    assert LogSchema.from_toml(tmp_path / "s.toml") == s


def test_a_long_text_is_cut_to_the_wire_limit(tmp_path):
    (tmp_path / "long.csv").write_text("user_id,item_id,label,ts,title\n"
                                       f"u,i,1,1,{'x' * (MAX_TEXT_CHARS + 50)}\n")
    enc = encode_log(tmp_path / "long.csv", LogSchema(columns=(ColumnSpec("title", "text"),)))
    assert [len(t) for t in enc.item_text.values()] == [MAX_TEXT_CHARS]


def test_replay_publishes_each_items_text_on_hw_items(kafka_topics, shop):
    log, schema = shop
    out = subprocess.run([sys.executable, "-m", "headwater", "replay", str(log), "--schema", str(schema),
                          "--bootstrap-servers", kafka_topics.bootstrap_servers,
                          "--topic-prefix", kafka_topics.topic_prefix],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["item_updates"] == 3
    topics = topic_names(kafka_topics.topic_prefix)
    got = {f.item_id: f for f in (decode_item_features(r.value)
                                  for r in read_topic(kafka_topics, topics.items, idle_s=0.5))}
    hat, cap, bag = entity_ids("item_id", ["hat", "cap", "bag"]).tolist()
    assert {i: f.text for i, f in got.items()} == {hat: "Old Hat", cap: "Base Cap. cotton", bag: None}
    assert set(got[hat].sparse) == {"genres"}


def test_a_title_like_item_column_is_inferred_as_text_and_a_category_is_not(tmp_path):
    from streams.log_infer import infer_schema

    rows = ["user_id,item_id,label,ts,title,brand,tagline,city"]
    for k in range(40):
        item = k % 10
        rows.append(f"u{k % 7},i{item},{k % 2},{k},The Movie Number {item},Acme {item % 2},"
                    f"{'Big Fun' if item < 3 else 'x'}{item},New York {k % 3}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    schema, stats = infer_schema(tmp_path / "t.csv")
    kinds = {c.name: (c.kind, c.side) for c in schema.columns}
    # title: words, one per item -> text. brand: words but 2 values for 10 items -> categorical.
    # tagline: one per item but mostly single words -> categorical. city: varies within an item.
    assert kinds == {"title": ("text", "item"), "brand": ("categorical", "item"),
                     "tagline": ("categorical", "item"), "city": ("categorical", "user")}
    assert stats.columns["title"].with_space == 40
    enc = encode_log(tmp_path / "t.csv", schema)
    assert enc.item_text[int(entity_ids("item_id", ["i4"])[0])] == "The Movie Number 4"
