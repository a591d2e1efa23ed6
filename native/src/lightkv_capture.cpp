// Q/K capture: llama.cpp's graph hook (patch 0007) or eval callback in C, copying the wanted
// ROPE nodes into tensors of the lightkv context's backend, and the guidance /
// attention-received graphs that read them there (lightkv.h, "capture").
//
// Why in C: llama.cpp asks the eval callback about EVERY node of every graph it computes; a
// callback in Python costs an interpreter round trip per node and copied the whole Q/K to
// host memory, only to upload it again for the guidance graph. Here the question is a few
// character compares, and the copy stays on the device when llama.cpp and the lightkv
// context share a backend (ggml_backend_tensor_copy: device to device).
// Why the hook: every node the eval callback answers "yes" ends a piece of the graph (the
// scheduler computes up to it and synchronises before calling back). The hook instead marks
// the wanted nodes as outputs when llama.cpp builds a graph, so their memory is not reused,
// and copies them after the whole graph ran in one piece.
#include "lightkv.h"
#include "lightkv_graphs.h"
#include "lightkv_internal.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace lightkv;

namespace {

constexpr int64_t MIN_CAPACITY = 64;   // rows of the first buffer of an entry (grows x2)
constexpr int32_t MAX_LAYER    = 1 << 20;

// the captured rows of one node name ("Qcur-12"), appended micro-batch after micro-batch;
// kind LIGHTKV_CAPTURE_K_CACHE: the layer's K cache tensor instead (no rows)
struct capture_entry {
    int32_t     layer = 0;
    int32_t     kind  = 0;      // LIGHTKV_CAPTURE_Q, _K or _K_CACHE
    std::string name;
    bool        wanted = false;
    ctx_ptr     meta;           // holds `t` only
    buf_ptr     buf;            // t's memory, a buffer of the context's backend
    ggml_tensor * t = nullptr;  // [ne0, ne1, capacity] f32 (head_dim, heads, rows)
    int64_t     rows = 0;
    int64_t     capacity = 0;
    int64_t     ne0 = 0, ne1 = 0;
    ggml_tensor * cache = nullptr;  // K_CACHE: llama.cpp's tensor (owned by its context)
};

constexpr int32_t ALL_KINDS = LIGHTKV_CAPTURE_Q | LIGHTKV_CAPTURE_K | LIGHTKV_CAPTURE_K_CACHE;

const char * kind_name(int32_t kind) {
    switch (kind) {
        case LIGHTKV_CAPTURE_Q: return "Qcur";
        case LIGHTKV_CAPTURE_K: return "Kcur";
        default:                return "the K cache of Kcur";
    }
}

// "Qcur-<l>" / "Kcur-<l>" -> (LIGHTKV_CAPTURE_Q or _K, l); false for any other name
bool parse_qk_name(const char * n, int32_t * kind, long * layer) {
    if ((n[0] != 'Q' && n[0] != 'K') || std::strncmp(n + 1, "cur-", 4) != 0) return false;
    char * end = nullptr;
    *layer = std::strtol(n + 5, &end, 10);
    if (end == n + 5 || *end != '\0') return false;
    *kind = n[0] == 'Q' ? LIGHTKV_CAPTURE_Q : LIGHTKV_CAPTURE_K;
    return true;
}

// a view of rows [row0, row0 + n) of e.t, with its buffer set (ggml_backend_tensor_copy and
// ggml_backend_tensor_get need one)
ggml_tensor * rows_view(ggml_context * scratch, const capture_entry & e, int64_t row0, int64_t n) {
    ggml_tensor * v = ggml_view_3d(scratch, e.t, e.ne0, e.ne1, n, e.t->nb[1], e.t->nb[2],
                                   (size_t) row0 * e.t->nb[2]);
    if (ggml_backend_view_init(v) != GGML_STATUS_SUCCESS) {
        fail(LIGHTKV_ERR_BACKEND, "could not make a view of the captured %s", e.name.c_str());
    }
    return v;
}

// same type, shape and strides: what ggml_backend_tensor_copy asserts (an abort otherwise)
bool same_layout(const ggml_tensor * a, const ggml_tensor * b) {
    if (a->type != b->type) return false;
    for (int i = 0; i < GGML_MAX_DIMS; i++) {
        if (a->ne[i] != b->ne[i] || a->nb[i] != b->nb[i]) return false;
    }
    return true;
}

}  // namespace

