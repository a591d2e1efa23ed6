"""native.GuidanceModel: a text model's own first layer (read from its GGUF by liblightkv, one
ggml graph) against transformers' own layer 0.

The reference runs the Hugging Face text model forward on inputs_embeds = [image rows ;
the model's own embed_tokens(prompt ids)] (so any input scaling is HF's: Gemma 3 scales the
token embeddings by sqrt(hidden) inside embed_tokens, never the image features) and hooks
layer 0's queries and keys where llama.cpp takes them, after the input RMS norm and the
projections (+ biases, + the per-head q_norm/k_norm of Gemma 3), before RoPE. The scores
are then lightkv_edge.reference.guidance_scores_from_qk with HF's own attention scaling.

Models: (a) the embedded Qwen2-VL-family model, as the shipped Q8_0 GGUF and as an f32 GGUF
converted here from the shipped HF checkpoint; (b) a tiny Gemma 3 (tests/helpers/tiny_vlms)
and (c) a tiny Qwen2-VL with grouped-query attention, both with random norm weights and K
biases (HF initialises them to ones / zeros, which would hide a missing norm or bias),
converted to f32 GGUFs by the pinned llama.cpp converter.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightkv_edge import native, reference
from lightkv_edge.embedded import MODELS_DIR, embedded_model
from tests.helpers.pinned import llama_cpp_dir

ROOT = Path(__file__).resolve().parent.parent
CONVERT = ROOT / "scripts" / "convert.py"

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- checkpoints
def _perturb(model, seed: int) -> None:
    """Random layer norm weights, q/k norm weights and biases in every layer (HF initialises
    them to constants, which would hide a norm or a bias the graph forgot)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" not in name and "model.layers" not in name:
                continue
            if name.endswith("layernorm.weight") or "q_norm" in name or "k_norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("_proj.bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _resave(model, d: Path) -> None:
    cfg = (d / "config.json").read_text()   # the full config the converter needs
    model.save_pretrained(d, safe_serialization=True)
    (d / "config.json").write_text(cfg)


