"""Applying a weight update to a running engine (``LLMEngine.update_weights``): the in-flight mode (keep /
drain / abort), the version, the KV policy and the engine's state around ``WeightUpdater.apply``."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.weight_update import UpdateReport, WeightUpdateError

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
UPDATE_MODES = ("keep", "drain", "abort")
KV_POLICIES = ("keep", "recompute")


def apply_update(engine: "LLMEngine", loader, version, mode, kv, partial, check_finite, backup_budget_bytes,
             applying: list) -> UpdateReport:
    if mode not in UPDATE_MODES:
        raise ValueError(f"mode must be one of {UPDATE_MODES}, got {mode!r}")
    if kv not in KV_POLICIES:
        raise ValueError(f"kv must be one of {KV_POLICIES}, got {kv!r}")
    engine._require_awake("update_weights")
    if engine.weights_discarded and partial:
        raise ValueError("partial=True: the weights were released by sleep(level=2); only a complete update "
                         "(partial=False) can bring them back")
    engine._drain_pending()   # a step queued ahead ran under the old weights: record it as such first
    if version is None:
        version = getattr(loader, "version", None)
        version = engine.weight_version + 1 if version is None else version
    if isinstance(version, bool) or not isinstance(version, int) or version <= engine.weight_version:
        raise ValueError(f"version must be an int greater than the current {engine.weight_version}, got {version!r}")
    if mode == "drain":
        engine.drain_running()
    elif mode == "abort":
        engine._abort_all()
    applying[0] = True
    try:
        if backup_budget_bytes is None:   # what KV sizing left free for it (EngineConfig.update_backup_bytes)
            backup_budget_bytes = engine.config.update_backup_bytes
        report = engine.updater.apply(loader, partial=partial, check_finite=check_finite,
                                    backup_budget_bytes=backup_budget_bytes)
    except WeightUpdateError as e:
        if e.inconsistent:
            logger.error("weight update failed after writes that could not be undone: refusing work (%s)", e)
            engine._abort_all()
        raise
    if not partial:
        engine.weights_discarded = False
    engine.scheduler.set_weight_version(version)
    if kv == "recompute":
        engine.scheduler.invalidate_kv()
    logger.info("weights updated to version %d: %d tensors, %.1f MB in %.3f s (mode=%s, kv=%s)", version,
                report.num_tensors, report.num_bytes / 1e6, report.seconds, mode, kv)
    return report

