"""The miniature's report: its tables, the rule that reads E10's λ, and its figures (mini.py writes them).

    results.md                      per setting: accuracy beside the paper's Table II; the tuning table; the λ
                                    readings; the rule's decision
    figure1-first-token.svg         training reward and test accuracy against step, mean over seeds (Figure 1)
    figure1-steps.svg
    steps-right.svg                 the steps setting: each step's right rate (greedy, test set) against step
    adapter-{setting}.svg           T-SPMO's mean |A| against step, relative to its start, for each λ reading

Everything here reads the runs' own files (metrics.jsonl, eval.jsonl): what the tables say is what the runs logged.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import checkpoints
import mini_base
from plot import moving_mean, svg_panels

# Qwen2-1.5B, 3x3 digits, n = 3000: Table II; T-SPMO without replay, (G, C_success, C_failure) = (50, 0, 0): Table V
PAPER = {"base": "3.9", "grpo": "4.4", "sgrpo": "22.9", "tspmo-decay": "70.0", "tspmo-literal": "70.0",
         "tspmo-decay-noreplay": "19.5 (Table V)"}
LABELS = {"base": "base (SFT)", "grpo": "GRPO", "sgrpo": "S-GRPO", "tspmo-decay": "T-SPMO, λ as weight decay (b)",
          "tspmo-literal": "T-SPMO, λ literal (a)", "tspmo-decay-noreplay": "T-SPMO (b), no replay",
          "tspmo-decay-logpi": "T-SPMO, λ as weight decay (b), log π",
          "tspmo-literal-logpi": "T-SPMO, λ literal (a), log π", "tspmo-decay-group": "T-SPMO (b), group pool",
          "tspmo-literal-group": "T-SPMO (a), group pool", "ppo": "PPO (shared critic)",
          "ppo-separate": "PPO (separate critic)", "dpo": "DPO (online)"}
SHORT = {"tspmo-decay": "T-SPMO (b)", "tspmo-literal": "T-SPMO (a)", "ppo": "PPO"}
COLORS = {"grpo": "#1f77b4", "sgrpo": "#ff7f0e", "tspmo-decay": "#2ca02c", "tspmo-literal": "#2ca02c",
          "tspmo-decay-noreplay": "#17becf", "tspmo-decay-logpi": "#8c8c00", "tspmo-literal-logpi": "#8c8c00",
          "tspmo-decay-group": "#7f7f7f", "tspmo-literal-group": "#7f7f7f", "ppo": "#d62728",
          "ppo-separate": "#8c564b", "dpo": "#9467bd"}
DASHED = {"tspmo-literal", "tspmo-literal-logpi", "tspmo-literal-group"}  # the λ readings: (b) solid, (a) dashed
INERT_A, KEPT_A, SAME_ACCURACY = 0.10, 0.50, 0.02  # the rule's thresholds (docs/mini.md, "E10's λ")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    import torch
    return f"{cpu}, {os.cpu_count()} cores{load}; torch {torch.__version__}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def evals(r: dict) -> list[dict]:
    return checkpoints.read_jsonl(Path(r["run"]) / "eval.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# Tables


def rate(entry: dict) -> str:
    """The learning rate, and whose tuned rate it is when the method borrows it (mini.TUNED_AS)."""
    return f"{entry['lr']:g}" + (f" (tuned for {SHORT.get(entry['as'], LABELS[entry['as']])})" if "as" in entry
                                 else "")


def results_table(setting: str, base_info: dict, results: list[dict], rates: dict) -> str:
    """Accuracy (%) on the test set, mean ± std over seeds and each seed, at the rate --tune chose; the minutes of
    a run, wall clock (which depends on what else the machine runs) and CPU (its own process, one thread)."""
    rows = ["| method | learning rate | test accuracy (%), mean ± std | per seed | steps | minutes per run, wall "
            "(CPU) | paper (%), Table II |", "|---|---|---|---|---|---|---|",
            f"| {LABELS['base']} | | {pct(base_info['accuracy'])} | (greedy: one value) | 0 | | {PAPER['base']} |"]
    for method in LABELS:
        rs = [r for r in results if r["setting"] == setting and r["method"] == method]
        if not rs:
            continue
        m, s = mean_std([100 * r["accuracy"] for r in rs])
        rows.append(f"| {LABELS[method]} | {rate(rates[setting][method])} | {m:.1f} ± {s:.1f} | "
                    f"{', '.join(pct(r['accuracy']) for r in rs)} | {rs[0]['steps']} | "
                    f"{statistics.fmean(r['minutes'] for r in rs):.1f} "
                    f"({statistics.fmean(r.get('cpu_minutes', float('nan')) for r in rs):.1f}) | "
                    f"{PAPER.get(method, '—')} |")
    return "\n".join(rows)


def tuning_table(table: dict) -> str:
    """Validation accuracy (%) of seed 0 at each rate; the chosen rate in bold."""
    lrs = sorted({lr for per in table.values() for e in per.values() for lr in e["validation"]})
    rows = ["| setting | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
            "|---|---|" + "---|" * (len(lrs) + 1)]
    for setting, per in table.items():
        for method in (m for m in LABELS if m in per and "as" not in per[m]):  # not the borrowed rates
            e = per[method]
            cells = [(f"**{pct(e['validation'][lr])}**" if lr == e["lr"] else pct(e["validation"][lr]))
                     if lr in e["validation"] else "" for lr in lrs]
            rows.append(f"| {setting} | {LABELS[method]} | " + " | ".join(cells) + f" | {e['lr']:g} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------------
# E10's λ: the readings and the rule


def reading_rows(setting: str, results: list[dict]) -> dict[str, list[dict]]:
    """For each T-SPMO variant, per seed: mean |A|, mean |B| and ‖BA‖ at the start (step 0, before any update) and
    at the end, the test accuracy at the end and at step 0 (the base), and whether the adapter ended inert."""
    out: dict[str, list[dict]] = {}
    for method in (m for m in LABELS if m.startswith("tspmo")):
        for r in (r for r in results if r["setting"] == setting and r["method"] == method):
            e = evals(r)
            out.setdefault(method, []).append(reading_row(r["seed"], e[0], e[-1]))
    return out


def reading_row(seed: int, first: dict, last: dict) -> dict:
    """One seed's row from its first evaluation (step 0) and its last: inert = mean |A| below INERT_A of its start
    and the accuracy within SAME_ACCURACY of the base; kept = mean |A| above KEPT_A of its start."""
    row = {"seed": seed, "A0": first["lora_A_mean_abs"], "A": last["lora_A_mean_abs"],
           "B0": first["lora_B_mean_abs"], "B": last["lora_B_mean_abs"], "BA0": first["lora_BA_norm"],
           "BA": last["lora_BA_norm"], "base": first["accuracy"], "accuracy": last["accuracy"]}
    moved = abs(row["accuracy"] - row["base"])  # accuracies are k/300: 21/300 − 15/300 is 0.020000000000000004
    row["inert"] = row["A"] < INERT_A * row["A0"] and moved <= SAME_ACCURACY + 1e-12
    row["kept"] = row["A"] > KEPT_A * row["A0"]
    return row


def readings_table(setting: str, rows: dict[str, list[dict]]) -> str:
    out = ["| T-SPMO | seed | mean \\|A\\| start → end (end/start) | mean \\|B\\| end | ‖BA‖ end | "
           "test accuracy (%) | inert |", "|---|---|---|---|---|---|---|"]
    for method, per_seed in rows.items():
        for x in per_seed:
            out.append(f"| {LABELS[method]} | {x['seed']} | {x['A0']:#.3g} → {x['A']:#.3g} "
                       f"({x['A'] / x['A0']:#.3g}) | {x['B']:#.3g} | {x['BA']:#.3g} | {pct(x['accuracy'])} | "
                       f"{'yes' if x['inert'] else 'no'} |")
    return "\n".join(out)


def lam_rule(by_setting: dict[str, dict[str, list[dict]]], settings) -> tuple[str, list[str]]:
    """The rule, as written before the runs (docs/mini.md): reading (b) is T-SPMO's default only if, in every
    setting, reading (a) (E10's π) leaves the adapter inert on at least 2 of 3 seeds while (b) keeps mean |A| above
    half its start on every seed. Returns ("decay" or "literal" or "undecided", the reasons, one per setting)."""
    reasons, verdicts = [], []
    for setting in settings:
        a, b = by_setting.get(setting, {}).get("tspmo-literal", []), by_setting.get(setting, {}).get("tspmo-decay", [])
        if len(a) < 3 or len(b) < 3:
            verdicts.append(None)
            reasons.append(f"{setting}: needs 3 seeds of each reading ({len(a)} and {len(b)} here)")
            continue
        inert, kept = sum(x["inert"] for x in a), sum(x["kept"] for x in b)
        verdicts.append(inert >= 2 and kept == len(b))
        ratio = lambda xs: ", ".join(f"{x['A'] / x['A0']:#.3g}" for x in xs)  # noqa: E731
        moved = ", ".join(f"{100 * (x['accuracy'] - x['base']):+.1f}" for x in a)
        reasons.append(f"{setting}: (a) inert on {inert} of {len(a)} seeds (mean |A| end/start {ratio(a)}; accuracy "
                       f"− base {moved} points); (b) keeps mean |A| above half its start on {kept} of {len(b)} "
                       f"(end/start {ratio(b)})")
    if None in verdicts:
        return "undecided", reasons
    return ("decay" if all(verdicts) else "literal"), reasons


# ----------------------------------------------------------------------------------------------------------------------
# Figures


def mean_curve(per_seed: list[dict[int, float]]) -> list[tuple[int, float]]:
    """Mean over seeds at the steps every seed has."""
    if not per_seed:
        return []
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    return [(s, statistics.fmean(c[s] for c in per_seed)) for s in steps]


def reward_curve(r: dict) -> dict[int, float]:
    """Training reward, moving mean of 10 steps."""
    rw = [m["reward_mean"] for m in checkpoints.read_jsonl(Path(r["run"]) / "metrics.jsonl")]
    return {i + 1: v for i, v in enumerate(moving_mean(rw))}


def figures(dest: Path, setting: str, results: list[dict]) -> list[str]:
    """The setting's figures, written into dest; returns their file names."""
    runs = {m: [r for r in results if r["setting"] == setting and r["method"] == m] for m in COLORS}
    runs = {m: rs for m, rs in runs.items() if rs}
    seeds = max((len(rs) for rs in runs.values()), default=0)
    legend = [(LABELS[m], COLORS[m], m in DASHED) for m in runs]
    line = lambda m, curve: (COLORS[m], m in DASHED, curve)  # noqa: E731
    names = [f"figure1-{setting}.svg"]
    reward = [line(m, mean_curve([reward_curve(r) for r in rs])) for m, rs in runs.items()]
    accuracy = [line(m, mean_curve([{e["step"]: e["accuracy"] for e in evals(r)} for r in rs]))
                for m, rs in runs.items()]
    (dest / names[0]).write_text(svg_panels([("training reward (mean of 10 steps)", reward),
                                             ("test accuracy (greedy)", accuracy)], legend,
                                            f"{setting} setting, mean of {seeds} seed{'s' * (seeds > 1)}"))
    if setting == "steps":
        names.append("steps-right.svg")
        panels = [(f"step {k + 1} ({name}) right, greedy",
                   [line(m, mean_curve([{e["step"]: e[f"right_{name}"] for e in evals(r)} for r in rs]))
                    for m, rs in runs.items()]) for k, name in enumerate(mini_base.STEP_NAMES)]
        (dest / names[-1]).write_text(svg_panels(panels, legend, "steps setting: token-level correctness, each "
                                                                 f"step's right rate on the test set (mean of {seeds} "
                                                                 f"seed{'s' * (seeds > 1)})"))
    tspmo = {m: rs for m, rs in runs.items() if m.startswith("tspmo")}
    if tspmo:
        names.append(f"adapter-{setting}.svg")
        rel = lambda r: {e["step"]: e["lora_A_mean_abs"] / evals(r)[0]["lora_A_mean_abs"] for e in evals(r)}  # noqa
        (dest / names[-1]).write_text(svg_panels(
            [("T-SPMO: mean |A| / its start", [line(m, mean_curve([rel(r) for r in rs])) for m, rs in tspmo.items()])],
            [(LABELS[m], COLORS[m], m in DASHED) for m in tspmo], f"{setting} setting", ymax=2.0))
    return names


# ----------------------------------------------------------------------------------------------------------------------
# results.md


def write_results(dest: Path, bases: dict[str, Path], results: list[dict], rates: dict, minutes: float,
                  command: str) -> str:
    """results.md and the figures; returns the text (printed by mini.py)."""
    settings = list(bases)
    readings = {s: reading_rows(s, results) for s in settings}
    decision, reasons = lam_rule(readings, settings)
    seeds = sorted({r["seed"] for r in results})
    parts = [f"# tokrl: the paper in miniature", "",
             f"`{command}`: {time.strftime('%Y-%m-%d %H:%M %Z')}, {machine()}; {minutes:.1f} minutes in all, wall "
             f"clock (the runs' own CPU time: {sum(r.get('cpu_minutes', 0.0) for r in results):.1f} minutes).", "",
             f"Test accuracy: greedy decoding on the fixed {mini_base.SPLIT_SIZE}-problem test set, seeds {seeds}; "
             "the paper's column is Qwen2-1.5B on 3-digit × 3-digit multiplication (n = 3000)."]
    for setting in settings:
        info = json.loads((bases[setting] / "base.json").read_text())
        parts += ["", f"## The {setting} setting", "", f"Base: {mini_base.describe(info)}.", "",
                  results_table(setting, info, results, rates)]
        names = figures(dest, setting, results)
        parts += ["", *[f"![{n}]({n})" for n in names]]
        if readings[setting]:
            parts += ["", f"E10's λ, {setting} setting:", "", readings_table(setting, readings[setting])]
    used = {s: {m: e for m, e in per.items() if any(r["method"] == m and r["setting"] == s for r in results)}
            for s, per in rates.items() if s in settings}
    parts += ["", "## Learning rates (python mini.py --tune: seed 0, validation accuracy %)", "", tuning_table(used),
              "", "## E10's λ: the rule", "",
              {"decay": "Reading (b), λ as AdamW's weight decay, meets the rule in every setting: T-SPMO's default.",
               "literal": "The rule is not met here: it would keep the literal reading (a); train.py's default is "
                          "(b) (SPEC.md, E10).",
               "undecided": "Not decided here (the rule needs 3 seeds of each reading in every setting)."}[decision],
              "", *[f"- {x}" for x in reasons], ""]
    text = "\n".join(parts)
    (dest / "results.md").write_text(text)
    return text
