"""Headwater: foundation (config, logging, metrics) and the CLI that wires the parts."""
