"""embedding_store package."""
