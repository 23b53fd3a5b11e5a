"""The chaos tool behind ``headwater bench chaos``: kill the pipeline's processes and its broker
mid-stream, then account for every event (:mod:`headwater.chaos.run`)."""

from headwater.chaos.run import ChaosConfig, FaultResult, run_chaos

__all__ = ["ChaosConfig", "FaultResult", "run_chaos"]
