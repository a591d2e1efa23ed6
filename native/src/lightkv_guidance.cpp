// GGUF metadata through ggml's gguf reader, and the guidance model: a text model's own layer
// input (RMS norm, Q/K projections in their stored type) read from its GGUF and run with the
// guidance as one ggml graph (graph builders in lightkv_graphs.cpp).
//
// Why read the GGUF ourselves: the engine validates a model before llama.cpp loads it
// (llama.cpp may abort on an odd file), and embed mode guides the merge before the LLM runs.
// ggml's gguf_init_from_file (no_alloc, no ggml context) reads the header, the key/values and
// the tensor infos in C and returns NULL on a bad file; the tensor data we need (two weight
// matrices, a few vectors, T token rows per prompt) is read with plain file reads.
#include "lightkv.h"
#include "lightkv_graphs.h"
#include "lightkv_internal.h"

#include "gguf.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

using namespace lightkv;

namespace {

struct gguf_deleter { void operator()(gguf_context * g) const { gguf_free(g); } };
using gguf_ptr = std::unique_ptr<gguf_context, gguf_deleter>;

struct file_closer { void operator()(FILE * f) const { std::fclose(f); } };
using file_ptr = std::unique_ptr<FILE, file_closer>;

// ggml's gguf reader logs why it refuses a file and returns NULL: while it reads, a log
// callback keeps the first error line (and passes everything on to the logger in place).
struct log_capture {
    ggml_log_callback prev_cb = nullptr;
    void *            prev_ud = nullptr;
    std::string       first_error;

    static void callback(ggml_log_level level, const char * text, void * ud) {
        auto * self = static_cast<log_capture *>(ud);
        if (level == GGML_LOG_LEVEL_ERROR && self->first_error.empty() && text) {
            std::string line = text;
            const size_t colon = line.find(": ");
            if (line.rfind("gguf_", 0) == 0 && colon != std::string::npos) line = line.substr(colon + 2);
            while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
            self->first_error = line;
        }
        if (self->prev_cb) self->prev_cb(level, text, self->prev_ud);
    }
};

gguf_ptr open_gguf(const char * path) {
    if (!path || !path[0]) LKV_INVALID("path must not be empty");
    log_capture cap;
    ggml_log_get(&cap.prev_cb, &cap.prev_ud);
    ggml_log_set(log_capture::callback, &cap);
    gguf_init_params p = {/*.no_alloc =*/ true, /*.ctx =*/ nullptr};
    gguf_context * g = gguf_init_from_file(path, p);
    ggml_log_set(cap.prev_cb, cap.prev_ud);
    if (!g) {
        LKV_INVALID("%s is not a readable GGUF file: %s", path,
                    cap.first_error.empty() ? "ggml's gguf reader refused it" : cap.first_error.c_str());
    }
    return gguf_ptr(g);
}

bool is_int_type(gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}

// element i of an integer scalar or array, as int64 (types checked before every getter:
// ggml's getters assert the type)
int64_t int_at(const gguf_context * g, int64_t id, const char * key, size_t i) {
    const bool arr = gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY;
    const gguf_type t = arr ? gguf_get_arr_type(g, id) : gguf_get_kv_type(g, id);
    const void * data = arr ? gguf_get_arr_data(g, id) : gguf_get_val_data(g, id);
    switch (t) {
        case GGUF_TYPE_UINT8:  return ((const uint8_t  *) data)[i];
        case GGUF_TYPE_INT8:   return ((const int8_t   *) data)[i];
        case GGUF_TYPE_UINT16: return ((const uint16_t *) data)[i];
        case GGUF_TYPE_INT16:  return ((const int16_t  *) data)[i];
        case GGUF_TYPE_UINT32: return ((const uint32_t *) data)[i];
        case GGUF_TYPE_INT32:  return ((const int32_t  *) data)[i];
        case GGUF_TYPE_INT64:  return ((const int64_t  *) data)[i];
        case GGUF_TYPE_UINT64: {
            const uint64_t v = ((const uint64_t *) data)[i];
            if (v > (uint64_t) std::numeric_limits<int64_t>::max()) LKV_INVALID("%s = %llu does not fit int64", key, (unsigned long long) v);
            return (int64_t) v;
        }
        default:
            LKV_INVALID("%s is not an integer", key);
    }
}

// An integer key; per-layer arrays (head counts of some models) give element `layer`.
// Returns false when the key is absent.
bool get_int(const gguf_context * g, const std::string & key, int64_t layer, int64_t * out) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return false;
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t == GGUF_TYPE_ARRAY) {
        if (!is_int_type(gguf_get_arr_type(g, id))) LKV_INVALID("%s is not an integer array", key.c_str());
        const size_t n = gguf_get_arr_n(g, id);
        if (layer < 0 || (size_t) layer >= n) LKV_INVALID("%s has %zu entries, no entry for layer %lld", key.c_str(), n, (long long) layer);
        *out = int_at(g, id, key.c_str(), (size_t) layer);
        return true;
    }
    if (!is_int_type(t)) LKV_INVALID("%s is not an integer (GGUF type %s)", key.c_str(), gguf_type_name(t));
    *out = int_at(g, id, key.c_str(), 0);
    return true;
}

