"""The loopback S3 endpoint behind durable broker storage: the semantics Tansu relies on
(conditional writes for its optimistic concurrency, listings that page), over a real socket."""

import threading
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

import pytest

from streams.local_s3 import serve

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.fixture()
def s3():
    server = serve(buckets=("b",))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def call(url, method="GET", body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_conditional_writes_refuse_a_stale_writer(s3):
    status, headers, _ = call(f"{s3}/b/w.json", "PUT", b"v1", {"If-None-Match": "*"})
    assert status == 200
    first = headers["ETag"]
    status, _, body = call(f"{s3}/b/w.json", "PUT", b"again", {"If-None-Match": "*"})
    assert status == 412 and b"PreconditionFailed" in body  # create: already there
    assert call(f"{s3}/b/w.json", "PUT", b"v2", {"If-Match": first})[0] == 200
    status, _, _ = call(f"{s3}/b/w.json", "PUT", b"lost update", {"If-Match": first})
    assert status == 412  # the version it read is gone
    assert call(f"{s3}/b/missing", "PUT", b"x", {"If-Match": first})[0] == 404
    assert call(f"{s3}/b/w.json")[2] == b"v2"


def test_reads_ranges_heads_and_deletes(s3):
    call(f"{s3}/b/k", "PUT", b"0123456789")
    status, headers, body = call(f"{s3}/b/k", headers={"Range": "bytes=2-4"})
    assert (status, body, headers["Content-Range"]) == (206, b"234", "bytes 2-4/10")
    assert call(f"{s3}/b/k", headers={"Range": "bytes=-3"})[2] == b"789"
    assert call(f"{s3}/b/k", headers={"Range": "bytes=20-"})[0] == 416
    status, headers, body = call(f"{s3}/b/k", "HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "10"
    assert call(f"{s3}/b/k", headers={"If-None-Match": headers["ETag"]})[0] == 304
    assert call(f"{s3}/b/k", "DELETE")[0] == 204
    assert call(f"{s3}/b/k")[0] == 404
    assert call(f"{s3}/nobucket/k")[0] == 404


def _list(s3, **q):
    query = "&".join(f"{k.replace('_', '-')}={v}" for k, v in q.items())
    root = ET.fromstring(call(f"{s3}/b?list-type=2&{query}")[2])
    keys = [e.text for e in root.iter(f"{NS}Key")]
    prefixes = [c.find(f"{NS}Prefix").text for c in root.iter(f"{NS}CommonPrefixes")]
    token = root.find(f"{NS}NextContinuationToken")
    return keys, prefixes, None if token is None else token.text


def test_listings_page_in_key_order_under_a_prefix(s3):
    names = [f"t/p/{i:05d}.batch" for i in range(25)] + ["t/q/x", "u/y", "t/p/sub/a", "t/p/sub/b"]
    for n in reversed(names):
        call(f"{s3}/b/{n}", "PUT", n.encode())
    got, token = [], ""
    while True:
        keys, _, token = _list(s3, prefix="t/p/", max_keys=7, **({"continuation_token": token} if token else {}))
        got += keys
        if token is None:
            break
    assert got == sorted(n for n in names if n.startswith("t/p/"))
    keys, prefixes, token = _list(s3, prefix="t/", delimiter="/")
    assert keys == [] and token is None and prefixes == ["t/p/", "t/q/"]
    keys, _, _ = _list(s3, prefix="t/p/", start_after="t/p/00022.batch")
    assert keys == ["t/p/00023.batch", "t/p/00024.batch", "t/p/sub/a", "t/p/sub/b"]
    body = b'<Delete><Object><Key>u/y</Key></Object><Object><Key>t/q/x</Key></Object></Delete>'
    assert call(f"{s3}/b?delete", "POST", body)[0] == 200
    assert _list(s3, prefix="u/")[0] == [] and _list(s3, prefix="t/q/")[0] == []


def test_what_it_does_not_serve_fails_loudly(s3):
    assert call(f"{s3}/b/k?uploads", "PUT", b"")[0] == 501
    assert call(f"{s3}/b?list-type=1")[0] == 501