struct lightkv_capture {
    lightkv_context *          ctx = nullptr;
    std::vector<capture_entry> entries;   // every (layer, kind) ever wanted
    std::string                error;     // first failure inside the callback ("" if none)
    int64_t n_asked = 0, n_wanted = 0, n_marked = 0, n_copied = 0;
    ctx_ptr                    scratch;   // the views of one copy (reset before each)

    // an empty metadata context for the two views of one copy
    ggml_context * views() {
        if (!scratch) scratch = new_meta_context(2);
        ggml_reset(scratch.get());
        return scratch.get();
    }

    capture_entry * find(int32_t layer, int32_t kind) {
        for (auto & e : entries) {
            if (e.layer == layer && e.kind == kind) return &e;
        }
        return nullptr;
    }

    capture_entry * wanted(long layer, int32_t kind) {
        for (auto & e : entries) {
            if (e.wanted && e.layer == layer && e.kind == kind) return &e;
        }
        return nullptr;
    }

    // the wanted entry named like node t, or nullptr (few compares: called for every node)
    capture_entry * match(const ggml_tensor * t) {
        if (t->op != GGML_OP_ROPE) return nullptr;   // the projection before RoPE has the name too
        int32_t kind;
        long layer;
        return parse_qk_name(t->name, &kind, &layer) ? wanted(layer, kind) : nullptr;
    }

    // t stores a layer's Kcur into its K cache (llama_kv_cache::cpy_k: ggml_set_rows(cache or
    // a view of it, a view of the Kcur ROPE node, cell indices), a view of the cache with the
    // rows as src[0]): remember the cache tensor of a wanted layer. Asked before t is
    // computed; its data is not needed, so it is never split on.
    void note_k_cache(const ggml_tensor * t) {
        if (t->op != GGML_OP_SET_ROWS || !t->src[0] || !t->view_src) return;
        const ggml_tensor * k_cur = t->src[0]->view_src ? t->src[0]->view_src : t->src[0];
        int32_t kind;
        long layer;
        if (k_cur->op != GGML_OP_ROPE || !parse_qk_name(k_cur->name, &kind, &layer) || kind != LIGHTKV_CAPTURE_K) return;
        capture_entry * e = wanted(layer, LIGHTKV_CAPTURE_K_CACHE);
        if (!e) return;
        ggml_tensor * cache = t->view_src;   // ggml_set_rows returns a view of its destination
        while (cache->view_src) cache = cache->view_src;
        e->cache = cache;
    }

    // room for `more` rows after e.rows: a buffer twice as large, the old rows copied over
    void reserve(capture_entry & e, int64_t more) {
        const int64_t need = e.rows + more;
        if (need <= e.capacity) return;
        int64_t cap = std::max<int64_t>(MIN_CAPACITY, e.capacity);
        while (cap < need) cap *= 2;
        checked_mul(checked_mul(e.ne0, e.ne1, "capture"), cap, "capture");
        capture_entry grown;
        grown.name = e.name;
        grown.ne0 = e.ne0;
        grown.ne1 = e.ne1;
        grown.meta = new_meta_context(1);
        grown.t = ggml_new_tensor_3d(grown.meta.get(), GGML_TYPE_F32, e.ne0, e.ne1, cap);
        grown.buf = ctx->alloc_inputs(grown.meta.get());
        if (e.rows > 0) {
            ggml_context * v = views();
            ggml_backend_tensor_copy(rows_view(v, e, 0, e.rows), rows_view(v, grown, 0, e.rows));
        }
        e.meta = std::move(grown.meta);
        e.buf = std::move(grown.buf);
        e.t = grown.t;
        e.capacity = cap;
    }

