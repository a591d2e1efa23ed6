"""Loading a GGUF vision-language model (text model + mmproj) into our llama.cpp build.

Owns the native objects (llama_model, llama_context, mtmd_context, sampler) and frees
them in `close()`. Validates what it can before calling into llama.cpp, and turns
llama.cpp's NULL returns into one-line errors that quote llama.cpp's own reason.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from . import gguf_file, interrupts, mtmd
from .errors import InputError, ModelError

llama_cpp = mtmd.llama_cpp

_GGUF_MAGIC = b"GGUF"
# llama.cpp sizes the KV cache in whole multiples of this many cells
KV_CELL_PAD = 256


def _keep_loading(progress, user_data) -> bool:
    # llama.cpp's loaders stop (and return NULL) when this says False: Ctrl-C during a
    # load ends the load instead of being swallowed inside this callback
    return not interrupts.requested()


_KEEP_LOADING = llama_cpp.llama_progress_callback(_keep_loading)
_KEEP_LOADING_MTMD = mtmd.progress_callback(_keep_loading)


# -- logging: keep llama.cpp quiet unless asked, but remember its last error -------------
class _Log:
    def __init__(self):
        self.verbose = False
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level, text, user_data):
        s = text.decode("utf-8", "replace") if text else ""
        with self._lock:
            self.lines.append(s)
            del self.lines[:-200]
        if self.verbose:
            os.write(2, text or b"")

    def clear(self) -> None:
        """Forget earlier lines (before a call whose failure we may have to explain)."""
        with self._lock:
            self.lines.clear()

    def first_error(self) -> str:
        """The first line since clear() that states an error or a failure: a loader logs
        the root cause first, then the failures it causes on the way out."""
        with self._lock:
            for line in self.lines:
                if "error" in line.lower() or "failed" in line.lower():
                    first = line.strip().splitlines()[0]
                    return first.split("error: ", 1)[-1].strip()
        return "see --verbose"

    def last_error(self) -> str:
        """The latest line that states an error; else the latest that says something
        failed (llama.cpp logs the reason first, then "failed to load model")."""
        with self._lock:
            for word in ("error", "failed"):
                for line in reversed(self.lines):
                    if word in line.lower():
                        first = line.strip().splitlines()[0] if line.strip() else line
                        return first.split("error: ", 1)[-1].strip()
        return "see --verbose"


LOG = _Log()
llama_cpp.llama_log_set(LOG.callback, None)
# mtmd-helper has a logger of its own; its setter also sets libmtmd's
mtmd.lib.mtmd_helper_log_set.argtypes = [llama_cpp.llama_log_callback, ctypes.c_void_p]
mtmd.lib.mtmd_helper_log_set(LOG.callback, None)
llama_cpp.llama_backend_init()


def check_gguf(path, what: str) -> Path:
    """The path of a readable GGUF file, else InputError naming `what` it should be."""
    if path is None:
        raise InputError(f"no {what} given")
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        raise InputError(f"{what} is a directory: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputError(f"cannot read {what} {p}: {e.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise InputError(f"{what} is not a GGUF file: {p}")
    return p


class VisionModel:
    """A text model + mmproj pair loaded into llama.cpp/libmtmd, with one context."""

    def __init__(self, model_path, mmproj_path, *, ctx_size=4096, n_threads=None,
                 gpu_layers=None, n_batch=2048, verbose=False, use_extra_bufts=False,
                 warmup=False, image_cache=0):
        LOG.verbose = verbose
        # the last `image_cache` pictures' encoder outputs, by image key (mtmd.image_keys,
        # "<picture id>/<ordinal>": one per chunk, and a picture can be many chunks, e.g.
        # Idefics3's slices), least recently used first: a picture asked about again skips
        # the vision encoder
        self.image_cache = image_cache
        self._encoded: OrderedDict[str, np.ndarray] = OrderedDict()
        self.image_cache_hits = 0       # encoder runs the cache saved, since loading
        model_path = check_gguf(model_path, "model")
        mmproj_path = check_gguf(mmproj_path, "mmproj")
        if gguf_file.field(model_path, "general.architecture") == "clip":
            raise InputError(f"{model_path} is a vision projector (mmproj), not a text model")
        if gguf_file.field(mmproj_path, "general.architecture") != "clip":
            raise InputError(f"{mmproj_path} is not a vision projector (mmproj) file")
        self.model_path, self.mmproj_path = model_path, mmproj_path
        # the family (lightkv_edge.families) and whether the tower has a class token: how
        # its image rows lie on their grid (families.row_cells)
        self.projector = gguf_file.field(mmproj_path, "clip.projector_type")
        self.class_token = gguf_file.has_tensor(mmproj_path, "v.class_embd")
        self.model = self.ctx = self.mctx = None
        n_threads = n_threads or os.cpu_count() or 1
        try:
            with interrupts.deferred():
                self._load(model_path, mmproj_path, ctx_size=ctx_size, n_threads=n_threads,
                           gpu_layers=gpu_layers, n_batch=n_batch,
                           use_extra_bufts=use_extra_bufts, warmup=warmup)
        except BaseException:
            self.close()
            raise

    def _load(self, model_path, mmproj_path, *, ctx_size, n_threads, gpu_layers, n_batch,
              use_extra_bufts, warmup):
        mp = llama_cpp.llama_model_default_params()
        if gpu_layers is not None:
            mp.n_gpu_layers = gpu_layers
        # Safe default: ggml's extra CPU buffer types (AMX, weight repacking) are off.
        # The pinned ggml's AMX path segfaulted on Q8_0 weights for any batch of more
        # than one token on an AMX CPU (docs/llama-cpp-notes.md); repacking only
        # speeds up some quant types on CPU. use_extra_bufts=True turns them back on.
        mp.use_extra_bufts = use_extra_bufts
        mp.progress_callback = _KEEP_LOADING
        LOG.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            if interrupts.requested():
                return                      # deferred() raises KeyboardInterrupt
            raise ModelError(f"llama.cpp could not load {model_path}: {LOG.first_error()}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self.model)

        cp = mtmd.context_params_default()
        cp.use_gpu = gpu_layers != 0
        cp.n_threads = n_threads
        cp.print_timings = False
        cp.warmup = warmup
        cp.progress_callback = _KEEP_LOADING_MTMD
        LOG.clear()
        self.mctx = mtmd.init_from_file(str(mmproj_path).encode(), self.model, cp)
        if not self.mctx:
            if interrupts.requested():
                return
            raise ModelError(f"cannot use the mmproj {mmproj_path} with {model_path.name}: "
                             f"{LOG.first_error()}")
        if not mtmd.support_vision(self.mctx):
            raise ModelError(f"{mmproj_path} has no vision encoder")
        self.use_mrope = bool(mtmd.decode_use_mrope(self.mctx))

        # llama.cpp rounds the context up to whole KV_CELL_PAD cells but cuts the batch
        # to the size asked for: ask for the rounded size, so that a small context still
        # takes batches of KV_CELL_PAD tokens (-c 16 means a 256-cell cache either way)
        ctx_size = min(ctx_size, max(llama_cpp.llama_model_n_ctx_train(self.model), 256))
        ctx_size = -(-ctx_size // KV_CELL_PAD) * KV_CELL_PAD
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = ctx_size
        cparams.n_batch = n_batch
        # non-causal image tokens (Gemma 3) must fit in one ubatch
        cparams.n_ubatch = n_batch
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not create a context: {LOG.last_error()}")
        # what the context really holds and takes per call (llama.cpp may adjust both)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.n_ubatch = llama_cpp.llama_n_ubatch(self.ctx)
        self.mem = llama_cpp.llama_get_memory(self.ctx)

    # -- text ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special=False, parse_special=False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max,
                                     add_special, parse_special)
        if n < 0:
            raise InputError("prompt could not be tokenized")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> bytes | None:
        t = llama_cpp.llama_model_chat_template(self.model, None)
        return t or None

    def apply_template(self, messages: list[tuple[str, str]], add_assistant: bool) -> str:
        arr = (llama_cpp.llama_chat_message * len(messages))()
        keep = []
        for i, (role, content) in enumerate(messages):
            r, c = role.encode(), content.encode("utf-8")
            keep += [r, c]
            arr[i].role, arr[i].content = r, c
        tmpl = self.chat_template()
        size = 4096 + sum(len(c) for _, c in messages) * 2
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), add_assistant,
                                                    buf, size)
            if n < 0:
                raise ModelError("the model's chat template is not supported by llama.cpp")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n + 1
        raise ModelError("chat template output too long")

    # -- vision -------------------------------------------------------------------------
    def encode(self, chunk, key: str | None = None) -> tuple[np.ndarray, float, bool]:
        """An image chunk's embeddings [n, n_embd] (the vision encoder's output, a copy
        the caller owns), the encoder's ms, and whether they came from the image cache
        (key: the chunk's mtmd.image_keys entry; None = do not cache)."""
        hit = self._encoded.get(key) if key is not None else None
        if hit is not None:
            self._encoded.move_to_end(key)
            self.image_cache_hits += 1
            return hit.copy(), 0.0, True
        t0 = time.perf_counter()
        if mtmd.encode_chunk(self.mctx, chunk) != 0:
            raise ModelError(f"the vision encoder failed: {LOG.last_error()}")
        n = mtmd.chunk_get_n_tokens(chunk)
        embd = np.ctypeslib.as_array(mtmd.get_output_embd(self.mctx),
                                     shape=(n, self.n_embd)).copy()
        t_ms = (time.perf_counter() - t0) * 1e3
        if key is not None and self.image_cache > 0:
            self._encoded[key] = embd.copy()
            self._trim_image_cache()
        return embd, t_ms, False

    def _trim_image_cache(self) -> None:
        """Drop the least recently used pictures, all their chunks at once, until at most
        `image_cache` pictures are left (the cache counts pictures, not chunks)."""
        def picture(key):
            return key.rsplit("/", 1)[0]
        recent = list(dict.fromkeys(picture(k) for k in reversed(self._encoded)))
        for old in recent[self.image_cache:]:
            for k in [k for k in self._encoded if picture(k) == old]:
                del self._encoded[k]

    def encoded_images(self) -> dict[str, np.ndarray]:
        """The image cache's entries (key -> embeddings), least recently used first."""
        return dict(self._encoded)

    def add_encoded_images(self, entries: dict[str, np.ndarray]) -> None:
        """Put encoder outputs made elsewhere (encoded_images of the same mmproj) into
        the image cache, e.g. one encoding shared by the runs of a benchmark."""
        for key, embd in entries.items():
            embd = np.asarray(embd, np.float32)
            if embd.ndim != 2 or embd.shape[1] != self.n_embd:
                raise InputError(f"cached image {key} has shape {embd.shape}, this model "
                                 f"takes rows of {self.n_embd}", param="image_cache")
            self._encoded[key] = embd.copy()
        self._trim_image_cache()

    # -- KV cache -----------------------------------------------------------------------
    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)

    def kv_bytes(self, seq_id: int = 0) -> int:
        """Bytes of KV cache the sequence holds (llama.cpp's own state-size count)."""
        return int(llama_cpp.llama_state_seq_get_size(self.ctx, seq_id))

    def close(self) -> None:
        if getattr(self, "mctx", None):
            mtmd.free(self.mctx)
            self.mctx = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
