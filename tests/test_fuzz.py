"""Every kind of file a run reads, damaged in every way a file gets damaged, handed to train.main in this process.

Kinds: a SVAMP json, a GSM8K jsonl, an adapter's safetensors and adapter_config.json, a run's config.json and
state.pt (for --resume), a model's config.json, model.safetensors and tokenizer.json. Damages: truncated at three
points, random bytes, empty, another encoding, a wrong type or a NaN or inf in a numeric field or tensor, a missing
field, an extra unknown field, a record of astronomic size. The damage is seeded (one random.Random per case, from the case's name).

Every case must end in one of two ways:
  - the run proceeds (the damage was harmless): exit status 0;
  - one `error:` line on stderr that names the damaged file, exit status 2 (a bad file handed in), and nothing
    written: a new run's directory not created, a resumed run's directory byte-identical (hashed before and after).
Never a traceback, an exception out of main, or a case that runs past its time limit."""
from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import signal
import zlib
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint
import checkpoints
import lora
import pretrained
import train
from test_train import write_gsm8k, write_svamp

pytestmark = pytest.mark.usefixtures("no_fsync")

RUN = ["--device", "cpu", "--algo", "grpo", "-G", "2", "--max-new-tokens", "2", "--eval-limit", "1", "--steps", "1",
       "--save-every", "1", "--lora-fraction", "0.5"]
LIMIT_S = 60  # a case still running after this is a failure (a hang on an astronomic record)
HUGE = 2_000_000  # characters in an astronomic text field


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def originals(tiny, tmp_path_factory) -> dict[str, Path]:
    """The whole files the cases damage copies of: data, an adapter, a finished one-step run (for --resume)."""
    root = tmp_path_factory.mktemp("originals")
    net = pretrained.load_model(tiny)
    lora.apply_lora(net, 8, 0.5, generator=torch.Generator().manual_seed(0))
    checkpoints.write_adapter(net, root / "adapter")
    run = root / "run"
    assert train.main(["--model", str(tiny), "--out", str(run), *RUN]) == 0
    svamp, gsm8k = write_svamp(root / "svamp"), write_gsm8k(root / "gsm8k")
    # one training record: the run's one step draws it, so a damage that passes the checks is one the run survives
    (svamp / "train.json").write_text(json.dumps(json.loads((svamp / "train.json").read_text())[:1]))
    (gsm8k / "train.jsonl").write_text((gsm8k / "train.jsonl").read_text().splitlines()[0] + "\n")
    return {"svamp": svamp, "gsm8k": gsm8k, "adapter": root / "adapter", "run": run, "model": tiny}


# --- where each kind of file lives, and the command that reads it -------------------------------------------------

class Case:
    """A copy of the originals in `tmp`, the file to damage in it, and the command that reads it."""

    def __init__(self, kind: str, originals: dict[str, Path], tmp: Path):
        self.kind, self.out = kind, tmp / "out"
        if kind in ("svamp", "gsm8k"):
            data = Path(shutil.copytree(originals[kind], tmp / kind))
            self.file = data / ("train.json" if kind == "svamp" else "train.jsonl")
            self.argv = ["--model", str(originals["model"]), "--task", kind, "--data", str(data),
                         "--out", str(self.out), *RUN]
        elif kind in ("adapter-weights", "adapter-config"):
            adapter = Path(shutil.copytree(originals["adapter"], tmp / "adapter"))
            self.file = adapter / ("adapter_model.safetensors" if kind == "adapter-weights" else "adapter_config.json")
            self.argv = ["--model", str(originals["model"]), "--eval-only", "--adapter", str(adapter), "--device",
                         "cpu", "--eval-limit", "1", "--max-new-tokens", "2"]
        elif kind in ("run-config", "state"):
            self.out = Path(shutil.copytree(originals["run"], tmp / "run"))
            self.file = self.out / ("config.json" if kind == "run-config" else "checkpoints/step-000001/state.pt")
            self.argv = ["--resume", str(self.out)]
        else:  # model-config, model-weights, tokenizer
            model = Path(shutil.copytree(originals["model"], tmp / "model"))
            self.file = model / {"model-config": "config.json", "model-weights": "model.safetensors",
                                 "tokenizer": "tokenizer.json"}[kind]
            self.argv = ["--model", str(model), "--out", str(self.out), *RUN]


def digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


# --- the damages ----------------------------------------------------------------------------------------------------

def edit_json(f: Path, change) -> None:
    obj = json.loads(f.read_text())
    change(obj)
    f.write_text(json.dumps(obj))


def edit_jsonl(f: Path, change, rng: random.Random) -> None:
    lines = f.read_text().splitlines()
    i = rng.randrange(len(lines))
    rec = json.loads(lines[i])
    change(rec)
    lines[i] = json.dumps(rec)
    f.write_text("\n".join(lines) + "\n")


def edit_tensors(f: Path, change) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(f))
    metadata = change(tensors)  # a dict: the header's new __metadata__
    save_file(tensors, str(f), metadata=metadata if isinstance(metadata, dict) else {"format": "pt"})


def edit_state(f: Path, change) -> None:
    state = torch.load(f, weights_only=True)
    change(state)
    torch.save(state, f)


def write_header(f: Path, change) -> None:
    """Rewrite a safetensors file's JSON header (change(header) returns the new header's bytes)."""
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = change(json.loads(data[8: 8 + n]))
    f.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])


def first_moment(state: dict) -> torch.Tensor:
    return next(iter(state["optimizer"]["state"].values()))["exp_avg"]


def pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


# (kind, damage) -> damage(file, rng). The byte-level damages apply to every kind.
BYTES = {
    "truncated at 1 byte": lambda f, rng: f.write_bytes(f.read_bytes()[:1]),
    "truncated at a random point": lambda f, rng: f.write_bytes(f.read_bytes()[: rng.randrange(2, f.stat().st_size
                                                                                                   - 1)]),
    "truncated by 1 byte": lambda f, rng: f.write_bytes(f.read_bytes()[:-1]),
    "random bytes": lambda f, rng: f.write_bytes(rng.randbytes(f.stat().st_size)),
    "empty": lambda f, rng: f.write_bytes(b""),
}
UTF16 = lambda f, rng: f.write_bytes(f.read_text().encode("utf-16"))


def latin1_svamp(f: Path, rng: random.Random) -> None:
    records = json.loads(f.read_text())
    pick(rng, records)["Body"] = "Zoé has 3 apples."
    f.write_bytes(json.dumps(records, ensure_ascii=False).encode("latin-1"))


def latin1_gsm8k(f: Path, rng: random.Random) -> None:
    edit_jsonl(f, lambda r: r.update(question="Zoé has 3 apples. How many?"), rng)
    f.write_bytes(f.read_text().replace("\\u00e9", "é").encode("latin-1"))


def svamp(change):
    return lambda f, rng: edit_json(f, lambda records: change(pick(rng, records)))


def huge_number_svamp(f: Path, rng: random.Random) -> None:
    records = json.loads(f.read_text())
    pick(rng, records)["Answer"] = 123456789.0
    f.write_text(json.dumps(records).replace("123456789.0", "9" * 10_000))  # past Python's 4,300-digit limit


def gsm8k(change):
    return lambda f, rng: edit_jsonl(f, change, rng)


def config(change):
    return lambda f, rng: edit_json(f, change)


def tensors(change):
    return lambda f, rng: edit_tensors(f, change)


def state(change):
    return lambda f, rng: edit_state(f, change)


def first_tensor(ts: dict) -> torch.Tensor:
    return ts[sorted(ts)[0]]


def tokenizer_id(value):
    """An added token's id replaced by `value` (a wrong type, NaN, or an astronomic id)."""
    def change(tok):
        tok["added_tokens"][0]["id"] = value
    return config(change)