bool get_float(const gguf_context * g, const std::string & key, double * out) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: *out = gguf_get_val_f32(g, id); return true;
        case GGUF_TYPE_FLOAT64: *out = gguf_get_val_f64(g, id); return true;
        default: LKV_INVALID("%s is not a float (GGUF type %s)", key.c_str(), gguf_type_name(gguf_get_kv_type(g, id)));
    }
}

// n bytes at absolute offset off of f
void read_at(FILE * f, const char * path, uint64_t off, void * dst, size_t n) {
#if defined(_WIN32)
    const bool sought = _fseeki64(f, (__int64) off, SEEK_SET) == 0;
#else
    const bool sought = fseeko(f, (off_t) off, SEEK_SET) == 0;
#endif
    if (!sought || std::fread(dst, 1, n, f) != n) {
        LKV_INVALID("%s is truncated: cannot read %zu bytes at offset %llu", path, n, (unsigned long long) off);
    }
}

// types ggml can dequantize (and multiply) on every backend that we place weights on
bool is_weight_type(ggml_type t) {
    if (t == GGML_TYPE_F32) return true;
    const ggml_type_traits * tr = ggml_get_type_traits(t);
    if (!tr || !tr->to_float || tr->blck_size <= 0) return false;
    return t == GGML_TYPE_F16 || t == GGML_TYPE_BF16 || ggml_is_quantized(t);
}

// n values of type t at src as float32 (ggml's own conversion for the type)
void to_f32(ggml_type t, const void * src, float * dst, int64_t n) {
    if (t == GGML_TYPE_F32) {
        std::memcpy(dst, src, (size_t) n * sizeof(float));
    } else {
        ggml_get_type_traits(t)->to_float(src, dst, n);
    }
}

// One tensor of the file, found and shape-checked.
struct tensor_ref {
    int64_t   id = -1;
    ggml_type type = GGML_TYPE_F32;
    int64_t   ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
    uint64_t  offset = 0;  // absolute file offset of its data
    size_t    nbytes = 0;
    int       n_dims() const { int n = GGML_MAX_DIMS; while (n > 1 && ne[n - 1] == 1) n--; return n; }
};

bool find_tensor(const gguf_context * g, const std::string & name, tensor_ref * out) {
    const int64_t id = gguf_find_tensor(g, name.c_str());
    if (id < 0) return false;
    out->id = id;
    out->type = gguf_get_tensor_type(g, id);
    const int64_t * ne = gguf_get_tensor_ne(g, id);
    for (int i = 0; i < GGML_MAX_DIMS; i++) out->ne[i] = ne[i];
    out->offset = (uint64_t) gguf_get_data_offset(g) + (uint64_t) gguf_get_tensor_offset(g, id);
    out->nbytes = gguf_get_tensor_size(g, id);
    if (!is_weight_type(out->type)) {
        LKV_INVALID("tensor %s has type %s, which cannot be used as a weight", name.c_str(), ggml_type_name(out->type));
    }
    return true;
}

// a small tensor (norm, bias, scale) as float32 host values
std::vector<float> read_f32(FILE * f, const char * path, const tensor_ref & t) {
    std::vector<uint8_t> raw(t.nbytes);
    read_at(f, path, t.offset, raw.data(), raw.size());
    const int64_t n = t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3];
    std::vector<float> out((size_t) n);
    to_f32(t.type, raw.data(), out.data(), n);
    return out;
}

}  // namespace

