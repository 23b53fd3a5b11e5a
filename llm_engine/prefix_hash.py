"""Content digests of KV blocks for the prefix cache.

A full block's digest is a cryptographic chain: ``blake2b(parent digest || token bytes)``, where
the tokens are fixed-width little-endian uint32 and the first block's parent is the *namespace*
digest, a digest of everything besides the tokens that shapes the KV (model config, weights,
dtype, adapter). Equal digests then mean equal prefixes in the same namespace, up to a 2^-64
birthday bound. The pool does not rely on that: it stores each block's token bytes and verifies
them on every hit (see :class:`llm_engine.block_pool.BlockPool`), so the hasher only decides how
well the index spreads; a hasher that collides costs misses, never wrong KV. That is why the
hasher is injectable (:class:`BlockHasher`): a test can plug in one that collides on purpose.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from typing import Protocol

BlockHash = bytes
DIGEST_SIZE = 16  # 128 bits: collisions only cost a miss, so the index needs spread, not 256 bits
_STRUCTS: dict[int, struct.Struct] = {}


def token_bytes(tokens: Sequence[int]) -> bytes:
    """The block's tokens as fixed-width little-endian uint32: what is hashed and what is stored
    with the block for verification (a byte compare on a hit)."""
    s = _STRUCTS.get(len(tokens))
    if s is None:
        s = _STRUCTS[len(tokens)] = struct.Struct(f"<{len(tokens)}I")
    return s.pack(*tokens)


def namespace_digest(**parts: object) -> bytes:
    """Digest of the named parts (canonical JSON, keys sorted; dataclasses as dicts)."""
    canon = {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in parts.items()}
    text = json.dumps(canon, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_SIZE, person=b"hw-kv-namespace").digest()


def model_namespace(model_config: object, *, weights: str = "", dtype: str = "",
                    adapter: str | None = None) -> bytes:
    """Namespace digest of a served model: its config (a dataclass or dict), an identity of its
    weights (checkpoint path or content digest), the KV dtype and the adapter id, if any."""
    return namespace_digest(model=model_config, weights=weights, dtype=dtype, adapter=adapter)


class BlockHasher(Protocol):
    """Digest of one full block given its parent's digest. ``root`` is the parent of a sequence's
    first block; it should carry the namespace, so blocks of different models never chain alike."""

    root: BlockHash

    def __call__(self, parent: BlockHash, tokens: bytes) -> BlockHash: ...


class PrefixHasher:
    """The default :class:`BlockHasher`: blake2b over the parent digest and the token bytes."""

    def __init__(self, namespace: bytes = b""):
        self.root: BlockHash = hashlib.blake2b(namespace, digest_size=DIGEST_SIZE, person=b"hw-kv-root").digest()

    @classmethod
    def for_model(cls, model_config: object, *, weights: str = "", dtype: str = "",
                  adapter: str | None = None) -> "PrefixHasher":
        return cls(model_namespace(model_config, weights=weights, dtype=dtype, adapter=adapter))

    def __call__(self, parent: BlockHash, tokens: bytes) -> BlockHash:
        return hashlib.blake2b(parent + tokens, digest_size=DIGEST_SIZE).digest()
