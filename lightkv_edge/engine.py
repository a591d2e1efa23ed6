"""The chat engine: a conversation with images on llama.cpp, prefilled under a LightKV mode.

    chat = VisionChat()                                  # the embedded model
    for piece in chat.stream("What colour is the circle?", ["shapes.png"]):
        print(piece, end="")
    print(chat.last_stats)

One turn: the user's message (with a media marker per image) is rendered with the model's
own chat template, libmtmd splits it into text and image chunks, the chunks are prefilled
under the mode (below), then tokens are sampled and streamed until end-of-generation.
The KV cache keeps the whole conversation, so the images stay in context across turns.

A turn is all or nothing until its answer starts: a message that does not fit, an error,
or Ctrl-C during its prefill leaves the conversation and the KV cache as they were. Ctrl-C
while answering keeps the answer so far. One VisionChat serves one call at a time: calls
from other threads wait for the current one; a second stream from the thread that is still
consuming one is refused.

Modes:
- off:   libmtmd's own helpers evaluate every chunk, exactly as llama-mtmd-cli does.
- embed: each image's embeddings are merged (embed_mode.py) and only the kept rows are
         decoded, each at its destination's original position.
- layer: a turn with images is prefilled by liblightkv's driver (layer_mode.py): the
         rows run through the decoder up to each scheduled layer, the image rows are
         merged there, guided by that layer's attention, and the KV cache is compacted
         to the final rows.
On top of any mode, evict=KEEP frees the least attended vision cells after each turn's
prefill (and every decode_evict tokens while answering): evict.py. The engine then decodes
the turn's rows itself, so that the eviction learns their KV cells. evict_adaptive gives
each layer its own budget (cells hidden from the deeper layers, freed when no layer keeps
them).
"""
from __future__ import annotations

import ctypes
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from . import gguf_file, interrupts, mtmd
from .embed_mode import DEFAULT_METHOD, GUIDED_METHODS, METHODS, reduce_image
from .errors import ClosedError, InputError, LightKVError, ModelError
from .images import Image, as_image, resized
from .model import LOG, VisionModel, check_gguf, llama_cpp

MODES = ("off", "embed", "layer")


@dataclass
class Stats:
    mode: str
    keep: float
    vision_tokens_in: int = 0
    vision_tokens_kept: int = 0
    prompt_tokens: int = 0          # KV cells the prompt of this turn filled
    kv_cells: int = 0               # KV cells held after this turn's prefill
    kv_bytes: int = 0               # bytes of KV cache after this turn's prefill
    t_encode_ms: float = 0.0
    images_cached: int = 0          # image chunks whose encoder output came from the cache
    t_merge_ms: float = 0.0         # merge work: guidance, merges and (layer mode) KV compaction
    t_guidance_ms: float = 0.0      # of t_merge_ms: layer mode's guidance from the captured Q/K
    t_compact_ms: float = 0.0       # of t_merge_ms: layer mode's KV compaction
    t_prefill_ms: float = 0.0
    t_decode_ms: float = 0.0
    ttft_ms: float = 0.0            # from the call to the first answer token sampled and decoded
    n_decoded: int = 0
    decode_tps: float = 0.0
    stop: str = ""                  # why the answer ended: eog, max_tokens, context_full,
                                    # interrupted
    # layer mode: the stages as run and the cells freed (`keep` is then the layer-averaged
    # kept fraction as run, the paper's definition)
    stages: list = field(default_factory=list)
    cells_freed: int = 0
    # KV eviction (evict.py): this turn's vision cells and the KV bytes before and after
    # the eviction at the end of the prefill, and the cells freed while decoding
    evict_vision_before: int = 0
    evict_vision_after: int = 0
    evict_kv_bytes_before: int = 0
    evict_kv_bytes_after: int = 0
    evict_decode_freed: int = 0
    # the layer-adaptive eviction (evict_adaptive): this turn's vision cells kept alive but
    # hidden from the deeper layers (cells freed for real: before - after), and the layer
    # average of the visible fraction of this turn's vision cells (KEEP, as counted)
    evict_hidden: int = 0
    evict_visible_fraction: float = 1.0
    t_evict_ms: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        return d


@dataclass
class _Turn:
    role: str
    content: str
    images: list = field(default_factory=list)
    originals: list = field(default_factory=list)   # the images as given (show_merge)


class _EmbdBatch:
    """A llama_batch of embedding rows whose arrays live in numpy (no C allocation)."""

    def __init__(self, embd: np.ndarray, pos: np.ndarray, n_pos_per_embd: int):
        n = len(embd)
        self.embd = np.ascontiguousarray(embd, dtype=np.float32)
        self.pos = np.ascontiguousarray(pos, dtype=np.int32)   # section-major, as libmtmd
        assert self.pos.size == n * n_pos_per_embd
        self.n_seq = np.ones(n, dtype=np.int32)
        self.seq0 = np.zeros(1, dtype=np.int32)
        self.seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * n)(
            *[self.seq0.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))] * n)
        self.logits = np.zeros(n, dtype=np.int8)
        b = llama_cpp.llama_batch()
        b.n_tokens = n
        b.token = ctypes.cast(None, ctypes.POINTER(llama_cpp.llama_token))
        b.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        b.n_seq_id = self.n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = self.seq_ptrs
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.batch = b


