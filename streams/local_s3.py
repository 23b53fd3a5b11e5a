"""A loopback S3 endpoint holding objects in memory: the durable storage of a local broker.

``headwater broker --storage s3://...`` keeps every record batch, watermark and group in S3
through Tansu's object store, so a broker killed and started again finds its topics. Tests and
``headwater bench chaos`` need such an endpoint on loopback that outlives the broker. moto's
server did this, and became the pipeline's bottleneck: Tansu lists a partition's objects on every
fetch, moto filters every key of the bucket in Python and renders each listed key through its
generic serializer (about 0.24 s per 1,000 keys), so a read cost grew with the log, and a
ten-minute chaos run saturated a core with it (reading 3,000 batches from offset 0 took 50 s;
here 1.6 s). This server keeps the keys sorted, so a listing costs what it returns.

What Tansu's object store uses, and nothing more: path-style requests to one bucket; PUT (with
``If-None-Match: *`` and ``If-Match`` preconditions, which Tansu's optimistic concurrency on
watermarks and groups relies on: a failed one answers 412), GET (ranges, ``If-Match`` /
``If-None-Match``), HEAD, DELETE, multi-object delete, ListObjectsV2 (prefix, delimiter,
start-after, continuation). Anything else answers 501, so a client needing more fails loudly.
Requests are not authenticated: it binds to loopback and is for tests and local benchmarks.

Run: ``python -m streams.local_s3 --port P [--bucket NAME]`` (or
:class:`streams.broker.LocalS3Server`).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import logging
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

__all__ = ["ObjectStore", "serve"]

_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass(frozen=True)
class _Object:
    data: bytes
    etag: str  # quoted, as S3 sends it
    modified: float
    content_type: str


class ObjectStore:
    """Buckets of objects, each bucket's keys kept sorted (a listing is a bisect and a slice)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, _Object]] = {}
        self._keys: dict[str, list[str]] = {}

    def create_bucket(self, bucket: str) -> None:
        with self._lock:
            self._objects.setdefault(bucket, {})
            self._keys.setdefault(bucket, [])

    def has_bucket(self, bucket: str) -> bool:
        return bucket in self._objects

    def get(self, bucket: str, key: str) -> _Object | None:
        return self._objects[bucket].get(key)

    def put(self, bucket: str, key: str, data: bytes, content_type: str,
            if_match: str | None, if_none_match: str | None) -> tuple[int, _Object | None]:
        """(status, object): 200 and the new object, 412 where a precondition fails (S3's
        answer to both), 404 for ``If-Match`` on a missing key."""
        obj = _Object(data, f'"{hashlib.md5(data).hexdigest()}"', time.time(), content_type)
        with self._lock:
            objects = self._objects[bucket]
            current = objects.get(key)
            if if_none_match is not None and current is not None and (
                    if_none_match.strip() == "*" or if_none_match.strip() == current.etag):
                return 412, None
            if if_match is not None:
                if current is None:
                    return 404, None
                if if_match.strip() not in ("*", current.etag):
                    return 412, None
            if current is None:
                bisect.insort(self._keys[bucket], key)
            objects[key] = obj
        return 200, obj

    def delete(self, bucket: str, key: str) -> None:
        with self._lock:
            if self._objects[bucket].pop(key, None) is not None:
                keys = self._keys[bucket]
                del keys[bisect.bisect_left(keys, key)]

    def list(self, bucket: str, prefix: str, after: str, delimiter: str,
             max_keys: int) -> tuple[list[tuple[str, _Object]], list[str], str | None]:
        """(objects, common prefixes, next key to start after or None) of one page."""
        with self._lock:
            keys, objects = self._keys[bucket], self._objects[bucket]
            i = bisect.bisect_left(keys, prefix)
            if after:  # a page ended at a common prefix: resume past every key under it
                past = after + "\U0010ffff" if delimiter and after.endswith(delimiter) else after
                i = max(i, bisect.bisect_right(keys, past))
            found: list[tuple[str, _Object]] = []
            prefixes: list[str] = []
            last = None
            while i < len(keys) and keys[i].startswith(prefix):
                if len(found) + len(prefixes) >= max_keys:
                    return found, prefixes, last
                key = keys[i]
                cut = key.find(delimiter, len(prefix)) if delimiter else -1
                if cut >= 0:  # every key under this common prefix counts once: skip past them
                    common = key[:cut + len(delimiter)]
                    prefixes.append(common)
                    last = common
                    i = bisect.bisect_left(keys, common + "\U0010ffff")
                    continue
                found.append((key, objects[key]))
                last = key
                i += 1
        return found, prefixes, None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the object store client reuses connections
    disable_nagle_algorithm = True  # with keep-alive, Nagle and delayed ACKs stall each answer
    store: ObjectStore  # set by serve()

    def log_message(self, fmt: str, *args) -> None:  # the default writes every request to stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    # -- plumbing ---------------------------------------------------------------------------
    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.append(b"\r\n")  # the headers and the body in one write
        if body and not head:
            self._headers_buffer.append(body)
        self.flush_headers()

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error>").encode()
        self._send(status, body, {"Content-Type": "application/xml"}, head)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ValueError("chunked uploads are not supported")
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _bucket(self, bucket: str, head: bool = False) -> bool:
        if self.store.has_bucket(bucket):
            return True
        self._error(404, "NoSuchBucket", f"bucket {bucket!r} does not exist", head)
        return False

    # -- verbs ------------------------------------------------------------------------------
    def do_PUT(self) -> None:
        bucket, key, query = self._target()
        try:
            data = self._body()
        except ValueError as exc:
            return self._error(501, "NotImplemented", str(exc))
        if not key:
            self.store.create_bucket(bucket)
            return self._send(200)
        if query or any(h.lower().startswith("x-amz-copy-source") for h in self.headers):
            return self._error(501, "NotImplemented", "copies and multipart uploads are not supported")
        if not self._bucket(bucket):
            return
        status, obj = self.store.put(bucket, key, data,
                                     self.headers.get("Content-Type", "binary/octet-stream"),
                                     self.headers.get("If-Match"), self.headers.get("If-None-Match"))
        if status == 412:
            return self._error(412, "PreconditionFailed", f"a precondition on {key!r} failed")
        if status == 404:
            return self._error(404, "NoSuchKey", f"{key!r} does not exist")
        assert obj is not None
        self._send(200, headers={"ETag": obj.etag})

    def do_GET(self, head: bool = False) -> None:
        bucket, key, query = self._target()
        if not self._bucket(bucket, head):
            return
        if not key:
            if query.get("list-type", [""])[0] != "2":
                return self._error(501, "NotImplemented", "only ListObjectsV2 is supported", head)
            return self._list(bucket, query, head)
        obj = self.store.get(bucket, key)
        if obj is None:
            return self._error(404, "NoSuchKey", f"{key!r} does not exist", head)
        headers = {"ETag": obj.etag, "Last-Modified": formatdate(obj.modified, usegmt=True),
                   "Content-Type": obj.content_type, "Accept-Ranges": "bytes"}
        if_match, if_none = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        if if_match is not None and if_match.strip() not in ("*", obj.etag):
            return self._error(412, "PreconditionFailed", f"{key!r} changed", head)
        if if_none is not None and if_none.strip() in ("*", obj.etag):
            return self._send(304, headers={"ETag": obj.etag}, head=True)
        data, status = obj.data, 200
        wanted = self.headers.get("Range")
        if wanted:
            span = _byte_range(wanted, len(data))
            if span is None:
                return self._error(416, "InvalidRange", f"{wanted} of {len(data)} bytes", head)
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data, status = data[start:end], 206
        self._send(status, data, headers, head)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_DELETE(self) -> None:
        bucket, key, _ = self._target()
        if self._bucket(bucket):
            self.store.delete(bucket, key)
            self._send(204)

    def do_POST(self) -> None:
        bucket, _, query = self._target()
        body = self._body()
        if "delete" not in query:
            return self._error(501, "NotImplemented", "only multi-object delete is supported")
        if not self._bucket(bucket):
            return
        try:
            keys = [el.text or "" for el in ET.fromstring(body).iter() if el.tag.endswith("Key")]
        except ET.ParseError as exc:
            return self._error(400, "MalformedXML", str(exc))
        for key in keys:
            self.store.delete(bucket, key)
        deleted = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
        self._send(200, f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{_NS}">'
                        f"{deleted}</DeleteResult>".encode(), {"Content-Type": "application/xml"})

    def _list(self, bucket: str, query: dict[str, list[str]], head: bool) -> None:
        arg = {k: v[0] for k, v in query.items()}
        prefix, delimiter = arg.get("prefix", ""), arg.get("delimiter", "")
        token = arg.get("continuation-token", "")
        after = unquote(token) if token else arg.get("start-after", "")
        try:
            max_keys = max(0, min(1000, int(arg.get("max-keys", "1000"))))
        except ValueError:
            return self._error(400, "InvalidArgument", "max-keys must be an integer", head)
        found, prefixes, last = self.store.list(bucket, prefix, after, delimiter, max_keys)
        out = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_NS}">',
               f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
               f"<KeyCount>{len(found) + len(prefixes)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
               f"<IsTruncated>{'true' if last is not None else 'false'}</IsTruncated>"]
        if delimiter:
            out.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if token:
            out.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        if last is not None:
            out.append(f"<NextContinuationToken>{escape(quote(last, safe=''))}</NextContinuationToken>")
        for key, obj in found:
            out.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(obj.modified)}"
                       f"</LastModified><ETag>{escape(obj.etag)}</ETag><Size>{len(obj.data)}</Size>"
                       "<StorageClass>STANDARD</StorageClass></Contents>")
        out.extend(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        out.append("</ListBucketResult>")
        self._send(200, "".join(out).encode(), {"Content-Type": "application/xml"}, head)


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` as [start, end); None when unsatisfiable."""
    unit, _, spec = header.partition("=")
    first, sep, last = spec.partition("-")
    if unit.strip() != "bytes" or not sep or "," in spec:
        return None
    try:
        if first:
            start, end = int(first), (int(last) + 1 if last else size)
        else:
            start, end = max(0, size - int(last)), size
    except ValueError:
        return None
    end = min(end, size)
    return (start, end) if start < end else None


def serve(host: str = "127.0.0.1", port: int = 0, buckets: tuple[str, ...] = ()) -> ThreadingHTTPServer:
    """A started-to-bind server (call ``serve_forever``) with ``buckets`` created."""
    store = ObjectStore()
    for b in buckets:
        store.create_bucket(b)
    handler = type("Handler", (_Handler,), {"store": store})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.local_s3", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    server = serve(args.host, args.port, tuple(args.bucket))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