// ============================================================================= GGUF metadata
struct lightkv_gguf {
    gguf_ptr g;
};

// ============================================================================= guidance model
struct lightkv_guidance_model {
    lightkv_context *      ctx = nullptr;
    lightkv_guidance_info  info{};
    std::string            path;
    file_ptr               file;           // token rows are read from it on first use
    tensor_ref             tok_embd;
    size_t                 tok_row_bytes = 0;
    // token id -> its dequantized row: a prompt's tokens (the chat template's above all)
    // repeat from image to image, and a file read per token was a tenth of the guidance of
    // a small image; emptied when it would pass TOKEN_CACHE_BYTES
    std::unordered_map<int32_t, std::vector<float>> token_rows;

    ctx_ptr                w_meta;         // the layer's tensors, in a buffer of ctx's backend
    buf_ptr                w_buf;
    ctx_ptr                mat_meta;       // attn_q / attn_k when they sit in CPU_REPACK
    buf_ptr                mat_buf;
    lightkv::layer_input   layer{};
};

namespace {

// llama.cpp's input scaling of the architectures that have one (src/models/*.cpp,
// llm_graph_context::build_inp_embd): returns text and embedding-row factors.
void input_scales(const std::string & arch, const gguf_context * g, int64_t n_embd, int64_t n_deepstack,
                  float * text, float * vision) {
    *text = *vision = 1.0f;
    const float sqrt_embd = sqrtf((float) n_embd);
    if (arch == "gemma" || arch == "gemma2" || arch == "afmoe") {
        *text = *vision = sqrt_embd;                 // every input, tokens or embeddings
    } else if (arch == "gemma3" || arch == "gemma4" || arch == "gemma-embedding") {
        *text = sqrt_embd;                           // "do not normalize ... raw embeddings input"
    }
    // build_inp_embd: f_embedding_scale (granite's embedding_scale key; fixed for grok and
    // minicpm), on embedding rows too unless the model has deepstack features
    double emb = 0.0;
    if (arch == "grok") emb = 78.38367176906169;
    if (arch == "minicpm") emb = 12.0;
    get_float(g, arch + ".embedding_scale", &emb);
    if (emb != 0.0) {
        *text *= (float) emb;
        if (n_deepstack == 0) *vision *= (float) emb;
    }
}

// ggml's CPU_REPACK buffer type when the context runs on the CPU and the CPU backend's
// repacked matrix product takes both matrices (the check llama.cpp makes: a mul_mat node
// over a dummy buffer of that type, asked of the device); otherwise nullptr
ggml_backend_buffer_type_t cpu_repack_buft(const lightkv_context & lc, ggml_tensor * wq, ggml_tensor * wk) {
    if (lc.primary != lc.cpu) return nullptr;
    ggml_backend_dev_t dev = ggml_backend_get_device(lc.cpu);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    if (!reg) return nullptr;
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) return nullptr;
    ggml_backend_buffer_type_t repack = nullptr;
    for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b; ++b) {
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) repack = *b;
    }
    if (!repack) return nullptr;
    ctx_ptr probe = new_meta_context(4);
    for (ggml_tensor * wt : {wq, wk}) {
        ggml_tensor * x  = ggml_new_tensor_2d(probe.get(), GGML_TYPE_F32, wt->ne[0], 512);
        ggml_tensor * op = ggml_mul_mat(probe.get(), wt, x);
        wt->buffer = ggml_backend_buft_alloc_buffer(repack, 0);
        const bool ok = wt->buffer && ggml_backend_dev_supports_op(dev, op);
        if (wt->buffer) ggml_backend_buffer_free(wt->buffer);
        wt->buffer = nullptr;
        if (!ok) return nullptr;
    }
    return repack;
}

