"""Train Qwen2 with GRPO, S-GRPO or T-SPMO under LoRA, as in Lee & Tong (2025), on one GPU (or the CPU).
The methods the paper argues against run in the same harness: --algo ppo (a critic, GAE) and --algo dpo.

    python train.py --algo tspmo --task mult                  # the paper's settings for (algo, task)
    python train.py --algo sgrpo --task svamp --steps 10      # any setting can be overridden
    python train.py --resume runs/mult-tspmo-20261122-101500  # continue exactly where it stopped [--steps N]
    python train.py --task mult --eval-only [--adapter DIR]   # accuracy of the base model or of an adapter

Deviations from the paper and choices it leaves open (README "Choices the paper leaves open" lists the same):
  1. T-SPMO replay takes its own optimizer step after each replayed group (the paper: "the policy model is updated
     again"); a training step of T-SPMO with replay therefore makes 1 + C_success + C_failure optimizer steps.
  2. The gsm8k task (prompt, SymPy reward, LoRA and step settings) is an extension; the paper has no such run.
  3. Evaluation cadence (--eval-every) and checkpoint cadence are ours; the paper gives neither.
  4. A zero-variance group still takes its update: GRPO/S-GRPO still backpropagate the β·KL term (E3/E5 keep it when
     Â = 0), T-SPMO only the λ·‖W‖² term. The step is logged with zero_variance = true.
  5. With --accum N, T-SPMO draws N rounds of replays after the accumulated update (one per fresh group; with
     --replay-pool group each from its own group); --reward partial (S2) trains on partial credit, evaluation stays
     exact. The replay pool (replay.py) is every completion generated so far, each replayed under its own problem.
  6. PPO and DPO (SPEC-baselines.md, baselines.py) take one prompt per step (--accum 1). PPO's shared critic passes
     the value loss's gradient into the policy's LoRA; PPO logs means over its μ passes.

Every setting is checked before anything is loaded (settings.validate); a resume keeps the settings the run recorded.

This file is the command line and the run directory: new, resumed or held. The training loop: training.py; what a run
logs: runlog.py; the settings, the paper's defaults and the rules they are checked against: settings.py; the settings
against the model and this machine: checks.py; tasks and data: tasks.py; checkpoints and the run directory's hold:
checkpoints.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import signal
import sys
from pathlib import Path

import checkpoints
import distributed
import model as M
import pretrained
from checkpoints import WriteError, append_jsonl, write_atomic
from checks import RUN_MARKER, check_inputs, check_resume, marked_settings_problem, read_run_settings
from distributed import World
from settings import (FULL_LR, LORA_FLAGS, ArgumentParser, Settings, add_arguments, flag, paper_defaults, paper_table,
                      usage_error, validate)
from tasks import DataError
from stopping import StopRequest, interrupt
from training import eval_only, train


# ----------------------------------------------------------------------------------------------------------------------
# The command line: a flag per setting, resolved against the paper's defaults


def build_parser() -> argparse.ArgumentParser:
    """A flag per setting (settings.py declares each), and the run directory's own: --resume, --eval-only, --adapter."""
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], epilog=paper_table(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    run = add_arguments(p)["run"]
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest intact checkpoint (none yet: "
                                                         "start it again from step 0), with the settings it recorded "
                                                         "(only --steps and --device may change)")
    run.add_argument("--eval-only", action="store_true", help="evaluate the base model (or --adapter) and exit")
    run.add_argument("--adapter", help="with --eval-only: a PEFT LoRA adapter directory")
    return p


def given_settings(args: argparse.Namespace) -> dict:
    """The settings the user typed (argparse leaves the others None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
            if getattr(args, f.name, None) is not None}


def resolve(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    """Settings = Settings() defaults ← the paper's for (algo, task) ← a resumed run's ← what the user typed."""
    given = given_settings(args)
    if base is not None:
        return dataclasses.replace(base, **given)
    algo, task = given.get("algo", Settings.algo), given.get("task", Settings.task)
    if given.get("train") == "full":  # F1: no LoRA to configure, and a full fine-tuning rate (settings.FULL_LR)
        if typed := [name for name in LORA_FLAGS if name in given]:
            usage_error(f"{flag(typed[0])} {given[typed[0]]}: a LoRA setting, and --train full applies no LoRA "
                        "(every weight trains); allowed with --train full: none of --lora-fraction, --lora-rank, "
                        "--lora-alpha, --lora-targets")
        given = {"lr": FULL_LR, **given}
    return Settings(**{**paper_defaults(algo, task), "algo": algo, "task": task, **given})


def resume_settings(args: argparse.Namespace) -> tuple[Settings, Path]:
    """A resume's settings, checked before anything is loaded: the recorded ones (a typed flag that differs from
    them is refused, except --steps and --device)."""
    run = Path(args.resume)
    recorded = read_run_settings(run, args.device)  # --device: this machine's, which a resume may change
    if args.eval_only or args.adapter:
        data = f" --data {recorded.data}" if recorded.data else ""
        usage_error(f"{'--eval-only' if args.eval_only else '--adapter'}: not with --resume; evaluate a run's "
                    f"adapter with python train.py --eval-only --adapter {run / 'adapter'} --model {recorded.model} "
                    f"--task {recorded.task}{data}")
    for name, value in given_settings(args).items():  # the typed --device is already the recorded settings' device
        if name != "steps" and value != getattr(recorded, name):
            usage_error(f"{flag(name)} {value}: {run} was recorded with {name} = {getattr(recorded, name)!r} "
                        f"({run / 'config.json'}); a resumed run keeps its settings, only --steps and --device may "
                        "change")
    cfg = dataclasses.replace(recorded, steps=args.steps or recorded.steps)
    validate(cfg, training=False)
    if not pretrained.is_dir(cfg.model) and not pretrained.is_repo_id(cfg.model):
        usage_error(f"{run} was recorded with --model {cfg.model} ({run / 'config.json'}), which is not a directory "
                    "here (a run from another machine, or started from another directory?); a resumed run keeps its "
                    f"settings: put the same model at {cfg.model}, or a symbolic link to it")
    return cfg, run


# ----------------------------------------------------------------------------------------------------------------------
# The run directory: new, resumed, held


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LOGS = ("metrics.jsonl", "eval.jsonl", "resumes.jsonl", "curves.svg")
# what a run writes in its directory before its first checkpoint is whole (with the leftovers of an interrupted write)
BEFORE_FIRST_CHECKPOINT = ("config.json", *LOGS, "checkpoints", checkpoints.HOLD_FILE)


def new_run_dir(cfg: Settings) -> Path:
    """The run directory of a new run: --out, checked (refuse_a_run_there), or the default name, which
    make_run_dir makes unique when it creates it."""
    if cfg.out:
        refuse_a_run_there(Path(cfg.out))
        return Path(cfg.out)
    return Path(f"runs/{cfg.task}-{cfg.algo}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def make_run_dir(base: Path) -> Path:
    """A new directory named `base`, or base-2, base-3, ... when that is taken: each name tried with one mkdir that
    fails if it exists, so two runs started in the same second never share one (no check, then create)."""
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            run = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                run.mkdir()
                return run
            except FileExistsError:
                continue
    except OSError as e:
        raise WriteError(Path(e.filename or base), e) from None


def refuse_a_run_there(run: Path, option: str = "--out") -> None:
    """Checked when the directory is chosen, and again once it is held (a run may have got there in between)."""
    if (problem := run_dir_problem(run)) is not None:
        usage_error(f"{option} {run}: {problem}")


def listing(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def run_dir_problem(run: Path) -> str | None:
    """Why `run` cannot take a new run (None: it can). A run directory never takes what it did not write: it must be
    absent, empty, or hold a run of tokrl's that stopped before its first checkpoint (start_run_dir starts it again
    there, deleting its logs): a config.json of tokrl's own run settings (checks.RUN_MARKER), the logs of the steps up
    to that checkpoint, the leftovers of an interrupted write, and nothing else. Read only: nothing is touched."""
    if not run.exists():
        return None
    if not run.is_dir():
        return "is a file; allowed: a new or empty directory"
    there = sorted(p.name for p in run.iterdir() if p.name != checkpoints.HOLD_FILE)
    if not there:
        return None
    if any((run / "checkpoints").glob("step-*")):
        return f"already holds a run; continue it with --resume {run}, or choose another --out"
    if not (run / "config.json").is_file():
        return f"not empty, and not a run of tokrl's (no config.json); it holds {listing(there)}; allowed: a new or " \
               "empty directory"
    if (why := marked_settings_problem(run / "config.json")) is not None:
        return (f"not empty, and not a run of tokrl's ({run / 'config.json'} is not tokrl's run settings: {why}); it "
                f"holds {listing(there)}; allowed: a new or empty directory")
    gone = "; a new run needs another --out"
    if (run / "adapter").exists():
        return f"holds a finished run ({run / 'adapter'} is its final adapter; its checkpoints are gone){gone}"
    stale = lambda name: name.startswith(".") and name.endswith(".tmp")  # noqa: E731 (remove_stale's leftovers)
    inside = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    if "latest" in inside:
        name = (run / "checkpoints" / "latest").read_text(errors="replace").strip()
        return f"holds a run whose checkpoints are gone ({run / 'checkpoints' / 'latest'} names {name:.40}){gone}"
    foreign = [n for n in there if n not in BEFORE_FIRST_CHECKPOINT and not stale(n)]
    foreign += [f"checkpoints/{n}" for n in inside if not (stale(n) or n.startswith((".tmp-step-", ".trash-step-")))]
    if (run / "checkpoints").exists() and not (run / "checkpoints").is_dir():
        foreign.append("checkpoints")
    if foreign:
        return f"holds what no run of tokrl's writes ({listing(foreign)}); allowed: a new or empty directory"
    saved = json.loads((run / "config.json").read_text())
    first = min(saved["save_every"], saved["steps"])  # the step of its first checkpoint
    for log in ("metrics.jsonl", "eval.jsonl", "resumes.jsonl"):
        try:
            steps = [r.get("step") for r in checkpoints.read_jsonl(run / log, warn=False)]
        except ValueError as e:
            return f"{e}; allowed: a new or empty directory"
        last = max((s for s in steps if isinstance(s, int)), default=0)
        if log == "resumes.jsonl" and steps or last > first:  # a resume starts from a checkpoint
            reach = f"resumes from step {last}" if log == "resumes.jsonl" else f"reaches step {last}"
            return f"holds the logs of a run whose checkpoints are gone ({run / log} {reach}, past its first " \
                   f"checkpoint, step {first}){gone}"
    return None


def hold(directory: Path, option: str) -> checkpoints.RunHold | None:
    """One writer per directory (checkpoints.hold_run_dir), taken before anything there is written. Under torchrun
    rank 0 holds it for the whole job (the only process that writes); the others hold nothing."""
    if distributed.env_rank() != 0:
        return None
    try:
        return checkpoints.hold_run_dir(directory)
    except checkpoints.RunHeld as e:
        usage_error(f"{option} {directory}: {e}")


def start_run_dir(run: Path, cfg: Settings) -> Settings:
    """Create the run directory and write its settings, once (a resume never rewrites them), marked as tokrl's own
    (checks.RUN_MARKER). A directory where a run stopped before its first checkpoint (run_dir_problem allowed it)
    starts again: its logs and leftovers are deleted."""
    if (run / "config.json").is_file():
        print(f"warning: {run} holds a run that stopped before its first checkpoint; starting it again from step 0 "
              "there", file=sys.stderr)
        checkpoints.remove_stale(run)
        for name in LOGS:
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(run))
    settings = {RUN_MARKER[0]: RUN_MARKER[1], **dataclasses.asdict(cfg)}
    write_atomic(run / "config.json", (json.dumps(settings, indent=2) + "\n").encode())
    return cfg


def checked_settings(args: argparse.Namespace) -> tuple[Settings, Path | None]:
    """The settings and the run directory (None with --eval-only), checked before anything is loaded or written."""
    if args.resume:
        return resume_settings(args)
    cfg = resolve(args)
    validate(cfg, training=not args.eval_only)
    if cfg.out and Path(cfg.out).is_symlink() and not Path(cfg.out).exists():
        usage_error(f"--out {cfg.out}: a symbolic link to {os.readlink(cfg.out)}, which does not exist; allowed: a "
                    "new or empty directory, or a link to one")
    above = next((p for p in Path(cfg.out or ".").parents if p.exists()), None)
    if above is not None and not above.is_dir():
        usage_error(f"--out {cfg.out}: {above} is a file, not a directory; allowed: a new or empty directory")
    if args.adapter and not args.eval_only:
        usage_error(f"--adapter {args.adapter}: only with --eval-only (training starts a new adapter)")
    if args.adapter and not all((Path(args.adapter) / f).is_file() for f in ADAPTER_FILES):
        usage_error(f"--adapter {args.adapter}: not an adapter directory; allowed: a directory with "
                    f"{' and '.join(ADAPTER_FILES)} (PEFT format, e.g. RUN_DIR/adapter)")
    return cfg, None if args.eval_only else new_run_dir(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world, held, working, status, run, restart, started = World(), None, False, 0, None, False, False
    sigterm = signal.signal(signal.SIGTERM, interrupt)  # before the run's steps, SIGTERM stops at once, as Ctrl-C
    try:
        cfg, run = checked_settings(args)
        task = check_inputs(cfg, not args.eval_only, args.adapter)  # seconds; loading the weights takes minutes
        option = "--resume" if args.resume else "--out" if cfg.out else "the run directory"
        default = run is not None and option == "the run directory"  # rank 0 creates it, the others take its name
        if default and distributed.env_rank() == 0:
            run = make_run_dir(run)  # made unique, created empty: nothing there to refuse
        if run is not None or cfg.out:  # before anything in the directory is written (or pruned)
            held = hold(run or Path(cfg.out), option)
        # a resume of a run with no checkpoint yet starts it again from step 0 (start_run_dir), as the same command
        restart = bool(args.resume) and not any((run / "checkpoints").glob("step-*"))
        ck = check_resume(run, cfg) if args.resume and not restart else None
        if run is not None and ck is None and not default:
            refuse_a_run_there(run, option)
        world = distributed.from_env(cfg.device)  # under torchrun: this process's place among N; else World()
        on_device = dataclasses.replace(cfg, device=world.device) if world.size > 1 else cfg  # cuda:LOCAL_RANK
        working = True  # from here on the directory may be written: the hold's record names this process
        if args.eval_only:
            eval_only(on_device, args.adapter, Path(cfg.out) if cfg.out else None, world)
            distributed.shutdown(world, synchronize=True)
            return 0
        if ck is None:
            run = Path(world.gather([str(run)])[0])  # rank 0's name (a default name holds the time)
            cfg = start_run_dir(run, cfg) if world.main else dataclasses.replace(cfg, out=str(run))
        elif world.main:
            for p in checkpoints.remove_stale(run):
                print(f"removed {p}, left by an interrupted write", file=sys.stderr)
            append_jsonl(run / "resumes.jsonl", {"step": ck[1]["step"], "steps": cfg.steps, "device": cfg.device,
                                                 "time": datetime.datetime.now().isoformat(timespec="seconds")})
        started = True
        if world.main:
            print("settings: " + json.dumps(dataclasses.asdict(cfg)))
        stop = StopRequest((signal.SIGINT, signal.SIGTERM))
        train(dataclasses.replace(on_device, out=cfg.out), run, resume=ck is not None, task=task, checkpoint=ck,
              world=world, stop=stop)
        distributed.shutdown(world, synchronize=True)  # every process got here: end together
        status = stop.status or 0  # 143: a SIGTERM stopped the run before its end (checkpointed)
    except (DataError, pretrained.ModelNotFoundError, M.CacheTooLarge, FileNotFoundError, ValueError, WriteError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # a write outside checkpoints.py's writers (mkdir): name the path
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}") from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM before the run's steps (train handles those from there on)
        if distributed.env_rank() == 0:
            print(f"\n{interrupted(args, run, restart, started, working)}", file=sys.stderr)
        raise SystemExit(getattr(e, "status", 130)) from None
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        distributed.shutdown(world)
        if held is not None:
            held.release(restore=not working)
    return status


def interrupted(args: argparse.Namespace, run: Path | None, restart: bool, started: bool, working: bool) -> str:
    """The line a signal before the run's steps ends the process with: what it leaves, and what to do next."""
    if not working or run is None:
        return "interrupted before anything was written"
    resume = distributed.resume_command(run)
    if args.resume and not restart:
        return f"interrupted before training resumed; its checkpoints are untouched: continue with: {resume}"
    if not started:
        return "interrupted before training started; nothing of this run was written"
    return (f"interrupted before training started: {run} holds its settings alone; start it again from step 0 with: "
            f"{resume}")


if __name__ == "__main__":
    status = main()  # an error raises SystemExit, with its own status, through the normal exit
    if distributed.env_world_size() > 1:  # under torchrun: a finished run's status is not left to the teardown
        distributed.exit_finished(status)
    sys.exit(status)
