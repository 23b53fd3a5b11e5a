"""llm_engine package."""
