"""The table, headline ratios and notes of benchmarks/rl_step.py (printed, and appended to benchmarks/RESULTS.md
through benchmarks.report)."""
from __future__ import annotations

import argparse
from typing import Any, Optional

from benchmarks.report import append_results, markdown_table
from benchmarks.rl_step_loops import VariantResult

HEADERS = ["variant", "rollout s", "trainer waited s", "train s", "weight sync s", "sleep+wake s", "step s",
           "baseline step / this", "model tokens", "rollout tok/s", "prefill tokens", "turns / episode",
           "staleness max", "epoch-0 mean abs(ratio-1)"]


def _by_key(results: list[VariantResult]) -> dict[str, VariantResult]:
    return {r.key: r for r in results}


def mean_ratio_dev(r: VariantResult) -> Optional[float]:
    devs = [s.ratio_dev for s in r.steps if s.ratio_dev is not None]
    return sum(devs) / len(devs) if devs else None


def headline(results: list[VariantResult]) -> dict[str, float]:
    """Baseline step time over ours (sync, async), and the weight sync's share of ours' step, in %."""
    r = _by_key(results)
    out: dict[str, float] = {}
    for key in ("sync", "async"):
        if key in r:
            out[f"weight_sync_pct_of_{key}_step"] = 100 * r[key].mean("weight_sync_s") / r[key].mean("step_s")
            if "hf" in r:
                out[f"hf_step_over_{key}_step"] = r["hf"].mean("step_s") / r[key].mean("step_s")
    return out


def table(results: list[VariantResult]) -> str:
    hf = _by_key(results).get("hf")
    rows = []
    for r in results:
        dev = mean_ratio_dev(r)
        rows.append([r.name, r.mean("rollout_s"), r.mean("rollout_wait_s"), r.mean("train_s"), r.mean("weight_sync_s"),
                     r.mean("sleep_wake_s"), r.mean("step_s"),
                     f"{hf.mean('step_s') / r.mean('step_s'):.2f}x" if hf is not None else "-",
                     round(r.mean("model_tokens")), r.rollout_tok_s, round(r.mean("prefill_tokens")),
                     round(r.mean("turns_mean"), 2), max(s.staleness_max for s in r.steps),
                     "n/a" if dev is None else f"{dev:.1e}"])
    return markdown_table(HEADERS, rows)


def notes(results: list[VariantResult], args: argparse.Namespace, label: str) -> str:
    r = _by_key(results)
    h = headline(results)
    parts = []
    for key, name in (("sync", "ours-sync"), ("async", "ours-async")):
        if f"hf_step_over_{key}_step" in h:
            parts.append(f"baseline step / {name} step = **{h[f'hf_step_over_{key}_step']:.2f}x**")
        if f"weight_sync_pct_of_{key}_step" in h:
            parts.append(f"weight sync = {h[f'weight_sync_pct_of_{key}_step']:.1f}% of {name}'s step")
    ours = next((r[k] for k in ("sync", "async") if k in r), None)
    push = (f"Weights pushed with rollout.weight_push.WeightPusher through {ours.steps[0].sync_transport} "
            f"({ours.steps[0].sync_bytes / 1e6:,.0f} MB a push in the engine's dtype; of its "
            f"{ours.mean('weight_sync_s'):.3g} s, packing on the trainer's side took {ours.mean('sync_pack_s'):.3g} s "
            f"and the engine's apply {ours.mean('sync_apply_s'):.3g} s), applied in place, in-flight turns' KV "
            "recomputed. ") if ours else ""
    if "sync" in r:
        push += f"Sleep gave back {r['sync'].mean('sleep_freed_bytes') / 1e9:.2f} GB of the engine's memory a step. "
    engine_dtype = args.engine_dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    shape_note = ("random weights (time only) with SmolLM2's 49,152-token vocabulary and tokenizer, so every sampled "
                  "id decodes (embedding and LM head smaller than the published model's); " if args.shape else "")
    env_note = (f"calculator tool environment ({args.difficulty}, few-shot), reward 1 for the right number"
                if args.env == "calculator" else
                f"echo_test token environment ({args.max_turns} turns per episode, 16-token observations)")
    return (
        "; ".join(parts) + ".\n\n"
        f"One GRPO step: {args.questions} questions x {args.group_size} episodes of the {env_note}, at most "
        f"{args.max_turns} model turns of {args.max_tokens} tokens, temperature {args.temperature}; model {label}; "
        f"{shape_note}engine {engine_dtype} (1 worker, gpu_memory_utilization {args.gpu_memory_utilization}), trainer "
        f"fp32 with AdamW (autocast: {args.trainer_autocast}), {args.epochs} PPO epochs of microbatches of {args.minibatch}, k3 KL to a frozen reference "
        f"(async: TIS cap {args.tis_cap}). Means of {args.steps} timed step{'s' if args.steps > 1 else ''} per "
        "variant after one warm-up step, all "
        f"variants from the same starting weights on the same questions, in one run. {push}"
        "Rollout s: submission to the last episode's end (async: the episodes run beside the previous step's "
        "training and push, so rollout s overlaps them and the trainer waited only the column after); step s: the "
        "trainer's wall time per step. Prefill tokens: ours, the engine's count (session KV kept between turns, "
        "prompts shared by episodes served from the prefix cache); "
        "baseline, each turn's whole context (generate keeps no KV between calls; left padding not counted).\n\n"
        "Baseline fidelity: the same environment objects and episode rules (stop token kept, max_turns, final "
        "observation not appended), the same sampling (full distribution at the temperature; logprobs from "
        "generate's scores), the same train_step on the same Trajectory fields; it differs in re-prefilling every "
        "turn, in running turns in lockstep (a batch waits for its longest row), and in sampling with the fp32 "
        "trainer itself. The epoch-0 column is each sampler's agreement with the trainer's forward on the fresh "
        "tokens: ours, the engine's dtype and kernels; the baseline, generate's KV-cached, left-padded forward.")


def report(results: list[VariantResult], args: argparse.Namespace, label: str, append: bool) -> Any:
    text, extra = table(results), notes(results, args, label)
    print(text)
    print()
    print(extra)
    if append:
        append_results(f"rl_step: one GRPO step, ours vs transformers generate ({label})", args.device, text, extra)
    return text