    // node t (computed, named like e) appended to e's rows
    void append(capture_entry & e, ggml_tensor * t) {
        if (t->type != GGML_TYPE_F32) {
            LKV_INVALID("%s is %s; the capture takes f32 nodes", e.name.c_str(), ggml_type_name(t->type));
        }
        if (!t->buffer && !(t->view_src && t->view_src->buffer)) {
            LKV_INVALID("%s is in no backend buffer (not a node of a scheduled graph)", e.name.c_str());
        }
        if (!ggml_is_contiguous(t) || t->ne[3] != 1) {
            LKV_INVALID("%s is not a contiguous [head_dim, heads, tokens] tensor", e.name.c_str());
        }
        if (e.rows > 0 && (t->ne[0] != e.ne0 || t->ne[1] != e.ne1)) {
            LKV_INVALID("%s changed shape between batches ([%lld, %lld] then [%lld, %lld])", e.name.c_str(),
                        (long long) e.ne0, (long long) e.ne1, (long long) t->ne[0], (long long) t->ne[1]);
        }
        if (e.capacity > 0 && (t->ne[0] != e.ne0 || t->ne[1] != e.ne1)) {
            e.meta.reset();   // an earlier turn of another shape: start a new buffer
            e.buf.reset();
            e.t = nullptr;
            e.capacity = 0;
        }
        e.ne0 = t->ne[0];
        e.ne1 = t->ne[1];
        reserve(e, t->ne[2]);
        ggml_tensor * dst = rows_view(views(), e, e.rows, t->ne[2]);
        if (!same_layout(t, dst)) LKV_INVALID("%s has strides the capture cannot copy", e.name.c_str());
        ggml_backend_tensor_copy(t, dst);
        e.rows += t->ne[2];
        n_copied++;
    }

    // the entry of (layer, kind) with rows (or its cache tensor), checked (read calls)
    capture_entry & captured(int32_t layer, int32_t kind) {
        if (!error.empty()) fail(LIGHTKV_ERR_BACKEND, "the capture failed during the decode: %s", error.c_str());
        if (kind != LIGHTKV_CAPTURE_Q && kind != LIGHTKV_CAPTURE_K && kind != LIGHTKV_CAPTURE_K_CACHE) {
            LKV_INVALID("kind must be LIGHTKV_CAPTURE_Q (1), _K (2) or _K_CACHE (4), got %d", kind);
        }
        capture_entry * e = find(layer, kind);
        if (!e || (kind == LIGHTKV_CAPTURE_K_CACHE ? e->cache == nullptr : e->rows == 0)) {
            LKV_INVALID("nothing was captured of %s-%d (not wanted, or llama.cpp's graph has no "
                        "ROPE node of that name)", kind_name(kind), layer);
        }
        return *e;
    }

    // run f, which is called from inside llama.cpp's compute: a failure cannot go back through
    // llama.cpp, so the first one is kept and reported by the next read
    template <typename F>
    void keeping_failure(F && f) {
        try {
            f();
        } catch (const lkv_error & err) {
            error = err.message;
        } catch (const std::exception & err) {
            error = std::string("internal error: ") + err.what();
        } catch (...) {
            error = "internal error";
        }
    }
};

namespace {

// [ne0, ne1, rows] rows [row0, row0 + n) of a captured entry -> [ne0, n, ne1] contiguous:
// the [head_dim, tokens, heads] layout of the graph builders
ggml_tensor * heads_major(ggml_context * g, const capture_entry & e, int64_t row0, int64_t n) {
    ggml_tensor * v = ggml_view_3d(g, e.t, e.ne0, e.ne1, n, e.t->nb[1], e.t->nb[2], (size_t) row0 * e.t->nb[2]);
    return ggml_cont(g, ggml_permute(g, v, 0, 2, 1, 3));
}

}  // namespace

