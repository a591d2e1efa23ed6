"""The chat engine: a conversation with images on llama.cpp, prefilled under a LightKV mode.

    chat = VisionChat()                                  # the embedded model
    for piece in chat.stream("What colour is the circle?", ["shapes.png"]):
        print(piece, end="")
    print(chat.last_stats)

One turn: the user's message (with a media marker per image) is rendered with the model's
own chat template, libmtmd splits it into text and image chunks, the chunks are prefilled
under the mode (below), then tokens are sampled and streamed until end-of-generation.
The KV cache keeps the whole conversation, so the images stay in context across turns.

Modes:
- off:   libmtmd's own helpers evaluate every chunk, exactly as llama-mtmd-cli does.
- embed: each image's embeddings are merged (embed_mode.py) and only the kept rows are
         decoded, each at its destination's original position.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import mtmd
from .embed_mode import GUIDED_METHODS, METHODS, reduce_image
from .errors import InputError, LightKVError, ModelError
from .images import Image, load_image, resized
from .model import LOG, VisionModel, llama_cpp

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
    t_merge_ms: float = 0.0
    t_prefill_ms: float = 0.0
    t_decode_ms: float = 0.0
    n_decoded: int = 0
    decode_tps: float = 0.0

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
                 max_tokens: int = 256, method: str = "lightkv", positions: str = "keep",
                 ignore_eos: bool = False, verbose: bool = False):
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        if mode == "layer":
            raise InputError("--mode layer is not available in this build yet "
                             "(use off or embed)")
        if not (0.0 < keep <= 1.0):
            raise InputError(f"--keep must be in (0, 1], got {keep}")
        if method not in METHODS:
            raise InputError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
        if positions not in ("keep", "renumber"):
            raise InputError(f"positions must be 'keep' or 'renumber', got {positions!r}")
        if windows is not None and windows < 1:
            raise InputError(f"--windows must be >= 1, got {windows}")
        if (model is None) != (mmproj is None):
            raise InputError("give both --model and --mmproj (or neither, for the "
                             "embedded model)")
        # the embedded model knows only its training image size: resize to it
        self.image_size = None
        if model is None:
            from .embedded import embedded_image_size, embedded_model
            model, mmproj = embedded_model()
            self.image_size = embedded_image_size()
        self.mode, self.keep, self.windows, self.method = mode, keep, windows, method
        self.positions = positions
        self.temp, self.seed, self.max_tokens = temp, seed, max_tokens
        self.ignore_eos = ignore_eos
        self.m = VisionModel(model, mmproj, ctx_size=ctx_size, n_threads=n_threads,
                             gpu_layers=gpu_layers, verbose=verbose)
        self.marker = mtmd.default_marker().decode()
        if mode == "embed" and positions == "keep" and not self.m.use_mrope:
            # merged rows keep their original positions: the sequence jumps forward over
            # the merged-away ones, which our patch 0001 lets llama.cpp accept
            _set_position_gaps(self.m.ctx, True)
        self._sampler = None
        self._eog_tokens = None
        # the merge's ggml graphs are small: they run with the LLM's thread count, so an
        # oversubscribed machine does not make their thread barriers spin
        from . import native
        native.set_num_threads(n_threads or 0)
        self._layer0 = None       # the first layer's Q/K, for the prompt's guidance
        if mode == "embed" and method in GUIDED_METHODS:
            from .embed_mode import FirstLayerQK
            try:
                self._layer0 = FirstLayerQK(self.m.model_path)
            except ValueError as e:
                self.close()
                raise ModelError(f"embed mode cannot guide with this model: {e} "
                                 "(use --mode off)") from None
        self.reset()

    # -- conversation state ---------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (and its KV cache)."""
        self.m.clear()
        self.history: list[_Turn] = []
        self.n_past = 0           # next position (M-RoPE images advance it by their extent)
        self.n_cells = 0          # KV cells in use
        self.rendered = ""        # the conversation text the KV cache holds
        self.last_stats: Stats | None = None

    def close(self) -> None:
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
        self.m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one turn -------------------------------------------------------------------------
    def ask(self, prompt: str, images=(), **kw) -> str:
        """Answer one message; returns the whole answer (see stream() for pieces)."""
        return "".join(self.stream(prompt, images, **kw))

    def stream(self, prompt: str, images=(), *, max_tokens: int | None = None):
        """Yield the answer piece by piece. `images`: paths or lightkv_edge.images.Image.
        Markers: the prompt may place images itself with the media marker
        (lightkv_edge.mtmd default "<__media__>"); otherwise they go before the text."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("empty prompt")
        imgs = [im if isinstance(im, Image) else load_image(im) for im in images]
        if self.image_size:
            imgs = [resized(im, self.image_size) for im in imgs]
        n_markers = prompt.count(self.marker)
        if n_markers == 0 and imgs:
            # as llama-mtmd-cli does: the markers go right before the text
            content = "".join(self.marker for _ in imgs) + prompt
        elif n_markers == len(imgs):
            content = prompt
        else:
            raise InputError(f"the prompt has {n_markers} image markers for {len(imgs)} images")
        turn = _Turn("user", content, imgs)
        text_for_guidance = prompt.replace(self.marker, " ")
        yield from self._run_turn(turn, text_for_guidance, max_tokens or self.max_tokens)

    def _render(self, turns: list[_Turn], add_assistant: bool) -> str:
        return self.m.apply_template([(t.role, t.content) for t in turns], add_assistant)

    def _run_turn(self, turn: _Turn, guidance_text: str, max_tokens: int):
        full = self._render(self.history + [turn], add_assistant=True)
        if not full.startswith(self.rendered):
            # the template rewrote earlier turns: start over from the whole conversation
            self.m.clear()
            self.n_past = self.n_cells = 0
            self.rendered = ""
        delta = full[len(self.rendered):]
        images = [im for t in (self.history + [turn]) for im in t.images] \
            if not self.rendered else list(turn.images)
        stats = Stats(self.mode, self.keep if self.mode != "off" else 1.0)
        cells_before = self.n_cells
        chunks = self._tokenize(delta, images)
        try:
            self._check_fits(chunks)
            self._prefill(chunks, guidance_text, stats)
        except BaseException:
            self._forget_all()
            mtmd.chunks_free(chunks)
            raise
        mtmd.chunks_free(chunks)
        stats.prompt_tokens = self.n_cells - cells_before
        stats.kv_cells = self.n_cells
        stats.kv_bytes = self.m.kv_bytes()
        self.history.append(turn)
        self.rendered = full
        self.last_stats = stats

        answer = bytearray()
        emitted = 0
        t0 = time.perf_counter()
        try:
            for token in self._generate(max_tokens, stats):
                answer += self.m.piece(token)
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
        answer token, fits in the context."""
        sizes = [(mtmd.chunk_get_type(c), mtmd.chunk_get_n_tokens(c))
                 for c in self._chunks(chunks)]
        if not sizes or sizes[-1][0] != mtmd.CHUNK_TEXT:
            raise InputError("the prompt must end with text after the last image")
        keep = self.keep if self.mode == "embed" else 1.0   # embed keeps ceil(keep * n)
        need = sum(n if kind == mtmd.CHUNK_TEXT else int(np.ceil(keep * n))
                   for kind, n in sizes)
        if self.n_cells + need + 1 > self.m.n_ctx:
            raise InputError(f"the prompt needs {need} tokens but only "
                             f"{self.m.n_ctx - self.n_cells} of the context's {self.m.n_ctx} "
                             f"are free (raise -c/--ctx-size or shorten the prompt)")

    def _forget_all(self) -> None:
        # a failed prefill leaves partial entries in the KV cache: start afresh
        self.m.clear()
        self.n_past = self.n_cells = 0
        self.rendered = ""
        self.history = []

    # -- prefill --------------------------------------------------------------------------
    def _prefill(self, chunks, guidance_text: str, stats: Stats) -> None:
        chunk_list = list(self._chunks(chunks))
        text_embd = None
        for i, chunk in enumerate(chunk_list):
            last = i == len(chunk_list) - 1
            kind = mtmd.chunk_get_type(chunk)
            if kind == mtmd.CHUNK_TEXT:
                self._eval_stock(chunk, last, stats)
            elif kind == mtmd.CHUNK_IMAGE:
                if self.mode == "off" or self.keep >= 1.0:
                    self._eval_image_stock(chunk, stats)
                else:
                    if text_embd is None:
                        ids = self.m.tokenize(guidance_text)
                        text_embd = (self.m.token_embeddings(ids) if ids
                                     else np.zeros((0, self.m.n_embd), np.float32))
                    self._eval_image_merged(chunk, text_embd, stats)
            else:
                raise InputError("audio input is not supported")

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
        t0 = time.perf_counter()
        if mtmd.encode_chunk(self.m.mctx, chunk) != 0:
            raise ModelError(f"the vision encoder failed: {LOG.last_error()}")
        n = mtmd.chunk_get_n_tokens(chunk)
        ptr = mtmd.get_output_embd(self.m.mctx)
        embd = np.ctypeslib.as_array(ptr, shape=(n, self.m.n_embd)).copy()
        stats.t_encode_ms += (time.perf_counter() - t0) * 1e3
        stats.vision_tokens_in += n
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

    def _image_positions(self, chunk, n: int) -> np.ndarray:
        """Positions of all n rows of an image chunk, laid out as libmtmd does:
        [n] for normal RoPE, section-major [4, n] (t, y, x, z) for M-RoPE."""
        if not self.m.use_mrope:
            return self.n_past + np.arange(n, dtype=np.int32)[None, :]
        img = mtmd.chunk_get_tokens_image(chunk)
        pos = np.empty((4, n), dtype=np.int32)
        for i in range(n):
            p = mtmd.image_tokens_get_decoder_pos(img, self.n_past, i)
            pos[:, i] = (p.t, p.y, p.x, p.z)
        return pos

    def _eval_image_merged(self, chunk, text_embd: np.ndarray, stats: Stats) -> None:
        embd = self._encode(chunk, stats)
        n = len(embd)
        img = mtmd.chunk_get_tokens_image(chunk)
        nx, ny = mtmd.image_tokens_get_nx(img), mtmd.image_tokens_get_ny(img)
        # libmtmd knows the token grid only for M-RoPE models; for the others it reports
        # nx = n, ny = 1, not a layout: let the merge square the rows (published behaviour)
        grid = (ny, nx) if self.m.use_mrope and nx * ny == n else None
        merged = reduce_image(embd, grid, text_embd, keep=self.keep, windows=self.windows,
                              method=self.method, layer=self._layer0, seed=self.seed)
        stats.t_merge_ms += merged.t_merge_ms
        stats.vision_tokens_kept += len(merged.kept)
        if self.positions == "keep":
            # each kept row sits at its destination's original position ((t, h, w) for
            # M-RoPE); the image still spans its original extent
            pos = self._image_positions(chunk, n)[:, merged.kept]
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
        non_causal = bool(mtmd.decode_use_non_causal(self.m.mctx, chunk))
        t0 = time.perf_counter()
        if non_causal:
            llama_cpp.llama_set_causal_attn(self.m.ctx, False)
        try:
            nb = self.m.n_batch
            for s in range(0, len(merged.kept), nb):
                e = min(s + nb, len(merged.kept))
                batch = _EmbdBatch(merged.embd[s:e], pos[:, s:e].reshape(-1), pos.shape[0])
                if llama_cpp.llama_decode(self.m.ctx, batch.batch) != 0:
                    raise ModelError(f"llama.cpp failed to decode the image: "
                                     f"{LOG.last_error()}")
        finally:
            if non_causal:
                llama_cpp.llama_set_causal_attn(self.m.ctx, True)
        stats.t_prefill_ms += (time.perf_counter() - t0) * 1e3
        self.n_cells += len(merged.kept)
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

    def _generate(self, max_tokens: int, stats: Stats):
        sampler = self._make_sampler()
        self._eog_piece = ""
        token_arr = (llama_cpp.llama_token * 1)()
        for _ in range(max_tokens):
            token = llama_cpp.llama_sampler_sample(sampler, self.m.ctx, -1)
            # the token goes into the KV cache even when it ends the turn, so the cache
            # holds the conversation exactly as the template renders it
            if self.n_cells + 1 > self.m.n_ctx:
                raise InputError("the context is full (raise -c/--ctx-size)")
            token_arr[0] = token
            batch = llama_cpp.llama_batch_get_one(token_arr, 1)
            pos = np.array([self.n_past], dtype=np.int32)
            batch.pos = pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
            if llama_cpp.llama_decode(self.m.ctx, batch) != 0:
                raise ModelError(f"llama.cpp failed to decode: {LOG.last_error()}")
            self.n_past += 1
            self.n_cells += 1
            if self.m.is_eog(token):
                self._eog_piece = self.m.piece(token).decode("utf-8", "replace")
                return
            stats.n_decoded += 1
            yield token


_set_position_gaps = llama_cpp.llama_cpp._lib.llama_set_position_gaps   # patch 0001
_set_position_gaps.argtypes = [ctypes.c_void_p, ctypes.c_bool]
_set_position_gaps.restype = None

_helper_decode_image_chunk = mtmd._fn(
    "mtmd_helper_decode_image_chunk", ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_int32,
    ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_void_p, ctypes.c_void_p)

__all__ = ["VisionChat", "Stats", "LightKVError"]