class VisionChat:
    """A multi-turn conversation about images with one GGUF vision-language model."""

    def __init__(self, model: str | None = None, mmproj: str | None = None, *,
                 mode: str = "embed", keep: float = 0.55, windows: int | None = None,
                 ctx_size: int = 4096, n_threads: int | None = None,
                 gpu_layers: int | None = None, temp: float = 0.0, seed: int = 0,
                 max_tokens: int = 256, method: str = DEFAULT_METHOD, positions: str = "keep",
                 ignore_eos: bool = False, verbose: bool = False,
                 model_name: str | None = None, schedule: str | None = None,
                 kv: str = "compact", evict: float | None = None,
                 decode_evict: int | None = None, evict_layers=None,
                 evict_window: int | None = None, evict_adaptive: bool = False,
                 image_cache: int = 4):
        _check_settings(mode=mode, keep=keep, windows=windows, ctx_size=ctx_size,
                        n_threads=n_threads, gpu_layers=gpu_layers, temp=temp, seed=seed,
                        max_tokens=max_tokens, method=method, positions=positions,
                        image_cache=image_cache)
        if (model is None) != (mmproj is None):
            raise InputError("give both model and mmproj (or neither, for an "
                             "embedded model)", param="model")
        self.schedule = None
        if mode == "layer":
            from . import layer_mode
            if method not in layer_mode.METHODS:
                raise InputError(f"layer mode merges with {' or '.join(layer_mode.METHODS)}, "
                                 f"not {method!r}", param="method")
            try:
                layer_mode.check_policies(positions, kv)
            except ValueError as e:
                raise InputError(str(e), param="kv" if "KV policy" in str(e)
                                 else "positions") from None
            if schedule is not None:
                try:
                    self.schedule = layer_mode.parse_schedule(schedule)
                except ValueError as e:
                    raise InputError(str(e), param="schedule") from None
        elif schedule is not None:
            raise InputError("a schedule is for mode 'layer'", param="schedule")
        self.kv = kv
        from . import evict as _evict
        try:
            if evict is not None:
                _evict.check_keep(evict)
        except ValueError as e:
            raise InputError(str(e), param="evict") from None
        try:
            _evict.check_every(decode_evict)
        except ValueError as e:
            raise InputError(str(e), param="decode_evict") from None
        if decode_evict is not None and evict is None:
            raise InputError("decode_evict needs evict (the kept fraction)",
                             param="decode_evict")
        if not isinstance(evict_adaptive, bool):
            raise InputError(f"evict_adaptive must be True or False, got {evict_adaptive!r}",
                             param="evict_adaptive")
        if evict_adaptive:
            if evict is None:
                raise InputError("evict_adaptive needs evict (the kept fraction)",
                                 param="evict_adaptive")
            if decode_evict is not None or evict_layers is not None:
                raise InputError("evict_adaptive reads every layer after the prefill: it takes "
                                 "neither decode_evict nor evict_layers", param="evict_adaptive")
            if mode == "layer" and kv == "exact":
                raise InputError("evict_adaptive cannot restrict cells that kv 'exact' has "
                                 "restricted to layer ranges already", param="evict_adaptive")
        self._evictor = None
        self._window_q = None
        self._image_keys = {}       # this turn's image chunks -> image cache keys
        if model is not None and model_name is not None:
            raise InputError("give either model files or an embedded model_name, not both",
                             param="model_name")
        self.m = None
        self._sampler = self._layer0 = None
        self._lock = threading.Lock()   # one call at a time (see the module's docstring)
        self._owner = None              # the thread whose call holds the lock
        # the embedded model knows only its training image size: resize to it
        self.image_size = None
        if model is None:
            from .embedded import DEFAULT_MODEL, embedded_image_size, embedded_model
            model, mmproj = embedded_model(model_name or DEFAULT_MODEL)
            self.image_size = embedded_image_size(model_name or DEFAULT_MODEL)
        self.mode, self.keep, self.windows, self.method = mode, keep, windows, method
        self.positions = positions
        self.temp, self.seed, self.max_tokens = temp, seed, max_tokens
        self.ignore_eos = ignore_eos
        if mode != "off":
            # the family, before libmtmd reads the file: embed and layer cover known ones
            from . import families
            check_gguf(model, "model")     # in VisionModel's order: the same first error
            mm = check_gguf(mmproj, "mmproj")
            if gguf_file.field(mm, "general.architecture") == "clip":  # else VisionModel says
                families.check_mode(gguf_file.field(mm, "clip.projector_type"), mode, mm)
        self.m = VisionModel(model, mmproj, ctx_size=ctx_size, n_threads=n_threads,
                             image_cache=image_cache,
                             gpu_layers=gpu_layers, verbose=verbose)
        self.marker = mtmd.default_marker().decode()
        if mode == "layer":
            from . import layer_mode
            try:    # the architecture and the depth, checked before any compute
                self._layer_runner = layer_mode.LayerRunner(
                    self.m.model, self.m.ctx, n_batch=self.m.n_batch,
                    use_mrope=self.m.use_mrope)
                if self.schedule is not None:
                    layer_mode.check_schedule(self.schedule, self._layer_runner.n_layer)
            except ValueError as e:
                self.close()
                raise InputError(f"layer mode: {e}", param="schedule" if self.schedule
                                 else "mode") from None
        if mode in ("embed", "layer") and positions == "keep" and not self.m.use_mrope:
            # merged rows keep their original positions: the sequence jumps forward over
            # the merged-away ones, which our patch 0001 lets llama.cpp accept
            _set_position_gaps(self.m.ctx, True)
        if evict is not None:
            try:    # the architecture, layers and window, checked before any compute
                self._evictor = _evict.Evictor(
                    self.m.model, self.m.ctx, keep=evict, layers=evict_layers,
                    window=evict_window, decode_every=decode_evict,
                    adaptive=evict_adaptive)
            except ValueError as e:
                self.close()
                raise InputError(str(e), param="evict") from None
        self._eog_tokens = None
        # the merge's ggml graphs are small: they run with the LLM's thread count, so an
        # oversubscribed machine does not make their thread barriers spin
        from . import native
        native.set_num_threads(n_threads or 0)
        self._layer0 = None       # the first layer's Q/K, for the prompt's guidance
        if mode == "embed" and method in GUIDED_METHODS:
            try:
                self._layer0 = native.GuidanceModel(self.m.model_path)
            except ValueError as e:
                self.close()
                raise ModelError(f"embed mode cannot guide with this model: {e} "
                                 "(use mode off)", param="mode") from None
        self._forget()

    # -- one call at a time ---------------------------------------------------------------
    @contextmanager
    def _exclusive(self):
        if self._owner == threading.get_ident():
            raise InputError("this VisionChat is still streaming an answer: finish or "
                             "close that stream first")
        with self._lock:
            if self.m is None:
                raise ClosedError("this VisionChat is closed")
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    # -- conversation state ---------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (and its KV cache)."""
        with self._exclusive():
            self._forget()

    def _forget(self) -> None:
        self.history: list[_Turn] = []
        self.last_stats: Stats | None = None
        # (image as given, embed_mode.MergedImage) of the last turn's images (show_merge)
        self.last_merges: list = []
        self._merges: list = []
        self._clear_kv()

    def _clear_kv(self) -> None:
        """Empty the KV cache; the next turn prefills the whole history again."""
        self.m.clear()
        self.n_past = 0           # next position (M-RoPE images advance it by their extent)
        self.n_cells = 0          # KV cells in use
        self.rendered = ""        # the conversation text the KV cache holds
        if self._evictor:
            self._evictor.clear()

    def close(self) -> None:
        """Free the model; later calls raise ClosedError. Closing twice is harmless."""
        if self.m is None:
            return
        with self._exclusive():
            self._layer0 = None       # the guidance model's weights and open file
            if self._sampler:
                llama_cpp.llama_sampler_free(self._sampler)
                self._sampler = None
            self.m.close()
            self.m = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def show_merge(self, path) -> list:
        """Write the picture of the last turn's merge (lightkv_edge.merge_picture: each image
        at its own size, merge groups, kept rows, windows, guidance) to `path`; with several
        images the k-th after the first goes to path's name + '-k' (e.g. out-2.png).
        Returns the paths written. InputError if there is nothing to show (mode off, keep 1,
        no image in the last turn) or the path is not writable."""
        from .merge_picture import check_output_path, write_merge_picture
        p = check_output_path(path)
        if not self.last_merges:
            raise InputError("no merge to show: the last turn had no image merged in embed "
                             "mode (mode off, layer, or keep 1)", param="show_merge")
        written = []
        for k, (im, merged) in enumerate(self.last_merges, 1):
            out = p if k == 1 else p.with_name(f"{p.stem}-{k}{p.suffix}")
            rgb = np.frombuffer(im.rgb, np.uint8).reshape(im.height, im.width, 3)
            written.append(write_merge_picture(out, rgb, merged))
        return written

    # -- one turn -------------------------------------------------------------------------
    def ask(self, prompt: str, images=(), **kw) -> str:
        """Answer one message; returns the whole answer (see stream() for pieces)."""
        return "".join(self.stream(prompt, images, **kw))

    def stream(self, prompt: str, images=(), *, max_tokens: int | None = None):
        """Yield the answer piece by piece. `images`: file paths, lightkv_edge.images.Image
        or PIL images (one path alone is taken as a list of one).
        Markers: the prompt may place images itself with the media marker
        (lightkv_edge.mtmd default "<__media__>"); otherwise they go before the text.
        Everything is checked here, before the first piece is asked for."""
        if self.m is None:
            raise ClosedError("this VisionChat is closed")
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a str, got {type(prompt).__name__}",
                             param="prompt")
        if not prompt.strip():
            raise InputError("empty prompt", param="prompt")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:   # lone surrogates: undecodable bytes from argv
            raise InputError(f"the prompt is not valid UTF-8 text (at character "
                             f"{e.start})", param="prompt") from None
        if max_tokens is None:
            max_tokens = self.max_tokens
        _check_settings(max_tokens=max_tokens)
        if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
            images = [images]
        originals = imgs = [as_image(im) for im in images]
        if self.image_size:
            imgs = [resized(im, self.image_size) for im in imgs]
        n_markers = prompt.count(self.marker)
        if n_markers == 0 and imgs:
            # as llama-mtmd-cli does: the markers go right before the text
            content = "".join(self.marker for _ in imgs) + prompt
        elif n_markers == len(imgs):
            content = prompt
        else:
            raise InputError(f"the prompt has {n_markers} image markers for {len(imgs)} "
                             "images", param="prompt")
        turn = _Turn("user", content, imgs, originals)
        text_for_guidance = prompt.replace(self.marker, " ")
        return self._stream(turn, text_for_guidance, max_tokens)

    def _stream(self, turn: _Turn, guidance_text: str, max_tokens: int):
        with self._exclusive():
            yield from self._run_turn(turn, guidance_text, max_tokens)

    def _render(self, turns: list[_Turn], add_assistant: bool) -> str:
        return self.m.apply_template([(t.role, t.content) for t in turns], add_assistant)

    def _run_turn(self, turn: _Turn, guidance_text: str, max_tokens: int):
        t_turn = time.perf_counter()
        full = self._render(self.history + [turn], add_assistant=True)
        before = (self.n_past, self.n_cells, self.rendered)
        if not full.startswith(self.rendered):
            # the template rewrote earlier turns: start over from the whole conversation
            self._clear_kv()
        cells_start = self.n_cells
        delta = full[len(self.rendered):]
        images = [im for t in (self.history + [turn]) for im in t.images] \
            if not self.rendered else list(turn.images)
        stats = Stats(self.mode, self.keep if self.mode != "off" else 1.0)
        self._merges = []
        try:
            chunks = self._tokenize(delta, images)
            try:
                # Ctrl-C waits for the native step under way, then undoes the turn
                with interrupts.deferred():
                    self._check_fits(chunks)
                    self._prefill(chunks, guidance_text, stats)
            finally:
                mtmd.chunks_free(chunks)
        except BaseException:
            self._undo_prefill(*before)
            raise
        stats.prompt_tokens = self.n_cells - cells_start
        stats.kv_cells = self.n_cells
        stats.kv_bytes = self.m.kv_bytes()
        self.history.append(turn)
        self.rendered = full
        self.last_stats = stats
        # the image chunks come in order: the last turn's images are the last merges
        k = len(turn.originals)
        self.last_merges = list(zip(turn.originals, self._merges[len(self._merges) - k:])) \
            if k and len(self._merges) >= k else []

        answer = bytearray()
        self._eog_piece = ""
        emitted = 0
        t0 = time.perf_counter()
        stats.stop = "interrupted"    # unless _generate says otherwise
        try:
            for _ in self._generate(max_tokens, stats, answer):
                if not stats.ttft_ms:
                    stats.ttft_ms = (time.perf_counter() - t_turn) * 1e3
                # hold back a split character; drop the tokenizer's leading space
                text = answer.decode("utf-8", "ignore").lstrip()
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
        finally:
            stats.t_decode_ms = (time.perf_counter() - t0) * 1e3
            stats.decode_tps = stats.n_decoded / max(stats.t_decode_ms / 1e3, 1e-9)
            text = answer.decode("utf-8", "replace").lstrip()
            self.history.append(_Turn("assistant", text))
            # what the KV cache now holds: the prompt, the answer, and the end token
            self.rendered = full + text + self._eog_piece

    # -- tokenizing and checking --------------------------------------------------------
    def _tokenize(self, text: str, images: list[Image]):
        bitmaps = [mtmd.bitmap_init(im.width, im.height, im.rgb) for im in images]
        for b, im in zip(bitmaps, images):      # the image cache's key (mtmd.image_keys)
            mtmd.bitmap_set_id(b, im.digest.encode())
        chunks = mtmd.chunks_init()
        try:
            data = text.encode("utf-8")
            it = mtmd.input_text(data, len(data), self.n_past == 0, True)
            arr = (ctypes.c_void_p * max(len(bitmaps), 1))(*bitmaps)
            rc = mtmd.tokenize(self.m.mctx, chunks, ctypes.byref(it), arr, len(bitmaps))
        finally:
            for b in bitmaps:
                mtmd.bitmap_free(b)
        if rc != 0:
            mtmd.chunks_free(chunks)
            why = {1: "the number of images does not match the image markers",
                   2: "an image could not be preprocessed"}.get(rc, LOG.last_error())
            raise InputError(f"cannot prepare the prompt: {why}")
        return chunks

    def _chunks(self, chunks):
        for i in range(mtmd.chunks_size(chunks)):
            yield mtmd.chunks_get(chunks, i)

    def _check_fits(self, chunks) -> None:
        """The prompt ends with text (the logits to sample from) and, with at least one
        answer token, fits in the context; an image that must be decoded in one batch
        (non-causal attention) fits in one."""
        chunk_list = list(self._chunks(chunks))
        if not chunk_list or mtmd.chunk_get_type(chunk_list[-1]) != mtmd.CHUNK_TEXT:
            raise InputError("the prompt must end with text after the last image",
                             param="prompt")
        # embed keeps ceil(keep * n); layer mode holds every row until its first merge;
        # layer mode's exact policy keeps each range's rows in their own cells: at most
        # every row once per range of layers (stages + 1; the default has 3 stages)
        keep = self.keep if self.mode == "embed" else 1.0
        copies = 1
        if self.mode == "layer" and self.kv == "exact" and any(
                mtmd.chunk_get_type(c) == mtmd.CHUNK_IMAGE for c in chunk_list):
            copies = (len(self.schedule) if self.schedule else 3) + 1
        need = 0
        for c in chunk_list:
            n = mtmd.chunk_get_n_tokens(c)
            if mtmd.chunk_get_type(c) != mtmd.CHUNK_TEXT:
                n = math.ceil(keep * n)
                if mtmd.decode_use_non_causal(self.m.mctx, c) and n > self.m.n_ubatch:
                    raise InputError(
                        f"an image of {n} tokens attends to itself both ways and must be "
                        f"decoded in one batch, but this context takes {self.m.n_ubatch} "
                        "(raise ctx_size); the conversation is unchanged", param="ctx_size")
            need += n
            if self._evictor and mtmd.chunk_get_type(c) != mtmd.CHUNK_TEXT and \
                    mtmd.decode_use_non_causal(self.m.mctx, c):
                raise InputError("KV eviction needs causal image attention (this model's "
                                 "images attend both ways); nothing was evicted",
                                 param="evict")
        need *= copies
        if self.n_cells + need + 1 > self.m.n_ctx:
            raise InputError(f"this message needs {need} tokens but only "
                             f"{self.m.n_ctx - self.n_cells} of the context's {self.m.n_ctx} "
                             "are free (raise ctx_size, shorten the message, or reset); "
                             "the conversation is unchanged", param="ctx_size")

    def _undo_prefill(self, n_past: int, n_cells: int, rendered: str) -> None:
        """Return the KV cache to where a turn began, after its prefill failed or was
        interrupted; the turn never reached the history."""
        if self.rendered != rendered:
            # the turn had started over from the whole conversation: the old cache is
            # gone, and the next turn prefills the history again
            self._clear_kv()
        elif not llama_cpp.llama_memory_seq_rm(self.m.mem, 0, n_past, -1):
            self._clear_kv()
        else:
            self.n_past, self.n_cells = n_past, n_cells
            if self._evictor:
                self._evictor.observe(False)
                self._evictor.log.drop_from(n_past)

    # -- prefill --------------------------------------------------------------------------
    def _prefill(self, chunks, guidance_text: str, stats: Stats) -> None:
        chunk_list = list(self._chunks(chunks))
        # valid while the chunks live: a later chunk may take a freed one's address
        self._image_keys = mtmd.image_keys(chunk_list)
        hits = self.m.image_cache_hits
        try:
            self._prefill_chunks(chunk_list, guidance_text, stats)
        finally:
            self._image_keys = {}
            stats.images_cached += self.m.image_cache_hits - hits

    def _prefill_chunks(self, chunk_list, guidance_text: str, stats: Stats) -> None:
        has_image = any(mtmd.chunk_get_type(c) == mtmd.CHUNK_IMAGE for c in chunk_list)
        ev = self._evictor
        images_before = ev.n_images if ev else 0
        if self.mode == "layer" and has_image:
            self._prefill_layer_mode(chunk_list, stats)
            if ev:
                self._evict_after_prefill(stats, images=range(images_before, ev.n_images))
            return
        text_ids = None
        for i, chunk in enumerate(chunk_list):
            last = i == len(chunk_list) - 1
            kind = mtmd.chunk_get_type(chunk)
            if kind == mtmd.CHUNK_TEXT:
                if ev is None:
                    self._eval_stock(chunk, last, stats)
                else:
                    # the text after the turn's last image is the observation window
                    window = last and has_image
                    ev.observe(window)
                    try:
                        self._eval_text_tracked(chunk, last, stats)
                        if window:
                            self._window_q = ev.take_queries()
                    finally:
                        if window:
                            ev.observe(False)
            elif kind == mtmd.CHUNK_IMAGE:
                if (self.mode == "off" or self.keep >= 1.0) and ev is None:
                    self._eval_image_stock(chunk, stats)
                elif self.mode == "off" or self.keep >= 1.0:
                    self._eval_image_logged(chunk, stats)
                else:
                    if text_ids is None:
                        text_ids = np.asarray(self.m.tokenize(guidance_text), np.int32)
                    self._eval_image_merged(chunk, text_ids, stats)
            else:
                raise InputError("audio input is not supported")
        if ev and has_image:
            self._evict_after_prefill(stats, images=range(images_before, ev.n_images))

    def _evict_after_prefill(self, stats: Stats, images) -> None:
        """Score this turn's images with its window and free what the budget leaves out."""
        ev = self._evictor
        t0 = time.perf_counter()
        images = list(images)
        q = self._window_q      # the captured queries (on the lightkv backend)
        self._window_q = None
        w = q.rows if ev.window is None else min(ev.window, q.rows)
        # the window: the turn's last w rows (text: one position a row)
        q_pos = np.arange(self.n_past - w, self.n_past, dtype=np.int32)
        stats.evict_vision_before = ev.vision_cells(images)
        stats.evict_kv_bytes_before = self.m.kv_bytes()
        freed = ev.evict(q, q_pos, images)
        self.n_cells -= freed
        stats.evict_vision_after = ev.vision_cells(images)
        stats.evict_hidden = ev.hidden_cells(images)
        stats.evict_visible_fraction = ev.visible_fraction(stats.evict_vision_before, images)
        stats.evict_kv_bytes_after = self.m.kv_bytes()
        stats.t_evict_ms += (time.perf_counter() - t0) * 1e3

    def _eval_text_tracked(self, chunk, logits_last: bool, stats: Stats) -> None:
        """The text chunk as mtmd_helper_eval_chunk_single decodes it (batches of n_batch
        tokens, logits for the last one), with each batch's cells logged for eviction."""
        cnt = ctypes.c_size_t()
        p = mtmd.chunk_get_tokens_text(chunk, ctypes.byref(cnt))
        toks = [p[i] for i in range(cnt.value)]
        t0 = time.perf_counter()
        nb = self.m.n_batch
        for s in range(0, len(toks), nb):
            e = min(s + nb, len(toks))
            b = llama_cpp.llama_batch_init(e - s, 0, 1)
            try:
                b.n_tokens = e - s
                for i in range(e - s):
                    b.token[i], b.pos[i] = toks[s + i], self.n_past + s + i
                    b.n_seq_id[i], b.seq_id[i][0] = 1, 0
                    b.logits[i] = logits_last and s + i == len(toks) - 1
                if llama_cpp.llama_decode(self.m.ctx, b) != 0:
                    raise ModelError(f"llama.cpp failed to evaluate the prompt: "
                                     f"{LOG.last_error()}")
            finally:
                llama_cpp.llama_batch_free(b)
            self._evictor.record(e - s, self.n_past + np.arange(s, e))
        stats.t_prefill_ms += (time.perf_counter() - t0) * 1e3
        self.n_cells += len(toks)
        self.n_past += len(toks)

    def _prefill_layer_mode(self, chunk_list, stats: Stats) -> None:
        """The whole turn through layer_mode: merges between decoder layers, KV compacted."""
        from . import layer_mode
        n_layer = self._layer_runner.n_layer
        ev = self._evictor
        try:
            stages = self.schedule
            if stages is None:
                # the grids the windows are cut on: a normal-RoPE chunk has none from
                # libmtmd, its rows are squared (window_grid), so its windows are clipped
                # like a grid's (a 4 x 4 chunk's 4 windows a side would merge nothing)
                sides = [min(layer_mode.window_grid(mtmd.chunk_get_n_tokens(c),
                                                    mtmd.image_grid(c, self.m.use_mrope)))
                         for c in chunk_list if mtmd.chunk_get_type(c) == mtmd.CHUNK_IMAGE]
                stages = layer_mode.default_schedule(
                    n_layer, self.keep, grid=(min(sides), min(sides)) if sides else None)
            t0 = time.perf_counter()
            res, n_past, t_enc = layer_mode.prefill_chunks(
                self.m, chunk_list, stages, n_past=self.n_past, positions=self.positions,
                kv=self.kv, runner=self._layer_runner,
                observe_q=ev.layers if ev else (),
                protect=layer_mode.METHODS[self.method])
        except ValueError as e:
            raise InputError(f"layer mode: {e}",
                             param="schedule" if self.schedule else "keep") from None
        finally:
            if ev:     # layer mode ends with the stock range: record the cells again
                ev.arm()
        t_total = (time.perf_counter() - t0) * 1e3
        stats.t_encode_ms += t_enc
        stats.t_merge_ms += res.t_guidance_ms + res.t_merge_ms + res.t_compact_ms
        stats.t_guidance_ms += res.t_guidance_ms
        stats.t_compact_ms += res.t_compact_ms
        stats.t_prefill_ms += t_total - t_enc - (res.t_guidance_ms + res.t_merge_ms
                                                  + res.t_compact_ms)
        stats.vision_tokens_in += res.vision_in
        stats.vision_tokens_kept += res.vision_out
        stats.stages = [dict(st) for st in res.stages]
        stats.keep = res.keep_fraction
        stats.cells_freed = res.cells_freed
        self.n_cells += sum(len(cells) for _, _, cells in res.layer_cells)
        self.n_past = n_past
        if ev:      # log the final cells: the eviction scores them
            row, j = 0, 0
            for c in chunk_list:
                if mtmd.chunk_get_type(c) == mtmd.CHUNK_IMAGE:
                    n, image = len(res.kept[j]), ev.new_image()
                    j += 1
                else:
                    n, image = mtmd.chunk_get_n_tokens(c), -1
                ev.add_cells(res.cells[row:row + n], res.positions[0, row:row + n], image)
                row += n
            self._window_q = res.window_q

    def _eval_stock(self, chunk, logits_last: bool, stats: Stats) -> None:
        new_n_past = ctypes.c_int32(self.n_past)  # the helper adds to it for text
        t0 = time.perf_counter()
        rc = mtmd.helper_eval_chunk_single(self.m.mctx, self.m.ctx, chunk, self.n_past, 0,
                                           self.m.n_batch, logits_last,
                                           ctypes.byref(new_n_past))
        stats.t_prefill_ms += (time.perf_counter() - t0) * 1e3
        if rc != 0:
            raise ModelError(f"llama.cpp failed to evaluate the prompt: {LOG.last_error()}")
        self.n_cells += mtmd.chunk_get_n_tokens(chunk)
        self.n_past = new_n_past.value

    def _encode(self, chunk, stats: Stats) -> np.ndarray:
        embd, t_ms, _ = self.m.encode(chunk, self._image_keys.get(chunk))
        stats.t_encode_ms += t_ms
        stats.vision_tokens_in += len(embd)
        return embd

    def _eval_image_stock(self, chunk, stats: Stats) -> None:
        """Exactly mtmd_helper_eval_chunk_single's image path (encode, then the helper's
        decode of those embeddings), split only to time the encoder separately."""
        embd = self._encode(chunk, stats)
        stats.vision_tokens_kept += len(embd)
        new_n_past = ctypes.c_int32(self.n_past)  # the helper adds to it for text
        t0 = time.perf_counter()
        rc = _helper_decode_image_chunk(
            self.m.mctx, self.m.ctx, chunk, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            self.n_past, 0, self.m.n_batch, ctypes.byref(new_n_past), None, None)
        stats.t_prefill_ms += (time.perf_counter() - t0) * 1e3
        if rc != 0:
            raise ModelError(f"llama.cpp failed to decode the image: {LOG.last_error()}")
        self.n_cells += len(embd)
        self.n_past = new_n_past.value

    def _eval_image_logged(self, chunk, stats: Stats) -> None:
        """Every row of the image, as libmtmd's helper decodes them, but by us, so that
        the eviction learns their cells."""
        embd = self._encode(chunk, stats)
        stats.vision_tokens_kept += len(embd)
        pos = mtmd.image_positions(chunk, self.n_past, self.m.use_mrope)
        self._decode_image_rows(chunk, embd, pos, mtmd.chunk_get_n_pos(chunk), stats)

    def _eval_image_merged(self, chunk, text_ids: np.ndarray, stats: Stats) -> None:
        embd = self._encode(chunk, stats)
        all_pos = mtmd.image_positions(chunk, self.n_past, self.m.use_mrope)
        # for normal-RoPE models libmtmd keeps no layout (grid None): the merge squares the
        # rows (published behaviour), where LLaVA's are no raster (families.row_cells)
        from .families import row_cells
        grid = mtmd.image_grid(chunk, self.m.use_mrope)
        merged = reduce_image(embd, grid, text_ids, keep=self.keep, windows=self.windows,
                              method=self.method, layer=self._layer0, seed=self.seed,
                              cells=None if grid else row_cells(self.m.projector, len(embd),
                                                                self.m.class_token))
        stats.t_merge_ms += merged.t_merge_ms
        stats.vision_tokens_kept += len(merged.kept)
        self._merges.append(merged)
        if self.positions == "keep":
            # each kept row sits at its destination's original position ((t, h, w) for
            # M-RoPE); the image still spans its original extent
            pos = all_pos[:, merged.kept]
            extent = mtmd.chunk_get_n_pos(chunk)
        else:
            # the published code's choice: renumber the kept rows contiguously
            m_kept = len(merged.kept)
            if self.m.use_mrope:
                pos = np.repeat((self.n_past + np.arange(m_kept, dtype=np.int32))[None], 4, 0)
                pos[3] = 0
            else:
                pos = (self.n_past + np.arange(m_kept, dtype=np.int32))[None, :]
            extent = m_kept
        self._decode_image_rows(chunk, merged.embd, pos, extent, stats)

    def _decode_image_rows(self, chunk, embd: np.ndarray, pos: np.ndarray, extent: int,
                           stats: Stats) -> None:
        """Decode image rows (embeddings) at pos [n_pos, n] in batches of n_batch, as
        libmtmd's helper does; the image then spans `extent` positions."""
        non_causal = bool(mtmd.decode_use_non_causal(self.m.mctx, chunk))
        ev = self._evictor
        image = ev.new_image() if ev else -1
        t0 = time.perf_counter()
        if non_causal:
            llama_cpp.llama_set_causal_attn(self.m.ctx, False)
        try:
            nb = self.m.n_batch
            for s in range(0, len(embd), nb):
                e = min(s + nb, len(embd))
                batch = _EmbdBatch(embd[s:e], pos[:, s:e].reshape(-1), pos.shape[0])
                if llama_cpp.llama_decode(self.m.ctx, batch.batch) != 0:
                    raise ModelError(f"llama.cpp failed to decode the image: "
                                     f"{LOG.last_error()}")
                if ev:
                    ev.record(e - s, pos[0, s:e], image)
        finally:
            if non_causal:
                llama_cpp.llama_set_causal_attn(self.m.ctx, True)
        stats.t_prefill_ms += (time.perf_counter() - t0) * 1e3
        self.n_cells += len(embd)
        self.n_past += extent

    # -- decoding -------------------------------------------------------------------------
    def _make_sampler(self):
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if self.ignore_eos:  # llama.cpp's --ignore-eos: end-of-generation tokens get -inf
            n_vocab = llama_cpp.llama_vocab_n_tokens(self.m.vocab)
            if self._eog_tokens is None:   # a scan of the vocabulary: once per chat
                self._eog_tokens = [t for t in range(n_vocab) if self.m.is_eog(t)]
            eog = self._eog_tokens
            bias = (llama_cpp.llama_logit_bias * len(eog))(
                *[llama_cpp.llama_logit_bias(t, float("-inf")) for t in eog])
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(eog), bias))
        if self.temp <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(self.temp))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(self.seed))
        self._sampler = chain
        return chain

    def _generate(self, max_tokens: int, stats: Stats, answer: bytearray):
        """Sample, decode and append to `answer` one token at a time; yields after each.
        A token's decode and its bookkeeping happen together or not at all (Ctrl-C is
        held until both are done), so the KV cache, the positions and the answer text
        always agree."""
        sampler = self._make_sampler()
        self._eog_piece = ""
        ev = self._evictor
        if ev:
            ev.start_decoding()
            try:
                yield from self._generate_tokens(sampler, max_tokens, stats, answer, ev)
            finally:
                ev.stop_decoding()
        else:
            yield from self._generate_tokens(sampler, max_tokens, stats, answer, None)

    def _generate_tokens(self, sampler, max_tokens: int, stats: Stats, answer: bytearray, ev):
        token_arr = (llama_cpp.llama_token * 1)()
        pos = np.zeros(1, dtype=np.int32)
        for _ in range(max_tokens):
            with interrupts.deferred():
                # the token goes into the KV cache even when it ends the turn, so the
                # cache holds the conversation exactly as the template renders it
                if self.n_cells + 1 > self.m.n_ctx:
                    stats.stop = "context_full"
                    return
                token = llama_cpp.llama_sampler_sample(sampler, self.m.ctx, -1)
                token_arr[0] = token
                batch = llama_cpp.llama_batch_get_one(token_arr, 1)
                pos[0] = self.n_past
                batch.pos = pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
                if llama_cpp.llama_decode(self.m.ctx, batch) != 0:
                    raise ModelError(f"llama.cpp failed to decode: {LOG.last_error()}")
                self.n_past += 1
                self.n_cells += 1
                if ev:
                    # LightVLM's decoding stage: every N tokens, re-score and evict
                    freed = ev.decoded(self.n_past - 1)
                    self.n_cells -= freed
                    stats.evict_decode_freed += freed
                if self.m.is_eog(token):
                    self._eog_piece = self.m.piece(token).decode("utf-8", "replace")
                    stats.stop = "eog"
                    return
                answer += self.m.piece(token)
                stats.n_decoded += 1
            yield token
        stats.stop = "max_tokens"


