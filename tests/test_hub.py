"""resolve_model_dir: local directory, Hugging Face cache, resumable download. Never touches the real network:
a ThreadingHTTPServer on 127.0.0.1 plays the Hub (`/{owner}/{name}/resolve/{revision}/{file}`)."""
import http.server
import json
import pathlib
import socket
import threading

import pytest

from model import ModelNotFoundError, hf_cache_dir, resolve_model_dir

REPO = "owner/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = b'{"model_type": "qwen2"}'
TOKENIZER = b'{"version": "1.0"}'
WEIGHTS = bytes(range(256)) * 40  # 10240 bytes, no two halves alike


class FakeHub:
    """Serves `files` for REPO at any revision, with X-Repo-Commit, Content-Length, Range and 404.

    `truncate`: file names whose body stops halfway although Content-Length announces the whole file.
    `ignore_range`: answer a Range request with 200 and the whole file, as some proxies do."""

    def __init__(self, files: dict[str, bytes], truncate: tuple[str, ...] = (), ignore_range: bool = False):
        self.files, self.truncate, self.ignore_range = files, truncate, ignore_range
        self.requests, self.auth = [], []  # requests: (file, Range header); auth: Authorization headers
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                parts = self.path.split("/")  # ['', owner, name, 'resolve', revision, file]
                name = parts[5] if len(parts) == 6 and parts[3] == "resolve" else None
                hub.requests.append((name, self.headers.get("Range")))
                hub.auth.append(self.headers.get("Authorization"))
                body = hub.files.get(name) if "/".join(parts[1:3]) == REPO else None
                if body is None:
                    self.send_error(404)
                    return
                ranged = self.headers.get("Range") and not hub.ignore_range
                start = int(self.headers["Range"][6:-1]) if ranged else 0  # "bytes=N-"
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                sent = body[start:]
                self.wfile.write(sent[: len(sent) // 2] if name in hub.truncate else sent)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def single_file_repo() -> dict[str, bytes]:
    return {"config.json": CONFIG, "tokenizer.json": TOKENIZER, "model.safetensors": WEIGHTS}


def closed_port_url() -> str:
    with socket.socket() as s:  # bind then close: nothing listens there, so connecting is refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    for var in ("HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def hub(cache, monkeypatch):
    servers = []

    def start(files, **kw):
        servers.append(FakeHub(files, **kw))
        monkeypatch.setenv("HF_ENDPOINT", servers[-1].url)
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def snapshot(cache) -> pathlib.Path:
    return cache / "models--owner--tiny" / "snapshots" / COMMIT


# --- local directory and bad names -------------------------------------------------------------------------

def test_local_directory_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_bytes(CONFIG)
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_local_directory_without_config_names_dir_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        resolve_model_dir(str(tmp_path))
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("name", ["./nope/x/y", "no such thing", "owner/../x", "gpt2"])
def test_neither_directory_nor_repo_id(name, cache):
    with pytest.raises(ValueError, match="neither an existing directory nor a Hugging Face repo id"):
        resolve_model_dir(name)


# --- cache -------------------------------------------------------------------------------------------------

def build_cache(cache, files):
    repo = cache / "models--owner--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot(cache).mkdir(parents=True)
    for name, body in files.items():
        (snapshot(cache) / name).write_bytes(body)


def test_cache_hit_makes_no_request(cache, monkeypatch):
    build_cache(cache, single_file_repo())
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # any request would fail
    assert resolve_model_dir(REPO) == snapshot(cache)


def test_cache_hit_by_commit_hash(cache, monkeypatch):
    build_cache(cache, single_file_repo())
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert resolve_model_dir(REPO, revision=COMMIT) == snapshot(cache)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert hf_cache_dir().parts[-3:] == (".cache", "huggingface", "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_cache_dir() == tmp_path / "elsewhere"


def test_hf_home_honoured_without_hf_hub_cache(tmp_path, monkeypatch, hub):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    hub(single_file_repo())
    got = resolve_model_dir(REPO, progress=False)
    assert got == tmp_path / "home" / "hub" / "models--owner--tiny" / "snapshots" / COMMIT


def test_not_cached_and_download_off(cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(ModelNotFoundError, match="by hand") as e:
        resolve_model_dir(REPO, allow_download=False)
    assert REPO in str(e.value)


def test_incomplete_cache_is_not_a_hit(cache, hub):
    files = single_file_repo()
    build_cache(cache, {"config.json": CONFIG, "tokenizer.json": TOKENIZER})  # weights missing
    server = hub(files)
    assert resolve_model_dir(REPO, progress=False) == snapshot(cache)
    assert [r[0] for r in server.requests] == [
        "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json", "model.safetensors"]


# --- download ----------------------------------------------------------------------------------------------

def test_download_single_file_then_cache_hit(cache, hub, capsys):
    files = single_file_repo()
    server = hub(files)
    snap = resolve_model_dir(REPO)
    assert snap == snapshot(cache)
    for name, body in files.items():
        assert (snap / name).read_bytes() == body
    assert (cache / "models--owner--tiny" / "refs" / "main").read_text() == COMMIT
    assert not list(snap.glob("*.incomplete"))
    assert "model.safetensors" in capsys.readouterr().err  # the progress line
    n = len(server.requests)
    assert resolve_model_dir(REPO) == snap
    assert len(server.requests) == n


def test_download_sharded(cache, hub):
    shards = {"model-00001-of-00002.safetensors": WEIGHTS[:5000],
              "model-00002-of-00002.safetensors": WEIGHTS[5000:]}
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors",
                                            "c": "model-00001-of-00002.safetensors"}}
    files = {"config.json": CONFIG, "tokenizer.json": TOKENIZER, "generation_config.json": b"{}",
             "model.safetensors.index.json": json.dumps(index).encode(), **shards}
    server = hub(files)
    snap = resolve_model_dir(REPO, progress=False)
    for name, body in files.items():
        assert (snap / name).read_bytes() == body
    assert not (snap / "model.safetensors").exists()
    assert "model.safetensors" not in [r[0] for r in server.requests]  # the index was enough


def test_resume_sends_range(cache, hub):
    snapshot(cache).mkdir(parents=True)
    (snapshot(cache) / "model.safetensors.incomplete").write_bytes(WEIGHTS[:len(WEIGHTS) // 2])
    server = hub(single_file_repo())
    snap = resolve_model_dir(REPO, progress=False)
    assert ("model.safetensors", f"bytes={len(WEIGHTS) // 2}-") in server.requests
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS
    assert not (snap / "model.safetensors.incomplete").exists()


def test_server_ignoring_range_restarts_from_scratch(cache, hub):
    snapshot(cache).mkdir(parents=True)
    (snapshot(cache) / "model.safetensors.incomplete").write_bytes(b"stale bytes that must not survive")
    server = hub(single_file_repo(), ignore_range=True)
    snap = resolve_model_dir(REPO, progress=False)
    assert ("model.safetensors", "bytes=33-") in server.requests  # asked to resume, got a 200
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS


def test_token_sent_as_bearer(cache, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server = hub(single_file_repo())
    resolve_model_dir(REPO, progress=False)
    assert set(server.auth) == {"Bearer hf_secret"}


def test_truncated_body_leaves_no_final_file(cache, hub):
    hub(single_file_repo(), truncate=("model.safetensors",))
    with pytest.raises(ModelNotFoundError, match="model.safetensors") as e:
        resolve_model_dir(REPO, progress=False)
    assert "got 5120 of 10240 bytes" in str(e.value)
    assert not (snapshot(cache) / "model.safetensors").exists()
    assert (snapshot(cache) / "model.safetensors.incomplete").stat().st_size == len(WEIGHTS) // 2


def test_truncated_then_resumed(cache, hub):
    server = hub(single_file_repo(), truncate=("model.safetensors",))
    with pytest.raises(ModelNotFoundError):
        resolve_model_dir(REPO, progress=False)
    server.truncate = ()  # the network comes back: the second run picks up the half it has
    snap = resolve_model_dir(REPO, progress=False)
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS
    assert server.requests[-1] == ("model.safetensors", f"bytes={len(WEIGHTS) // 2}-")


def test_missing_required_file_is_an_error(cache, hub):
    hub({"config.json": CONFIG, "model.safetensors": WEIGHTS})  # no tokenizer.json
    with pytest.raises(ModelNotFoundError, match="tokenizer.json.*HTTP 404"):
        resolve_model_dir(REPO, progress=False)


def test_unreachable_endpoint_explains_manual_placement(cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_dir("Qwen/Qwen2-1.5B", progress=False)
    msg = str(e.value)
    assert "Qwen/Qwen2-1.5B" in msg and "config.json" in msg
    assert "by hand" in msg and "https://huggingface.co/Qwen/Qwen2-1.5B" in msg and "--model" in msg
    assert not (cache / "models--Qwen--Qwen2-1.5B" / "refs" / "main").exists()