void load_guidance_model(lightkv_guidance_model & m, const char * path, int32_t layer) {
    gguf_ptr gp = open_gguf(path);
    const gguf_context * g = gp.get();
    lightkv_guidance_info & info = m.info;
    m.path = path;

    const int64_t arch_id = gguf_find_key(g, "general.architecture");
    if (arch_id < 0 || gguf_get_kv_type(g, arch_id) != GGUF_TYPE_STRING) LKV_INVALID("%s has no general.architecture", path);
    const std::string arch = gguf_get_val_str(g, arch_id);
    if (arch == "clip") LKV_INVALID("%s is a vision projector (mmproj), not a text model", path);
    if (arch == "gemma3n") LKV_INVALID("architecture gemma3n (AltUp layers) is not supported for guidance");
    std::snprintf(info.arch, sizeof(info.arch), "%s", arch.c_str());

    int64_t n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_deepstack = 0;
    if (!get_int(g, arch + ".embedding_length", -1, &n_embd) || n_embd <= 0) LKV_INVALID("%s has no valid %s.embedding_length", path, arch.c_str());
    if (!get_int(g, arch + ".block_count", -1, &n_layer) || n_layer <= 0) LKV_INVALID("%s has no valid %s.block_count", path, arch.c_str());
    if (layer < 0 || layer >= n_layer) LKV_INVALID("layer %d is outside the model's %lld layers", (int) layer, (long long) n_layer);
    if (!get_int(g, arch + ".attention.head_count", layer, &n_head)) LKV_INVALID("%s has no %s.attention.head_count", path, arch.c_str());
    if (n_head <= 0) LKV_INVALID("layer %d of %s has no attention heads", (int) layer, path);
    if (!get_int(g, arch + ".attention.head_count_kv", layer, &n_head_kv)) n_head_kv = n_head;
    if (n_head_kv <= 0 || n_head % n_head_kv != 0) {
        LKV_INVALID("%lld query heads do not share %lld key heads evenly", (long long) n_head, (long long) n_head_kv);
    }
    if (!get_int(g, arch + ".attention.key_length", -1, &head_dim)) {
        if (n_embd % n_head != 0) LKV_INVALID("n_embd %lld is not a multiple of %lld heads", (long long) n_embd, (long long) n_head);
        head_dim = n_embd / n_head;
    }
    if (head_dim <= 0) LKV_INVALID("%s has an invalid head size %lld", path, (long long) head_dim);
    get_int(g, arch + ".n_deepstack_layers", -1, &n_deepstack);
    if (n_deepstack < 0 || n_deepstack > 64) LKV_INVALID("%s has an invalid n_deepstack_layers %lld", path, (long long) n_deepstack);
    double eps = 0.0;
    if (!get_float(g, arch + ".attention.layer_norm_rms_epsilon", &eps)) {
        LKV_INVALID("%s has no %s.attention.layer_norm_rms_epsilon (guidance needs an RMS-norm model)", path, arch.c_str());
    }
    if (!(eps > 0.0 && eps < 1.0)) LKV_INVALID("%s has an invalid RMS norm epsilon %g", path, eps);

    // ---- tensors (all checked before any ggml call: ggml asserts on mismatched shapes)
    const std::string blk = "blk." + std::to_string(layer) + ".";
    tensor_ref t_norm, t_wq, t_wk, t_bq, t_bk, t_sq, t_sk, t_nq, t_nk, t_tok;
    if (!find_tensor(g, blk + "attn_q.weight", &t_wq) || !find_tensor(g, blk + "attn_k.weight", &t_wk)) {
        if (gguf_find_tensor(g, (blk + "attn_qkv.weight").c_str()) >= 0) {
            LKV_INVALID("%s has a fused %sattn_qkv.weight, no separate attn_q/attn_k (not supported for guidance)", path, blk.c_str());
        }
        LKV_INVALID("%s has no separate %sattn_q.weight / attn_k.weight (architecture %s)", path, blk.c_str(), arch.c_str());
    }
    if (!find_tensor(g, blk + "attn_norm.weight", &t_norm)) LKV_INVALID("%s has no %sattn_norm.weight", path, blk.c_str());
    if (gguf_find_tensor(g, (blk + "attn_norm.bias").c_str()) >= 0) {
        LKV_INVALID("%s normalises with a LayerNorm (%sattn_norm.bias); guidance needs an RMS norm", path, blk.c_str());
    }
    if (!find_tensor(g, "token_embd.weight", &t_tok)) LKV_INVALID("%s has no token_embd.weight", path);

    const int64_t n_q = n_head * head_dim, n_k = n_head_kv * head_dim;
    auto want_shape = [&](const tensor_ref & t, const std::string & name, int64_t ne0, int64_t ne1) {
        if (t.ne[0] != ne0 || t.ne[1] != ne1 || t.ne[2] != 1 || t.ne[3] != 1) {
            LKV_INVALID("%s: %s has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]", path, name.c_str(),
                        (long long) t.ne[0], (long long) t.ne[1], (long long) t.ne[2], (long long) t.ne[3],
                        (long long) ne0, (long long) ne1);
        }
    };
    want_shape(t_norm, blk + "attn_norm.weight", n_embd, 1);
    want_shape(t_wq, blk + "attn_q.weight", n_embd, n_q);
    want_shape(t_wk, blk + "attn_k.weight", n_embd, n_k);
    if (t_tok.ne[0] != n_embd || t_tok.ne[1] < 1 || t_tok.ne[2] != 1 || t_tok.ne[3] != 1) {
        LKV_INVALID("%s: token_embd.weight has %lld columns, expected n_embd = %lld", path, (long long) t_tok.ne[0], (long long) n_embd);
    }
    const bool has_bq = find_tensor(g, blk + "attn_q.bias", &t_bq);
    const bool has_bk = find_tensor(g, blk + "attn_k.bias", &t_bk);
    const bool has_sq = find_tensor(g, blk + "attn_q.scale", &t_sq);
    const bool has_sk = find_tensor(g, blk + "attn_k.scale", &t_sk);
    const bool has_nq = find_tensor(g, blk + "attn_q_norm.weight", &t_nq);
    const bool has_nk = find_tensor(g, blk + "attn_k_norm.weight", &t_nk);
    if (has_bq) want_shape(t_bq, blk + "attn_q.bias", n_q, 1);
    if (has_bk) want_shape(t_bk, blk + "attn_k.bias", n_k, 1);
    if (has_sq) want_shape(t_sq, blk + "attn_q.scale", 1, 1);
    if (has_sk) want_shape(t_sk, blk + "attn_k.scale", 1, 1);
    if (has_nq && !(t_nq.n_dims() == 1 && (t_nq.ne[0] == head_dim || t_nq.ne[0] == n_q))) {
        LKV_INVALID("%s: %sattn_q_norm.weight has %lld elements, expected %lld (per head) or %lld", path, blk.c_str(),
                    (long long) t_nq.ne[0], (long long) head_dim, (long long) n_q);
    }
    if (has_nk && !(t_nk.n_dims() == 1 && (t_nk.ne[0] == head_dim || t_nk.ne[0] == n_k))) {
        LKV_INVALID("%s: %sattn_k_norm.weight has %lld elements, expected %lld (per head) or %lld", path, blk.c_str(),
                    (long long) t_nk.ne[0], (long long) head_dim, (long long) n_k);
    }

    info.n_embd = n_embd;
    info.n_embd_inp = checked_mul(n_embd, 1 + n_deepstack, "n_embd_inp");
    info.n_vocab = t_tok.ne[1];
    info.n_head = n_head;
    info.n_head_kv = n_head_kv;
    info.head_dim = head_dim;
    info.layer = layer;
    info.weight_type = (int32_t) t_wq.type;
    info.has_q_bias = has_bq;
    info.has_k_bias = has_bk;
    info.has_q_norm = has_nq;
    info.has_k_norm = has_nk;
    info.rms_eps = (float) eps;
    // logit scale, as llama.cpp computes it: Gemma 3 fixes it by model size (27B: 62 layers);
    // other models use attention.scale when they carry it, else 1/sqrt(head_dim)
    double attn_scale = 0.0;
    if (arch == "gemma3") {
        attn_scale = n_layer == 62 ? 1.0 / std::sqrt((double) (n_embd / n_head)) : 1.0 / std::sqrt((double) head_dim);
    } else {
        get_float(g, arch + ".attention.scale", &attn_scale);
    }
    info.kq_scale = attn_scale != 0.0 ? (float) attn_scale : 1.0f / sqrtf((float) head_dim);
    input_scales(arch, g, n_embd, n_deepstack, &info.text_scale, &info.vision_scale);
    if (!std::isfinite(info.kq_scale) || !std::isfinite(info.text_scale) || !std::isfinite(info.vision_scale)) {
        LKV_INVALID("%s has a non-finite attention or embedding scale", path);
    }

    // ---- read the tensors into a buffer of the context's backend: the two matrices in their
    //      stored type (as llama.cpp multiplies them), the small vectors as float32
    FILE * f = std::fopen(path, "rb");
    if (!f) LKV_INVALID("cannot open %s", path);
    m.file.reset(f);
    m.tok_embd = t_tok;
    m.tok_row_bytes = ggml_row_size(t_tok.type, n_embd);

    m.w_meta = new_meta_context(16);
    ggml_context * w = m.w_meta.get();
    auto vec = [&](int64_t n) { return ggml_new_tensor_1d(w, GGML_TYPE_F32, n); };
    lightkv::layer_input & l = m.layer;
    l.attn_norm = vec(n_embd);
    // on the CPU, the two matrices go to ggml's CPU_REPACK buffer type when it takes them
    // (interleaved blocks for its faster gemm kernels, same quantized arithmetic), as
    // llama.cpp places its CPU weights by default
    m.mat_meta = new_meta_context(2);
    ggml_tensor * wq = ggml_new_tensor_2d(m.mat_meta.get(), t_wq.type, n_embd, n_q);
    ggml_tensor * wk = ggml_new_tensor_2d(m.mat_meta.get(), t_wk.type, n_embd, n_k);
    ggml_backend_buffer_type_t repack = cpu_repack_buft(*m.ctx, wq, wk);
    if (repack) {
        ggml_backend_buffer_t b = ggml_backend_alloc_ctx_tensors_from_buft(m.mat_meta.get(), repack);
        if (!b) fail(LIGHTKV_ERR_OUT_OF_MEMORY, "could not allocate the layer's weights");
        ggml_backend_buffer_set_usage(b, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        m.mat_buf.reset(b);
        l.q.w = wq;
        l.k.w = wk;
    } else {
        m.mat_meta.reset();
        l.q.w = ggml_new_tensor_2d(w, t_wq.type, n_embd, n_q);
        l.k.w = ggml_new_tensor_2d(w, t_wk.type, n_embd, n_k);
    }
    l.q.bias  = has_bq ? vec(n_q) : nullptr;
    l.k.bias  = has_bk ? vec(n_k) : nullptr;
    l.q.scale = has_sq ? vec(1) : nullptr;
    l.k.scale = has_sk ? vec(1) : nullptr;
    l.q.norm  = has_nq ? vec(t_nq.ne[0]) : nullptr;
    l.k.norm  = has_nk ? vec(t_nk.ne[0]) : nullptr;
    l.head_dim = head_dim;
    l.eps = info.rms_eps;
    l.kq_scale = info.kq_scale;
    l.text_scale = info.text_scale;
    l.vision_scale = info.vision_scale;
    m.w_buf = m.ctx->alloc_inputs(w);

    auto put_f32 = [&](ggml_tensor * dst, const tensor_ref & src) {
        if (!dst) return;
        const std::vector<float> v = read_f32(f, path, src);
        for (float x : v) {
            if (!std::isfinite(x)) LKV_INVALID("%s: a layer-%d norm, bias or scale holds NaN or Inf", path, (int) layer);
        }
        upload(dst, v);
    };
    auto put_raw = [&](ggml_tensor * dst, const tensor_ref & src) {
        std::vector<uint8_t> raw(src.nbytes);
        if (raw.size() != ggml_nbytes(dst)) LKV_INVALID("%s: tensor size mismatch", path);
        read_at(f, path, src.offset, raw.data(), raw.size());
        upload(dst, raw);
    };
    put_f32(l.attn_norm, t_norm);
    put_raw(l.q.w, t_wq);
    put_raw(l.k.w, t_wk);
    put_f32(l.q.bias, t_bq);
    put_f32(l.k.bias, t_bk);
    put_f32(l.q.scale, t_sq);
    put_f32(l.k.scale, t_sk);
    put_f32(l.q.norm, t_nq);
    put_f32(l.k.norm, t_nk);
    // the last token row must be inside the file (a truncated file fails here, not per call)
    std::vector<uint8_t> last(m.tok_row_bytes);
    read_at(f, path, t_tok.offset + (uint64_t) (t_tok.ne[1] - 1) * m.tok_row_bytes, last.data(), last.size());
}

constexpr size_t TOKEN_CACHE_BYTES = (size_t) 32 << 20;

// The dequantized, finite embedding row of token `id` (in [0, n_vocab)), read on first use.
const std::vector<float> & token_row(lightkv_guidance_model & m, int32_t id) {
    auto hit = m.token_rows.find(id);
    if (hit != m.token_rows.end()) return hit->second;
    const int64_t n_embd = m.info.n_embd;
    std::vector<uint8_t> raw(m.tok_row_bytes);
    read_at(m.file.get(), m.path.c_str(), m.tok_embd.offset + (uint64_t) id * m.tok_row_bytes, raw.data(), raw.size());
    std::vector<float> row((size_t) n_embd);
    to_f32(m.tok_embd.type, raw.data(), row.data(), n_embd);
    for (int64_t c = 0; c < n_embd; c++) {
        if (!std::isfinite(row[c])) LKV_INVALID("the embedding of token %d is not finite", (int) id);
    }
    if ((m.token_rows.size() + 1) * (size_t) n_embd * sizeof(float) > TOKEN_CACHE_BYTES) m.token_rows.clear();
    return m.token_rows.emplace(id, std::move(row)).first->second;
}

void guidance_model_scores(lightkv_guidance_model & m, const float * vision, int64_t n_vision,
                           const int32_t * tokens, int64_t n_text, float * out) {
    lightkv_context & lc = *m.ctx;
    const lightkv_guidance_info & info = m.info;
    if (n_vision < 0 || n_text < 0) LKV_INVALID("counts must be >= 0 (n_vision %lld, n_text %lld)", (long long) n_vision, (long long) n_text);
    if (n_vision > 0 && !vision) LKV_INVALID("vision must not be NULL");
    if (n_vision > 0 && !out) LKV_INVALID("out_scores must not be NULL");
    if (n_text > 0 && !tokens) LKV_INVALID("text_tokens must not be NULL");
    if (n_vision + n_text > MAX_TOKENS) LKV_INVALID("%lld rows are more than the supported %lld", (long long) (n_vision + n_text), (long long) MAX_TOKENS);
    for (int64_t j = 0; j < n_text; j++) {
        if (tokens[j] < 0 || tokens[j] >= info.n_vocab) {
            LKV_INVALID("token id %d is outside the vocabulary [0, %lld)", (int) tokens[j], (long long) info.n_vocab);
        }
    }
    const int64_t n_in = checked_mul(n_vision, info.n_embd_inp, "vision");
    for (int64_t i = 0; i < n_in; i++) {
        if (!std::isfinite(vision[i])) {
            LKV_INVALID("vision contains NaN or Inf (row %lld)", (long long) (i / info.n_embd_inp));
        }
    }
    lc.last_splits = 0;
    if (n_vision == 0) return;
    if (n_text == 0) {  // an empty sum
        std::fill(out, out + n_vision, 0.0f);
        return;
    }
    const int64_t n_seq = n_vision + n_text;
    checked_mul(checked_mul(n_text, n_seq, "logits"), info.n_head, "logits");
    checked_mul(n_seq, checked_mul(info.n_head, info.head_dim, "q"), "q");

    // ---- the prompt's token rows: read from the file (T rows, not the table) and
    //      dequantized by ggml's own routine for the type, as llama.cpp's CPU get_rows does
    std::vector<float> text((size_t) checked_mul(n_text, info.n_embd, "text"));
    for (int64_t j = 0; j < n_text; j++) {
        const std::vector<float> & row = token_row(m, tokens[j]);
        std::memcpy(text.data() + j * info.n_embd, row.data(), row.size() * sizeof(float));
    }

    // ---- inputs on the chosen backend
    ctx_ptr in_meta = new_meta_context(2);
    ggml_tensor * t_vision = ggml_new_tensor_2d(in_meta.get(), GGML_TYPE_F32, info.n_embd_inp, n_vision);
    ggml_tensor * t_text   = ggml_new_tensor_2d(in_meta.get(), GGML_TYPE_F32, info.n_embd, n_text);
    lc.place_tensors(SCRATCH_ROWS, in_meta.get());
    ggml_backend_tensor_set(t_vision, vision, 0, ggml_nbytes(t_vision));
    upload(t_text, text);

    // ---- one graph: input scaling, RMS norm, Q/K (+bias, head norms), guidance
    ctx_ptr g = new_meta_context(64);
    ggml_tensor * total = lightkv::guidance_from_layer_input(g.get(), t_vision, t_text, m.layer);  // [1, N + T]
    // the vision rows come first: read those n_vision values
    lc.compute_result(g.get(), total, out, n_vision, "guidance scores");
}

}  // namespace