DAMAGES = {
    "svamp": {
        "latin-1": latin1_svamp, "utf-16": UTF16,
        "Answer a string": svamp(lambda r: r.update(Answer=str(r["Answer"]))),
        "Body a number": svamp(lambda r: r.update(Body=3)),
        "Answer NaN": svamp(lambda r: r.update(Answer=float("nan"))),
        "Answer inf": svamp(lambda r: r.update(Answer=float("-inf"))),
        "no Question": svamp(lambda r: r.pop("Question")),
        "extra field": svamp(lambda r: r.update(Colour="red")),
        "astronomic Body": svamp(lambda r: r.update(Body="x" * HUGE)),
        "astronomic Answer": huge_number_svamp,
    },
    "gsm8k": {
        "latin-1": latin1_gsm8k, "utf-16": UTF16,
        "answer a number": gsm8k(lambda r: r.update(answer=12)),
        "question a list": gsm8k(lambda r: r.update(question=["What?"])),
        "answer NaN": gsm8k(lambda r: r.update(answer="so #### nan")),
        "answer inf": gsm8k(lambda r: r.update(answer="so #### inf")),
        "no answer": gsm8k(lambda r: r.pop("answer")),
        "extra field": gsm8k(lambda r: r.update(colour="red")),
        "astronomic question": gsm8k(lambda r: r.update(question="x" * HUGE)),
        "astronomic answer": gsm8k(lambda r: r.update(answer="so #### " + "9" * 50_000)),
    },
    "adapter-weights": {
        "header in utf-16": lambda f, rng: write_header(f, lambda h: json.dumps(h).encode("utf-16")),
        "an integer tensor": tensors(lambda ts: ts.update({sorted(ts)[0]: first_tensor(ts).to(torch.int32)})),
        "a NaN": tensors(lambda ts: first_tensor(ts).view(-1)[0].fill_(float("nan"))),
        "an inf": tensors(lambda ts: first_tensor(ts).view(-1)[-1].fill_(float("inf"))),
        "a tensor missing": tensors(lambda ts: ts.pop(sorted(ts)[-1])),
        "an extra tensor": tensors(lambda ts: ts.update({"base_model.model.extra.weight": torch.zeros(2)})),
        "extra metadata": tensors(lambda ts: {"format": "pt", "colour": "red"}),
        "astronomic shape": lambda f, rng: write_header(
            f, lambda h: json.dumps({**h, sorted(k for k in h if k != "__metadata__")[0]: {
                **h[sorted(k for k in h if k != "__metadata__")[0]], "shape": [2**31, 2**31]}}).encode()),
        "astronomic header length": lambda f, rng: f.write_bytes((2**62).to_bytes(8, "little") + f.read_bytes()[8:]),
    },
    "adapter-config": {
        "utf-16": UTF16,
        "r a string": config(lambda c: c.update(r="8")),
        "r a fraction": config(lambda c: c.update(r=8.5)),
        "lora_alpha NaN": config(lambda c: c.update(lora_alpha=float("nan"))),
        "lora_alpha inf": config(lambda c: c.update(lora_alpha=float("inf"))),
        "no r": config(lambda c: c.pop("r")),
        "no target_modules": config(lambda c: c.pop("target_modules")),
        "extra field": config(lambda c: c.update(colour="red")),
        "astronomic r": config(lambda c: c.update(r=10**12)),
        "astronomic layer": config(lambda c: c.update(layers_to_transform=[10**30])),
    },
    "run-config": {
        "utf-16": UTF16,
        "lr a string": config(lambda c: c.update(lr="0.0001")),
        "lora_rank a fraction": config(lambda c: c.update(lora_rank=8.5)),
        "steps a boolean": config(lambda c: c.update(steps=True)),
        "lr NaN": config(lambda c: c.update(lr=float("nan"))),
        "temperature inf": config(lambda c: c.update(temperature=float("inf"))),
        "no lr": config(lambda c: c.pop("lr")),
        "no model": config(lambda c: c.pop("model")),
        "extra field": config(lambda c: c.update(colour="red")),
        "astronomic steps": config(lambda c: c.update(steps=10**40)),
        "astronomic model path": config(lambda c: c.update(model="x" * HUGE)),
    },
    "state": {
        "legacy torch format": lambda f, rng: torch.save(torch.load(f, weights_only=True), f,
                                                         _use_new_zipfile_serialization=False),
        "step a string": state(lambda s: s.update(step="1")),
        "data_position a fraction": state(lambda s: s.update(data_position=0.5)),
        "rng a string": state(lambda s: s.update(rng="x")),
        "data_position NaN": state(lambda s: s.update(data_position=float("nan"))),
        "a NaN AdamW moment": state(lambda s: first_moment(s).view(-1)[0].fill_(float("nan"))),
        "step inf": state(lambda s: s.update(step=float("inf"))),
        "no rng": state(lambda s: s.pop("rng")),
        "no optimizer": state(lambda s: s.pop("optimizer")),
        "extra field": state(lambda s: s.update(colour="red")),
        "astronomic data_position": state(lambda s: s.update(data_position=10**18)),
        "astronomic step": state(lambda s: s.update(step=10**18)),
        "astronomic moment": state(lambda s: first_moment(s).__setitem__(..., 1e38)),
    },
    "model-config": {
        "utf-16": UTF16,
        "hidden_size a string": config(lambda c: c.update(hidden_size="64")),
        "num_hidden_layers a fraction": config(lambda c: c.update(num_hidden_layers=4.5)),
        "tie_word_embeddings a string": config(lambda c: c.update(tie_word_embeddings="yes")),
        "rope_theta NaN": config(lambda c: c.update(rope_theta=float("nan"))),
        "rms_norm_eps inf": config(lambda c: c.update(rms_norm_eps=float("inf"))),
        "no hidden_size": config(lambda c: c.pop("hidden_size")),
        "no rope_theta": config(lambda c: c.pop("rope_theta")),
        "extra field": config(lambda c: c.update(colour="red")),
        "astronomic layers": config(lambda c: c.update(num_hidden_layers=10**9)),
        "astronomic vocabulary": config(lambda c: c.update(vocab_size=10**12)),
        "astronomic positions": config(lambda c: c.update(max_position_embeddings=10**30)),
    },
    "model-weights": {  # every value is read before the load: a NaN is named as the header's faults are
        "header in utf-16": lambda f, rng: write_header(f, lambda h: json.dumps(h).encode("utf-16")),
        "an integer tensor": tensors(lambda ts: ts.update({sorted(ts)[0]: first_tensor(ts).to(torch.int8)})),
        "a NaN": tensors(lambda ts: first_tensor(ts).view(-1)[3].fill_(float("nan"))),
        "an inf": tensors(lambda ts: ts[sorted(ts)[-1]].view(-1)[-1].fill_(float("inf"))),
        "a tensor missing": tensors(lambda ts: ts.pop(sorted(ts)[-1])),
        "an extra tensor": tensors(lambda ts: ts.update({"model.extra.weight": torch.zeros(2)})),
        "astronomic header length": lambda f, rng: f.write_bytes((2**62).to_bytes(8, "little") + f.read_bytes()[8:]),
    },
    "tokenizer": {
        "utf-16": UTF16,
        "an id a string": tokenizer_id("256"),
        "an id NaN": tokenizer_id(float("nan")),
        "an id inf": tokenizer_id(float("inf")),
        "no model": config(lambda t: t.pop("model")),
        "extra field": config(lambda t: t.update(colour="red")),
        "astronomic id": tokenizer_id(10**12),
        "astronomic token": config(lambda t: t["added_tokens"][0].update(content="x" * HUGE)),
    },
}
CASES = [(kind, damage) for kind, own in DAMAGES.items() for damage in [*BYTES, *own]]


