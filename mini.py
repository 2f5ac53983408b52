"""The paper in miniature: its methods, on two constructed settings, on a laptop CPU; nothing downloaded.

    python mini.py                # both settings, the default methods at their shipped rates, 3 seeds, the paper's
                                  # step counts -> runs/mini/
    python mini.py --quick        # both settings, the default methods, one seed, 1/9 of the steps -> runs/mini/quick/
    python mini.py --tune         # the learning-rate search on the validation set -> runs/mini/tune/tuning.json
    python mini.py --rebuild-base # build both SFT bases here from seed 0 instead of copying the shipped ones
    python mini.py --beyond       # beyond the paper: full fine-tuning, entropy cuts, TreeRL's advantage, each tuned
                                  # and run beside its counterpart (mini_beyond.py) -> runs/mini/beyond/

What it does (each stage writes into --out, default runs/mini/):
  1. the bases (mini_base.py): a 1 M-parameter Qwen2 and a character tokenizer; per setting an SFT'd base, copied
     from data/ (or built here from its seed);
  2. the runs, each through `training.train` (the code path of `python train.py`): the paper's settings scaled to the
     miniature (`run_settings`) at the paper's step counts, the learning rate of each (setting, method) the one
     `--tune` chose on the validation set at the same step counts (data/mini-tuning.json), two runs at a time, one
     CPU thread each;
  3. OUT/results.md: per setting the table beside the paper's Table II, the tuning table, the table of E10's λ
     readings and the decision the rule of docs/mini.md gives; the figures (mini_report.py).

The same budget of tries for every method: one seed at each of three learning rates, the best validation accuracy
kept (ties: the smaller rate); then 3 seeds at that rate on the test set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import torch

import mini_base
import mini_beyond
import mini_report
from mini_runs import (LRS, METHODS, QUICK_STEP_SCALE, STEP_SCALE, Job, choose, run_all, run_settings, slowest_first,
                       workers)
from mini_base import SETTINGS, say
from settings import ArgumentParser, setting_problem, usage_error
from values import first_line

# ----------------------------------------------------------------------------------------------------------------------
# The methods run by default (mini_runs.py defines them) and the rates they borrow

DEFAULT_METHODS = ("grpo", "sgrpo", "tspmo-decay", "tspmo-literal", "tspmo-decay-noreplay", "ppo", "dpo")
# An ablation runs at the rate tuned for the method it varies, so that only the ablated setting differs (as the
# paper's ablations hold the rest fixed), unless the tuning table holds its own (--tune --methods NAME tunes it)
TUNED_AS = {"tspmo-decay-noreplay": "tspmo-decay", "tspmo-decay-logpi": "tspmo-decay",
            "tspmo-literal-logpi": "tspmo-literal", "ppo-separate": "ppo", "tspmo-decay-group": "tspmo-decay",
            "tspmo-literal-group": "tspmo-literal"}
TUNED_METHODS = tuple(m for m in DEFAULT_METHODS if m not in TUNED_AS)  # what --tune runs by default
TUNING = mini_base.DATA / "mini-tuning.json"  # the shipped choice of --tune: each (setting, method)'s rate


# ----------------------------------------------------------------------------------------------------------------------
# Tuning: one seed at each learning rate, scored on the validation set


def tune(out: Path, bases: dict[str, Path], methods: list[str], parallel: int, step_scale: float,
         eval_limit: int | None, steps: int | None = None) -> tuple[dict, list[dict]]:
    """Every (setting, method, rate) with seed 0, scored on the validation set only (the test set is never
    evaluated here); returns {setting: {method: {"validation": {rate: accuracy}, "lr": chosen}}} and the runs."""
    jobs = []
    for setting in bases:
        for method in methods:
            for lr in LRS:
                cfg = run_settings(method, setting, 0, bases[setting], lr, step_scale)
                jobs.append(Job(setting, method, 0, "validation", dataclasses.replace(
                    cfg, steps=steps or cfg.steps, eval_limit=eval_limit,
                    out=str(out / "runs" / f"{setting}-{method}-lr{lr:g}"))))
    parallel = workers(parallel, len(jobs))
    say(f"tuning: {len(jobs)} runs, {parallel} at a time, one thread each; progress in {out}/runs/*/log.txt")
    results = run_all(slowest_first(jobs), parallel)
    table: dict = {}
    for r in results:
        table.setdefault(r["setting"], {}).setdefault(r["method"], {"validation": {}})["validation"][r["lr"]] = \
            r["accuracy"]
    for per_method in table.values():
        for entry in per_method.values():
            entry["lr"] = choose(entry["validation"])
    return table, results


def with_borrowed(rates: dict) -> dict:
    """Each ablation without a tuned rate of its own gets its method's (TUNED_AS), marked {"as": that method}."""
    return {s: {**{m: {**per[t], "as": t} for m, t in TUNED_AS.items() if t in per and m not in per}, **per}
            for s, per in rates.items()}


