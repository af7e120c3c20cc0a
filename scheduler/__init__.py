"""Which tokens of which sequences run in the next step, and the KV block accounting behind it.

Pure Python: no torch, no imports from the rest of the project.
"""
from scheduler.block_pool import BlockPool, block_keys
from scheduler.config import SchedulerConfig
from scheduler.output import FinishedSequence, ScheduledSequence, SchedulerOutput
from scheduler.host_pool import HostBlockPool
from scheduler.request import FinishReason, KVLocation, Sequence, SequenceStatus, StopCondition
from scheduler.scheduler import Scheduler
from scheduler.stats import ContextTooLarge, SchedulerStats, SessionError

__all__ = [
    "BlockPool", "block_keys", "SchedulerConfig", "FinishedSequence", "ScheduledSequence",
    "SchedulerOutput", "FinishReason", "Sequence", "SequenceStatus", "StopCondition",
    "Scheduler", "SchedulerStats", "SessionError", "ContextTooLarge", "HostBlockPool", "KVLocation",
]
