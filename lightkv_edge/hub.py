"""Fetch a GGUF model + mmproj pair from a Hugging Face hub repo (the CLI's ``--hf-repo``).

``resolve("OWNER/NAME")`` picks the two files of the repo and returns their local paths:

* the mmproj (vision projector) is a ``.gguf`` whose name contains "mmproj" (any case),
  preferring F16, then BF16, F32, Q8_0, then the first alphabetically;
* the model is one of the other ``.gguf`` files: the one ``hf_file`` names (an exact name
  or a glob such as ``'*Q4_K_M*'``), else the first quant found in the order Q4_K_M,
  Q4_K_S, Q5_K_M, Q8_0, F16, BF16, F32, else the first alphabetically. Split models
  (``-00001-of-0000N.gguf``) are not supported yet.

Online (the default) it lists the repo with ``HfApi().list_repo_files`` and downloads with
``hf_hub_download`` (its progress bar shows unless ``progress=False``); files already in
the cache are not downloaded again. Offline (``offline=True``, env ``HF_HUB_OFFLINE=1``, or
when the hub cannot be reached) it reads the local cache only, without importing or
calling anything that could touch the network. The cache is huggingface_hub's own
(``cache_dir``, else ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else the default).

Every failure is an :class:`InputError` or :class:`ModelError` with a one-line message.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InputError, ModelError

__all__ = ["HubPair", "resolve", "MODEL_QUANT_ORDER", "MMPROJ_QUANT_ORDER"]

MODEL_QUANT_ORDER = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0", "F16", "BF16", "F32")
MMPROJ_QUANT_ORDER = ("F16", "BF16", "F32", "Q8_0")

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_NOT_CACHED = "not in the local Hugging Face cache; run once with network"
_LOGIN = "log in with `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN"


class _NoMatch(InputError):
    """No file of the listing matches what was asked (offline: maybe just not cached)."""


class _NoMmproj(ModelError):
    """The listing has no mmproj (offline: maybe just not cached)."""


@dataclass(frozen=True)
class HubPair:
    """The local paths of a model and its mmproj, and where they came from."""

    model: Path
    mmproj: Path
    repo: str
    model_file: str
    mmproj_file: str


# ---------------------------------------------------------------------------- checks

def _check_repo(repo) -> str:
    if not isinstance(repo, str) or not repo.strip():
        raise InputError("--hf-repo: empty repo id; expected OWNER/NAME")
    repo = repo.strip()
    parts = repo.split("/")
    if len(parts) != 2:
        raise InputError(f"--hf-repo: bad repo id {repo!r}; expected OWNER/NAME")
    for part in parts:
        if (not part or len(part) > 96 or not _NAME_RE.match(part)
                or "--" in part or ".." in part):
            raise InputError(
                f"--hf-repo: bad repo id {repo!r}; expected OWNER/NAME (letters, digits, "
                "'-', '_', '.'; no '--' or '..')")
    return repo


def _check_revision(revision):
    if revision is None:
        return None
    if (not isinstance(revision, str) or not revision.strip() or ".." in revision
            or revision.startswith("/") or "\\" in revision):
        raise InputError(f"--hf-repo: bad revision {revision!r}")
    return revision.strip()


def _truthy(value: str) -> bool:
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _env_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return _truthy(value)
    try:  # the flag huggingface_hub read when it was imported (only if already imported)
        import sys
        constants = sys.modules.get("huggingface_hub.constants")
        return bool(constants and constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - defensive
        return False


def _cache_root(cache_dir) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


# ---------------------------------------------------------------------- choosing files

def _base(name: str) -> str:
    return PurePosixPath(name).name


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _is_mmproj(name: str) -> bool:
    return "mmproj" in _base(name).lower()


def _has_quant(name: str, quant: str) -> bool:
    # the quant as a whole word: letters/digits may not touch it (so F16 is not in BF16)
    pattern = r"(?<![A-Za-z0-9])" + re.escape(quant) + r"(?![A-Za-z0-9])"
    return re.search(pattern, _base(name), re.IGNORECASE) is not None


def _split_key(name: str):
    """(stem, total) for a part of a split model, else None."""
    m = _SPLIT_RE.search(name)
    return (name[: m.start()], m.group(2)) if m else None


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _match(pattern: str, names):
    """Files named exactly by `pattern` (full path or basename), else matching it as a glob."""
    exact = [n for n in names if n == pattern or _base(n) == pattern]
    if exact:
        return exact
    lowered = pattern.lower()
    return [n for n in names
            if fnmatch.fnmatchcase(n.lower(), lowered)
            or fnmatch.fnmatchcase(_base(n).lower(), lowered)]


def _refuse_split(repo: str, name: str):
    raise ModelError(
        f"{repo}: {name} is part of a split (multi-part) GGUF model; split models are not "
        "supported yet, pick a single-file quant with --hf-file")


def _pick_by_preference(names, order):
    for quant in order:
        hits = sorted(n for n in names if _has_quant(n, quant))
        if hits:
            return hits[0]
    return sorted(names)[0]


def _pick_mmproj(repo: str, ggufs, mmproj_file):
    if mmproj_file:
        # among the files named mmproj first; a projector named otherwise can be given too
        avail = [n for n in ggufs if _is_mmproj(n)] or ggufs
        hits = _match(mmproj_file, avail) or _match(mmproj_file, ggufs)
        if len(hits) != 1:
            if not hits:
                raise _NoMatch(f"{repo}: no file matches mmproj {mmproj_file!r}; "
                               f"available: {_listing(avail)}")
            raise InputError(f"{repo}: mmproj {mmproj_file!r} matches several files: "
                             f"{_listing(hits)}; give an exact name")
        return hits[0]
    candidates = [n for n in ggufs if _is_mmproj(n)]
    if not candidates:
        raise _NoMmproj(
            f"{repo} has no mmproj .gguf (vision projector), so it cannot see images; "
            "choose a vision-language repo or use --model/--mmproj")
    return _pick_by_preference(candidates, MMPROJ_QUANT_ORDER)


def _pick_model(repo: str, ggufs, hf_file, mmproj: str):
    models = [n for n in ggufs if not _is_mmproj(n) and n != mmproj]
    if not models:
        raise ModelError(f"{repo} has no model .gguf besides the mmproj "
                         f"(files: {_listing(ggufs)})")
    if hf_file:
        hits = _match(hf_file, models)
        if not hits:
            raise _NoMatch(f"{repo}: no model file matches --hf-file {hf_file!r}; "
                             f"available: {_listing(models)}")
        keys = {_split_key(n) for n in hits}
        if len(hits) == 1 or (len(keys) == 1 and None not in keys):
            chosen = sorted(hits)[0]
            if _split_key(chosen):
                _refuse_split(repo, chosen)
            return chosen
        raise InputError(f"{repo}: --hf-file {hf_file!r} matches several files: "
                         f"{_listing(hits)}; give an exact name")
    single = [n for n in models if not _split_key(n)]
    if not single:
        _refuse_split(repo, sorted(models)[0])
    return _pick_by_preference(single, MODEL_QUANT_ORDER)


def _choose(repo: str, files, hf_file, mmproj_file):
    ggufs = sorted({f for f in files if _is_gguf(f)})
    if not ggufs:
        raise ModelError(f"{repo} has no .gguf files (llama.cpp needs GGUF); "
                         "choose a GGUF repo")
    mmproj = _pick_mmproj(repo, ggufs, mmproj_file)
    model = _pick_model(repo, ggufs, hf_file, mmproj)
    return model, mmproj


# ------------------------------------------------------------------------ local cache

def _snapshot(root: Path, repo: str, revision):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    if not repo_dir.is_dir():
        raise ModelError(f"{repo} is {_NOT_CACHED} (cache: {root})")
    rev = revision or "main"
    if _COMMIT_RE.match(rev):
        commit = rev
    else:
        ref = repo_dir / "refs" / rev
        try:
            commit = ref.read_text().strip()
        except OSError:
            raise ModelError(f"{repo} revision {rev!r} is {_NOT_CACHED}") from None
        if not _COMMIT_RE.match(commit):
            raise ModelError(f"{repo}: broken cache entry {ref} (not a commit hash)")
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        raise ModelError(f"{repo} revision {rev!r} is {_NOT_CACHED}")
    return snap


def _cached_files(snap: Path):
    files = []
    for dirpath, _dirs, names in os.walk(snap, followlinks=False):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file():  # follows the blob symlink; a dangling one is not cached
                files.append(path.relative_to(snap).as_posix())
    return files


def _resolve_offline(repo, root, revision, hf_file, mmproj_file, why=""):
    try:
        snap = _snapshot(root, repo, revision)
        files = _cached_files(snap)
        if not any(_is_gguf(f) for f in files):
            raise ModelError(f"{repo}: its .gguf files are {_NOT_CACHED}")
    except ModelError as exc:
        if why:
            raise ModelError(f"{why}, and {exc}") from None
        raise
    try:
        model, mmproj = _choose(repo, files, hf_file, mmproj_file)
    except _NoMatch as exc:  # the file asked for may exist on the hub, just not here
        msg = str(exc).replace("no model file matches", "no cached model file matches")
        msg = msg.replace("no file matches", "no cached file matches")
        raise ModelError(f"{msg}; if it is in the repo it is {_NOT_CACHED}") from None
    except _NoMmproj:
        raise ModelError(f"{repo}: no mmproj .gguf is {_NOT_CACHED}") from None
    return HubPair(model=snap / model, mmproj=snap / mmproj, repo=repo,
                   model_file=model, mmproj_file=mmproj)


# ----------------------------------------------------------------------------- online

def _network_errors():
    errs = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import OfflineModeIsEnabled
        errs.append(OfflineModeIsEnabled)
    except ImportError:  # pragma: no cover - old huggingface_hub
        pass
    try:
        import requests
        errs += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx
        errs.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def _hf_errors():
    import huggingface_hub.errors as e
    names = ("GatedRepoError", "DisabledRepoError", "RepositoryNotFoundError",
             "RevisionNotFoundError", "LocalEntryNotFoundError", "EntryNotFoundError",
             "HfHubHTTPError")

    class _Never(Exception):
        pass
    return {n: getattr(e, n, _Never) for n in names}


def _status(exc):
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _hub_error(exc, repo: str, what: str, errs, revision):
    """Map a huggingface_hub exception to one of ours (None when not ours to map)."""
    if isinstance(exc, errs["GatedRepoError"]):
        return InputError(f"{repo} is gated: accept its terms on the hub page, then {_LOGIN}")
    if isinstance(exc, errs["DisabledRepoError"]):
        return InputError(f"{repo} has been disabled on the hub")
    if isinstance(exc, errs["RepositoryNotFoundError"]):
        return InputError(f"{repo}: repo not found on the Hugging Face hub (if it is private, "
                          f"{_LOGIN})")
    if isinstance(exc, errs["RevisionNotFoundError"]):
        return InputError(f"{repo}: revision {revision!r} not found")
    if isinstance(exc, errs["LocalEntryNotFoundError"]):
        return ModelError(f"{repo}: {what} is {_NOT_CACHED}")
    if isinstance(exc, errs["EntryNotFoundError"]):
        return ModelError(f"{repo}: {what} not found in the repo")
    if isinstance(exc, errs["HfHubHTTPError"]):
        status = _status(exc)
        if status in (401, 403):
            return InputError(f"{repo}: not authorised (HTTP {status}); {_LOGIN}")
        return ModelError(f"{repo}: hub error while getting {what}"
                          f"{f' (HTTP {status})' if status else ''}: {_one_line(exc)}")
    return None


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    if enabled:
        yield
        return
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _resolve_online(repo, root, revision, hf_file, mmproj_file, progress):
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise ModelError("--hf-repo needs huggingface_hub: pip install huggingface_hub") from None
    errs = _hf_errors()
    net = _network_errors()

    try:
        files = HfApi().list_repo_files(repo, revision=revision)
    except net as exc:
        why = (f"cannot reach the Hugging Face hub ({type(exc).__name__})"
               if type(exc).__name__ != "OfflineModeIsEnabled"
               else "huggingface_hub is in offline mode (HF_HUB_OFFLINE)")
        return _resolve_offline(repo, root, revision, hf_file, mmproj_file, why=why)
    except Exception as exc:  # noqa: BLE001 - mapped to one line below
        status = _status(exc)
        if isinstance(exc, errs["HfHubHTTPError"]) and status is not None and status >= 500:
            why = f"the Hugging Face hub is unavailable (HTTP {status})"
            return _resolve_offline(repo, root, revision, hf_file, mmproj_file, why=why)
        mapped = _hub_error(exc, repo, "the file list", errs, revision)
        if mapped is None:
            mapped = ModelError(f"{repo}: cannot list the repo files: {_one_line(exc)}")
        raise mapped from None

    model, mmproj = _choose(repo, files, hf_file, mmproj_file)
    paths = {}
    with _progress_bars(progress):
        for name in (mmproj, model):
            try:
                paths[name] = Path(hf_hub_download(repo, name, revision=revision,
                                                   cache_dir=str(root)))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to one line below
                mapped = _hub_error(exc, repo, name, errs, revision)
                if mapped is None:
                    if isinstance(exc, net):
                        mapped = ModelError(f"{repo}: download of {name} failed, cannot reach "
                                            f"the hub ({type(exc).__name__}) and it is "
                                            f"{_NOT_CACHED}")
                    elif isinstance(exc, OSError):
                        mapped = ModelError(f"{repo}: cannot save {name} in {root}: "
                                            f"{_one_line(exc)}")
                    else:
                        mapped = ModelError(f"{repo}: download of {name} failed: "
                                            f"{_one_line(exc)}")
                raise mapped from None
    return HubPair(model=paths[model], mmproj=paths[mmproj], repo=repo,
                   model_file=model, mmproj_file=mmproj)


# ------------------------------------------------------------------------------- API

def resolve(repo: str, *, hf_file: str | None = None, mmproj_file: str | None = None,
            revision: str | None = None, cache_dir: str | None = None,
            offline: bool | None = None, progress: bool = True) -> HubPair:
    """Local paths of the GGUF model + mmproj of hub repo ``repo`` ("OWNER/NAME").

    ``hf_file`` / ``mmproj_file``: an exact file name or a glob choosing the model / mmproj
    (default: by quant preference, see the module doc). ``revision``: a branch, tag or commit
    (default main). ``cache_dir``: the hub cache (default huggingface_hub's).
    ``offline``: True reads the cache only; None follows ``HF_HUB_OFFLINE``; online falls back
    to the cache when the hub cannot be reached. ``progress=False`` hides the download bars.
    Raises :class:`InputError` / :class:`ModelError` with a one-line message.
    """
    repo = _check_repo(repo)
    revision = _check_revision(revision)
    for flag, value in (("--hf-file", hf_file), ("mmproj_file", mmproj_file)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"{flag}: empty file name")
    hf_file = hf_file.strip() if hf_file else None
    mmproj_file = mmproj_file.strip() if mmproj_file else None
    root = _cache_root(cache_dir)
    if offline is None:
        offline = _env_offline()
    if offline:
        return _resolve_offline(repo, root, revision, hf_file, mmproj_file)
    return _resolve_online(repo, root, revision, hf_file, mmproj_file, progress)