def read_tuning(path: Path) -> dict:
    """{setting: {method: {"validation": {rate: accuracy}, "lr": rate}}}, as written by --tune: its structure, every
    rate by train.py's own rule for --lr (settings.py), every accuracy in [0, 1]; a fault is one line, exit status 2."""
    def refuse(why: str) -> NoReturn:
        usage_error(f"--tuning {path}: {why}")

    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, or not UTF-8
        refuse(f"cannot read the tuning table ({first_line(e)})")
    if not (isinstance(raw, dict) and isinstance(raw.get("table"), dict)):
        refuse('not a tuning table: expected {"table": {setting: {method: {"lr": rate, "validation": {rate: '
               'accuracy}}}}}, as python mini.py --tune writes it')

    def rate(where: str, value) -> float:
        if (why := setting_problem("lr", value)) is not None:
            refuse(f"{where} is {value!r:.40}; {why}")
        return value

    table: dict = {}
    for s, per in raw["table"].items():
        if not isinstance(per, dict):
            refuse(f"table.{s} is not an object of methods")
        for m, e in per.items():
            where = f"table.{s}.{m}"
            if not (isinstance(e, dict) and "lr" in e and isinstance(e.get("validation"), dict)):
                refuse(f'{where} is not {{"lr": rate, "validation": {{rate: accuracy}}}}')
            validation = {}
            for k, accuracy in e["validation"].items():
                try:
                    key = float(k)
                except ValueError:
                    refuse(f"{where}.validation holds {k!r:.40}, which is not a learning rate")
                if not (type(accuracy) in (int, float) and 0 <= accuracy <= 1):
                    refuse(f"{where}.validation.{k} is {accuracy!r:.40}; allowed: an accuracy in [0, 1]")
                validation[rate(f"{where}.validation.{k}", key)] = accuracy
            table.setdefault(s, {})[m] = {"lr": rate(f"{where}.lr", e["lr"]), "validation": validation}
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mini.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mini", help="output folder (default runs/mini; the bases are cached in "
                                                      "OUT/base and OUT/base-steps)")
    p.add_argument("--quick", action="store_true", help="one seed, the default methods, 1/9 of the paper's steps, "
                                                        "into OUT/quick/")
    p.add_argument("--tune", action="store_true", help="the learning-rate search (one seed at each of "
                                                       f"{', '.join(f'{lr:g}' for lr in LRS)}, scored on the "
                                                       f"validation set; default methods {','.join(TUNED_METHODS)}) "
                                                       "into OUT/tune/tuning.json")
    p.add_argument("--beyond", action="store_true",
                   help="beyond the paper (mini_beyond.py): GRPO and T-SPMO (b) with full fine-tuning, T-SPMO (b) "
                        "with entropy cuts and with TreeRL's advantage, each tuned (its grid, the edge rule) and run "
                        "beside its counterpart, whose test seeds run again; into OUT/beyond/ (with --quick "
                        "OUT/beyond/quick/); --methods chooses among "
                        f"{','.join(mini_beyond.ROWS)}")
    p.add_argument("--tuning", default=str(TUNING), help="the rates to use (default: the shipped choice, "
                                                         "data/mini-tuning.json; or OUT/tune/tuning.json)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {','.join(SETTINGS)}")
    p.add_argument("--seeds", type=positive_int, help="seeds per method (default 3; --quick 1)")
    p.add_argument("--methods", help=f"comma-separated, of {','.join(METHODS)} (default "
                                     f"{','.join(DEFAULT_METHODS)}; an ablation without a tuned rate of its own "
                                     "takes the rate of the method it varies)")
    p.add_argument("--steps", type=positive_int, help="RL steps for every method (default: the paper's; --quick "
                                                      "1/9 of them)")
    p.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N problems (default all 300)")
    p.add_argument("--rebuild-base", action="store_true", help="run the SFTs here rather than copy the shipped "
                                                               "bases (data/mini-base*/, built the same way)")
    p.add_argument("--sft-threads", type=positive_int, default=1,
                   help="torch threads for the SFT (1: the thread count changes the float sums, so the base)")
    p.add_argument("--parallel", type=positive_int, default=2, help="runs at a time, one thread each (2)")
    return p


def check_names(flag: str, given: str, allowed) -> list[str]:
    """A comma-separated list of distinct names, each of `allowed`; else one line, exit status 2."""
    names, choose = given.split(","), f"choose from {','.join(allowed)}"
    if "" in names:
        usage_error(f"{flag} {given!r}: an empty name; {choose}, separated by commas")
    if bad := [n for n in names if n not in allowed]:
        usage_error(f"{flag} {given}: unknown {flag[2:-1]} {bad[0]!r}; {choose}")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        usage_error(f"{flag} {given}: {twice[0]!r} named twice (more seeds: --seeds); {choose}, each once")
    return names


