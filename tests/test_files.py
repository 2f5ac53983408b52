"""The files a user hands in, checked before any weight loads and before anything is written (checks.py): a damaged
adapter, a data record the reward cannot read, a data file that is not UTF-8, an evaluation of nothing, an --out
that leads nowhere. Each is one `error:` line naming the file (and the record), exit status 2; the README's "When
things go wrong" table gives every fault its exit status, and `test_every_row_of_the_table_has_its_exit_status`
holds the code to it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint
import lora
import model as M
import train
from test_train import SMALL, write_gsm8k, write_svamp

pytestmark = pytest.mark.usefixtures("no_fsync")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading weights is an error here: every check must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the weights were loaded before the input was checked")
    monkeypatch.setattr(M, "load_model", refuse)


def refused(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of train.main(args), which must stop with SystemExit."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(args)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("error: ...") prints its message and exits 1
        code, err = 1, err + code + "\n"
    return code, err


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    net = M.load_model(tiny)
    lora.apply_lora(net, 8, 1.0, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_adapter(net, out)
    return out


# --- the faults a new user found ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["random bytes", "100 bytes short"])
def test_a_damaged_adapter_file_is_one_line_exit_2(tmp_path, tiny, adapter, capsys, no_loading, damage):
    """Before: exit 1 and a 22-line traceback ending in safetensors' `SafetensorError`."""
    bad = Path(shutil.copytree(adapter, tmp_path / "bad"))
    weights = bad / "adapter_model.safetensors"
    if damage == "random bytes":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    else:
        os.truncate(weights, weights.stat().st_size - 100)
    code, err = refused(["--model", str(tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    if damage == "random bytes":
        assert err.startswith(f"error: --adapter {bad}: {weights}: not a safetensors file"), err
    else:
        n = (adapter / "adapter_model.safetensors").stat().st_size
        assert err == (f"error: --adapter {bad}: {weights}: {n - 100} bytes, but its header announces {n}: the file is "
                       "truncated (an interrupted download or copy)\n")


def test_a_non_finite_adapter_weight_is_named_before_the_weights_load(tmp_path, tiny, adapter, capsys, no_loading):
    from safetensors.torch import load_file, save_file
    bad = Path(shutil.copytree(adapter, tmp_path / "bad"))
    weights = load_file(str(bad / "adapter_model.safetensors"))
    name = sorted(weights)[1]
    weights[name][0, 0] = float("inf")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    code, err = refused(["--model", str(tiny), "--eval-only", "--adapter", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and err == (f"error: --adapter {bad}: {bad / 'adapter_model.safetensors'}: {name} holds "
                                 "non-finite values (NaN or inf)\n")


@pytest.mark.parametrize("answer,why", [(float("nan"), "Answer nan is not a finite number"),
                                        (float("inf"), "Answer inf is not a finite number"),
                                        ("12", "needs string Body and Question and a numeric Answer")])
def test_a_svamp_answer_the_reward_cannot_read_is_named_before_anything(tmp_path, tiny, capsys, no_loading, answer,
                                                                        why):
    """Before: the data check passed NaN; the run wrote config.json and .lock, loaded the weights and died with
    `error: Invalid literal for Fraction: 'nan'`, naming neither the file nor the record."""
    d = write_svamp(tmp_path / "s")
    records = json.loads((d / "train.json").read_text())
    records[2]["Answer"] = answer
    (d / "train.json").write_text(json.dumps(records))  # json writes NaN and Infinity, and reads them back
    run = tmp_path / "run"
    code, err = refused(["--task", "svamp", "--model", str(tiny), "--data", str(d), "--out", str(run), *SMALL],
                        capsys)
    assert code == 2 and err == f"error: {d / 'train.json'}: record 2 (chal-3): {why}\n"
    assert not run.exists()


def test_a_gsm8k_file_that_is_not_utf8_is_named_with_its_line(tmp_path, tiny, capsys, no_loading):
    """Before: `error: 'utf-8' codec can't decode byte 0xe9 in position ...`, with no file name."""
    d = write_gsm8k(tmp_path / "g")
    lines = (d / "train.jsonl").read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"plus", b"pl\xe9s")  # Latin-1's é
    (d / "train.jsonl").write_bytes(b"\n".join(lines))
    run = tmp_path / "run"
    code, err = refused(["--task", "gsm8k", "--model", str(tiny), "--data", str(d), "--out", str(run), *SMALL],
                        capsys)
    # line 4 is {"question": "What is 3 pl\xe9s 1?", ...}: 26 characters before the byte 0xe9
    assert code == 2 and err == (f"error: {d / 'train.jsonl'}: line 4 is not UTF-8 text (byte 0xe9 at column 27); "
                                 "save the file as UTF-8\n")
    assert not run.exists()


def test_an_evaluation_of_no_example_is_refused(tiny, capsys, no_loading):
    """Before: exit 0 with "accuracy 0.0000 on 0 mult test examples", an accuracy of nothing."""
    code, err = refused(["--model", str(tiny), "--eval-only", "--eval-limit", "0", "--device", "cpu"], capsys)
    assert code == 2 and err == ("error: --eval-limit 0: --eval-only measures an accuracy, and 0 examples have none; "
                                 "allowed: --eval-limit >= 1 with --eval-only\n")


def test_an_out_that_is_a_dangling_symbolic_link_is_named(tmp_path, tiny, capsys, no_loading):
    """Before: `cannot write …/.lock: File exists`, which misleads: nothing is there."""
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone" / "run")
    code, err = refused(["--model", str(tiny), "--out", str(link), *SMALL], capsys)
    assert code == 2 and err == (f"error: --out {link}: a symbolic link to {tmp_path / 'gone' / 'run'}, which does "
                                 "not exist; allowed: a new or empty directory, or a link to one\n")
    assert link.is_symlink() and not (tmp_path / "gone").exists()
