"""lightkv_edge.hub: choosing and fetching a GGUF + mmproj pair, fully offline.

Every test runs against a Hugging Face cache layout built here
(models--OWNER--NAME/{blobs,refs,snapshots/<commit>}); the online path is exercised with
huggingface_hub's functions monkeypatched. Sockets are blocked, so nothing can leave.
"""
import hashlib
import os
import socket
from pathlib import Path

import pytest

from lightkv_edge import hub
from lightkv_edge.errors import InputError, LightKVError, ModelError

REPO = "acme/tiny-vlm-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"


# ------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Offline env, a temp cache, and any socket connect is a test failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


def gguf(tag: str) -> bytes:
    return b"GGUF" + b"\x03\x00\x00\x00" + tag.encode()


def make_repo(root: Path, repo: str, files, *, commit=COMMIT, ref="main", missing_blobs=()):
    """Build a repo in huggingface_hub's cache layout; returns the snapshot dir."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    blobs = repo_dir / "blobs"
    snap = repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    for name in files:
        data = gguf(name) if name.endswith(".gguf") else b"{}"
        digest = hashlib.sha256(data).hexdigest()
        if name not in missing_blobs:
            (blobs / digest).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            continue
        rel = os.path.relpath(blobs / digest, link.parent)
        link.symlink_to(rel)
    return snap


def one_line(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


BASIC = ["README.md",
         "tiny-vlm-Q8_0.gguf", "tiny-vlm-Q4_K_M.gguf", "tiny-vlm-F16.gguf",
         "tiny-vlm-Q4_K_S.gguf", "mmproj-tiny-vlm-f16.gguf", "mmproj-tiny-vlm-Q8_0.gguf"]


# ---------------------------------------------------------------------- offline path

def test_picks_preferred_quant_and_returns_snapshot_files(cache):
    snap = make_repo(cache, REPO, BASIC)
    pair = hub.resolve(REPO)  # HF_HUB_OFFLINE=1 from the env, cache from HF_HUB_CACHE
    assert pair.model_file == "tiny-vlm-Q4_K_M.gguf"
    assert pair.mmproj_file == "mmproj-tiny-vlm-f16.gguf"
    assert pair.repo == REPO
    assert pair.model == snap / "tiny-vlm-Q4_K_M.gguf"
    assert pair.mmproj == snap / "mmproj-tiny-vlm-f16.gguf"
    for p in (pair.model, pair.mmproj):
        assert p.is_file() and p.read_bytes().startswith(b"GGUF")
        assert p.parent.name == COMMIT and p.parent.parent.name == "snapshots"
    assert pair.model.read_bytes() == gguf("tiny-vlm-Q4_K_M.gguf")


@pytest.mark.parametrize("files, expected", [
    (["m-Q4_K_S.gguf", "m-Q5_K_M.gguf", "m-Q8_0.gguf"], "m-Q4_K_S.gguf"),
    (["m-Q5_K_M.gguf", "m-Q8_0.gguf", "m-F16.gguf"], "m-Q5_K_M.gguf"),
    (["m-F16.gguf", "m-Q8_0.gguf", "m-Q6_K.gguf"], "m-Q8_0.gguf"),
    (["m-BF16.gguf", "m-F16.gguf", "m-F32.gguf"], "m-F16.gguf"),
    (["m-BF16.gguf", "m-F32.gguf"], "m-BF16.gguf"),          # BF16 is not taken for F16
    (["m-f32.gguf", "m-IQ3_XXS.gguf"], "m-f32.gguf"),          # any case
    (["m-Q6_K.gguf", "m-IQ3_XXS.gguf", "m-Q2_K.gguf"], "m-IQ3_XXS.gguf"),  # alphabetical
    (["model.Q4_K_M.gguf", "model.q8_0.gguf"], "model.Q4_K_M.gguf"),
])
def test_model_quant_preference_order(cache, files, expected):
    make_repo(cache, REPO, files + ["mmproj-f16.gguf"])
    assert hub.resolve(REPO).model_file == expected


@pytest.mark.parametrize("files, expected", [
    (["mmproj-Q8_0.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf", "mmproj-f32.gguf"],
     "mmproj-F16.gguf"),
    (["mmproj-Q8_0.gguf", "mmproj-BF16.gguf", "mmproj-f32.gguf"], "mmproj-BF16.gguf"),
    (["mmproj-Q8_0.gguf", "mmproj-f32.gguf"], "mmproj-f32.gguf"),
    (["mmproj-Q8_0.gguf", "mmproj-Q4_0.gguf"], "mmproj-Q8_0.gguf"),
    (["tiny-MMPROJ-q4_1.gguf", "MMProj-other.gguf"], "MMProj-other.gguf"),
])
def test_mmproj_preference(cache, files, expected):
    make_repo(cache, REPO, files + ["m-Q4_K_M.gguf"])
    pair = hub.resolve(REPO)
    assert pair.mmproj_file == expected
    assert pair.model_file == "m-Q4_K_M.gguf"


@pytest.mark.parametrize("pattern, expected", [
    ("*Q8_0*", "tiny-vlm-Q8_0.gguf"),
    ("*q8_0*", "tiny-vlm-Q8_0.gguf"),                 # globs ignore case
    ("tiny-vlm-F16.gguf", "tiny-vlm-F16.gguf"),       # exact name
    ("*K_S.gguf", "tiny-vlm-Q4_K_S.gguf"),
])
def test_hf_file_selects_model(cache, pattern, expected):
    make_repo(cache, REPO, BASIC)
    pair = hub.resolve(REPO, hf_file=pattern)
    assert pair.model_file == expected
    assert pair.model.read_bytes() == gguf(expected)
    assert pair.mmproj_file == "mmproj-tiny-vlm-f16.gguf"   # never the model glob's match


def test_hf_file_ambiguous_lists_matches(cache):
    make_repo(cache, REPO, BASIC)
    with pytest.raises(InputError) as ei:
        hub.resolve(REPO, hf_file="*Q4_K*")
    msg = one_line(ei)
    assert "several" in msg and "tiny-vlm-Q4_K_M.gguf" in msg and "tiny-vlm-Q4_K_S.gguf" in msg


def test_hf_file_no_match_offline_lists_cached_files(cache):
    make_repo(cache, REPO, BASIC)
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO, hf_file="*Q2_K*")
    msg = one_line(ei)
    assert "*Q2_K*" in msg and "tiny-vlm-Q8_0.gguf" in msg
    assert "not in the local Hugging Face cache" in msg
    assert "mmproj-tiny-vlm-f16.gguf" not in msg.split("available:")[1]  # models only


def test_mmproj_file_selects_and_errors(cache):
    make_repo(cache, REPO, BASIC)
    assert hub.resolve(REPO, mmproj_file="*Q8_0*").mmproj_file == "mmproj-tiny-vlm-Q8_0.gguf"
    with pytest.raises(InputError) as ei:
        hub.resolve(REPO, mmproj_file="mmproj-*")
    assert "several" in one_line(ei)


def test_offline_argument_and_hf_home(cache, tmp_path, monkeypatch):
    """offline=True without the env var; cache found through HF_HOME/hub."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_CACHE")
    make_repo(tmp_path / "hf_home" / "hub", REPO, BASIC)

    def boom(*a, **k):
        raise AssertionError("offline must not call the hub")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", boom)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    pair = hub.resolve(REPO, offline=True)
    assert pair.model.is_file() and pair.model_file == "tiny-vlm-Q4_K_M.gguf"


