"""The two table slots a retrieval model ships beside the ranker's rows (names both sides agree on).

The trainer's two-tower model (:mod:`training.two_tower`) writes each user's current query vector
under :data:`USER_VECTORS` and each item's vector under :data:`ITEM_VECTORS` (unit norm, the
towers' ``dim``); they travel on ``hw.params`` as ordinary rows, so a replica holds them like any
other slot, the ANN index follows :data:`ITEM_VECTORS` from the same deltas, and serving needs no
user tower: Recommend without candidates looks the user's row up and searches the item slot.
These slots are not the ranker's (its tower never reads them) and their width is their own.
"""

USER_VECTORS = "retrieval_user"
ITEM_VECTORS = "retrieval_item"
RETRIEVAL_SLOTS = (USER_VECTORS, ITEM_VECTORS)

__all__ = ["USER_VECTORS", "ITEM_VECTORS", "RETRIEVAL_SLOTS"]
