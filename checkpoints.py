"""A run's files on disk, each written so that a crash (even kill -9) or a full disk never leaves a half-written one
where a reader would take it for whole.

    RUN/config.json                 the settings, written once when the run starts; a resume never rewrites it
    RUN/resumes.jsonl               one line per resume: the step it resumed from and the --steps it runs to
    RUN/metrics.jsonl, eval.jsonl   one line per step / evaluation, appended; a torn last line is dropped on reading
    RUN/curves.svg                  rewritten whole: temporary file, then rename
    RUN/checkpoints/step-NNNNNN/    adapter/ (--train full: model/) + state.pt, built as .tmp-step-NNNNNN and
                                    renamed when complete
    RUN/checkpoints/latest          the newest checkpoint's name (temporary file, then rename)
    RUN/adapter/                    the final adapter, PEFT format (--train full: RUN/model/, a Hugging Face model)
    RUN/.lock                       the hold of the process writing RUN: its pid, host and start time

One process writes a run directory at a time (`hold_run_dir`): a second one is refused before it touches anything.

A resume takes the newest checkpoint that reads back whole (`find_checkpoint`), drops log lines written after it,
and removes the leftovers of an interrupted write (`remove_stale`). Every write error becomes a `WriteError` that
names the path. No non-finite adapter or optimizer state is ever written (`NonFiniteState`).

Fault injection, for tests only: with TOKRL_FAULT=POINT:N in the environment the process kills itself with SIGKILL
the N-th time it reaches POINT (`fault`); the points are listed in FAULT_POINTS. Unset, `fault` does nothing.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import io
import json
import math
import os
import random
import reprlib
import shutil
import signal
import socket
import sys
from pathlib import Path

import torch

import lora
from values import first_line, is_integer

KEEP = 2  # checkpoints kept on disk (the newest two: one stays whole while the next is written)
# fsync each file before its rename, so that a power loss (not only a crash) cannot leave an empty file under the real
# name. An fsync costs milliseconds a file: the fault tests, which write hundreds of checkpoints and where the fault is
# a killed process (the page cache survives it), turn it off.
DURABLE = True

FAULT_POINTS = (
    "checkpoint.start",  # nothing of this checkpoint written yet
    "checkpoint.adapter.partial", "checkpoint.adapter.written",  # adapter (or --train full: model) weights half
    # written / written, not renamed
    "checkpoint.state.partial", "checkpoint.state.written",  # state.pt half written / written, not renamed
    "checkpoint.rename",  # the .tmp-step directory complete, not yet renamed
    "checkpoint.renamed",  # renamed; `latest` still names the previous checkpoint
    "latest.partial", "latest.written",  # the new `latest` half written / written, not renamed
    "prune.renamed", "prune.partial",  # an old checkpoint moved aside / half deleted
    "metrics.partial", "metrics.appended",  # half a line / a whole line appended to metrics.jsonl
    "eval.partial", "eval.appended",  # the same for eval.jsonl
    "curves.partial", "curves.written",  # curves.svg half written / written, not renamed
)
_hits: dict[str, int] = {}


def fault(point: str) -> None:
    """Test-only hook: SIGKILL this process the N-th time it reaches `point` when TOKRL_FAULT=point:N."""
    spec = os.environ.get("TOKRL_FAULT")
    if not spec or spec.partition(":")[0] != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, permissions); the message names it."""

    def __init__(self, path: Path, err: OSError | str):
        super().__init__(f"cannot write {path}: {err if isinstance(err, str) else err.strerror or err}")
        self.path, self.reason = path, err if isinstance(err, str) else str(err.strerror or err)