// =============================================================================== C API
extern "C" {

lightkv_status lightkv_gguf_open(const char * path, lightkv_gguf ** out) {
    return guarded(nullptr, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        auto f = std::make_unique<lightkv_gguf>();
        f->g = open_gguf(path);
        *out = f.release();
    });
}

void lightkv_gguf_free(lightkv_gguf * f) { delete f; }

lightkv_status lightkv_gguf_value(const lightkv_gguf * f, const char * key, int32_t * kind,
                                  int64_t * int_value, double * float_value, const char ** str_value) {
    return guarded(nullptr, [&] {
        if (!f || !key) LKV_INVALID("file and key must not be NULL");
        int32_t k = LIGHTKV_GGUF_ABSENT;
        const gguf_context * g = f->g.get();
        const int64_t id = gguf_find_key(g, key);
        if (id >= 0) {
            const gguf_type t = gguf_get_kv_type(g, id);
            if (is_int_type(t)) {
                k = LIGHTKV_GGUF_INT;
                const int64_t v = int_at(g, id, key, 0);
                if (int_value) *int_value = v;
            } else if (t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64) {
                k = LIGHTKV_GGUF_FLOAT;
                if (float_value) *float_value = t == GGUF_TYPE_FLOAT32 ? gguf_get_val_f32(g, id) : gguf_get_val_f64(g, id);
            } else if (t == GGUF_TYPE_BOOL) {
                k = LIGHTKV_GGUF_BOOL;
                if (int_value) *int_value = gguf_get_val_bool(g, id) ? 1 : 0;
            } else if (t == GGUF_TYPE_STRING) {
                k = LIGHTKV_GGUF_STRING;
                if (str_value) *str_value = gguf_get_val_str(g, id);
            } else if (t == GGUF_TYPE_ARRAY) {
                k = LIGHTKV_GGUF_ARRAY;
                if (int_value) *int_value = (int64_t) gguf_get_arr_n(g, id);
            } else {
                LKV_INVALID("%s has an unknown GGUF type %d", key, (int) t);
            }
        }
        if (kind) *kind = k;
    });
}

