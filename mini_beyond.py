"""The miniature beyond the paper (`python mini.py --beyond`): four rows, each its counterpart with one change.

    row                   counterpart   the one change
    grpo-full             grpo          --train full: every weight, fp32, AdamW; the KL reference a frozen copy (F1)
    tspmo-decay-full      tspmo-decay   --train full (T-SPMO keeps no reference)
    tspmo-decay-entropy   tspmo-decay   --replay-cut entropy: a replay branches at j with P(j) ∝ H_j (B1)
    tspmo-decay-treerl    tspmo-decay   --edge-advantage treerl: TreeRL's A(v|p) in place of E7 (B2)

The budget is every method's (mini.py): seed 0 at each rate of the row's grid on the validation set, at the step count
the row is reported at; the edge rule (below); 3 seeds on the test set at the chosen rate. The counterparts take their
validation accuracies from the shipped tuning table, get the edge rule too, and run their test seeds again here, for
their forwards and CPU time under the same load (and, every run being seeded, as a check of the shipped accuracies).

    the edge rule   where the best rate of the grid is its smallest or largest, one more rate beyond it at the grid's
                    half-decade spacing (3e-3 → 1e-2, 3e-4 → 1e-4; full: 3e-4 → 1e-3, 3e-5 → 1e-5), and the best of
                    the four kept (ties: the smaller rate)
    a difference    two rows' means at least DIFFERENCE apart and every seed of one above every seed of the other;
                    means that far apart with overlapping seeds: a lean; closer: no difference found (docs/mini.md)

Files, in OUT/beyond/ (OUT/beyond/quick/ with --quick): tuning.json, results.json, results.md; runs/ (test seeds) and
tune/runs/ (validation), each run an ordinary run directory with a result.json: a run whose result.json holds the
same settings is kept, not run again, so a stopped command continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import queue
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import checkpoints
import mini_base
import mini_report
import mini_runs
import training
from mini_base import say
from settings import Settings

# ----------------------------------------------------------------------------------------------------------------------
# The rows, their grids and the edge rule

BEYOND = {  # name: (counterpart, what differs from it)
    "grpo-full": ("grpo", {"train": "full"}),
    "tspmo-decay-full": ("tspmo-decay", {"train": "full"}),
    "tspmo-decay-entropy": ("tspmo-decay", {"replay_cut": "entropy"}),
    "tspmo-decay-treerl": ("tspmo-decay", {"edge_advantage": "treerl"}),
}
COUNTERPARTS = ("grpo", "tspmo-decay")
# The order the rows run in: the entropy and TreeRL rows and their counterpart, then full fine-tuning, GRPO's
# test seeds again last (its forwards are G = 8 a step whatever the rewards; what a rerun adds is its CPU time here)
ROWS = ("tspmo-decay-entropy", "tspmo-decay-treerl", "tspmo-decay", "grpo-full", "tspmo-decay-full", "grpo")
SHIPPED_RESULTS = mini_base.DATA / "mini-results.json"  # python mini.py's records: the counterparts' shipped rows
FULL_LRS = (3e-5, 1e-4, 3e-4)  # a tenth of LoRA's grid: every weight moves, not an adapter whose B starts at 0
DIFFERENCE = 0.10  # accuracy: 10 points, about twice the seeds' typical standard deviation (docs/mini.md)
LABELS = {"grpo": "GRPO", "tspmo-decay": "T-SPMO (b)", "grpo-full": "GRPO, full fine-tuning",
          "tspmo-decay-full": "T-SPMO (b), full fine-tuning", "tspmo-decay-entropy": "T-SPMO (b), entropy cuts",
          "tspmo-decay-treerl": "T-SPMO (b), TreeRL's advantage"}


def counterpart(row: str) -> str:
    return BEYOND[row][0] if row in BEYOND else row


def grid(row: str) -> tuple[float, ...]:
    return FULL_LRS if BEYOND.get(row, ("", {}))[1].get("train") == "full" else mini_runs.LRS


def next_rate(lr: float, direction: int) -> float:
    """The rate one half-decade beyond lr on the 1, 3, 10 grid (direction +1 above, −1 below): 3e-3 → 1e-2."""
    k = round(2 * math.log10(lr)) + direction  # half-decades: 1e-3 is −6, 3e-3 is −5
    return float(f"{3 if k % 2 else 1}e{k // 2}")


def edge_rate(rates: tuple[float, ...], validation: dict[float, float]) -> float | None:
    """The edge rule: the rate beyond the grid's edge where the grid's best rate sits at that edge; else None."""
    best = mini_runs.choose({lr: validation[lr] for lr in rates})
    return next_rate(best, +1) if best == max(rates) else next_rate(best, -1) if best == min(rates) else None


def row_settings(row: str, setting: str, seed: int, base: Path, lr: float, step_scale: float) -> Settings:
    """The counterpart's settings (mini_runs.run_settings), with the row's one change."""
    cfg = mini_runs.run_settings(counterpart(row), setting, seed, base, lr, step_scale)
    return dataclasses.replace(cfg, **BEYOND[row][1]) if row in BEYOND else cfg


def verdict(a: list[float], b: list[float]) -> str:
    """The rule written before the runs: "differ" when the means are DIFFERENCE apart or more and every seed of one
    row is above every seed of the other; "a lean" when the means are that far apart but the seeds overlap; "no
    difference found" otherwise."""
    if abs(statistics.fmean(a) - statistics.fmean(b)) < DIFFERENCE - 1e-12:  # k/300 accuracies: 0.1 ± rounding
        return "no difference found"
    return "differ" if min(a) > max(b) or min(b) > max(a) else "a lean"


