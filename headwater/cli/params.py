"""``headwater params status|pin|rollback|unpin``: the parameters serving uses, over the admin
endpoint of ``headwater serve --admin-port`` (see :mod:`serving.params_admin`)."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_ADMIN = "127.0.0.1:9470"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="status, pin, rollback and unpin of the parameters serving uses")
    actions = p.add_subparsers(dest="params_action", required=True, metavar="ACTION")
    for name, help_text in (("status", "the version served, whether pinned, the versions held"),
                            ("pin", "serve VERSION on every replica until unpinned"),
                            ("rollback", "pin the newest held version older than the one served"),
                            ("unpin", "follow the newest version again")):
        a = actions.add_parser(name, help=help_text)
        if name == "pin":
            a.add_argument("version", type=int, metavar="VERSION", help="a held version (see status)")
        a.add_argument("--admin", default=os.environ.get("HW_PARAMS_ADMIN", DEFAULT_ADMIN), metavar="HOST:PORT",
                       help=f"admin endpoint of a serving process (headwater serve --admin-port; "
                            f"default $HW_PARAMS_ADMIN or {DEFAULT_ADMIN})")
        a.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
        a.add_argument("--json", action="store_true", help="print the answer as one JSON line")
        a.set_defaults(handler=_params)


def _params(args: argparse.Namespace) -> int:
    from headwater.cli.runtime import print_json
    from serving.params_admin import admin_request

    action = args.params_action
    if action == "status":
        code, body = admin_request(args.admin, "GET", "/admin/params", timeout_s=args.timeout)
    else:
        payload = {"version": args.version} if action == "pin" else {}
        code, body = admin_request(args.admin, "POST", f"/admin/params/{action}", payload, args.timeout)
    if args.json:
        print_json({"code": code, **body})
    elif code != "OK":
        sys.stderr.write(f"headwater params {action}: {code}: {body.get('message', '')}\n")
    else:
        if body.get("message"):
            print(body["message"])
        print(_describe(body.get("status") or {}))
    return 0 if code == "OK" else 1


def _describe(st: dict) -> str:
    held = st.get("held_versions") or []
    span = f"{held[0]}..{held[-1]} ({len(held)})" if held else "none"
    pin = f"pinned to {st.get('pinned_version')}" if st.get("pinned") else "following the newest"
    return (f"model {st.get('model_id')} shard {st.get('shard')}: serving version {st.get('version')} "
            f"({pin}; newest seen {st.get('newest_version')}), held versions {span}, "
            f"freshness lag {st.get('freshness_lag_ms', -1) / 1000:.1f} s")
