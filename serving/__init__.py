"""serving: the parameter-server replica and the gRPC recommendation API (see docs/architecture.md
"Serving" and docs/api.md)."""