lightkv_context * lightkv::capture_context(lightkv_capture * cap) { return cap ? cap->ctx : nullptr; }

extern "C" {

lightkv_status lightkv_capture_create(lightkv_context * ctx, lightkv_capture ** out) {
    return guarded(ctx, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        auto cap = std::make_unique<lightkv_capture>();
        cap->ctx = ctx;
        *out = cap.release();
    });
}

void lightkv_capture_free(lightkv_capture * cap) { delete cap; }

lightkv_status lightkv_capture_want(lightkv_capture * cap, const int32_t * layers, const int32_t * kinds, int32_t n) {
    return guarded(cap ? cap->ctx : nullptr, [&] {
        if (!cap) LKV_INVALID("cap must not be NULL");
        if (n < 0) LKV_INVALID("n must be >= 0, got %d", n);
        if (n > 0 && (!layers || !kinds)) LKV_INVALID("layers and kinds must not be NULL when n > 0");
        for (int32_t i = 0; i < n; i++) {
            if (layers[i] < 0 || layers[i] >= MAX_LAYER) LKV_INVALID("layer %d is out of range", layers[i]);
            if (kinds[i] < 1 || kinds[i] > ALL_KINDS) {
                LKV_INVALID("kinds of layer %d must be LIGHTKV_CAPTURE_Q (1), _K (2), _K_CACHE (4) or'ed, got %d",
                            layers[i], kinds[i]);
            }
            for (int32_t j = 0; j < i; j++) {
                if (layers[j] == layers[i]) LKV_INVALID("layer %d is wanted twice", layers[i]);
            }
        }
        for (auto & e : cap->entries) e.wanted = false;
        for (int32_t i = 0; i < n; i++) {
            for (int32_t kind : {LIGHTKV_CAPTURE_Q, LIGHTKV_CAPTURE_K, LIGHTKV_CAPTURE_K_CACHE}) {
                if (!(kinds[i] & kind)) continue;
                capture_entry * e = cap->find(layers[i], kind);
                if (!e) {
                    cap->entries.emplace_back();
                    e = &cap->entries.back();
                    e->layer = layers[i];
                    e->kind = kind;
                    e->name = std::string(kind_name(kind)) + "-" + std::to_string(layers[i]);
                    if (kind == LIGHTKV_CAPTURE_K_CACHE) e->ne0 = e->ne1 = 0;
                }
                e->wanted = true;
            }
        }
    });
}

lightkv_status lightkv_capture_reset(lightkv_capture * cap) {
    return guarded(cap ? cap->ctx : nullptr, [&] {
        if (!cap) LKV_INVALID("cap must not be NULL");
        for (auto & e : cap->entries) {
            e.rows = 0;
            e.cache = nullptr;   // found again by the next decode (its context may be gone)
        }
        cap->error.clear();
    });
}

bool lightkv_capture_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = static_cast<lightkv_capture *>(user_data);
    if (!cap || !t) return !ask;   // wants nothing; never stops the computation
    capture_entry * e = cap->match(t);
    if (ask) {
        cap->n_asked++;
        cap->note_k_cache(t);
        if (e) cap->n_wanted++;
        return e != nullptr;
    }
    // the node is computed (the scheduler synchronised its backend): copy it
    if (e && cap->error.empty()) cap->keeping_failure([&] { cap->append(*e, t); });
    return true;
}