def check_out(out: Path) -> None:
    """--out: a directory this process can write (made here if new), before any work."""
    if out.exists() and not out.is_dir():
        usage_error(f"--out {out}: is a file; allowed: a directory, new or one this user can write")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        usage_error(f"--out {out}: cannot write there ({e.strerror or e}); allowed: a directory this user can write")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = check_names("--settings", args.settings, SETTINGS)
    if args.tune and args.beyond:
        usage_error("--tune --beyond: --beyond tunes its own rows; choose one")
    default, allowed = ((mini_beyond.ROWS, mini_beyond.ROWS) if args.beyond else
                        (TUNED_METHODS if args.tune else DEFAULT_METHODS, METHODS))
    methods = check_names("--methods", ",".join(default) if args.methods is None else args.methods, allowed)
    rates = None if args.tune else with_borrowed(read_tuning(Path(args.tuning)))  # a bad table stops here
    if args.beyond:  # the counterparts' validation accuracies come from the table; the new rows are tuned here
        methods = [m for m in mini_beyond.ROWS if m in methods]
        rates = {s: {m: e for m, e in per.items() if m not in TUNED_AS} for s, per in rates.items()}
        needed = [m for m in mini_beyond.COUNTERPARTS if m in {mini_beyond.counterpart(x) for x in methods}]
        if missing := [f"{s}/{m}" for s in settings for m in needed if m not in rates.get(s, {})]:
            usage_error(f"--tuning {args.tuning}: no learning rate for {missing[0]}; run python mini.py --tune")
    elif rates is not None:
        if missing := [f"{s}/{m}" for s in settings for m in methods if m not in rates.get(s, {})]:
            usage_error(f"--tuning {args.tuning}: no learning rate for {missing[0]}; run python mini.py --tune")
    out = Path(args.out)
    check_out(out)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.sft_threads)  # the runs below take one thread each
    bases = {}
    for setting in settings:
        if args.rebuild_base:
            shutil.rmtree(mini_base.base_dir(out, setting), ignore_errors=True)
        bases[setting] = mini_base.build_base(out, setting, shipped=not args.rebuild_base)
    torch.set_num_threads(threads)
    step_scale = QUICK_STEP_SCALE if args.quick else STEP_SCALE
    command = "python mini.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.beyond:
        return mini_beyond.main(out, bases, methods, rates, args.seeds or (1 if args.quick else 3), step_scale,
                                args.steps, args.eval_limit, args.parallel, command)
    if args.tune:
        dest = out / "tune"
        table, results = tune(dest, bases, methods, args.parallel, step_scale, args.eval_limit, args.steps)
        minutes, cpu = (time.time() - t0) / 60, sum(r["cpu_minutes"] for r in results)
        (dest / "tuning.json").write_text(json.dumps({"command": command, "minutes": round(minutes, 1),
                                                      "cpu_minutes": round(cpu, 1),
                                                      "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                                                      "machine": mini_report.machine(), "table": table}, indent=2))
        print(mini_report.tuning_table(table))
        print(f"wrote {dest / 'tuning.json'} in {minutes:.1f} min (the runs' CPU time {cpu:.1f} min); use it with "
              f"--tuning {dest / 'tuning.json'}")
        return 0
    dest = out / "quick" if args.quick else out  # --quick keeps its own runs and files beside the full table's
    dest.mkdir(parents=True, exist_ok=True)
    jobs = []
    for setting in settings:
        for method in methods:
            for seed in range(args.seeds or (1 if args.quick else 3)):
                cfg = run_settings(method, setting, seed, bases[setting], rates[setting][method]["lr"], step_scale)
                steps = args.steps or cfg.steps
                jobs.append(Job(setting, method, seed, "test", dataclasses.replace(
                    cfg, out=str(dest / "runs" / f"{setting}-{method}-seed{seed}"), steps=steps,
                    eval_limit=args.eval_limit, eval_every=max(1, min(25, steps // 6)))))
    parallel = workers(args.parallel, len(jobs))
    say(f"{len(jobs)} runs, {parallel} at a time, one thread each; progress in {dest}/runs/*/log.txt")
    results = run_all(slowest_first(jobs), parallel)
    (dest / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = mini_report.write_results(dest, bases, results, rates, (time.time() - t0) / 60, command)
    print(text)
    print(f"wrote {dest / 'results.md'} and its figures in {(time.time() - t0) / 60:.1f} min (the runs' CPU time "
          f"{sum(r['cpu_minutes'] for r in results):.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