# ----------------------------------------------------------------------------------------------------------------------
# The plan: validation runs, the edge rule's runs, test seeds; each stage queued as the one before it ends


@dataclasses.dataclass
class Row:
    """One row in one setting: its grid, its validation accuracies as they arrive, its test rates."""
    setting: str
    name: str
    rates: tuple[float, ...]
    validation: dict[float, float]
    shipped: float | None = None  # a counterpart's shipped rate
    rerun: bool = True  # a counterpart: its test seeds run again at the shipped rate (it was named in --methods)
    extra: float | None = None  # the edge rule's rate, once decided
    lr: float | None = None  # the chosen rate, once the validation runs are in


class Plan:
    """Every run of --beyond, queued stage by stage: `start()` the first jobs, `after(result)` the jobs a result
    makes ready (a row's edge run once its grid is in, its test seeds once its rate is chosen)."""

    def __init__(self, out: Path, bases: dict[str, Path], rows: list[str], tuning: dict, seeds: int,
                 step_scale: float, steps: int | None, eval_limit: int | None):
        self.out, self.bases, self.seeds, self.step_scale = out, bases, seeds, step_scale
        self.steps, self.eval_limit = steps, eval_limit
        self.rows = {}
        planned = [r for r in ROWS if r in rows or r in {counterpart(x) for x in rows}]  # a row's counterpart too
        for setting in bases:
            for name in planned:
                shipped = tuning[setting][name] if name in COUNTERPARTS else None
                self.rows[setting, name] = Row(setting, name, mini_runs.LRS if shipped else grid(name),
                                               dict(shipped["validation"]) if shipped else {},
                                               shipped["lr"] if shipped else None, name in rows)

    def job(self, row: Row, lr: float, seed: int, split: str) -> mini_runs.Job:
        cfg = row_settings(row.name, row.setting, seed, self.bases[row.setting], lr, self.step_scale)
        steps = self.steps or cfg.steps
        name = f"{row.setting}-{row.name}-lr{lr:g}"
        if split == "validation":
            return mini_runs.Job(row.setting, row.name, seed, split, dataclasses.replace(
                cfg, steps=steps, eval_limit=self.eval_limit, out=str(self.out / "tune" / "runs" / name)))
        return mini_runs.Job(row.setting, row.name, seed, split, dataclasses.replace(
            cfg, steps=steps, eval_limit=self.eval_limit, eval_every=max(1, min(25, steps // 6)),
            out=str(self.out / "runs" / f"{name}-seed{seed}")))

    def start(self) -> list[mini_runs.Job]:
        jobs = [self.job(row, lr, 0, "validation") for row in self.rows.values() for lr in row.rates
                if lr not in row.validation]
        return jobs + [j for row in self.rows.values() for j in self.ready(row)]

    def after(self, result: dict) -> list[mini_runs.Job]:
        row = self.rows[result["setting"], result["method"]]
        if result["split"] != "validation":
            return []
        row.validation[result["lr"]] = result["accuracy"]
        return self.ready(row)

    def ready(self, row: Row) -> list[mini_runs.Job]:
        """The jobs a row's validation accuracies make ready: none until the grid is in; then the edge rule's run;
        then, once it is in (or none is due), the test seeds at the chosen rate. A counterpart's at its shipped rate
        run again only if it was named (its shipped seeds stand for it otherwise); at a rate the rule chose in its
        place, always."""
        if row.lr is not None or any(lr not in row.validation for lr in row.rates):
            return []
        if row.extra is None:
            row.extra = edge_rate(row.rates, row.validation) or 0.0  # 0.0: decided, none due
            if row.extra and row.extra not in row.validation:
                return [self.job(row, row.extra, 0, "validation")]
        if row.extra and row.extra not in row.validation:
            return []
        row.lr = mini_runs.choose(row.validation)
        test_rates = [lr for lr in {row.lr, row.shipped} - {None} if row.rerun or lr != row.shipped]
        return [self.job(row, lr, seed, "test") for lr in test_rates for seed in range(self.seeds)]

    def table(self) -> dict:
        """{setting: {row: {"validation", "lr", "grid", "edge", and for a counterpart "shipped"}}}: the tuning file."""
        out: dict = {}
        for (setting, name), row in self.rows.items():
            entry = {"validation": dict(sorted(row.validation.items())), "lr": row.lr, "grid": list(row.rates),
                     "edge": row.extra or None}
            if row.shipped is not None:
                entry["shipped"] = row.shipped
            out.setdefault(setting, {})[name] = entry
        return out


def read_table(raw: dict) -> dict:
    """A tuning.json's table as Plan.table() made it: JSON wrote each validation rate as a string key."""
    return {s: {row: {**e, "validation": {float(k): a for k, a in e["validation"].items()}} for row, e in per.items()}
            for s, per in raw["table"].items()}


def priority(job: mini_runs.Job) -> tuple:
    """Rows in ROWS' order; within a row, the settings in order, validation before test."""
    return ROWS.index(job.method), job.setting, job.split != "validation", job.cfg.lr, job.seed


# ----------------------------------------------------------------------------------------------------------------------
# The runs: kept when done, `parallel` at a time


def same_settings(recorded: dict, settings: dict) -> bool:
    """A kept run is this job's when every setting it recorded is the job's, and every setting it did not record (a
    field Settings gained since) is at its default: a default is what that run did."""
    defaults = dataclasses.asdict(Settings())
    return set(recorded) <= set(settings) and all(recorded.get(k, defaults[k]) == v for k, v in settings.items())


def run_kept(job: mini_runs.Job, loaded=None) -> dict:
    """mini_runs.run_job, unless RUN/result.json holds a result of the same settings (then that result, not run again);
    the result also counts the run's training forwards (metrics.jsonl's, the sampling not included) and, for a
    replaying T-SPMO run, the share of replay cuts at the first token."""
    run = Path(job.cfg.out)
    kept = run / "result.json"
    settings = dataclasses.asdict(job.cfg)
    if kept.is_file() and same_settings(json.loads(kept.read_text())["settings"], settings):
        return {**json.loads(kept.read_text())["result"], "kept": True}
    result = mini_runs.run_job(job, loaded)
    metrics = checkpoints.read_jsonl(run / "metrics.jsonl")
    result["forwards"] = sum(m["forwards"] for m in metrics)
    cuts = [r["replay_cut"] for m in metrics for r in m.get("replays", [])]
    if cuts:
        result["replay_cuts_at_0"] = sum(j == 0 for j in cuts) / len(cuts)
    checkpoints.write_atomic(kept, (json.dumps({"settings": settings, "result": result}, indent=2) + "\n").encode())
    return result


def run_plan(plan: Plan, parallel: int, log: Callable = say, worker: Callable = run_kept,
             each: Callable[[list[dict]], None] = lambda done: None) -> list[dict]:
    """Every job of the plan, each one a result makes ready queued as the result comes, `parallel` at a time in
    separate processes (1: in this process, each base loaded once); `each(results so far)` after every result."""
    waiting, done = sorted(plan.start(), key=priority), []

    def report(r):
        done.append(r)
        each(done)
        log(f"  {r['setting']:<11} {r['method']:<20} lr {r['lr']:g} seed {r['seed']} | {r['split']} accuracy "
            f"{r['accuracy']:.3f} | {r['steps']} steps | {r['minutes']:.1f} min (CPU {r['cpu_minutes']:.1f}) | "
            f"{r['forwards']} forwards{' (kept)' if r.get('kept') else ''}  [{len(done)} done, {len(waiting)} queued]")

    if parallel <= 1:
        bases: dict[str, tuple] = {}
        while waiting:
            j = waiting.pop(0)
            if j.cfg.model not in bases:
                bases[j.cfg.model] = training.load_everything(j.cfg)
            r = worker(j, bases[j.cfg.model])
            waiting = sorted(waiting + plan.after(r), key=priority)
            report(r)
        return done
    arrived: queue.SimpleQueue = queue.SimpleQueue()
    with multiprocessing.get_context("spawn").Pool(parallel) as pool:  # spawn: as mini_runs.run_all, and why
        running = 0
        while waiting or running:
            while waiting and running < parallel:
                pool.apply_async(worker, (waiting.pop(0),), callback=arrived.put, error_callback=arrived.put)
                running += 1
            r = arrived.get()
            running -= 1
            if isinstance(r, BaseException):
                raise r
            waiting = sorted(waiting + plan.after(r), key=priority)
            report(r)
        pool.close()  # each worker exits on its own, running its exit handlers (mini_runs.run_all says why)
        pool.join()
    return done


# ----------------------------------------------------------------------------------------------------------------------
# The report


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def label(row: str, lr: float, table: dict, setting: str) -> str:
    """The row's name; a counterpart's test seeds at its shipped rate are "(shipped rate)" where the edge rule chose
    another, and those at the chosen rate "re-tuned"."""
    e = table[setting][row]
    if "shipped" in e and e["shipped"] != e["lr"]:
        return LABELS[row] + (" (shipped rate)" if lr == e["shipped"] else ", re-tuned by the edge rule")
    return LABELS[row]


def groups(results: list[dict], setting: str) -> dict[tuple[str, float, bool], list[dict]]:
    """The test results of a setting by (row, rate, shipped), in ROWS' order, this command's before the shipped."""
    out: dict = {}
    for r in sorted((r for r in results if r["setting"] == setting and r["split"] == "test"),
                    key=lambda r: (ROWS.index(r["method"]), r["lr"], "shipped" in r, r["seed"])):
        out.setdefault((r["method"], r["lr"], "shipped" in r), []).append(r)
    return out


def with_shipped(results: list[dict], table: dict, shipped: list[dict]) -> list[dict]:
    """This command's results and, for each counterpart in the table, its shipped test seeds at its shipped rate
    (python mini.py's records, marked "shipped"), which stand for it where it was not run again."""
    return results + [{**r, "shipped": True} for r in shipped if r["method"] in table.get(r["setting"], {})
                      and r["lr"] == table[r["setting"]][r["method"]].get("shipped")]


def results_table(setting: str, results: list[dict], table: dict) -> str:
    """Accuracy (%) on the test set, mean ± std and each seed; what a run spent: training forwards a step (the
    forwards of the updates, fresh and replay groups; sampling not counted; not in the shipped records) and CPU
    minutes (its own process, under the load of its own day); for a replaying T-SPMO row, the share of its replays cut
    at the first token (mean over seeds)."""
    rows = ["| row | learning rate | test accuracy (%), mean ± std | per seed | steps | forwards a step | CPU minutes "
            "a run | replay cuts at the first token (%) |", "|---|---|---|---|---|---|---|---|"]
    for (row, lr, shipped), rs in groups(results, setting).items():
        m, s = mini_report.mean_std([100 * r["accuracy"] for r in rs])
        cuts = (pct(statistics.fmean(r["replay_cuts_at_0"] for r in rs)) if all("replay_cuts_at_0" in r for r in rs)
                else "—")
        forwards = "—" if shipped else f"{statistics.fmean(r['forwards'] / r['steps'] for r in rs):.2f}"
        rows.append(f"| {label(row, lr, table, setting)}{', shipped (python mini.py)' * shipped} | {lr:g} | "
                    f"{m:.1f} ± {s:.1f} | {', '.join(pct(r['accuracy']) for r in rs)} | {rs[0]['steps']} | {forwards} | "
                    f"{statistics.fmean(r['cpu_minutes'] for r in rs):.2f} | {cuts} |")
    return "\n".join(rows)


def comparisons(setting: str, results: list[dict], table: dict) -> list[tuple[str, str, list[float], list[float]]]:
    """(row, counterpart, the row's accuracies, the counterpart's) for each beyond row run here, against the
    counterpart at its chosen rate (re-tuned where the edge rule chose another; this command's seeds, or the shipped
    ones where it did not run them again); and GRPO full against T-SPMO (b) full, as GRPO against T-SPMO (b)."""
    by: dict = {}
    for (row, lr, _), rs in groups(results, setting).items():  # this command's first, then the shipped
        if lr == table[setting][row]["lr"]:
            by.setdefault(row, [r["accuracy"] for r in rs])
    pairs = [(row, BEYOND[row][0]) for row in ROWS if row in BEYOND] + [("grpo", "tspmo-decay"),
                                                                        ("grpo-full", "tspmo-decay-full")]
    return [(a, b, by[a], by[b]) for a, b in pairs if a in by and b in by]


def comparison_table(setting: str, results: list[dict], table: dict) -> str:
    rows = ["| row | against | mean difference (points) | seeds | the rule |", "|---|---|---|---|---|"]
    for a, b, xs, ys in comparisons(setting, results, table):
        d = 100 * (statistics.fmean(xs) - statistics.fmean(ys))
        spread = "separate" if min(xs) > max(ys) or min(ys) > max(xs) else "overlap"
        rows.append(f"| {LABELS[a]} | {LABELS[b]} | {d:+.1f} | {spread} | {verdict(xs, ys)} |")
    return "\n".join(rows)


def tuning_table(table: dict) -> str:
    """Validation accuracy (%) of seed 0 at each rate tried (the chosen one in bold); the edge rule's rate."""
    rows = ["| setting | row | validation accuracy (%) at each rate | chosen | the edge rule |", "|---|---|---|---|---|"]
    for setting, per in table.items():
        for row in (r for r in ROWS if r in per):
            e = per[row]
            cells = ", ".join(f"{lr:g}: " + (f"**{pct(a)}**" if lr == e["lr"] else pct(a))
                              for lr, a in sorted(e["validation"].items()))
            edge = f"{e['edge']:g} added" if e["edge"] else "inside the grid: none"
            shipped = f" (shipped: {e['shipped']:g}, data/mini-tuning.json)" if "shipped" in e else ""
            chosen = "not yet" if e["lr"] is None else f"{e['lr']:g}"
            rows.append(f"| {setting} | {LABELS[row]} | {cells} | {chosen}{shipped} | {edge} |")
    return "\n".join(rows)


def write_results(dest: Path, results: list[dict], table: dict, minutes: float, command: str,
                  shipped: list[dict]) -> str:
    """results.md, beside the counterparts' `shipped` records; returns its text (printed by mini.py)."""
    cpu = sum(r["cpu_minutes"] for r in results)
    results = with_shipped(results, table, shipped)
    parts = ["# tokrl: the miniature beyond the paper", "",
             f"`{command}`: {time.strftime('%Y-%m-%d %H:%M %Z')}, {mini_report.machine()}; {minutes:.1f} minutes in "
             f"this command, wall clock; the runs' own CPU time {cpu:.1f} minutes (kept runs: as they were measured).",
             "", "Test accuracy: greedy decoding on the fixed 300-problem test set. The rule (docs/mini.md): two rows "
             f"differ when their means are {100 * DIFFERENCE:.0f} points apart or more and their seeds separate."]
    for setting in table:
        parts += ["", f"## The {setting} setting", "", results_table(setting, results, table), "",
                  comparison_table(setting, results, table)]
    parts += ["", "## Learning rates (seed 0, validation accuracy %)", "", tuning_table(table), ""]
    text = "\n".join(parts)
    (dest / "results.md").write_text(text)
    return text


# ----------------------------------------------------------------------------------------------------------------------
# The command


def main(out: Path, bases: dict[str, Path], rows: list[str], tuning: dict, seeds: int, step_scale: float,
         steps: int | None, eval_limit: int | None, parallel: int, command: str) -> int:
    """--beyond: the plan run; OUT/beyond/{tuning.json, results.json, results.md} (OUT/beyond/quick/ with --quick)
    written again after every result, so that a stopped command leaves the tables of what finished."""
    t0 = time.time()
    dest = out / "beyond" / ("quick" if step_scale != mini_runs.STEP_SCALE else "")
    dest.mkdir(parents=True, exist_ok=True)
    plan = Plan(dest, bases, rows, tuning, seeds, step_scale, steps, eval_limit)
    parallel = mini_runs.workers(parallel, seeds * len(rows) * len(bases))  # at least this many runs
    say(f"beyond the paper: {', '.join(rows)}; {parallel} at a time, one thread each; progress in "
        f"{dest}/runs/*/log.txt and {dest}/tune/runs/*/log.txt")
    # the shipped rows were run at the paper's step counts on every test problem: beside those runs only
    paper_scale = step_scale == mini_runs.STEP_SCALE and steps is None and eval_limit is None
    shipped = json.loads(SHIPPED_RESULTS.read_text()) if paper_scale else []
    meta: dict = {}

    def write(results: list[dict]) -> str:
        minutes = (time.time() - t0) / 60
        meta.update({"command": command, "minutes": round(minutes, 1),
                     "cpu_minutes": round(sum(r["cpu_minutes"] for r in results), 1),
                     "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": mini_report.machine()})
        checkpoints.write_atomic(dest / "tuning.json",
                                 (json.dumps({**meta, "table": plan.table()}, indent=2) + "\n").encode())
        checkpoints.write_atomic(dest / "results.json", (json.dumps(results, indent=2) + "\n").encode())
        return write_results(dest, results, plan.table(), minutes, command, shipped)

    text = write(run_plan(plan, parallel, each=write))
    minutes = meta["minutes"]
    print(text)
    print(f"wrote {dest / 'results.md'}, results.json and tuning.json in {minutes:.1f} min (the runs' CPU time "
          f"{meta['cpu_minutes']} min)")
    return 0
