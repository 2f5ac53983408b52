"""resolve_model_dir: what tokrl decides on top of huggingface_hub. A local directory wins; a repo id that the library
cached is found with the network off and loads; only the files tokrl reads are fetched; a model that cannot be had
gives one message saying what to place by hand and where.

Never touches the real network. huggingface_hub reads HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT
once, at import, so each resolution runs in a fresh interpreter with those variables set as a user would set them,
HF_ENDPOINT always pointing at 127.0.0.1: a FakeHub thread that answers the four requests snapshot_download makes, or
a closed port (the network is down). The cache is laid out by the library itself, through a download from the FakeHub.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_checkpoint
import pretrained
import tokenizer

REPO = "owner/tiny"
MAIN = "0123456789abcdef0123456789abcdef01234567"  # the commit the main branch points to
V1 = "89abcdef0123456789abcdef0123456789abcdef"  # the commit of tag v1
SERVER_LIFETIME_S = 120  # a FakeHub stops by itself after this, whatever happens to the test


class FakeHub:
    """The Hub endpoints snapshot_download uses, on 127.0.0.1, for `repos` = {repo_id: {commit: {file: bytes}}}:

    GET  /api/models/{repo}/revision/{rev}     -> {"sha": commit}  (rev: a branch/tag of `refs`, or a commit)
    GET  /api/models/{repo}/tree/{commit}       -> the file list
    HEAD /{repo}/resolve/{commit}/{file}        -> X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{commit}/{file}        -> the bytes
    Unknown repos and revisions get the Hub's 404 with its X-Error-Code. `requests` records (method, path, auth)."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]], refs: dict[tuple[str, str], str]):
        self.repos, self.refs, self.requests = repos, refs, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.timer = threading.Timer(SERVER_LIFETIME_S, self.server.shutdown)
        self.timer.daemon = True
        self.timer.start()

    def answer(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path, h.headers.get("Authorization")))
        path = h.path.split("?")[0]
        for repo, commits in self.repos.items():
            if path.startswith(f"/api/models/{repo}/revision/"):
                rev = path.rsplit("/", 1)[1]
                commit = self.refs.get((repo, rev), rev)
                if commit not in commits:
                    return self.send(h, 404, b"{}", body, {"X-Error-Code": "RevisionNotFound"})
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in commits[commit]]}
                return self.send(h, 200, json.dumps(info).encode(), body)
            if path.startswith(f"/api/models/{repo}/tree/"):
                files = commits.get(path.rsplit("/", 1)[1], {})
                tree = [{"type": "file", "path": f, "size": len(b), "oid": git_oid(b)} for f, b in files.items()]
                return self.send(h, 200, json.dumps(tree).encode(), body)
            if path.startswith(f"/{repo}/resolve/"):
                commit, name = path[len(f"/{repo}/resolve/"):].split("/", 1)
                data = commits.get(commit, {}).get(name)
                if data is None:
                    return self.send(h, 404, b"", body, {"X-Error-Code": "EntryNotFound"})
                return self.send(h, 200, data, body, {"X-Repo-Commit": commit, "ETag": f'"{git_oid(data)}"'})
        self.send(h, 404, b"{}", body, {"X-Error-Code": "RepoNotFound"} if path.startswith("/api/models/") else {})

    @staticmethod
    def send(h, status: int, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def fetched(self) -> set[str]:
        """Names of the files whose bytes were downloaded."""
        return {p.rsplit("/", 1)[1] for m, p, _ in self.requests if m == "GET" and "/resolve/" in p}

    def close(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def closed_port_url() -> str:
    with socket.socket() as s:  # bind then close: nothing listens there, so a connection is refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


RESOLVE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import pretrained
import tokenizer
for arg in sys.argv[2:]:
    name, _, revision = arg.partition("@")
    try:
        print(json.dumps({"dir": str(pretrained.resolve_model_dir(name, revision=revision or None))}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def hub_env(**env: str) -> dict[str, str]:
    """This process's environment without any HF_* variable, plus `env`; HF_ENDPOINT is always on 127.0.0.1."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.setdefault("HF_ENDPOINT", closed_port_url())
    assert env["HF_ENDPOINT"].startswith("http://127.0.0.1:")
    return {**base, "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", **env}


def resolve(*names: str, cwd: Path | None = None, **env: str) -> list[dict]:
    """resolve_model_dir(name[@revision]) for each name, in one fresh interpreter with `env` set."""
    r = subprocess.run([sys.executable, "-c", RESOLVE, str(ROOT), *names], env=hub_env(**env), cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def repo_files(src: Path) -> dict[str, bytes]:
    """A checkpoint directory's files, plus files a real repo has that tokrl must not download."""
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    return {**files, "pytorch_model.bin": b"\0" * 4096, "README.md": b"# tiny\n", "model.gguf": b"\0" * 64}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny model downloaded once through a FakeHub into HF_HOME by huggingface_hub; the hub is then stopped."""
    tmp = tmp_path_factory.mktemp("hub")
    src = make_checkpoint(tmp / "src")
    hub = FakeHub({REPO: {MAIN: repo_files(src)}}, {(REPO, "main"): MAIN})
    try:
        [got] = resolve(REPO, HF_HOME=str(tmp / "home"), HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret")
    finally:
        hub.close()
    return {"home": tmp / "home", "src": src, "got": got, "requests": hub.requests, "fetched": hub.fetched()}


def snapshot(hub_cache: Path, commit: str) -> Path:
    return hub_cache / "models--owner--tiny" / "snapshots" / commit


# --- download into the library's cache -------------------------------------------------------------------------

def test_download_lands_in_the_hf_cache_and_fetches_only_what_tokrl_reads(cached):
    snap = snapshot(cached["home"] / "hub", MAIN)
    assert cached["got"] == {"dir": str(snap)}
    assert cached["fetched"] == {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"}
    # the library's layout: refs/main names the commit, snapshot files link to content-addressed blobs
    assert (cached["home"] / "hub" / "models--owner--tiny" / "refs" / "main").read_text() == MAIN
    assert (snap / "model.safetensors").is_symlink()
    assert (snap / "model.safetensors").read_bytes() == (cached["src"] / "model.safetensors").read_bytes()
    # HF_TOKEN is sent to the endpoint on every Hub request
    assert {auth for _, path, auth in cached["requests"] if "owner/tiny" in path} == {"Bearer hf_secret"}


def test_cached_model_is_found_with_the_network_off_and_loads(cached):
    snap = str(snapshot(cached["home"] / "hub", MAIN))
    assert resolve(REPO, HF_HOME=str(cached["home"]), HF_HUB_OFFLINE="1") == [{"dir": snap}]
    ids = torch.tensor([[5, 9, 200, 17]])
    with torch.no_grad():
        assert torch.equal(pretrained.load_model(snap).logits(ids), pretrained.load_model(cached["src"]).logits(ids))
    text = "12 x 3 = 36"
    ours, src = tokenizer.Tokenizer(Path(snap) / "tokenizer.json"), tokenizer.Tokenizer(cached["src"] / "tokenizer.json")
    assert ours.encode(text) == src.encode(text)


def test_local_directory_wins_over_a_cached_repo_of_the_same_name(cached, tmp_path):
    make_checkpoint(tmp_path / "owner" / "tiny", seed=1)  # ./owner/tiny exists in the working directory
    got = resolve(REPO, cwd=tmp_path, HF_HOME=str(cached["home"]), HF_HUB_OFFLINE="1")
    assert got == [{"dir": REPO}]
    # elsewhere the same name comes from the cache, here with HF_HUB_OFFLINE unset and the Hub unreachable
    elsewhere = resolve(REPO, cwd=tmp_path / "owner", HF_HOME=str(cached["home"]))
    assert elsewhere == [{"dir": str(snapshot(cached["home"] / "hub", MAIN))}]


def test_revision_and_hf_hub_cache_are_honoured(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    v1 = {**repo_files(src), "config.json": (src / "config.json").read_bytes() + b"\n"}  # another commit
    hub = FakeHub({REPO: {MAIN: repo_files(src), V1: v1}}, {(REPO, "main"): MAIN, (REPO, "v1"): V1})
    env = dict(HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins
    try:
        assert resolve(f"{REPO}@v1", HF_ENDPOINT=hub.url, **env) == [{"dir": str(snapshot(tmp_path / "elsewhere",
                                                                                            V1))}]
    finally:
        hub.close()
    assert not (tmp_path / "home").exists()
    got = resolve(f"{REPO}@v1", f"{REPO}@{V1}", REPO, HF_HUB_OFFLINE="1", **env)
    assert got[0] == got[1] == {"dir": str(snapshot(tmp_path / "elsewhere", V1))}
    assert got[2]["error"] == "ModelNotFoundError"  # main was never downloaded


# --- what cannot be had ----------------------------------------------------------------------------------------

def assert_by_hand_message(msg: str, repo: str, endpoint: str, cache: Path) -> None:
    assert "\n" not in msg and msg.startswith(repo)
    for needed in ("config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json",
                   f"{endpoint}/{repo}", "--model DIR", str(cache / ("models--" + repo.replace("/", "--")))):
        assert needed in msg, needed


def test_unreachable_network_gives_the_by_hand_message(tmp_path):
    down_url = closed_port_url()
    [down] = resolve("Qwen/Qwen2-1.5B", HF_HOME=str(tmp_path), HF_ENDPOINT=down_url)
    assert down["error"] == "ModelNotFoundError" and f"cannot be fetched from {down_url}" in down["message"], down
    assert_by_hand_message(down["message"], "Qwen/Qwen2-1.5B", down_url, tmp_path / "hub")


def test_offline_from_the_command_line_is_one_line(tmp_path):
    env = hub_env(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval-only", "--model", "Qwen/Qwen2-1.5B"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("error: Qwen/Qwen2-1.5B (revision main): not (whole) in the cache"), line
    assert "HF_HUB_OFFLINE is set" in line
    assert_by_hand_message(line[len("error: "):], "Qwen/Qwen2-1.5B", env["HF_ENDPOINT"], tmp_path / "hub")


def test_repo_without_safetensors_and_unknown_repo_are_named(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    files = {k: v for k, v in repo_files(src).items() if k != "model.safetensors"}  # only pytorch_model.bin
    hub = FakeHub({REPO: {MAIN: files}}, {(REPO, "main"): MAIN})
    try:
        no_weights, unknown = resolve(REPO, "owner/other", HF_HOME=str(tmp_path / "home"), HF_ENDPOINT=hub.url)
    finally:
        hub.close()
    assert "pytorch_model.bin" not in hub.fetched()
    assert no_weights["error"] == "ModelNotFoundError"
    assert "is incomplete: no model.safetensors or model.safetensors.index.json" in no_weights["message"]
    assert unknown["error"] == "ModelNotFoundError" and "no such repo" in unknown["message"]
    assert "HF_TOKEN" in unknown["message"]


def test_partial_cache_offline_names_the_missing_weights(cached, tmp_path):
    """An interrupted download: the library knows the file list (trees/) and says what is missing; a cache another
    tool left without that list is caught by tokrl's own check. Both end in the by-hand message."""
    shutil.copytree(cached["home"], tmp_path / "home", symlinks=True)
    hub_cache = tmp_path / "home" / "hub"
    shutil.copytree(hub_cache / "models--owner--tiny", hub_cache / "models--owner--tiny2", symlinks=True)
    shutil.rmtree(hub_cache / "models--owner--tiny2" / "trees")
    for repo in ("tiny", "tiny2"):
        (hub_cache / f"models--owner--{repo}" / "snapshots" / MAIN / "model.safetensors").unlink()
    known, unknown = resolve(REPO, "owner/tiny2", HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    assert known["error"] == "ModelNotFoundError" and "missing (model.safetensors)" in known["message"], known
    assert unknown["error"] == "ModelNotFoundError", unknown
    assert "is incomplete: no model.safetensors or model.safetensors.index.json" in unknown["message"], unknown
    assert "--model DIR" in known["message"] and "--model DIR" in unknown["message"]


@pytest.mark.parametrize("name", ["no such thing", "./nope/x/y", "a/b/c", "owner/../x"])
def test_neither_directory_nor_repo_id(name, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a bad name must be refused before any lookup")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ValueError, match="neither an existing directory nor a Hugging Face repo id"):
        pretrained.resolve_model_dir(name)


def test_local_directory_without_config_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        pretrained.resolve_model_dir(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_revision_flag_reaches_the_lookup(monkeypatch):
    import train

    seen = []

    def record(name, *, revision=None):
        seen.append((name, revision))
        raise pretrained.ModelNotFoundError("stop here")

    monkeypatch.setattr(pretrained, "resolve_model_dir", record)
    with pytest.raises(SystemExit, match="stop here"):
        train.main(["--eval-only", "--model", REPO, "--revision", "v1"])
    assert seen == [(REPO, "v1")]