def test_explicit_cache_dir(tmp_path):
    other = tmp_path / "elsewhere"
    make_repo(other, REPO, BASIC)
    pair = hub.resolve(REPO, cache_dir=str(other))
    assert str(pair.model).startswith(str(other))


def test_repo_not_in_cache(cache):
    make_repo(cache, REPO, BASIC)
    with pytest.raises(ModelError) as ei:
        hub.resolve("acme/other-GGUF")
    msg = one_line(ei)
    assert "acme/other-GGUF" in msg and "not in the local Hugging Face cache" in msg
    assert "run once with network" in msg


def test_empty_cache_dir(cache):
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    assert "not in the local Hugging Face cache" in one_line(ei)


@pytest.mark.parametrize("bad", ["noslash", "a/b/c", "", "   ", "/name", "owner/", "a--b/c",
                                 "-a/b", "a/b.", "a/../b", "a b/c", None, 42])
def test_bad_repo_ids(cache, bad):
    with pytest.raises(InputError) as ei:
        hub.resolve(bad)
    assert "OWNER/NAME" in one_line(ei)


def test_bad_repo_checked_before_anything(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("repo must be validated first")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", boom)
    with pytest.raises(InputError):
        hub.resolve("a/b/c")


def test_multipart_refused(cache):
    make_repo(cache, REPO, ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf",
                            "mmproj-big-f16.gguf"])
    for kwargs in ({}, {"hf_file": "*Q4_K_M*"}, {"hf_file": "big-Q4_K_M-00001-of-00002.gguf"}):
        with pytest.raises(ModelError) as ei:
            hub.resolve(REPO, **kwargs)
        msg = one_line(ei)
        assert "split" in msg and "not supported" in msg