def _check_settings(**given) -> None:
    """Validate VisionChat's settings (those given), naming the parameter at fault."""
    def fail(name, why):
        raise InputError(f"{name} {why}, got {given[name]!r}", param=name)

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and \
            not isinstance(v, bool) and math.isfinite(v)

    for name, v in given.items():
        if name == "mode" and v not in MODES:
            fail(name, f"must be one of {', '.join(MODES)}")
        if name == "keep" and not (is_real(v) and 0.0 < v <= 1.0):
            fail(name, "must be a number in (0, 1]")
        if name == "temp" and not (is_real(v) and v >= 0.0):
            fail(name, "must be a finite number >= 0")
        if name in ("max_tokens", "ctx_size") and not (is_int(v) and v >= 1):
            fail(name, "must be an integer >= 1")
        if name in ("windows", "n_threads") and v is not None and not (is_int(v) and v >= 1):
            fail(name, "must be None or an integer >= 1")
        if name == "gpu_layers" and v is not None and not (is_int(v) and v >= -1):
            fail(name, "must be None, -1 (all) or an integer >= 0")
        if name == "image_cache" and not (is_int(v) and v >= 0):
            fail(name, "must be an integer >= 0 (0: no cache)")
        if name == "seed" and not (is_int(v) and 0 <= v < 2**32):
            fail(name, "must be an integer in [0, 2**32)")
        if name == "method" and v not in METHODS:
            fail(name, f"must be one of {', '.join(METHODS)}")
        if name == "positions" and v not in ("keep", "renumber"):
            fail(name, "must be 'keep' or 'renumber'")


_set_position_gaps = llama_cpp.llama_cpp._lib.llama_set_position_gaps   # patch 0001
_set_position_gaps.argtypes = [ctypes.c_void_p, ctypes.c_bool]
_set_position_gaps.restype = None

_helper_decode_image_chunk = mtmd._fn(
    "mtmd_helper_decode_image_chunk", ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_int32,
    ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_void_p, ctypes.c_void_p)

__all__ = ["VisionChat", "Stats", "LightKVError"]
