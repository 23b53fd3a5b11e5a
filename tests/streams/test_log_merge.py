"""An event log's view and the engagements that followed it are one positive example, as the
joiner would build it; nothing else is folded."""

import numpy as np

from streams.log_infer import schema_for
from streams.log_merge import VIEW_WINDOW_MS, engaged_views
from streams.log_reader import encode_log


def _reference(user, item, ts, label, window_ms):
    """Row by row: each engagement goes to the latest earlier view of its user and item, if near."""
    keep, merged = list(range(len(user))), [float(x) for x in label]
    latest: dict[tuple[int, int], int] = {}
    dropped = set()
    for r in range(len(user)):
        key = (int(user[r]), int(item[r]))
        if label[r] <= 0:
            latest[key] = r
        elif key in latest and ts[r] - ts[latest[key]] <= window_ms:
            merged[latest[key]] = 1.0
            dropped.add(r)
    keep = [r for r in keep if r not in dropped]
    return keep, [merged[r] for r in keep]


def test_a_view_and_the_cart_and_purchase_after_it_are_one_positive():
    s = 1000
    rows = [  # (user, item, ts, label) in time order
        (1, 10, 0 * s, 0),   # view ...
        (1, 10, 60 * s, 1),  # ... its cart ...
        (1, 11, 70 * s, 1),  # a cart with no view: an example of its own
        (1, 10, 120 * s, 1),  # ... its purchase
        (2, 10, 130 * s, 0),  # a view ...
        (2, 10, 900 * s, 1),  # ... and a cart 770 s later: past the window, two examples
        (3, 12, 140 * s, 0),  # an earlier view stays a negative ...
        (3, 12, 150 * s, 0),  # ... the latest view before the click is the one clicked
        (3, 12, 160 * s, 1),
    ]
    user, item, ts, label = (np.array(c) for c in zip(*rows))
    keep, merged = engaged_views(user, item, ts, label.astype(np.float32), window_ms=600 * s)
    assert keep.tolist() == [0, 2, 4, 5, 6, 7]
    assert merged.tolist() == [1, 1, 0, 1, 0, 1]


def test_engaged_views_matches_a_row_by_row_reference():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 300))
        ts = np.sort(rng.integers(0, 5_000, n))
        user, item = rng.integers(0, 4, n), rng.integers(0, 5, n)
        label = (rng.random(n) < 0.4).astype(np.float32)
        keep, merged = engaged_views(user, item, ts, label, window_ms=400)
        want_keep, want_merged = _reference(user, item, ts, label, 400)
        assert keep.tolist() == want_keep and merged.tolist() == want_merged


def test_an_event_log_is_read_as_the_joiner_joins_it_and_a_click_log_is_not(tmp_path):
    events = tmp_path / "events.csv"  # RetailRocket's spelling, ms times
    events.write_text("timestamp,visitorid,event,itemid\n"
                      "1433221332000,7,view,355\n1433221392000,7,addtocart,355\n"
                      "1433221400000,7,view,356\n1433221500000,8,addtocart,355\n"
                      "1433221600000,7,transaction,355\n")
    enc = encode_log(events, schema_for(events))
    assert enc.folded_engagements == 2  # the cart and the purchase of 355 by 7: its view's label
    assert sorted(zip(enc.source_line.tolist(), enc.label.tolist())) == [(2, 1), (4, 0), (5, 1)]
    assert VIEW_WINDOW_MS == 600_000
    clicks = tmp_path / "clicks.csv"  # impressions with 0/1 labels: each row is its own showing
    clicks.write_text("user_id,item_id,label,ts\n7,355,0,1000\n7,355,1,1060\n")
    enc = encode_log(clicks, schema_for(clicks))
    assert enc.folded_engagements == 0 and enc.label.tolist() == [0, 1]