class NonFiniteState(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# One writer per run directory

HOLD_FILE = ".lock"


class RunHeld(RuntimeError):
    """The run directory cannot be held: another process holds it (the message names it: pid, host, start time), or
    its hold file is a symbolic link, which is never followed."""


class RunHold:
    """This process's hold on a run directory: an exclusive flock on RUN/.lock, kept while the file stays open.
    The kernel drops it whenever the process ends (exit, crash, kill -9, power loss), so a dead run never leaves a
    hold to clear by hand; the file itself stays, naming the last holder, and the next holder rewrites it."""

    def __init__(self, run: Path, fd: int, previous: bytes):
        self.run, self.fd, self.previous = run, fd, previous

    def release(self, restore: bool = False) -> None:
        """Drop the hold. `restore`: put the previous holder's record back first (a start refused after taking the
        hold, before writing anything, leaves the directory byte-identical)."""
        if self.fd is None:
            return
        if restore and self.previous:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, self.previous, 0)
        os.close(self.fd)  # closing the file drops the lock (the file is kept: deleting it would race a taker)
        self.fd = None


def hold_run_dir(run: Path) -> RunHold:
    """Hold `run` (created if absent) for this process, or raise RunHeld naming the process that holds it. A refused
    caller changes nothing: the file it opens already exists, and it only reads it."""
    path = run / HOLD_FILE
    try:
        run.mkdir(parents=True, exist_ok=True)
        # not O_TRUNC: the holder's record must stay readable; O_NOFOLLOW: a link there would have the hold write its
        # record over the link's target, a file that is not the run's
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunHeld(f"{path} is a symbolic link (to {os.readlink(path)}); a run directory's hold is a plain "
                          "file, never followed through a link: remove the link") from None
        raise WriteError(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise RunHeld(f"in use by another process ({describe_holder(holder)}; its hold: {path}); a run directory "
                      "has one writer at a time: wait for that process to end, or stop it") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        previous = os.pread(fd, 4096, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise WriteError(path, e) from None
    return RunHold(run, fd, previous)


def describe_holder(record: str) -> str:
    try:
        h = json.loads(record)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, TypeError, KeyError):  # taken a moment ago, its record not yet written
        return "it has not yet written its pid, host and start time"


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def write_halves(f, data: bytes, point: str = "") -> None:
    """data to the open file `f` in two halves, then flushed (and fsynced, if DURABLE). With a fault `point`, the
    first half reaches the file before point.partial: a process killed there leaves exactly half of it written."""
    f.write(data[: len(data) // 2])
    if point:
        f.flush()
        fault(point + ".partial")
    f.write(data[len(data) // 2:])
    f.flush()
    if DURABLE:
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes, point: str = "") -> None:
    """data to a temporary file beside `path`, flushed to disk, then renamed over it: whole or not at all."""
    tmp = path.parent / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            write_halves(f, data, point)
        if point:
            fault(point + ".written")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, e) from None


def append_jsonl(path: Path, row: dict, point: str = "") -> None:
    """One JSON line appended; on a write error the file is cut back to its old length (no half line stays)."""
    line = (json.dumps(row) + "\n").encode()
    try:
        with open(path, "ab") as f:
            size = f.tell()
            try:
                write_halves(f, line, point)
            except OSError:
                f.truncate(size)
                raise
        if point:
            fault(point + ".appended")
    except OSError as e:
        raise WriteError(path, e) from None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def write_adapter(net, out: str | os.PathLike, base_model: str = "", point: str = "") -> None:
    """The adapter in PEFT's format (lora.adapter_state, lora.adapter_config: what peft.PeftModel.from_pretrained and
    vLLM's LoRA loader read), every file written atomically through write_atomic."""
    from safetensors.torch import save

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(out, e) from None
    weights = save(lora.adapter_state(net), metadata={"format": "pt"})
    write_atomic(out / "adapter_model.safetensors", weights, point)
    config = json.dumps(lora.adapter_config(net, base_model), indent=2) + "\n"
    write_atomic(out / "adapter_config.json", config.encode())


def write_weights(net, out: str | os.PathLike, point: str = "") -> None:
    """Every weight of the model (--train full) as out/model.safetensors in the Hugging Face layout (a tied head
    stored once, as the embedding), written atomically through write_atomic."""
    from safetensors.torch import save

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(out, e) from None
    state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    if net.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    write_atomic(out / "model.safetensors", save(state, metadata={"format": "pt"}), point)


# ----------------------------------------------------------------------------------------------------------------------
# Reading: JSON lines that may end in a torn line


def read_jsonl(path: Path, max_step: int | None = None, warn: bool = True) -> list[dict]:
    """The rows of a JSON-lines log (those with step <= max_step). A last line cut short by a crash is dropped (with
    a warning, if `warn`); a bad line elsewhere cannot come from a crash, and is a ValueError naming it."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: the append was cut short
                if warn:
                    print(f"warning: {path}: dropped a torn last line (a crash during its append): {line[:60]!r}",
                          file=sys.stderr)
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON object ({line[:60]!r}); fix or remove that line")
        rows.append(row)
    return [r for r in rows if max_step is None or r.get("step", 0) <= max_step]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def non_finite(net, opt) -> str | None:
    """The first adapter weight or optimizer-state tensor holding NaN or ±inf, by name; None if all are finite.
    One device sync when all are finite (this runs after every optimizer step)."""
    named = [(f"{name}.{ab}", getattr(m, ab)) for name, m in lora.lora_modules(net) for ab in ("lora_A", "lora_B")]
    if not named:  # --train full: every weight is trained
        named = list(net.named_parameters())
    named += [(f"optimizer state {i} {k}", v) for i, st in enumerate(opt.state.values()) for k, v in st.items()
              if torch.is_tensor(v) and v.is_floating_point()]
    flags: dict[torch.device, list[torch.Tensor]] = {}  # AdamW keeps `step` on the CPU, the moments with the weights
    for _, t in named:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    if all(bool(torch.stack(f).all()) for f in flags.values()):
        return None
    return next(name for name, t in named if not torch.isfinite(t).all())


def save_checkpoint(run: Path, step: int, net, opt, state: dict, base_model: str, keep: int | None = None) -> Path:
    """checkpoints/step-NNNNNN with the adapter and state.pt ({"step", "optimizer", **state}); then `latest`; then
    prune to the newest `keep`. Refuses non-finite state. Returns the checkpoint's directory."""
    bad = non_finite(net, opt)
    if bad:
        raise NonFiniteState(f"{bad} is not finite: checkpoint of step {step} not written")
    root = run / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    fault("checkpoint.start")
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if lora.lora_modules(net):
            write_adapter(net, tmp / "adapter", base_model, "checkpoint.adapter")
        else:  # --train full: every weight, at the same write points
            write_weights(net, tmp / "model", "checkpoint.adapter")
        buf = io.BytesIO()
        torch.save({"step": step, "optimizer": opt.state_dict(), **state}, buf)
        write_atomic(tmp / "state.pt", buf.getvalue(), "checkpoint.state")
        fault("checkpoint.rename")
        if final.exists():  # a resume from an older checkpoint writes this step again
            _discard(final)
        os.replace(tmp, final)  # the directory appears complete, or not at all
    except (OSError, WriteError) as e:  # name the checkpoint, not the temporary file inside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(final, e.reason if isinstance(e, WriteError) else e) from None
    fault("checkpoint.renamed")
    write_atomic(root / "latest", (final.name + "\n").encode(), "latest")
    for old in sorted(root.glob("step-*"))[: -(keep or KEEP)]:
        _discard(old, "prune")
    return final


def _discard(path: Path, point: str = "") -> None:
    """Move a checkpoint aside (one rename), then delete it; a crash in between leaves only a .trash- directory."""
    trash = path.parent / f".trash-{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    if point:
        fault(point + ".renamed")
        (trash / "state.pt").unlink(missing_ok=True)
        fault(point + ".partial")
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(run: Path) -> list[Path]:
    """Remove what an interrupted write left behind (temporary files, half-built or half-deleted checkpoints)."""
    found = [p for d in (run, run / "checkpoints", run / "adapter") if d.is_dir()
             for p in d.iterdir() if p.name.startswith(".") and (p.name.endswith(".tmp") or
                                                               p.name.startswith((".tmp-step-", ".trash-step-")))]
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return found


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(ck: Path, accum: int | None = None) -> tuple[dict, dict]:
    """(state.pt's contents, the adapter's tensors), or a ValueError naming the file and what is wrong with it:
    state.pt must hold this checkpoint's step, a data position of at most step × `accum` examples, the generators'
    states and an AdamW state whose numbers are finite; the adapter must read back whole and finite."""
    path = ck / "state.pt"
    try:
        # onto the CPU whatever device wrote it (a resume may run elsewhere); AdamW's load moves it to the weights'
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds (pickle, zip, EOF, ...): any of them means "not whole"
        raise ValueError(f"{path}: not a checkpoint torch can read ({type(e).__name__}: "
                         f"{first_line(e)[:120]})") from None
    if (problem := state_problem(state, int(ck.name[len("step-"):]), accum)) is not None:
        raise ValueError(f"{path}: {problem}")
    if (ck / "model").is_dir():  # --train full: the model's weights
        return state, lora.read_adapter_tensors(ck / "model" / "model.safetensors")
    tensors = lora.read_adapter_tensors(ck / "adapter" / "adapter_model.safetensors")
    lora.read_adapter_config(ck / "adapter" / "adapter_config.json")
    return state, tensors


def state_problem(state, step: int, accum: int | None) -> str | None:
    """What is wrong with state.pt's contents (None: nothing), read before a resume uses any of it."""
    if not isinstance(state, dict) or not {"step", "optimizer", "rng", "data_position"} <= set(state):
        return "lacks step, optimizer, rng or data_position"
    if not is_integer(state["step"]) or state["step"] != step:
        return f"step is {reprlib.repr(state['step'])}, not this checkpoint's {step}"
    most = step * accum if accum else 2**62
    if not is_integer(state["data_position"]) or not 0 <= state["data_position"] <= most:
        return (f"data_position is {reprlib.repr(state['data_position'])}; allowed: the examples drawn by step {step}, "
                f"an integer from 0 to {most}")
    ranks = state.get("rng_ranks", [])
    if not isinstance(ranks, list):
        return "rng_ranks is not a list of the processes' generator states"
    for rng in [state["rng"], *ranks]:
        if not (isinstance(rng, dict) and all(torch.is_tensor(rng.get(k)) and rng[k].dtype == torch.uint8
                                              for k in ("sample", "select"))):
            return "rng does not hold the sampling and selection generators' states"
        try:
            random.Random().setstate(rng.get("replay"))
        except (TypeError, ValueError):
            return "rng does not hold the replay generator's state"
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])):
        return "optimizer is not AdamW's state (state and param_groups)"
    numbers = [v for g in opt["param_groups"] for v in g.values() if isinstance(v, (int, float))]
    if not all(math.isfinite(v) for v in numbers):  # lr, eps, weight_decay
        return "optimizer's param_groups hold a number that is not finite"
    for i, entry in opt["state"].items():
        tensors = entry.values() if isinstance(entry, dict) else [None]
        if not all(torch.is_tensor(t) and (not t.is_floating_point() or torch.isfinite(t).all()) for t in tensors):
            return f"optimizer state {i} holds a value that is not a finite tensor"
    return None


def find_checkpoint(run: Path, accum: int | None = None) -> tuple[Path, dict]:
    """The newest checkpoint that reads back whole (read_checkpoint: `accum` is the run's --accum), and its state.
    Skipped ones are named in a warning, and so is a `latest` that names a missing or broken one; none intact is a
    CheckpointError naming what was tried."""
    root = run / "checkpoints"
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    tried = []
    for ck in sorted(root.glob("step-*"), reverse=True):
        try:
            state, _ = read_checkpoint(ck, accum)
        except (ValueError, OSError) as e:
            tried.append(str(e))
            continue
        if tried or (latest and latest != ck.name):
            skipped = "; ".join(tried) or "none"
            print(f"warning: {root / 'latest'} names {latest or 'nothing'}; unreadable checkpoints skipped: {skipped}."
                  f" Resuming from the newest intact one, {ck}", file=sys.stderr)
        return ck, state
    none = f"{root} holds no checkpoint (the run stopped before its first one)"
    raise CheckpointError(f"{run} has no intact checkpoint to resume from: " + ("; ".join(tried) or none))