def build_qwen2vl(d: Path, seed: int = 0) -> Path:
    """A tiny Qwen2-VL (hidden 64, 4 query heads sharing 2 key heads of 16, q/k biases) with
    the shipped model's tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    hf = MODELS_DIR / "hf"
    d.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "preprocessor_config.json"):
        shutil.copy(hf / f, d / f)
    c = json.loads((hf / "config.json").read_text())
    c["text_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=2,
                            layer_types=["full_attention"] * 2,
                            rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default",
                                          "type": "default"})
    c["vision_config"].update(hidden_size=64)
    (d / "config.json").write_text(json.dumps(c))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(d))
    _perturb(model, seed)
    _resave(model, d)
    return d


def build_gemma3(d: Path, seed: int = 0) -> Path:
    from transformers import Gemma3ForConditionalGeneration
    from tests.helpers.tiny_vlms import build_gemma3 as build
    build(d, seed=seed)
    model = Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    _perturb(model, seed)
    # RMS norm is scale-free except for its epsilon: with token embeddings of rms ~1e-4
    # (x 8 = sqrt(64) ~ 1e-3, squared ~ eps 1e-6) the sqrt(n_embd) input scaling shows in
    # the scores, so the parity test checks it
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.mul_(0.006)
    _resave(model, d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (HF checkpoint dir, GGUF)}: the checkpoints built, then the converter runs in
    parallel (mostly the converter's own start-up)."""
    llama_dir = llama_cpp_dir()
    out = tmp_path_factory.mktemp("gguf")
    dirs = {"embedded": MODELS_DIR / "hf",
            "gemma3": build_gemma3(tmp_path_factory.mktemp("hf_gemma3")),
            "qwen2vl": build_qwen2vl(tmp_path_factory.mktemp("hf_qwen2vl"))}
    procs = [(name, subprocess.Popen(
        [sys.executable, str(CONVERT), str(d), "--outdir", str(out), "--name", name,
         "--outtype", "f32", "--llama-cpp", str(llama_dir), "--text-only"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for name, d in dirs.items()]
    for name, p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: {err.strip()[-500:]}"
    got = {name: (d, out / f"{name}-f32.gguf") for name, d in dirs.items()}
    got["embedded-q8_0"] = (MODELS_DIR / "hf", embedded_model()[0])
    return got


# ----------------------------------------------------------------------------- reference
def _hf_text_model(hf_dir: Path):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(hf_dir)
    if cfg.model_type == "gemma3":
        from transformers import Gemma3ForConditionalGeneration as cls
    else:
        from transformers import Qwen2VLForConditionalGeneration as cls
    hf = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return hf.model.language_model


def hf_guidance(hf_dir: Path, vision: np.ndarray, ids: np.ndarray, text_mult: float = 1.0):
    """(scores, HF's attention scaling) from transformers' own layer 0 (text_mult: an extra
    factor on the token embeddings, to show what a wrong input scaling would change)."""
    lm = _hf_text_model(hf_dir)
    attn = lm.layers[0].self_attn
    cfg = lm.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    seen = {}

    def keep(name, heads):
        def hook(module, args, out):
            t = out[0]
            # q_norm/k_norm give [H, S, hd] already; q_proj/k_proj give [S, H * hd]
            seen[name] = t if t.dim() == 3 else t.reshape(t.shape[0], heads, hd).transpose(0, 1)
        return hook
    has_qk_norm = hasattr(attn, "q_norm")
    qm = attn.q_norm if has_qk_norm else attn.q_proj
    km = attn.k_norm if has_qk_norm else attn.k_proj
    hooks = [qm.register_forward_hook(keep("q", n_head)), km.register_forward_hook(keep("k", n_kv))]
    with torch.no_grad():
        text = lm.embed_tokens(torch.from_numpy(ids.astype(np.int64))) * text_mult  # HF's scaling
        x = torch.cat([torch.from_numpy(vision), text])[None]
        lm(inputs_embeds=x)
    for h in hooks:
        h.remove()
    q, k = seen["q"], seen["k"]
    n = len(vision)
    s = n + len(ids)
    assert q.shape == (n_head, s, hd) and k.shape == (n_kv, s, hd)
    want = reference.guidance_scores_from_qk(q.double(), k.double(), np.arange(n),
                                             np.arange(n, s), scale=attn.scaling)
    return want.numpy(), attn.scaling


def _case(model: native.GuidanceModel, seed: int, n: int = 48, t: int = 9):
    rng = np.random.default_rng(seed)
    vision = rng.standard_normal((n, model.n_embd_inp)).astype(np.float32)
    ids = rng.integers(0, model.n_vocab, t).astype(np.int32)
    return vision, ids


# Tolerances (relative error of every score, worst over the cases; measured with these seeds):
# - f32 GGUFs: ggml's f32 matrix products and softmax against PyTorch (f32 layer, float64
#   guidance): float32 rounding only (measured worst 1e-7 .. 3e-7): rtol 2e-5.
# - the shipped Q8_0 GGUF: 8-bit blocks of weights AND token embeddings, and ggml quantizes
#   the activations to Q8_0 for the dot products too, exactly as llama.cpp's layer 0 does
#   (measured worst 1.5 %, median 0.3 %): rtol 5e-2 leaves 3x room and still catches a
#   forgotten norm weight (it moves these scores by 47-75 %).
TOL = {"embedded": 2e-5, "gemma3": 2e-5, "qwen2vl": 2e-5, "embedded-q8_0": 5e-2}


@pytest.mark.parametrize("name", sorted(TOL))
def test_scores_match_transformers_layer0(models, name):
    hf_dir, gguf = models[name]
    model = native.GuidanceModel(gguf, backend="cpu")
    worst = 0.0
    for seed in range(3):
        vision, ids = _case(model, seed)
        got = model.scores(vision, ids)
        want, hf_scale = hf_guidance(hf_dir, vision, ids)
        assert got.shape == (len(vision),) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=TOL[name], atol=0)
        worst = max(worst, float(np.max(np.abs(got / want - 1))))
        # the logit scale is the one transformers uses
        assert model.kq_scale == pytest.approx(hf_scale, rel=1e-6)
    print(f"{name}: worst relative error {worst:.2e}")


def test_cached_token_rows_give_the_scores_a_fresh_model_gives(models):
    """The guidance model keeps each prompt token's dequantized row after its first use:
    a later prompt that shares tokens with earlier ones scores exactly as it would on a
    freshly opened model (which reads every row from the file)."""
    _, gguf = models["embedded-q8_0"]
    used = native.GuidanceModel(gguf, backend="cpu")
    rng = np.random.default_rng(7)
    vision = rng.standard_normal((16, used.n_embd_inp)).astype(np.float32)
    first, second = [5, 9, 13, 21, 40], [9, 40, 7, 5, 5, 63]   # shares 5, 9 and 40
    used.scores(vision, first)
    again = used.scores(vision, second)
    fresh = native.GuidanceModel(gguf, backend="cpu").scores(vision, second)
    assert again.tobytes() == fresh.tobytes()
    assert not np.array_equal(again, used.scores(vision, first))   # prompts do matter


def test_what_each_model_has(models):
    """The graph reads what each family has, with llama.cpp's input scaling."""
    emb = native.GuidanceModel(models["embedded-q8_0"][1])
    assert (emb.arch, emb.n_embd, emb.n_head, emb.n_head_kv, emb.head_dim) == ("qwen2vl", 128, 4, 4, 32)
    assert emb.weight_type == 8                                    # GGML_TYPE_Q8_0, kept as stored
    assert emb.has_q_bias and emb.has_k_bias and not emb.has_q_norm
    assert emb.text_scale == emb.vision_scale == 1.0
    gem = native.GuidanceModel(models["gemma3"][1])
    assert (gem.arch, gem.n_head, gem.n_head_kv, gem.head_dim) == ("gemma3", 2, 1, 32)
    assert gem.has_q_norm and gem.has_k_norm and not gem.has_q_bias
    assert gem.text_scale == pytest.approx(8.0) and gem.vision_scale == 1.0   # sqrt(64), tokens only
    qw = native.GuidanceModel(models["qwen2vl"][1])
    assert (qw.n_head, qw.n_head_kv, qw.head_dim) == (4, 2, 16)


def test_gemma_scales_tokens_not_image_rows(models):
    """llama.cpp's gemma3 graph multiplies token embeddings by sqrt(n_embd) and leaves image
    rows alone. Gemma 3's RMS norms (the layer's input norm, then per-head Q/K norms) remove
    almost every trace of an input scale: only the epsilons see it, so the check uses inputs
    whose mean square is near the input norm's epsilon (1e-6): image rows of rms 1e-4, token
    embeddings of rms ~1e-4 (the checkpoint's, x 8). There the scores match HF within the
    f32 tolerance, while a wrong scaling of either kind moves them by 40x that or more
    (measured: 9e-4 unscaled tokens, 2e-3 scaled image rows)."""
    hf_dir, gguf = models["gemma3"]
    model = native.GuidanceModel(gguf)
    vision, ids = _case(model, 7)
    vision *= 1e-4
    got = model.scores(vision, ids)
    want, _ = hf_guidance(hf_dir, vision, ids)
    np.testing.assert_allclose(got, want, rtol=TOL["gemma3"])
    unscaled_text, _ = hf_guidance(hf_dir, vision, ids, text_mult=1 / 8)
    scaled_vision, _ = hf_guidance(hf_dir, vision * 8, ids)
    for wrong in (unscaled_text, scaled_vision):
        assert np.max(np.abs(wrong / want - 1)) > 10 * TOL["gemma3"]


def test_empty_prompt_and_no_rows():
    model = native.GuidanceModel(embedded_model()[0])
    vision = np.ones((5, model.n_embd_inp), np.float32)
    np.testing.assert_array_equal(model.scores(vision, []), np.zeros(5, np.float32))
    assert model.scores(np.zeros((0, model.n_embd_inp), np.float32), [1, 2]).shape == (0,)


def test_bad_input_is_one_line_value_error():
    model = native.GuidanceModel(embedded_model()[0])
    d = model.n_embd_inp
    bad = {
        "token out of range": (np.ones((3, d), np.float32), [model.n_vocab]),
        "negative token": (np.ones((3, d), np.float32), [-1]),
        "float tokens": (np.ones((3, d), np.float32), [0.5]),
        "NaN row": (np.full((3, d), np.nan, np.float32), [1]),
        "wrong width": (np.ones((3, d + 1), np.float32), [1]),
        "1-D rows": (np.ones(d, np.float32), [1]),
    }
    for what, (v, t) in bad.items():
        with pytest.raises(ValueError) as e:
            model.scores(v, t)
        assert "\n" not in str(e.value), what


# ----------------------------------------------------------------------------- unsupported
def _write_gguf(path: Path, tensors: dict, kv_extra: dict | None = None, arch: str = "llama"):
    """A minimal text-model GGUF (F32 tensors) written with the pinned gguf-py."""
    sys.path.insert(0, str(llama_cpp_dir() / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    if kv_extra is None or kv_extra.get("eps", True):
        w.add_layer_norm_rms_eps(1e-5)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _layer(**over):
    rng = np.random.default_rng(0)
    t = {"token_embd.weight": rng.standard_normal((10, 32)).astype(np.float32),
         "blk.0.attn_norm.weight": np.ones(32, np.float32),
         "blk.0.attn_q.weight": rng.standard_normal((32, 32)).astype(np.float32),
         "blk.0.attn_k.weight": rng.standard_normal((32, 32)).astype(np.float32)}
    for k, v in over.items():
        k = k.replace("__", ".")
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    return t


@pytest.mark.parametrize("case, match", [
    ("fused", "fused"), ("layernorm", "LayerNorm"), ("no_eps", "epsilon"),
    ("bad_shape", "shape"), ("layer", "outside"), ("mmproj", "mmproj"),
])
def test_unsupported_models_are_one_line_errors(tmp_path, case, match):
    p = tmp_path / f"{case}.gguf"
    layer = 0
    if case == "fused":
        t = _layer(**{"blk.0.attn_q.weight": None, "blk.0.attn_k.weight": None,
                      "blk.0.attn_qkv.weight": np.ones((96, 32), np.float32)})
        _write_gguf(p, t)
    elif case == "layernorm":
        _write_gguf(p, _layer(**{"blk.0.attn_norm.bias": np.zeros(32, np.float32)}))
    elif case == "no_eps":
        _write_gguf(p, _layer(), {"eps": False})
    elif case == "bad_shape":
        _write_gguf(p, _layer(**{"blk.0.attn_k.weight": np.ones((16, 32), np.float32)}))
    elif case == "layer":
        _write_gguf(p, _layer())
        layer = 3
    else:
        _write_gguf(p, _layer(), arch="clip")
    with pytest.raises(ValueError, match=match) as e:
        native.GuidanceModel(p, layer=layer)
    assert "\n" not in str(e.value)


def test_a_well_formed_minimal_model_works(tmp_path):
    """The same writer's valid file loads and scores (so the cases above fail for their
    reason, not because the writer is broken)."""
    p = tmp_path / "ok.gguf"
    _write_gguf(p, _layer())
    m = native.GuidanceModel(p)
    g = m.scores(np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32), [1, 2, 3])
    assert g.shape == (4,) and np.all(np.isfinite(g)) and np.all(g > 0)


# ----------------------------------------------------------------------------- the GGUF reader
FUZZ = r"""
import ctypes as C, random, sys
from lightkv_edge import native
lib = native._load()
data = open(sys.argv[1], "rb").read()
out = sys.argv[2]
rng = random.Random(0)
header = int(sys.argv[3])
n_ok = n_err = 0
cases = [data[:k] for k in range(0, header + 64, 7)]           # truncations
for _ in range(400):                                           # corrupt bytes in the metadata
    b = bytearray(data[:header + 1024])
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(4, header)] = rng.randrange(256)
    cases.append(bytes(b))
for i, c in enumerate(cases):
    open(out, "wb").write(c)
    h = C.c_void_p()
    st = lib.lightkv_gguf_open(out.encode(), C.byref(h))
    if st == 0:
        n_ok += 1
        lib.lightkv_gguf_free(h)
        try:   # a file that parses: its values are read without tripping ggml's type asserts
            native.gguf_fields(out, ["general.architecture", "clip.vision.image_size",
                                     "clip.vision.image_mean", "general.alignment"])
        except ValueError:
            pass
    elif st == 1:
        n_err += 1
    else:
        print("unexpected status", st, "case", i); sys.exit(3)
print(n_ok, n_err)
"""


def test_gguf_reader_refuses_bad_files_without_aborting(tmp_path):
    """ggml's gguf reader (through lightkv_gguf_open) on truncated and corrupted copies of a
    real GGUF: every case returns OK or INVALID_ARGUMENT; none aborts the process (run in a
    child process, so an abort would show as its exit code)."""
    src = embedded_model()[1]
    data = src.read_bytes()
    assert native.gguf_fields(src, ["general.architecture"])["general.architecture"] == "clip"
    n_kv = struct.unpack("<q", data[16:24])[0]
    assert n_kv > 5
    header = 3904    # the key/values and tensor infos of this mmproj: its data starts there
    assert len(data) > 2 * header
    r = subprocess.run([sys.executable, "-c", FUZZ, str(src), str(tmp_path / "case.gguf"),
                        str(header)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:], r.stdout[-500:])
    n_ok, n_err = map(int, r.stdout.split()[-2:])
    n_cases = len(range(0, header + 64, 7)) + 400
    assert n_ok + n_err == n_cases
    assert n_err > n_cases // 2          # most cases are really refused


def test_gguf_fields_reads_without_gguf_py():
    """The engine's pre-load checks read metadata through ggml's reader: no Python GGUF
    parser is imported."""
    code = ("import sys; from lightkv_edge import gguf_file; from lightkv_edge.embedded import embedded_model; "
            "t, m = embedded_model(); "
            "print(gguf_file.field(t, 'general.architecture'), gguf_file.field(m, 'general.architecture'), "
            "gguf_file.field(t, 'qwen2vl.embedding_length'), gguf_file.field(t, 'no.such.key')); "
            "print('gguf' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["qwen2vl", "clip", "128", "None", "False"]


def test_truncated_model_is_a_model_error(tmp_path):
    from lightkv_edge.errors import ModelError
    from lightkv_edge.model import VisionModel
    t, m = embedded_model()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(t.read_bytes()[:1000])
    with pytest.raises(ModelError, match="not a readable GGUF") as e:
        VisionModel(bad, m)
    assert "\n" not in str(e.value)