class TimeLimit(Exception):
    pass


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """train.main in this process: (exit status, stderr). An exception out of main fails the case."""
    def alarm(*_):
        raise TimeLimit(f"still running after {LIMIT_S} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    capsys.readouterr()
    try:
        code = train.main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # noqa: BLE001 (a traceback a user would see: the case fails)
        import traceback
        pytest.fail(f"an exception out of train.main:\n{''.join(traceback.format_exception(e))[-3000:]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("error: ...") prints its message and exits with status 1
        code, err = 1, err + code + "\n"
    return code, err


@pytest.mark.parametrize("kind,damage", CASES, ids=[f"{k}: {d}" for k, d in CASES])
def test_a_damaged_file_is_harmless_or_one_line_naming_it(originals, tmp_path, capsys, kind, damage):
    case = Case(kind, originals, tmp_path)
    rng = random.Random(zlib.crc32(f"{kind}: {damage}".encode()))
    (BYTES.get(damage) or DAMAGES[kind][damage])(case.file, rng)
    before = digest(case.out) if case.out.exists() else None
    code, err = run_main(case.argv, capsys)
    assert "Traceback" not in err, err
    if code == 0:
        return  # harmless: the run proceeded
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, f"exit {code}, stderr:\n{err[-2000:]}"  # a bad file handed in
    assert str(case.file) in errors[0], f"the error does not name {case.file}: {errors[0][:500]}"
    if before is None:
        assert not case.out.exists(), f"{case.out} was created"
    else:
        assert digest(case.out) == before, f"{case.out} changed"
