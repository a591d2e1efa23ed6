"""ctypes declarations of the libmtmd calls the engine makes.

llama-cpp-python's `llama_cpp.mtmd_cpp` loads libmtmd (ours, see _libs) and binds part of
its API; we declare here, on that same library handle, exactly the functions we call, with
signatures copied from the pinned tools/mtmd/mtmd.h and mtmd-helper.h, so the engine does
not depend on which of them a given llama-cpp-python release happens to bind.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int32, c_size_t, c_uint32, c_void_p

from . import _libs

llama_cpp = _libs.use_our_llama_cpp()
from llama_cpp import mtmd_cpp as _m  # noqa: E402  (after the library path is set)

lib = _m._libmtmd

CHUNK_TEXT, CHUNK_IMAGE, CHUNK_AUDIO = 0, 1, 2

context_params = _m.mtmd_context_params
progress_callback = _m.mtmd_progress_callback


class input_text(ctypes.Structure):
    _fields_ = [("text", c_char_p), ("text_len", c_size_t),
                ("add_special", c_bool), ("parse_special", c_bool)]


class decoder_pos(ctypes.Structure):
    _fields_ = [("t", c_uint32), ("x", c_uint32), ("y", c_uint32), ("z", c_uint32)]


def _fn(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


llama_token_p = POINTER(c_int32)

context_params_default = _fn("mtmd_context_params_default", context_params)
init_from_file = _fn("mtmd_init_from_file", c_void_p, c_char_p, c_void_p, context_params)
free = _fn("mtmd_free", None, c_void_p)
default_marker = _fn("mtmd_default_marker", c_char_p)
support_vision = _fn("mtmd_support_vision", c_bool, c_void_p)
decode_use_mrope = _fn("mtmd_decode_use_mrope", c_bool, c_void_p)
decode_use_non_causal = _fn("mtmd_decode_use_non_causal", c_bool, c_void_p, c_void_p)

bitmap_init = _fn("mtmd_bitmap_init", c_void_p, c_uint32, c_uint32, c_char_p)
bitmap_free = _fn("mtmd_bitmap_free", None, c_void_p)
bitmap_set_id = _fn("mtmd_bitmap_set_id", None, c_void_p, c_char_p)

chunks_init = _fn("mtmd_input_chunks_init", c_void_p)
chunks_free = _fn("mtmd_input_chunks_free", None, c_void_p)
chunks_size = _fn("mtmd_input_chunks_size", c_size_t, c_void_p)
chunks_get = _fn("mtmd_input_chunks_get", c_void_p, c_void_p, c_size_t)
chunk_get_type = _fn("mtmd_input_chunk_get_type", c_int, c_void_p)
chunk_get_tokens_text = _fn("mtmd_input_chunk_get_tokens_text", llama_token_p, c_void_p,
                            POINTER(c_size_t))
chunk_get_tokens_image = _fn("mtmd_input_chunk_get_tokens_image", c_void_p, c_void_p)
chunk_get_n_tokens = _fn("mtmd_input_chunk_get_n_tokens", c_size_t, c_void_p)
chunk_get_n_pos = _fn("mtmd_input_chunk_get_n_pos", c_int32, c_void_p)
chunk_get_id = _fn("mtmd_input_chunk_get_id", c_char_p, c_void_p)
image_tokens_get_n_tokens = _fn("mtmd_image_tokens_get_n_tokens", c_size_t, c_void_p)
image_tokens_get_decoder_pos = _fn("mtmd_image_tokens_get_decoder_pos", decoder_pos,
                                   c_void_p, c_int32, c_size_t)

tokenize = _fn("mtmd_tokenize", c_int32, c_void_p, c_void_p, POINTER(input_text),
               POINTER(c_void_p), c_size_t)
encode_chunk = _fn("mtmd_encode_chunk", c_int32, c_void_p, c_void_p)
get_output_embd = _fn("mtmd_get_output_embd", POINTER(c_float), c_void_p)

# mtmd-helper: the stock path (what llama-mtmd-cli runs); `off` mode uses exactly this.
helper_eval_chunk_single = _fn("mtmd_helper_eval_chunk_single", c_int32, c_void_p, c_void_p,
                               c_void_p, c_int32, c_int32, c_int32, c_bool, POINTER(c_int32))


def image_positions(chunk, n_past: int, use_mrope: bool):
    """Decoder positions of an image chunk's rows starting at n_past, laid out as libmtmd
    does: [1, n] for normal RoPE, section-major [4, n] (t, y, x, z) for M-RoPE."""
    import numpy as np
    n = chunk_get_n_tokens(chunk)
    if not use_mrope:
        return n_past + np.arange(n, dtype=np.int32)[None, :]
    img = chunk_get_tokens_image(chunk)
    pos = np.empty((4, n), dtype=np.int32)
    for i in range(n):
        p = image_tokens_get_decoder_pos(img, n_past, i)
        pos[:, i] = (p.t, p.y, p.x, p.z)
    return pos


def image_grid(chunk, use_mrope: bool) -> tuple[int, int] | None:
    """(rows, cols) of an image chunk's token grid, from its M-RoPE decoder positions;
    None for normal-RoPE models, whose rows libmtmd lays out in no grid."""
    if not use_mrope:
        return None
    pos = image_positions(chunk, 0, True)
    rows, cols = int(pos[1].max() - pos[1].min()) + 1, int(pos[2].max() - pos[2].min()) + 1
    return (rows, cols) if rows * cols == pos.shape[1] else None


def image_keys(chunks) -> dict[int, str]:
    """The image cache's key of every image chunk of one turn, by chunk address: the
    picture's id (set on its bitmap from its pixels) and the chunk's ordinal among the
    turn's chunks of that id. libmtmd gives every slice of one picture the picture's id,
    so the ordinal tells the slices apart (and a picture sent twice in one turn)."""
    keys, seen = {}, {}
    for ch in chunks:
        if chunk_get_type(ch) != CHUNK_IMAGE:
            continue
        pid = (chunk_get_id(ch) or b"").decode()
        if pid:
            k = seen.get(pid, 0)
            seen[pid] = k + 1
            keys[ch] = f"{pid}/{k}"
    return keys