int64_t lightkv_gguf_n_tensors(const lightkv_gguf * f) { return f ? gguf_get_n_tensors(f->g.get()) : 0; }

int32_t lightkv_gguf_has_tensor(const lightkv_gguf * f, const char * name) {
    return f && name && gguf_find_tensor(f->g.get(), name) >= 0 ? 1 : 0;
}

lightkv_status lightkv_guidance_model_create(lightkv_context * ctx, const char * gguf_path, int32_t layer,
                                             lightkv_guidance_model ** out) {
    return guarded(ctx, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        auto m = std::make_unique<lightkv_guidance_model>();
        m->ctx = ctx;
        load_guidance_model(*m, gguf_path, layer);
        *out = m.release();
    });
}

void lightkv_guidance_model_free(lightkv_guidance_model * model) { delete model; }

lightkv_status lightkv_guidance_model_info(const lightkv_guidance_model * model, lightkv_guidance_info * out) {
    return guarded(model ? model->ctx : nullptr, [&] {
        if (!model || !out) LKV_INVALID("model and out must not be NULL");
        *out = model->info;
    });
}

lightkv_status lightkv_guidance_model_scores(lightkv_guidance_model * model, const float * vision, int64_t n_vision,
                                             const int32_t * text_tokens, int64_t n_text, float * out_scores) {
    return guarded(model ? model->ctx : nullptr, [&] {
        if (!model) LKV_INVALID("model must not be NULL");
        guidance_model_scores(*model, vision, n_vision, text_tokens, n_text, out_scores);
    });
}

}  // extern "C"