void lightkv_capture_graph(struct ggml_cgraph * gf, bool computed, void * user_data) {
    auto * cap = static_cast<lightkv_capture *>(user_data);
    if (!cap || !gf) return;
    const int n_nodes = ggml_graph_n_nodes(gf);
    if (!computed) {
        // a new graph, not yet allocated: keep the wanted nodes' memory to the end of it
        for (int i = 0; i < n_nodes; i++) {
            ggml_tensor * t = ggml_graph_node(gf, i);
            if (cap->match(t)) {
                ggml_set_output(t);
                cap->n_marked++;
            }
        }
        return;
    }
    // computed (built now or reused) and synchronised: copy the wanted nodes, in graph order.
    // The K cache is looked for in every graph: a reset forgets it, a reused graph has it.
    for (int i = 0; i < n_nodes; i++) {
        ggml_tensor * t = ggml_graph_node(gf, i);
        cap->note_k_cache(t);
        capture_entry * e = cap->match(t);
        if (!e || !cap->error.empty()) continue;
        cap->keeping_failure([&] {
            if (!(t->flags & GGML_TENSOR_FLAG_OUTPUT)) {
                // its memory may hold another node's data by now
                LKV_INVALID("%s was wanted after llama.cpp built the graph, which did not keep it "
                            "(set the graph hook again after lightkv_capture_want)", e->name.c_str());
            }
            cap->append(*e, t);
        });
    }
}

lightkv_status lightkv_capture_shape(const lightkv_capture * cap, int32_t layer, int32_t kind,
                                     int64_t * n_rows, int64_t * n_head, int64_t * head_dim) {
    return guarded(cap ? cap->ctx : nullptr, [&] {
        if (!cap) LKV_INVALID("cap must not be NULL");
        if (kind != LIGHTKV_CAPTURE_Q && kind != LIGHTKV_CAPTURE_K) {
            LKV_INVALID("kind must be LIGHTKV_CAPTURE_Q (1) or LIGHTKV_CAPTURE_K (2), got %d", kind);
        }
        const capture_entry * e = const_cast<lightkv_capture *>(cap)->find(layer, kind);
        if (n_rows) *n_rows = e ? e->rows : 0;
        if (n_head) *n_head = e && e->rows ? e->ne1 : 0;
        if (head_dim) *head_dim = e && e->rows ? e->ne0 : 0;
    });
}

lightkv_status lightkv_capture_stats(const lightkv_capture * cap, int64_t * n_asked, int64_t * n_wanted,
                                     int64_t * n_marked, int64_t * n_copied) {
    return guarded(cap ? cap->ctx : nullptr, [&] {
        if (!cap) LKV_INVALID("cap must not be NULL");
        if (n_asked) *n_asked = cap->n_asked;
        if (n_wanted) *n_wanted = cap->n_wanted;
        if (n_marked) *n_marked = cap->n_marked;
        if (n_copied) *n_copied = cap->n_copied;
    });
}

lightkv_status lightkv_capture_read(lightkv_capture * cap, int32_t layer, int32_t kind, int64_t row0,
                                    int64_t n_rows, float * out) {
    return guarded(cap ? cap->ctx : nullptr, [&] {
        if (!cap) LKV_INVALID("cap must not be NULL");
        capture_entry & e = cap->captured(layer, kind);
        if (row0 < 0 || n_rows < 0 || row0 + n_rows > e.rows) {
            LKV_INVALID("rows [%lld, %lld) are outside the %lld captured rows of %s", (long long) row0,
                        (long long) (row0 + n_rows), (long long) e.rows, e.name.c_str());
        }
        if (n_rows == 0) return;
        if (!out) LKV_INVALID("out must not be NULL");
        ggml_backend_tensor_get(e.t, out, (size_t) row0 * e.t->nb[2], (size_t) n_rows * e.t->nb[2]);
    });
}

