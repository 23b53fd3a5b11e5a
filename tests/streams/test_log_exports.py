"""Logs as public exports write them (UCI Online Retail, Coveo, KuaiRand, Trivago) run with no
flags: their names as the exports dress them, guests' rows and page views skipped and counted,
lists where a name says so, other outcomes of the event left out."""

import numpy as np

from streams.log_infer import infer_schema, schema_for
from streams.log_reader import encode_log


def _write(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_online_retail_guests_are_skipped_and_its_us_invoice_dates_read(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(400):
        customer = "" if i % 4 == 0 else f"{12000 + i % 37}.0"  # pandas' float ids; a guest's empty
        day, minute = 1 + i // 40, i % 60
        rows.append([f"5{i // 3:05d}", f"2{rng.integers(50):04d}", f'"ITEM {i % 50}, RED"', 1 + i % 5,
                     f"12/{day}/2009 7:{minute:02d}", "2.95", customer, "United Kingdom"])
    path = _write(tmp_path / "online_retail_II.csv",
                  ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "Customer ID", "Country"],
                  rows)
    schema, stats = infer_schema(path)
    assert (schema.user_col, schema.item_col, schema.time_col) == ("Customer ID", "StockCode", "InvoiceDate")
    assert schema.time_format == "%m/%d/%Y %H:%M" and schema.skip_empty_ids and schema.implicit
    assert stats.bad_rows == 0 and stats.skipped_rows == 100
    assert "skipped 100 (no user or item)" in stats.summary()
    log = encode_log(path, schema)  # on_bad_row="error": nothing stops it
    assert log.skipped_rows == 100 and not log.bad_rows
    assert (log.label == 1).sum() == 300  # each signed-in line a positive, beside sampled negatives
    assert np.datetime64(int(log.ts_ms.min()), "ms") == np.datetime64("2009-12-01T07:01")


def test_coveo_names_with_hash_and_epoch_suffixes_and_its_product_action_label(tmp_path):
    rows = []
    for i in range(300):
        session, t = f"s{i // 6:03d}hash", 1_555_202_092_860 + 1000 * i
        if i % 2:
            rows.append([session, "pageview", "", "", t, f"url{i % 7}"])
        else:
            rows.append([session, "event_product", ["detail", "add", "detail", "purchase", "remove"][i % 5],
                         f"sku{i % 23}", t, f"url{i % 7}"])
    path = _write(tmp_path / "browsing_train.csv", ["session_id_hash", "event_type", "product_action",
                                                    "product_sku_hash", "server_timestamp_epoch_ms", "hashed_url"], rows)
    schema, stats = infer_schema(path)
    assert (schema.user_col, schema.item_col, schema.time_col, schema.label_col) == (
        "session_id_hash", "product_sku_hash", "server_timestamp_epoch_ms", "product_action")
    assert set(schema.positive_values) == {"add", "purchase"} and schema.skip_empty_ids
    assert any("'event_type' holds neither numbers nor known event words" in n for n in stats.notes)
    log = encode_log(path, schema)
    assert log.skipped_rows == 150 and not log.bad_rows


def test_a_tag_pair_is_a_list_and_columns_named_for_engagements_are_outcomes(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for i in range(600):
        click = int(rng.random() < 0.4)
        tags = f"{rng.integers(1, 40)},{rng.integers(1, 40)}" if i % 3 else str(rng.integers(1, 40))
        rows.append([i % 50, i % 70, 1_649_376_000_000 + i, click, int(click and rng.random() < 0.1),
                     int(click and rng.random() < 0.01), f'"{tags}"'])
    path = _write(tmp_path / "log.csv", ["user_id", "video_id", "time_ms", "is_click", "is_like", "is_follow", "tag"],
                  rows)
    schema, stats = infer_schema(path)
    assert (schema.item_col, schema.time_col, schema.label_col) == ("video_id", "time_ms", "is_click")
    assert schema.column("tag").kind == "multi" and schema.column("tag").separator == ","
    assert schema.column("is_like").kind == "ignore" and schema.column("is_follow").kind == "ignore"
    assert any(n.startswith("is_follow ignored: its name is an engagement's") for n in stats.notes)


def test_a_search_log_clickout_among_its_impressions_runs_without_flags(tmp_path):
    rows = []
    for i in range(200):
        user, t = f"u{i % 9}", 1_541_563_426 + 10 * i
        if i % 3 == 2:  # a clickout: the reference is among the impressions
            rows.append([user, t, "clickout item", 100 + i % 4, "100|101|102|103"])
        else:  # an interaction, or a search: no impressions (a city for a reference)
            rows.append([user, t, "interaction item image" if i % 3 else "search for destination",
                         100 + i % 4 if i % 3 else "Milan", ""])
    path = _write(tmp_path / "train.csv", ["user_id", "timestamp", "action_type", "reference", "impressions"], rows)
    schema = schema_for(path)
    assert (schema.item_col, schema.impressions_col, schema.label_col) == ("reference", "impressions", "label")
    assert schema.skip_empty_ids
    log = encode_log(path, schema)
    clickouts = sum(r[2] == "clickout item" for r in rows)
    assert len(log) == 4 * clickouts and log.label.sum() == clickouts
    assert log.skipped_rows == len(rows) - clickouts


def test_otto_sessions_of_nested_events_are_read_as_a_row_per_event(tmp_path):
    import json

    lines = [{"session": s, "events": [{"aid": 100 + (s * 7 + k) % 30, "ts": 1_659_304_800 + 60 * s + k,
                                        "type": ["clicks", "carts", "orders"][k % 3]} for k in range(1 + s % 4)]}
             for s in range(80)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    schema = schema_for(path)
    assert (schema.user_col, schema.item_col, schema.time_col) == ("session", "events.aid", "events.ts")
    assert schema.implicit  # clicks, carts, orders: all engagements, a log of positives
    log = encode_log(path, schema)
    assert (log.label == 1).sum() == sum(1 + s % 4 for s in range(80))
    assert set(log.source_line[log.label == 1].tolist()) == set(range(1, 81))  # each event on its session's line


def test_segment_track_events_read_their_nested_properties_and_event_phrases(tmp_path):
    import json

    lines = []
    for i in range(300):
        anon, user = f"anon-{i % 20}", (f"u{i % 20}" if i % 5 == 0 else None)
        if i % 3 == 0:
            lines.append({"type": "page", "anonymousId": anon, "userId": user, "name": "Home",
                          "timestamp": f"2024-03-01T00:{i // 60:02d}:{i % 60:02d}.000Z", "properties": {"path": "/"}})
        else:
            event = ["Product Viewed", "Product Added", "Product Viewed", "Product Removed"][i % 4]
            lines.append({"type": "track", "event": event, "anonymousId": anon, "userId": user,
                          "timestamp": f"2024-03-01T00:{i // 60:02d}:{i % 60:02d}.000Z",
                          "properties": {"product_id": f"sku-{i % 13}", "price": 9.5}})
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    schema, stats = infer_schema(path)
    assert (schema.user_col, schema.item_col, schema.label_col) == ("anonymousId", "properties.product_id", "event")
    assert schema.positive_values == ("Product Added",) and schema.skip_empty_ids
    assert stats.skipped_rows == 100 and stats.bad_rows == 0


def test_month_day_times_without_a_year_read_in_2000(tmp_path):
    rows = [[i % 30, i % 40, 0, 1, 2, f"{5 + i // 60}{(1 + i % 28):02d}", i % 4] for i in range(300)]
    path = _write(tmp_path / "user_log_format1.csv",
                  ["user_id", "item_id", "cat_id", "seller_id", "brand_id", "time_stamp", "action_type"], rows)
    schema, stats = infer_schema(path)
    assert schema.time_col == "time_stamp" and schema.time_format == "%m%d"
    assert any("(no year: 2000 is taken)" in n for n in stats.notes)
    assert stats.time_min.startswith("2000-05-01")


def test_headerless_exports_of_many_columns_or_hashes_are_not_guessed_into_a_user_and_item(tmp_path):
    import pytest

    from streams.events import SchemaError

    rng = np.random.default_rng(3)
    criteo = tmp_path / "train.txt"  # label, 13 counts, 26 hashed categories: no user, no item
    criteo.write_text("".join("\t".join([str(int(rng.random() < 0.25))] + [str(rng.integers(5)) for _ in range(13)]
                                        + [f"{rng.integers(1 << 31):08x}" for _ in range(26)]) + "\n"
                              for _ in range(300)))
    with pytest.raises(SchemaError, match="missing columns.*first line is data"):
        schema_for(criteo)
    jester = tmp_path / "jester.csv"  # one row per user, a rating (99: none) per joke
    jester.write_text("".join(",".join([str(rng.integers(20, 101))] + [
        f"{rng.uniform(-10, 10):.2f}" if rng.random() < 0.7 else "99" for _ in range(100)]) + "\n" for _ in range(300)))
    with pytest.raises(SchemaError, match="missing columns"):
        schema_for(jester)


def test_item_attributes_named_for_its_interactions_are_outcomes_and_codes_are_categories(tmp_path):
    rows = [[f"u{i % 30}", f"b{i % 50}", int((i * 7) % 5 == 0), 1_700_000_000 + i, round(3 + (i % 50) / 25, 2),
             10 * (i % 50), 100 + (i * 13) % 97] for i in range(600)]
    path = _write(tmp_path / "log.csv", ["user_id", "business_id", "label", "ts", "stars", "review_count",
                                         "PRODUCT_SUBCLASS"], rows)
    schema, stats = infer_schema(path)
    assert schema.column("stars").kind == "ignore" and schema.column("review_count").kind == "ignore"
    assert any(n.startswith("stars ignored: its name says it sums up the item's interactions") for n in stats.notes)
    assert schema.column("PRODUCT_SUBCLASS").kind == "categorical"


def test_play_counts_in_a_headerless_extract_are_positives_not_a_rating_scale(tmp_path):
    rng = np.random.default_rng(4)
    plays = np.minimum(rng.geometric(0.45, 900), 23)  # 1 the most common, a long tail
    path = tmp_path / "train_triplets.txt"
    users = [f"{rng.integers(1 << 60):016x}" for _ in range(60)]
    path.write_text("".join(f"{users[rng.integers(60)]}\tSO{rng.integers(400):06d}\t{p}\n" for p in plays))
    schema, stats = infer_schema(path)
    assert schema.implicit and schema.positive_threshold is None
    plays_spec = schema.column("column_3")
    assert plays_spec is None or plays_spec.kind == "ignore"  # known after the fact: no feature
    assert "column_3" not in schema.dense_names() and any("'column_3' counts" in n for n in stats.notes)
