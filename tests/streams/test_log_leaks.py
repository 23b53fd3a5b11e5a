"""Columns a model must not learn from are left out of an inferred schema, each with the note
saying why; columns that merely predict well, and columns the schema file describes, stay."""

import numpy as np

from streams.log_infer import infer_schema
from streams.log_schema import ColumnSpec, LogSchema


def _kinds(schema: LogSchema) -> dict[str, str]:
    return {c.name: c.kind for c in schema.columns}


def _write(path, header: str, rows: list[str]):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_a_rows_own_id_or_text_is_left_out_and_a_session_that_repeats_is_kept(tmp_path):
    rng = np.random.default_rng(0)
    rows = [f"u{rng.integers(40)},i{rng.integers(60)},{rng.integers(2)},{1000 + t},r{t},"
            f"s{t // 5},great read number {t}" for t in range(600)]
    path = _write(tmp_path / "reviews.csv", "user_id,item_id,label,ts,review_id,session,text", rows)
    schema, stats = infer_schema(path)
    assert _kinds(schema) == {"review_id": "ignore", "session": "categorical", "text": "ignore"}
    assert "review_id ignored: its values almost never repeat (600 distinct in 600 cells)" in stats.summary()


def test_a_cell_that_only_comes_with_one_label_is_an_outcome_and_left_out(tmp_path):
    # Goodreads: an unread book is never rated; RetailRocket: only a purchase has a transaction id.
    rng = np.random.default_rng(1)
    rows = []
    for t in range(2000):
        read = rng.random() < 0.6
        rating = int(rng.integers(1, 6)) if read else 0
        bought = rating == 5 and rng.random() < 0.5
        rows.append(f"u{rng.integers(50)},b{rng.integers(80)},{rating},{1000 + t},{int(read)},"
                    f"{4000 + t if bought else ''},g{rng.integers(5)}")
    path = _write(tmp_path / "shelf.csv", "user_id,book_id,rating,ts,is_read,transactionid,genre", rows)
    schema, stats = infer_schema(path)
    assert schema.positive_threshold == 4.0
    assert _kinds(schema) == {"is_read": "ignore", "transactionid": "ignore", "genre": "categorical"}
    summary = stats.summary()
    assert "is_read ignored: one of its values comes with a negative label on 100.0% of its" in summary
    assert "transactionid ignored: a non-empty cell comes with a positive label on 100.0%" in summary
    kept = infer_schema(path, LogSchema(columns=(ColumnSpec("is_read", "categorical", "user"),)))[0]
    assert _kinds(kept)["is_read"] == "categorical"  # what the schema file says is kept


def test_in_a_log_of_positives_only_the_items_own_details_are_left_out(tmp_path):
    # Last.fm with the artist as the item: the track names it; the price an article sold at.
    rng = np.random.default_rng(2)
    rows = []
    for t in range(3000):
        artist = int(rng.integers(30))
        track = artist * 10 + int(rng.integers(4))
        price = 10 + artist + rng.normal(0, 0.3)
        rows.append(f"u{rng.integers(60)},{1000 + t},a{artist},track {track},{price:.2f},{rng.choice(['web', 'app'])}")
    path = _write(tmp_path / "plays.csv", "user_id,ts,artist,track,price,device", rows)
    schema, stats = infer_schema(path, item_col="artist")
    assert schema.implicit
    assert _kinds(schema) == {"track": "ignore", "price": "ignore", "device": "categorical"}
    assert "track ignored: in a log of positives only it names the row's item (100%" in stats.summary()


def test_a_small_log_keeps_every_column(tmp_path):
    rows = [f"u{t % 7},i{t % 11},{t % 2},{1000 + t},r{t},{t % 2}" for t in range(120)]
    schema, _ = infer_schema(_write(tmp_path / "small.csv", "user_id,item_id,label,ts,review_id,flag", rows))
    assert _kinds(schema)["review_id"] == "categorical"


def test_an_item_side_column_with_a_value_per_item_is_one_more_item_id(tmp_path):
    # Book-Crossing's books: an image URL per book beside its publisher.
    rng = np.random.default_rng(3)
    rows = []
    for t in range(1500):
        book = int(rng.integers(120))
        rows.append(f"u{rng.integers(40)},{book},{rng.integers(2)},{1000 + t},"
                    f"http://images.amazon.com/images/P/{book:010d}.01.jpg,pub{book % 9}")
    schema, stats = infer_schema(_write(tmp_path / "books.csv", "user_id,item_id,label,ts,image_url,publisher", rows))
    assert _kinds(schema) == {"image_url": "ignore", "publisher": "categorical"}
    assert "image_url ignored: one value per item (120 values for 120 items)" in stats.summary()