lightkv_status lightkv_capture_guidance(lightkv_capture * cap, int32_t layer,
                                        const int64_t * vision_idx, int64_t n_vision,
                                        const int64_t * text_idx, int64_t n_text,
                                        float scale, float * out_scores) {
    return guarded(cap ? cap->ctx : nullptr, [&] {
        if (!cap) LKV_INVALID("cap must not be NULL");
        capture_entry & q = cap->captured(layer, LIGHTKV_CAPTURE_Q);
        capture_entry & k = cap->captured(layer, LIGHTKV_CAPTURE_K);
        if (q.rows != k.rows) {
            LKV_INVALID("%s has %lld rows but %s %lld", q.name.c_str(), (long long) q.rows, k.name.c_str(),
                        (long long) k.rows);
        }
        if (q.ne0 != k.ne0 || k.ne1 < 1 || q.ne1 % k.ne1 != 0) {
            LKV_INVALID("%s [%lld, %lld] and %s [%lld, %lld] are not query and key heads of one layer",
                        q.name.c_str(), (long long) q.ne0, (long long) q.ne1, k.name.c_str(),
                        (long long) k.ne0, (long long) k.ne1);
        }
        if (!std::isfinite(scale)) LKV_INVALID("scale must be finite");
        const int64_t n_seq = q.rows;
        std::vector<char> seen;
        check_indices(vision_idx, n_vision, n_seq, "vision", seen);
        check_indices(text_idx, n_text, n_seq, "text", seen);
        if (n_vision > 0 && !out_scores) LKV_INVALID("out_scores must not be NULL");
        lightkv_context * ctx = cap->ctx;
        ctx->last_splits = 0;
        if (n_vision == 0) return;
        if (n_text == 0) {  // an empty sum
            std::fill(out_scores, out_scores + n_vision, 0.0f);
            return;
        }
        checked_mul(checked_mul(n_text, n_seq, "logits"), q.ne1, "logits");
        const int64_t n_head_kv = k.ne1;

        ctx_ptr in_meta = new_meta_context(2);
        ggml_tensor * t_t = ggml_new_tensor_2d(in_meta.get(), GGML_TYPE_I32, n_text, n_head_kv);
        ggml_tensor * t_v = ggml_new_tensor_1d(in_meta.get(), GGML_TYPE_I32, n_vision);
        buf_ptr in_buf = ctx->alloc_inputs(in_meta.get());
        std::vector<int32_t> vi(vision_idx, vision_idx + n_vision);
        upload(t_t, text_rows_per_head(text_idx, n_text, n_head_kv));
        upload(t_v, vi);

        ctx_ptr g = new_meta_context(40);
        ggml_tensor * t_q = heads_major(g.get(), q, 0, n_seq);   // [d, S, H]
        ggml_tensor * t_k = heads_major(g.get(), k, 0, n_seq);   // [d, S, H_kv]
        ggml_tensor * gs = lightkv::guidance_from_qk(g.get(), t_q, t_k, t_t, t_v, scale);
        ctx->compute_result(g.get(), gs, out_scores, n_vision, "guidance scores");
    });
}