def test_multipart_skipped_when_a_single_file_exists(cache):
    make_repo(cache, REPO, ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf",
                            "big-Q8_0.gguf", "mmproj-big-f16.gguf"])
    assert hub.resolve(REPO).model_file == "big-Q8_0.gguf"


def test_revision_commit_and_branch(cache):
    make_repo(cache, REPO, BASIC)
    make_repo(cache, REPO, ["new-Q8_0.gguf", "mmproj-new-bf16.gguf"], commit=COMMIT2, ref="dev")
    assert hub.resolve(REPO).model_file == "tiny-vlm-Q4_K_M.gguf"
    dev = hub.resolve(REPO, revision="dev")
    assert (dev.model_file, dev.mmproj_file) == ("new-Q8_0.gguf", "mmproj-new-bf16.gguf")
    assert dev.model.parent.name == COMMIT2
    assert hub.resolve(REPO, revision=COMMIT2).model_file == "new-Q8_0.gguf"
    for rev in ("v2", "a" * 40):
        with pytest.raises(ModelError) as ei:
            hub.resolve(REPO, revision=rev)
        assert "not in the local Hugging Face cache" in one_line(ei)
    with pytest.raises(InputError):
        hub.resolve(REPO, revision="../../etc")


def test_files_in_subfolder(cache):
    snap = make_repo(cache, REPO, ["sub/m-Q4_K_M.gguf", "sub/mmproj-m-f16.gguf"])
    pair = hub.resolve(REPO, hf_file="m-Q4_K_M.gguf")
    assert pair.model_file == "sub/m-Q4_K_M.gguf" and pair.model == snap / "sub/m-Q4_K_M.gguf"


def test_dangling_blob_is_not_cached(cache):
    make_repo(cache, REPO, BASIC, missing_blobs={"tiny-vlm-Q4_K_M.gguf"})
    assert hub.resolve(REPO).model_file == "tiny-vlm-Q4_K_S.gguf"
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO, hf_file="tiny-vlm-Q4_K_M.gguf")
    assert "not in the local Hugging Face cache" in one_line(ei)


def test_mmproj_not_cached(cache):
    make_repo(cache, REPO, ["tiny-vlm-Q4_K_M.gguf"])
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    assert "mmproj" in (msg := one_line(ei)) and "not in the local Hugging Face cache" in msg


def test_no_gguf_cached(cache):
    make_repo(cache, REPO, ["README.md"])
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    assert "not in the local Hugging Face cache" in one_line(ei)


# ----------------------------------------------------------- online path (all mocked)

