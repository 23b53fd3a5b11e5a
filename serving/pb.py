"""The generated protobuf / gRPC modules of ``headwater.v1`` (see :mod:`serving.protogen`).

The build generates them; if they are missing or older than the .proto (a checkout used without
re-running set-up), they are regenerated here once, before import.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from serving import protogen

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent
if not protogen.is_current(_ROOT):
    log.warning("gRPC stubs missing or stale; regenerating from %s", protogen.PROTO_REL)
    protogen.generate(_ROOT)

pb2 = importlib.import_module("serving.proto.headwater.v1.recommender_pb2")
pb2_grpc = importlib.import_module("serving.proto.headwater.v1.recommender_pb2_grpc")

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Recommender"].full_name  # "headwater.v1.Recommender"

__all__ = ["pb2", "pb2_grpc", "SERVICE_NAME"]