lightkv_status lightkv_capture_attention_received(lightkv_capture * cap, int32_t layer, int64_t n_query,
                                                        const int32_t * cells, int64_t n_key,
                                                        const int32_t * q_pos, const int32_t * k_pos,
                                                        float scale, float * out) {
    return guarded(cap ? cap->ctx : nullptr, [&] {
        if (!cap) LKV_INVALID("cap must not be NULL");
        capture_entry & q = cap->captured(layer, LIGHTKV_CAPTURE_Q);
        capture_entry & kc = cap->captured(layer, LIGHTKV_CAPTURE_K_CACHE);
        ggml_tensor * cache = kc.cache;
        if (n_query < 1 || n_query > q.rows) {
            LKV_INVALID("n_query must be in [1, %lld] (the captured rows of %s), got %lld", (long long) q.rows,
                        q.name.c_str(), (long long) n_query);
        }
        const int64_t head_dim = q.ne0, n_head = q.ne1;
        if (cache->ne[2] != 1 || cache->ne[3] != 1) {
            LKV_INVALID("the K cache of layer %d has %lld streams; one is supported", layer, (long long) cache->ne[2]);
        }
        if (cache->ne[0] % head_dim != 0 || n_head % (cache->ne[0] / head_dim) != 0) {
            LKV_INVALID("the K cache rows of layer %d (%lld values) are not key heads of the %lld x %lld queries",
                        layer, (long long) cache->ne[0], (long long) n_head, (long long) head_dim);
        }
        const int64_t n_head_kv = cache->ne[0] / head_dim;
        if (n_key < 1 || n_key > MAX_TOKENS) LKV_INVALID("n_key must be in [1, %lld], got %lld", (long long) MAX_TOKENS, (long long) n_key);
        if (!cells || !q_pos || !k_pos || !out) LKV_INVALID("cells, q_pos, k_pos and out must not be NULL");
        if (!std::isfinite(scale)) LKV_INVALID("scale must be finite");
        for (int64_t j = 0; j < n_key; j++) {
            if (cells[j] < 0 || cells[j] >= cache->ne[1]) {
                LKV_INVALID("cell %d is outside the K cache's %lld cells", cells[j], (long long) cache->ne[1]);
            }
        }
        checked_mul(checked_mul(n_query, n_key, "logits"), n_head, "logits");
        const std::vector<float> mask = causal_mask(q_pos, n_query, k_pos, n_key);
        if (!cache->buffer) LKV_INVALID("the K cache of layer %d is in no backend buffer", layer);
        lightkv_context * ctx = cap->ctx;
        ctx->last_splits = 0;

        // which of the context's backends reads the cache's buffer where it is (the
        // scheduler aborts on a buffer none of its backends supports): the chosen backend
        // (llama.cpp on the same device), else the CPU (a host buffer); neither: the rows
        // come through the host
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(cache->buffer);
        ggml_backend_t reader = ggml_backend_supports_buft(ctx->primary, buft) ? ctx->primary
                              : ggml_backend_supports_buft(ctx->cpu, buft)     ? ctx->cpu
                                                                                : nullptr;
        ctx_ptr in_meta = new_meta_context(3);
        ggml_tensor * t_i = ggml_new_tensor_1d(in_meta.get(), GGML_TYPE_I32, n_key);
        ggml_tensor * t_m = ggml_new_tensor_2d(in_meta.get(), GGML_TYPE_F32, n_key, n_query);
        ggml_tensor * t_rows = reader ? nullptr : ggml_new_tensor_2d(in_meta.get(), cache->type, cache->ne[0], n_key);
        buf_ptr in_buf = ctx->alloc_inputs(in_meta.get());
        std::vector<int32_t> idx(cells, cells + n_key);
        if (!reader) {
            // gather the rows through the host (ggml copies nothing between foreign buffers)
            std::vector<uint8_t> rows((size_t) (cache->nb[1] * n_key));
            for (int64_t j = 0; j < n_key; j++) {
                ggml_backend_tensor_get(cache, rows.data() + j * cache->nb[1], (size_t) cells[j] * cache->nb[1], cache->nb[1]);
                idx[j] = (int32_t) j;
            }
            ggml_backend_tensor_set(t_rows, rows.data(), 0, rows.size());
        }
        upload(t_i, idx);
        ggml_backend_tensor_set(t_m, mask.data(), 0, ggml_nbytes(t_m));

        ctx_ptr g = new_meta_context(32);
        ggml_tensor * src = reader ? ggml_view_2d(g.get(), cache, cache->ne[0], cache->ne[1], cache->nb[1], 0) : t_rows;
        ggml_tensor * k_rows = ggml_get_rows(g.get(), src, t_i);                          // [H_kv * d, N] f32
        ggml_tensor * k = ggml_reshape_3d(g.get(), k_rows, head_dim, n_head_kv, n_key);   // [d, H_kv, N]
        k = ggml_cont(g.get(), ggml_permute(g.get(), k, 0, 2, 1, 3));                     // [d, N, H_kv]
        ggml_tensor * t_q = heads_major(g.get(), q, q.rows - n_query, n_query);          // [d, W, H]
        ggml_tensor * r = lightkv::attention_received(g.get(), t_q, k, t_m, scale);
        ctx->compute_result(g.get(), r, out, n_key, "attention scores", k_rows, reader);
    });
}

}  // extern "C"
