"""A run's files on disk: checkpoints/step-NNNNNN/ (adapter + optimizer and RNG state) written under a temporary
name and renamed, `checkpoints/latest` naming the newest, and the JSON-lines logs (metrics.jsonl, eval.jsonl)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import lora


def rng_state(gens: dict) -> dict:
    return {"sample": gens["sample"].get_state(), "select": gens["select"].get_state(),
            "data": gens["data"].getstate(), "replay": gens["replay"].getstate()}


def save_checkpoint(run: Path, step: int, net, opt, gens, base_model: str, keep: int = 2,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """`extra`: more named tensors to restore on resume (PPO's value head and separate critic), in state.pt."""
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_adapter(net, tmp / "adapter", base_model=base_model)
    state = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(gens)}
    if extra:
        state["extra"] = extra
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the directory appears complete, or not at all
    lora.atomic_write(run / "checkpoints" / "latest", lambda p: Path(p).write_text(final.name + "\n"))
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = run / "checkpoints" / latest.read_text().strip()
    return path if (path / "state.pt").is_file() else None



def read_jsonl(path: Path, max_step: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if max_step is None or r["step"] <= max_step]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    lora.atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))
