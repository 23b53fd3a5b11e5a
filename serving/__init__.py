"""serving: the parameter-server replica and the gRPC recommendation API (see README section)."""
