"""The demo's tables: one seed's per-class table, the mechanisms, and the several-seed
summary (mean +- std, and per-seed paired differences against the controls)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

CONTROLS = ("baseline", "source_only_bn")


def gap_recovered(miou: float, source_only: float, oracle: float) -> float | None:
    """Share of the source-only -> oracle gap a method closes, in percent."""
    gap = oracle - source_only
    if not math.isfinite(gap) or abs(gap) < 1e-9:
        return None
    return 100.0 * (miou - source_only) / gap


def _cell(v: float | None, width: int) -> str:
    return f"{(v if v is not None else float('nan')):>{width}.1f}"


def format_report(report: dict[str, Any]) -> str:
    """The per-class table (like the paper's Table 1) at the reported snapshots, with the
    mIoU at the last step, the share of the gap recovered and the mechanisms."""
    variants = report["variants"]
    names = list(next(iter(variants.values()))["per_class"])
    width = max(8, max(len(n) for n in names))
    head = f"{'method':<15}" + "".join(f"{n[:width]:>{width + 1}}" for n in names) + f"{'mIoU':>7}{'last':>7}{'gap':>7}"
    lines = [head, "-" * len(head)]
    for v, m in variants.items():
        cells = "".join(_cell(m["per_class"][n], width + 1) for n in names)
        last = m.get("last", {}).get("miou")
        gap = m.get("gap_recovered")
        lines.append(f"{v:<15}{cells}{m['miou']:>7.1f}{_cell(last, 7)}{(f'{gap:.0f}%' if gap is not None else '-'):>7}")
    lines.append(
        "mIoU: the snapshot each method selects without target labels; last: its stage's final step; "
        "gap: share of the source-only -> oracle gap recovered"
    )
    lines.extend(format_mechanisms(report.get("mechanisms", {}), names))
    return "\n".join(lines)


def format_mechanisms(mech: dict[str, Any], names: Sequence[str]) -> list[str]:
    lines = []
    att = mech.get("attention")
    if att:
        lines.append(
            f"attention AUROC {att['auroc']:.3f} (DA's alpha ranking the pixels source-only gets wrong; "
            f"0.5 = no better than chance; mean alpha {att['mean_attention_on_errors']:.3f} on errors, "
            f"{att['mean_attention_on_correct']:.3f} elsewhere)"
        )
    sep = mech.get("discriminators", {})
    for net in ("D", "C"):
        if net in sep:
            s = sep[net]
            lines.append(
                f"{net}: mean output {s['source']:.3f} on source, {s['target']:.3f} on target "
                f"(gap {s['gap']:+.3f}; least squares labels 0 / 1)"
            )
    ol = mech.get("online_labels")
    if ol:
        t, s = ol["teacher"], ol["student"]
        lines.append(
            f"online stage, at its end, on the target val set: teacher {t['precision']:.1f}% right "
            f"({t['confident_share']:.0f}% of the pixels confident, {t['confident_precision'] or 0:.1f}% of those "
            f"right), student {s['precision']:.1f}% right"
        )
    pl = mech.get("pseudo_labels")
    if pl:
        for rule, r in pl["rules"].items():
            per = ", ".join(
                f"{n} {r['per_class_precision'][n]:.0f}%" for n in names if r["per_class_precision"].get(n) is not None
            )
            lines.append(
                f"pseudo labels ({rule} rule): {r['precision']:.1f}% right, {r['labelled_fraction']:.1f}% "
                f"labelled; per class: {per}"
            )
    return lines


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_seeds(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std of each method over the seeds (reported and last-step snapshots), and the
    per-seed paired differences of each method against the baseline and source_only_bn."""
    methods = list(reports[0]["variants"])
    out: dict[str, Any] = {"seeds": [r["seed"] for r in reports], "methods": {}, "paired": {}}
    for m in methods:
        vals = [r["variants"][m]["miou"] for r in reports]
        lasts = [r["variants"][m].get("last", {}).get("miou") for r in reports]
        mean, std = _stats(vals)
        entry = {"mean": mean, "std": std, "per_seed": vals}
        if all(v is not None for v in lasts):
            entry["last_mean"], entry["last_std"] = _stats(lasts)
            entry["last_per_seed"] = lasts
        out["methods"][m] = entry
        for control in CONTROLS:
            if control == m or control not in methods:
                continue
            diffs = [r["variants"][m]["miou"] - r["variants"][control]["miou"] for r in reports]
            d_mean, d_std = _stats(diffs)
            out["paired"].setdefault(m, {})[f"vs_{control}"] = {
                "per_seed": diffs,
                "mean": d_mean,
                "std": d_std,
                "positive": sum(d > 0 for d in diffs),
            }
    return out


def format_seeds(summary: dict[str, Any]) -> str:
    """The several-seed table: mean +- std, per-seed values, paired differences."""
    seeds = summary["seeds"]
    lines = [
        f"{'method':<15}{'mean +- std':>14}{'last step':>14}  "
        + " ".join(f"{'s' + str(s):>6}" for s in seeds)
        + "   "
        + "   ".join(f"vs {c} (wins)" for c in CONTROLS)
    ]
    for m, e in summary["methods"].items():
        last = f"{e['last_mean']:.1f} +- {e['last_std']:.1f}" if "last_mean" in e else "-"
        row = f"{m:<15}{e['mean']:>7.1f} +- {e['std']:<4.1f}{last:>14}  " + " ".join(
            f"{v:>6.1f}" for v in e["per_seed"]
        )
        for c in CONTROLS:
            p = summary["paired"].get(m, {}).get(f"vs_{c}")
            row += (
                f"   {p['mean']:>+6.1f} ({p['positive']}/{len(seeds)})".ljust(len(f"vs {c} (wins)") + 3)
                if p
                else " " * (len(f"vs {c} (wins)") + 3)
            )
        lines.append(row)
    lines.append(
        "mIoU (%) at the snapshots selected without target labels; last step: the stages' final "
        "iterations; vs X: mean of the per-seed differences (seeds where the method is higher)"
    )
    return "\n".join(lines)