def _hf_error(cls, msg, status=None):
    """An instance of a huggingface_hub HTTP error without a real response."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, msg)
    exc.response = type("R", (), {"status_code": status, "headers": {}})()
    exc.server_message = None
    exc.request_id = None
    return exc


@pytest.fixture
def online(monkeypatch, cache):
    """Online mode with list_repo_files / hf_hub_download mocked onto the temp cache."""
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    state = {"files": list(BASIC), "list_exc": None, "dl_exc": None, "calls": [],
             "bars_disabled": []}

    def list_repo_files(self, repo_id, revision=None, **kw):
        state["calls"].append(("list", repo_id, revision))
        if state["list_exc"] is not None:
            raise state["list_exc"]
        return list(state["files"])

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **kw):
        from huggingface_hub.utils import are_progress_bars_disabled
        state["calls"].append(("download", repo_id, filename, revision, cache_dir))
        state["bars_disabled"].append(are_progress_bars_disabled())
        if state["dl_exc"] is not None:
            raise state["dl_exc"]
        snap = make_repo(Path(cache_dir), repo_id, [filename])  # "downloads" it
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return state


def test_online_downloads_chosen_pair(online, cache):
    pair = hub.resolve(REPO, hf_file="*Q8_0*")
    assert pair.model_file == "tiny-vlm-Q8_0.gguf"
    assert pair.mmproj_file == "mmproj-tiny-vlm-f16.gguf"
    assert pair.model.is_file() and pair.mmproj.is_file()
    downloads = [c for c in online["calls"] if c[0] == "download"]
    assert {c[2] for c in downloads} == {"tiny-vlm-Q8_0.gguf", "mmproj-tiny-vlm-f16.gguf"}
    assert all(c[4] == str(cache) for c in downloads)
    assert online["calls"][0] == ("list", REPO, None)


def test_online_progress_switch(online):
    from huggingface_hub.utils import are_progress_bars_disabled
    before = are_progress_bars_disabled()
    hub.resolve(REPO, progress=False)
    assert online["bars_disabled"] == [True, True]
    assert are_progress_bars_disabled() == before           # restored afterwards
    online["bars_disabled"].clear()
    hub.resolve(REPO, progress=True)
    assert online["bars_disabled"] == [before, before]


def test_online_no_match_and_ambiguous_list_repo_files(online):
    with pytest.raises(InputError) as ei:
        hub.resolve(REPO, hf_file="*Q2_K*")
    msg = one_line(ei)
    assert "no model file matches" in msg and "tiny-vlm-Q4_K_M.gguf" in msg
    with pytest.raises(InputError) as ei:
        hub.resolve(REPO, hf_file="*.gguf")
    assert "several" in one_line(ei)


def test_online_repo_without_mmproj_or_gguf(online):
    online["files"] = ["m-Q4_K_M.gguf", "README.md"]
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    assert "mmproj" in one_line(ei)
    online["files"] = ["model.safetensors"]
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    assert ".gguf" in one_line(ei)


def test_online_repo_not_found(online):
    from huggingface_hub.errors import RepositoryNotFoundError
    online["list_exc"] = _hf_error(RepositoryNotFoundError, "404 Client Error\nRepo Not Found",
                                   404)
    with pytest.raises(InputError) as ei:
        hub.resolve(REPO)
    assert "not found" in (msg := one_line(ei)) and REPO in msg


@pytest.mark.parametrize("kind", ["gated", "401"])
def test_online_gated_or_unauthorised_says_log_in(online, kind):
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    online["list_exc"] = (_hf_error(GatedRepoError, "403 gated\nmore", 403) if kind == "gated"
                          else _hf_error(HfHubHTTPError, "401 Unauthorized", 401))
    with pytest.raises(InputError) as ei:
        hub.resolve(REPO)
    msg = one_line(ei)
    assert "huggingface-cli login" in msg and "HF_TOKEN" in msg


def test_online_revision_not_found(online):
    from huggingface_hub.errors import RevisionNotFoundError
    online["list_exc"] = _hf_error(RevisionNotFoundError, "404 revision", 404)
    with pytest.raises(InputError) as ei:
        hub.resolve(REPO, revision="nope")
    assert "nope" in one_line(ei)


def test_online_connection_error_falls_back_to_cache(online, cache):
    import requests
    snap = make_repo(cache, REPO, BASIC)
    online["list_exc"] = requests.exceptions.ConnectionError("no route to host")
    pair = hub.resolve(REPO)
    assert pair.model == snap / "tiny-vlm-Q4_K_M.gguf"
    assert not [c for c in online["calls"] if c[0] == "download"]


def test_online_connection_error_not_cached(online):
    import requests
    online["list_exc"] = requests.exceptions.ConnectTimeout("timed out")
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    msg = one_line(ei)
    assert "cannot reach" in msg and "not in the local Hugging Face cache" in msg


def test_online_server_error_falls_back_to_cache(online, cache):
    from huggingface_hub.errors import HfHubHTTPError
    make_repo(cache, REPO, BASIC)
    online["list_exc"] = _hf_error(HfHubHTTPError, "503 Service Unavailable", 503)
    assert hub.resolve(REPO).model_file == "tiny-vlm-Q4_K_M.gguf"


def test_online_download_failures_are_one_line(online):
    from huggingface_hub.errors import LocalEntryNotFoundError
    online["dl_exc"] = LocalEntryNotFoundError("connection broke\nsecond line")
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    assert "not in the local Hugging Face cache" in one_line(ei)
    online["dl_exc"] = OSError(28, "No space left on device")
    with pytest.raises(ModelError) as ei:
        hub.resolve(REPO)
    assert "No space left" in one_line(ei)
    online["dl_exc"] = RuntimeError("weird\nfailure")
    with pytest.raises(LightKVError) as ei:
        hub.resolve(REPO)
    one_line(ei)


def test_env_offline_zero_means_online(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub.resolve(REPO)
    assert online["calls"][0][0] == "list"


def test_no_host_address_in_module():
    src = Path(hub.__file__).read_text()
    assert "://" not in src
