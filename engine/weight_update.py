"""Validated, all-or-nothing, in-place application of a weight update from any checkpoint loader.

A loader is duck-typed (the protocol lives in ``weight_sync.base``; the engine never imports ``weight_sync``):
``version``, ``names_and_shapes() -> {hf_name: (shape, dtype)} | None``, ``iter_tensors()`` and ``close()``.

Order of one ``WeightUpdater.apply``::

    1. manifest = loader.names_and_shapes()     validate every name/shape/dtype and completeness: no byte written
    2. for name, t in loader.iter_tensors():    check t (known name, shape, floating dtype, finite?, not repeated,
                                                as declared); back up the destination slice (within budget); copy_
    3. completeness (unless partial)            every expected name arrived (and every declared one, if declared)
    4. loader.close()                           always, success or failure
    5. model.refresh_fp32_head()                applied updates that wrote the final norm or the lm_head (or
                                                the tied embedding): the float32 head's copies follow them
    on any failure: restore every backed-up slice, raise WeightUpdateError; if some slice was overwritten without a
    backup (budget exceeded), the weights are a mix -> WeightsInconsistentError and ``inconsistent`` stays True
    until a complete update succeeds.

Bucketed loaders (``loader.bucket_plan`` / ``iter_buckets``, see ``engine.bucket_copy``) take the bulk path: the
layout is validated once per training run (cached by its key), each bucket lands with one multi-tensor copy, and a
loader whose buckets are all resident before the first write (CUDA IPC) needs no rollback copy: with every byte
present and validated up front, nothing can fail between the first write and the last.

Writes are ``copy_`` into the existing storage (never reallocation), so CUDA graphs captured on the parameters stay
valid. Fused parameters (qkv, gate_up) receive each shard in its row slice as it arrives, so tensor order is free.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from engine.bucket_copy import BucketCopyPlan, all_finite, build_plan, check_buffer, copy_many, copy_resident
from engine.model_config import ModelConfig
from engine.weights import WeightMapper, WeightTarget, copy_into

logger = logging.getLogger(__name__)

_SHOWN = 8  # names listed in one error message


class WeightUpdateError(ValueError):
    """An update was rejected; the previous weights are intact (bitwise) unless ``inconsistent``."""

    inconsistent = False


class WeightsInconsistentError(WeightUpdateError):
    """An update failed after overwriting weights that could not be restored (backup budget exceeded), or the
    weights were already inconsistent: they are a mix of versions until a complete update succeeds."""

    inconsistent = True


@dataclass(frozen=True)
class UpdateReport:
    num_tensors: int                # tensors written (ignored names, e.g. a tied lm_head, not counted)
    num_bytes: int                  # bytes of those tensors as the loader delivered them
    seconds: float                  # wall time of apply, manifest to close
    names_updated: tuple[str, ...]  # Hugging Face names written, in arrival order
    backup_bytes: int = 0           # device bytes copied aside so a failure could be undone


def _shown(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > _SHOWN else "")


class _Transaction:
    """The writes of one update and the originals needed to undo them."""

    def __init__(self, params: dict[str, nn.Parameter], budget_bytes: int) -> None:
        self.params = params
        self.budget_bytes = budget_bytes
        self.backup_bytes = 0
        self.backups: list[tuple[WeightTarget, torch.Tensor]] = []
        self.unbacked: list[str] = []  # HF names overwritten with no original kept
        self.bulk_backups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (slices, originals)

    def write(self, hf_name: str, target: WeightTarget, tensor: torch.Tensor) -> None:
        dst = self.params[target.param_name].data
        if target.shard is not None:
            dst = dst[target.shard]
        nbytes = dst.numel() * dst.element_size()
        if self.backup_bytes + nbytes <= self.budget_bytes:
            self.backups.append((target, dst.clone()))
            self.backup_bytes += nbytes
        else:
            self.unbacked.append(hf_name)
        copy_into(self.params, target, tensor)

    def write_many(self, names: list[str], dst: list[torch.Tensor], src: list[torch.Tensor], backup: bool) -> None:
        """One bucket's writes: originals kept (one multi-tensor copy) while the budget allows, then the new
        values (another)."""
        if backup:
            nbytes = sum(d.numel() * d.element_size() for d in dst)
            if self.backup_bytes + nbytes <= self.budget_bytes:
                originals = [torch.empty_like(d) for d in dst]
                copy_many(originals, dst)
                self.bulk_backups.append((dst, originals))
                self.backup_bytes += nbytes
            else:
                self.unbacked.extend(names)
        copy_many(dst, src)

    def rollback(self) -> None:
        for target, original in reversed(self.backups):
            copy_into(self.params, target, original)
        self.backups.clear()
        for dst, originals in reversed(self.bulk_backups):
            copy_many(dst, originals)
        self.bulk_backups.clear()


class WeightUpdater:
    """The only writer of a loaded model's parameters after load (one per model)."""

    def __init__(self, model: nn.Module, model_config: ModelConfig) -> None:
        self.model = model
        self.mapper = WeightMapper(model_config)
        self.params = dict(model.named_parameters())  # deduplicated: a tied lm_head is embed_tokens' Parameter
        self.expected = self.mapper.expected_hf_names()
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
        self.inconsistent = False  # True after a failed update that could not be fully undone
        self._bucket_plans: OrderedDict[tuple, BucketCopyPlan] = OrderedDict()  # (layout key, partial) -> plan
        # Checkpoint names of the parameters the float32 head copies (CausalLM.enable_fp32_head): the final
        # norm and the lm_head, which is the embedding when tied. An update writing one refreshes the copies.
        head = {"norm.weight", "embed_tokens.weight" if model_config.tie_word_embeddings else "lm_head.weight"}
        self._head_names = frozenset(n for n in self.expected if self.mapper.resolve(n).param_name in head)
        # Resident bucketed updates on CUDA: every bucket into the parameters with one kernel launch
        # (engine.kernels.bulk_copy); None: a copy per tensor. Set to a device to force it (tests, on CPU under
        # the Triton interpreter).
        self.copy_kernel_device: Optional[torch.device] = _copy_kernel_device(self.params.values())

    # ------------------------------------------------------------------------------------------ checks
    def _check_manifest(self, manifest: Any, partial: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if not isinstance(manifest, dict):
            raise WeightUpdateError(f"loader manifest must be a dict of name -> (shape, dtype), "
                                    f"got {type(manifest).__name__}")
        for name, spec in manifest.items():
            try:
                shape, dtype = tuple(spec[0]), spec[1]
            except (TypeError, IndexError):
                raise WeightUpdateError(f"manifest entry for {name!r} must be (shape, dtype), got {spec!r}") from None
            if not isinstance(dtype, torch.dtype):
                raise WeightUpdateError(f"manifest entry for {name!r}: dtype must be a torch.dtype, got {dtype!r}")
            try:
                target = self.mapper.resolve(name)
            except ValueError as e:
                raise WeightUpdateError(f"update rejected before any write: {e}") from None
            if target is None:
                continue
            if shape != self.mapper.shape_of(name):
                raise WeightUpdateError(f"update rejected before any write: weight {name!r} has shape {shape}, "
                                        f"expected {self.mapper.shape_of(name)}")
            if not dtype.is_floating_point:
                raise WeightUpdateError(f"update rejected before any write: weight {name!r} has non-floating "
                                        f"dtype {dtype}")
        if not partial:
            missing = sorted(set(self.expected) - self.mapper.covered(manifest))
            if missing:
                raise WeightUpdateError(f"update rejected before any write: it lacks weights {_shown(missing)} "
                                        f"(pass partial=True to update a subset)")
        return manifest

    def _check_tensor(self, name: Any, tensor: Any, manifest: Optional[dict], seen: set[str],
                      check_finite: bool) -> Optional[WeightTarget]:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError(f"loader yielded ({type(name).__name__}, {type(tensor).__name__}); "
                                    f"expected (str, Tensor)")
        try:
            target = self.mapper.check(name, tensor)
        except ValueError as e:
            raise WeightUpdateError(str(e)) from None
        if manifest is not None:
            if name not in manifest:
                raise WeightUpdateError(f"weight {name!r} is not in the loader's manifest")
            shape, dtype = manifest[name]
            if (tuple(tensor.shape), tensor.dtype) != (tuple(shape), dtype):
                raise WeightUpdateError(f"weight {name!r} arrived as {tuple(tensor.shape)} {tensor.dtype}, "
                                        f"the manifest declared {tuple(shape)} {dtype}")
        if target is None:
            return None
        if name in seen:
            raise WeightUpdateError(f"weight {name!r} given twice")
        if check_finite and not bool(torch.isfinite(tensor).all()):
            raise WeightUpdateError(f"weight {name!r} has non-finite values (NaN or inf)")
        return target

    def forget_plans(self) -> None:
        """Parameters were reallocated (sleep level 2): cached bucket plans point at their old storage."""
        self._bucket_plans.clear()

    # ------------------------------------------------------------------------------------------ apply
    def apply(self, loader: Any, *, partial: bool = False, check_finite: bool = False,
              backup_budget_bytes: Optional[int] = None) -> UpdateReport:
        """Apply one update from ``loader`` (closed on return). ``partial``: the update may cover a subset of
        the weights (it must still deliver every name its manifest declares). ``check_finite``: reject NaN/inf.
        ``backup_budget_bytes``: device memory allowed for originals of overwritten slices; None = the
        parameters' total bytes, so a failure can always be undone; 0 = no backup (a failure after the first
        write leaves the weights inconsistent). Raises WeightUpdateError / WeightsInconsistentError."""
        t0 = time.perf_counter()
        budget = self.param_bytes if backup_budget_bytes is None else backup_budget_bytes
        if budget < 0:
            raise ValueError(f"backup_budget_bytes must be >= 0, got {backup_budget_bytes}")
        tx = _Transaction(self.params, budget)
        try:
            if self.inconsistent and partial:
                raise WeightsInconsistentError("weights are inconsistent after an earlier failed update; only a "
                                               "complete update (partial=False) can repair them")
            if callable(getattr(loader, "bucket_plan", None)) and callable(getattr(loader, "iter_buckets", None)):
                names, nbytes = self._apply_buckets(loader, tx, partial, check_finite)
            else:
                names, nbytes = self._apply(loader, tx, partial, check_finite)
            loader.close()
        except BaseException as err:
            self._fail(loader, tx, err)
            raise  # unreachable: _fail raises
        # Only an applied update refreshes the float32 head: a rolled-back one restored the parameters bitwise
        # to what the copies were last refreshed from.
        refresh = getattr(self.model, "refresh_fp32_head", None)
        if refresh is not None and self._head_names.intersection(names):
            refresh()
        if not partial:
            self.inconsistent = False
        return UpdateReport(len(names), nbytes, time.perf_counter() - t0, tuple(names), tx.backup_bytes)

    @torch.no_grad()
    def _apply(self, loader: Any, tx: _Transaction, partial: bool, check_finite: bool) -> tuple[list[str], int]:
        names_and_shapes = getattr(loader, "names_and_shapes", None)
        manifest = names_and_shapes() if names_and_shapes is not None else None
        if manifest is not None:
            manifest = self._check_manifest(manifest, partial)
        names: list[str] = []
        seen: set[str] = set()
        nbytes = 0
        for name, tensor in loader.iter_tensors():
            target = self._check_tensor(name, tensor, manifest, seen, check_finite)
            if target is None:
                continue  # deliberately ignored (tied lm_head, rotary inv_freq)
            tx.write(name, target, tensor)
            names.append(name)
            seen.add(name)
            nbytes += tensor.numel() * tensor.element_size()
        if manifest is not None:
            undelivered = sorted(n for n in manifest if n not in seen and self.mapper.resolve(n) is not None)
            if undelivered:
                raise WeightUpdateError(f"loader declared but never delivered {_shown(undelivered)}")
        if not partial:
            missing = sorted(set(self.expected) - self.mapper.covered(seen))
            if missing:
                raise WeightUpdateError(f"update lacks weights {_shown(missing)} (pass partial=True to update "
                                        f"a subset)")
        return names, nbytes

    def _bucket_plan(self, layout: Any, partial: bool) -> BucketCopyPlan:
        key = (layout.key, partial)
        plan = self._bucket_plans.get(key)
        if plan is None:
            try:
                plan = build_plan(layout, self.mapper, self.params, lambda m: self._check_manifest(m, partial))
            except WeightUpdateError:
                raise
            except ValueError as e:
                raise WeightUpdateError(f"update rejected before any write: {e}") from None
            self._bucket_plans[key] = plan
            while len(self._bucket_plans) > 4:
                self._bucket_plans.popitem(last=False)
        self._bucket_plans.move_to_end(key)
        return plan

    @torch.no_grad()
    def _apply_buckets(self, loader: Any, tx: _Transaction, partial: bool,
                       check_finite: bool) -> tuple[list[str], int]:
        plan = self._bucket_plan(loader.bucket_plan(), partial)
        reuse = bool(getattr(loader, "persistent_buffers", False))
        resident = bool(getattr(loader, "buckets_resident", False))
        seen: set[int] = set()

        def sources(item: Any) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
            try:
                b, buf = item
                b = check_buffer(plan, b, buf, seen)
            except (TypeError, ValueError) as e:
                raise WeightUpdateError(f"bucketed loader: {e}") from None
            seen.add(b)
            src = plan.sources(b, buf, reuse)
            if check_finite:
                bad = [n for n, ok in zip(plan.buckets[b].names, all_finite(src)) if not ok]
                if bad:
                    raise WeightUpdateError(f"weight {bad[0]!r} has non-finite values (NaN or inf)")
            return b, buf, src

        if resident:
            # Every bucket is readable now: check them all, then write with no rollback copy (nothing is left
            # that could fail between the first write and the last).
            ready = [sources(item) for item in loader.iter_buckets()]
            self._check_all_buckets(plan, seen)
            try:
                copy_resident(plan, ready, self.copy_kernel_device)
            except Exception as e:  # noqa: BLE001 - the kernel would not build or launch: per-tensor copies
                if self.copy_kernel_device is None:
                    raise
                logger.warning("weight updates: the one-launch bucket copy failed (%s: %s); copying per tensor "
                               "from now on", type(e).__name__, e)
                self.copy_kernel_device = None
                copy_resident(plan, ready, None)
        else:
            for item in loader.iter_buckets():
                b, _, src = sources(item)
                bc = plan.buckets[b]
                tx.write_many(bc.names, bc.dst, src, backup=True)
            self._check_all_buckets(plan, seen)
        return list(plan.names), plan.num_bytes

    @staticmethod
    def _check_all_buckets(plan: BucketCopyPlan, seen: set[int]) -> None:
        missing = [b for b, bc in enumerate(plan.buckets) if b not in seen and bc.names]
        if missing:
            names = [n for b in missing for n in plan.buckets[b].names]
            raise WeightUpdateError(f"loader declared but never delivered buckets {missing[:_SHOWN]}: "
                                    f"{_shown(names)}")

    def _fail(self, loader: Any, tx: _Transaction, err: BaseException) -> None:
        try:
            loader.close()
        except Exception:  # the original error is the one to report
            logger.exception("weight update: closing the loader after a failure raised too")
        with torch.no_grad():
            tx.rollback()
        if tx.unbacked:
            self.inconsistent = True
            msg = (f"weight update failed after overwriting {len(tx.unbacked)} tensor(s) without a backup "
                   f"(backup budget {tx.budget_bytes} bytes exceeded): {_shown(tx.unbacked)}; the weights are "
                   f"inconsistent until a complete update lands. Cause: {_describe(err)}")
        elif self.inconsistent and not isinstance(err, WeightsInconsistentError):
            msg = (f"weight update failed and the weights remain inconsistent from an earlier failed update. "
                   f"Cause: {_describe(err)}")
        else:
            msg = None
        if not isinstance(err, Exception):
            raise err  # KeyboardInterrupt / SystemExit: undone as far as possible, propagated as is
        if msg is not None:
            raise WeightsInconsistentError(msg) from err
        if isinstance(err, WeightUpdateError):
            raise err
        raise WeightUpdateError(f"weight update failed and was rolled back: {_describe(err)}") from err


def _copy_kernel_device(params) -> Optional[torch.device]:
    """The parameters' CUDA device when the bucket copy kernel can run there (Triton imports), else None."""
    devices = {p.device for p in params}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return None
    try:
        import engine.kernels.bulk_copy  # noqa: F401
    except Exception as e:  # noqa: BLE001 - no (working) Triton: per-tensor copies
        logger.warning("weight updates: no bucket copy kernel (%s: %s); buckets are copied per tensor",
                       type(e).__name__, e)
        return None
    return next(iter(devices))


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, WeightUpdateError) else f"loader raised {type(err).__name__}: {err}"
