// Layer mode's driver: the prefill of one turn with the schedule's merges between decoder
// layers, over the patched llama.cpp (lightkv.h, "layer mode: the prefill of one turn").
//
// The turn is a list of segments (text tokens, image embeddings). Each range of layers
// between two merges is one pass of llama_decode over the rows still present (patch 0003),
// the hidden state leaving the range comes back to the host, and the stage layer's Q/K go to
// the capture (patch 0007's hook). Then each image is merged in its windows (the merge plans
// of lightkv.cpp), and the KV cells of the turn are compacted or restricted (patches 0004,
// 0005, 0006). Every check runs before the first decode (check_turn).
#include "lightkv_internal.h"

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

using namespace lightkv;

struct lightkv_layer_prefill {
    std::vector<float>                 logits;
    int64_t                            rows = 0;
    int32_t                            n_pos = 1;
    std::vector<int32_t>               positions;   // [n_pos][rows]
    std::vector<std::vector<int32_t>>  cells;       // per cache: [rows]
    std::vector<std::vector<int64_t>>  kept;        // per image
    struct range {
        int32_t il_begin, il_end;
        std::vector<std::vector<int32_t>> cells;    // per cache
    };
    std::vector<range>                 ranges;
    std::unique_ptr<lightkv_schedule>        schedule;  // the report points at this copy
    std::unique_ptr<lightkv_schedule_report> report;
    double t_guidance_ms = 0.0, t_merge_ms = 0.0, t_compact_ms = 0.0;
};

namespace {

using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

[[noreturn]] void llama_failed(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

void llama_failed(const char * fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fail(LIGHTKV_ERR_BACKEND, "%s", buf);
}

// What the model and context are, read once per call.
struct model_info {
    const llama_model * model = nullptr;
    int32_t n_layer = 0, n_embd = 0, n_head = 0, n_vocab = 0;
    int32_t n_batch = 0, n_ubatch = 0;
    bool    mrope = false;                 // 4 positions a row (M-RoPE sections)
    std::vector<int32_t> cache_size;       // cells of each KV cache (1, or the iSWA pair)
    float   guidance_scale = 0.0f;         // 0: the capture's head_dim rule
};

// The architecture name ("" if unreadable).
std::string arch_of(const llama_model * model) {
    char buf[64] = {0};
    return llama_model_meta_val_str(model, "general.architecture", buf, sizeof buf) > 0 ? buf : "";
}

model_info read_model(llama_context * lctx, int32_t n_batch) {
    if (!lctx) LKV_INVALID("the llama context must not be NULL");
    model_info mi;
    mi.model = llama_get_model(lctx);
    mi.n_layer = llama_model_n_layer(mi.model);
    // the patches cover some graph builders only: ask llama.cpp (it computes nothing)
    const bool covered = llama_set_layer_range(lctx, 0, mi.n_layer);
    llama_set_layer_range(lctx, 0, -1);
    if (!covered) {
        LKV_INVALID("layer mode does not cover this model's architecture or memory (the llama, "
                    "qwen2, qwen2vl and gemma3 graphs with one KV cache or the sliding-window pair "
                    "are patched)");
    }
    mi.n_embd = llama_model_n_embd(mi.model);
    mi.n_head = llama_model_n_head(mi.model);
    mi.n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(mi.model));
    const int rope = llama_model_rope_type(mi.model);
    mi.mrope = rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE;
    mi.n_batch = n_batch > 0 ? n_batch : (int32_t) llama_n_batch(lctx);
    mi.n_ubatch = (int32_t) llama_n_ubatch(lctx);
    mi.cache_size.push_back(llama_kv_cells_select(lctx, 0));
    if (llama_model_n_swa(mi.model) > 0) {
        const int32_t n_swa_cells = llama_kv_cells_select(lctx, 1);
        if (n_swa_cells > 0) mi.cache_size.push_back(n_swa_cells);
        llama_kv_cells_select(lctx, 0);
    }
    // the guidance's scale is the layer's own: 1/sqrt(head_dim), except Gemma 3 27B, whose
    // query_pre_attn_scalar is n_embd / n_head (llama.cpp's f_attention_scale for its 62 layers)
    if (arch_of(mi.model) == "gemma3" && mi.n_layer == 62) {
        mi.guidance_scale = 1.0f / std::sqrt((float) mi.n_embd / (float) mi.n_head);
    }
    return mi;
}

// The grid an image's windows are cut on: its own, or the published padded square.
void window_grid(const lightkv_segment & s, int64_t * rows, int64_t * cols) {
    if (s.grid_rows > 0 && s.grid_cols > 0) {
        *rows = s.grid_rows;
        *cols = s.grid_cols;
        return;
    }
    int64_t side = (int64_t) std::sqrt((double) s.n);
    while (side * side < s.n) side++;
    while (side > 1 && (side - 1) * (side - 1) >= s.n) side--;
    *rows = *cols = side;
}

// Every rule of a turn, before any compute (data pointers only when need_data).
void check_turn(const model_info & mi, const lightkv_segment * segs, int32_t n_segs,
                const lightkv_layer_prefill_params * p, bool need_data) {
    if (!p) LKV_INVALID("params must not be NULL");
    const lightkv_schedule * sched = p->schedule;
    if (!sched) LKV_INVALID("the schedule must not be NULL");
    if (sched->n_layer != mi.n_layer) {
        LKV_INVALID("the schedule was made for %d layers but the model has %d", sched->n_layer, mi.n_layer);
    }
    if (!(p->protect >= 0.0 && p->protect <= 1.0)) LKV_INVALID("protect must be in [0, 1], got %g", p->protect);
    if (p->protect > 0.0 && sched->use_threshold) {
        LKV_INVALID("a protected stage (protect %g) takes no similarity threshold", p->protect);
    }
    if (p->n_observe < 0 || (p->n_observe > 0 && !p->observe_layers)) LKV_INVALID("bad observe_layers");
    for (int32_t i = 0; i < p->n_observe; i++) {
        if (p->observe_layers[i] < 0 || p->observe_layers[i] >= mi.n_layer) {
            LKV_INVALID("observed layer %d is outside [0, %d)", p->observe_layers[i], mi.n_layer);
        }
    }
    if (n_segs < 1 || !segs) LKV_INVALID("the turn has no segment");
    if (segs[n_segs - 1].kind != LIGHTKV_SEGMENT_TEXT) {
        LKV_INVALID("the turn must end with text (the logits to sample from)");
    }
    const int32_t n_pos = mi.mrope ? 4 : 1;
    const int64_t one_batch = std::min(mi.n_batch, mi.n_ubatch);
    int64_t n_rows = 0;
    for (int32_t i = 0; i < n_segs; i++) {
        const lightkv_segment & s = segs[i];
        if (s.n < 1) LKV_INVALID("segment %d has %lld rows", i, (long long) s.n);
        if (s.n > MAX_TOKENS) LKV_INVALID("segment %d has too many rows (%lld)", i, (long long) s.n);
        n_rows += s.n;
        if (need_data && !s.pos) LKV_INVALID("segment %d has no positions", i);
        if (s.kind == LIGHTKV_SEGMENT_TEXT) {
            if (s.n_pos != 1 && s.n_pos != n_pos) {
                LKV_INVALID("text segment %d: positions need 1 or %d rows, got %d", i, n_pos, s.n_pos);
            }
            if (need_data && !s.tokens) LKV_INVALID("text segment %d has no tokens", i);
            if (need_data) {
                for (int64_t j = 0; j < s.n; j++) {
                    if (s.tokens[j] < 0 || s.tokens[j] >= mi.n_vocab) {
                        LKV_INVALID("text segment %d: token %d is outside the vocabulary [0, %d)", i,
                                    s.tokens[j], mi.n_vocab);
                    }
                }
            }
        } else if (s.kind == LIGHTKV_SEGMENT_IMAGE) {
            if (s.n_pos != n_pos) LKV_INVALID("image segment %d: positions need %d rows, got %d", i, n_pos, s.n_pos);
            if (need_data && !s.embd) LKV_INVALID("image segment %d has no embeddings", i);
            if (need_data) {
                const std::string what = "the embedding of image segment " + std::to_string(i);
                check_finite(s.embd, checked_mul(s.n, mi.n_embd, "image rows"), what.c_str());
            }
            if ((s.grid_rows > 0) != (s.grid_cols > 0) || s.grid_rows < 0 || s.grid_cols < 0 ||
                (s.grid_rows > 0 && s.grid_rows * s.grid_cols != s.n)) {
                LKV_INVALID("image segment %d: grid %lldx%lld does not hold its %lld rows", i,
                            (long long) s.grid_rows, (long long) s.grid_cols, (long long) s.n);
            }
            int64_t rows, cols;
            window_grid(s, &rows, &cols);
            if (lightkv_schedule_check_grid(sched, rows, cols) != LIGHTKV_OK) {
                LKV_INVALID("%s", lightkv_last_error(nullptr));
            }
            if (s.cells) {
                std::vector<char> seen((size_t) (rows * cols), 0);
                for (int64_t j = 0; j < s.n; j++) {
                    const int64_t r = s.cells[2 * j], c = s.cells[2 * j + 1];
                    if (r < 0 || r >= rows || c < 0 || c >= cols || seen[r * cols + c]) {
                        LKV_INVALID("image segment %d: row %lld's cell (%lld, %lld) is outside the %lldx%lld "
                                    "grid or taken twice", i, (long long) j, (long long) r, (long long) c,
                                    (long long) rows, (long long) cols);
                    }
                    seen[r * cols + c] = 1;
                }
            }
            if (s.non_causal && s.n > one_batch) {
                LKV_INVALID("an image of %lld rows attends to itself both ways and must be decoded in one "
                            "batch, but this context takes %lld (raise n_batch and n_ubatch)",
                            (long long) s.n, (long long) one_batch);
            }
        } else {
            LKV_INVALID("segment %d has unknown kind %d", i, s.kind);
        }
    }
    // A sliding-window cache (cache 1 of the iSWA pair) holds window + n_ubatch cells unless
    // the context was made with swa_full, and llama.cpp gives a new row a cell whose position
    // left the window; every row of the turn needs its own cell until the merge read it:
    // compact, the turn's rows; exact, each range's rows.
    const int64_t n_ranges = (int64_t) sched->stages.size() + 1;
    for (size_t c = 1; c < mi.cache_size.size(); c++) {
        const int64_t need = sched->kv == LIGHTKV_KV_COMPACT ? n_rows : n_rows * n_ranges;
        if (need > mi.cache_size[c]) {
            LKV_INVALID("the sliding-window KV cache holds %d cells, but a layer-mode prefill of this turn "
                        "(%lld rows%s) needs %lld; create the context with swa_full or a larger n_ubatch",
                        mi.cache_size[c], (long long) n_rows,
                        sched->kv == LIGHTKV_KV_COMPACT ? ", kv compact" : " in each layer range, kv exact",
                        (long long) need);
        }
    }
}

// The rows of one segment as they go through the ranges.
struct seg_rows {
    const lightkv_segment *           seg;
    bool                              tokens = false;  // text in range 0: token ids
    std::vector<float>                x;               // [m][D] rows entering the next range
    std::vector<int32_t>              pos;             // [n_pos][m]
    std::vector<int64_t>              orig;            // [m] original index in the segment
    std::vector<int64_t>              gpos;            // image: [m][2] cell on the grid
    int64_t                           grid_rows = 0, grid_cols = 0;
    std::vector<std::vector<int32_t>> cells;           // per cache: [m]
    std::vector<float>                h;               // [m][D] leaving the range
    int64_t m() const { return (int64_t) orig.size(); }
    bool image() const { return seg->kind == LIGHTKV_SEGMENT_IMAGE; }
};

// One merge of an image's rows: (x, kept, assign, weight) over its current rows.
struct stage_merge {
    std::vector<float>   x;
    std::vector<int64_t> kept, assign;
    std::vector<float>   weight;
};

stage_merge take(lightkv_merge_result * raw) {
    std::unique_ptr<lightkv_merge_result, void (*)(lightkv_merge_result *)> r(raw, lightkv_merge_result_free);
    stage_merge out;
    const int64_t m = lightkv_merge_result_rows(raw), n = lightkv_merge_result_tokens(raw),
                  d = lightkv_merge_result_dim(raw);
    out.x.assign(lightkv_merge_result_x(raw), lightkv_merge_result_x(raw) + m * d);
    out.kept.assign(lightkv_merge_result_kept(raw), lightkv_merge_result_kept(raw) + m);
    out.assign.assign(lightkv_merge_result_assign(raw), lightkv_merge_result_assign(raw) + n);
    out.weight.assign(lightkv_merge_result_weight(raw), lightkv_merge_result_weight(raw) + n);
    return out;
}

void check_ok(lightkv_context * ctx, lightkv_status st) {
    if (st != LIGHTKV_OK) fail(st, "%s", lightkv_last_error(ctx));
}

// The driver's state of one call: the context, its caches and the turn's rows.
struct driver {
    lightkv_capture *                    cap;
    lightkv_context *                    ctx;        // the capture's: guidance and merges
    llama_context *                      lctx;
    const model_info &                   mi;
    const lightkv_layer_prefill_params & p;
    const lightkv_schedule &             sched;
    std::vector<std::vector<uint8_t>>    held;       // per cache: the turn's cells still needed

    void select(int32_t cache) {
        if (llama_kv_cells_select(lctx, cache) < 0) llama_failed("llama.cpp has no KV cache %d here", cache);
    }
    int32_t n_caches() const { return (int32_t) mi.cache_size.size(); }

    // rows [lo, hi) of r through the current layer range; returns their cells per cache and
    // appends the hidden state leaving the range to r.h (unless last)
    void decode(seg_rows & r, int64_t lo, int64_t hi, bool logits_last, bool last,
                std::vector<std::vector<int32_t>> & cells) {
        const int64_t n = hi - lo;
        const int32_t n_pos = mi.mrope ? 4 : 1;
        const int64_t m = r.m();
        std::vector<llama_pos> pos;
        std::vector<llama_token> toks;
        std::vector<float> embd;
        llama_batch b = {};
        b.n_tokens = (int32_t) n;
        if (r.tokens) {                    // one position a token
            pos.assign(r.pos.begin() + lo, r.pos.begin() + hi);
            toks.resize((size_t) n);
            for (int64_t j = 0; j < n; j++) toks[j] = r.seg->tokens[r.orig[lo + j]];
            b.token = toks.data();
        } else {
            pos.resize((size_t) (n_pos * n));
            for (int32_t k = 0; k < n_pos; k++) {
                // text rows under M-RoPE: t = y = x = z (row 0); image rows: their sections
                const int32_t src = r.image() ? k : 0;
                for (int64_t j = 0; j < n; j++) pos[k * n + j] = r.pos[src * m + lo + j];
            }
            embd.assign(r.x.begin() + lo * mi.n_embd, r.x.begin() + hi * mi.n_embd);
            b.embd = embd.data();
        }
        std::vector<int32_t> n_seq((size_t) n, 1);
        llama_seq_id seq0 = 0;
        std::vector<llama_seq_id *> seq_ptr((size_t) n, &seq0);
        std::vector<int8_t> logits((size_t) n, 0);
        logits[n - 1] = logits_last ? 1 : 0;
        b.pos = pos.data();
        b.n_seq_id = n_seq.data();
        b.seq_id = seq_ptr.data();
        b.logits = logits.data();
        const int rc = llama_decode(lctx, b);
        if (rc != 0) llama_failed("llama_decode failed in layer mode (rc=%d)", rc);
        for (int32_t c = 0; c < n_caches(); c++) {
            select(c);
            std::vector<int32_t> got((size_t) n);
            if (llama_get_layer_range_cells(lctx, got.data(), (int32_t) n) != n) {
                llama_failed("llama.cpp did not report the KV cells of the batch");
            }
            for (int32_t cell : got) {
                if (cell < 0 || cell >= mi.cache_size[c]) llama_failed("llama.cpp reported KV cell %d", cell);
                if (held[c][cell]) {
                    llama_failed("llama.cpp's sliding-window KV cache gave a cell of this turn to another row "
                                 "during a layer-mode prefill; create the context with swa_full (a full-size "
                                 "sliding-window cache)");
                }
                held[c][cell] = 1;
            }
            cells[c].insert(cells[c].end(), got.begin(), got.end());
        }
        select(0);
        if (!last) {
            const float * out = llama_get_layer_range_out(lctx);
            if (!out) llama_failed("llama.cpp returned no hidden state");
            r.h.insert(r.h.end(), out, out + n * mi.n_embd);
        }
    }

    // r's rows through the current range: in batches of n_batch, or, for a non-causal image,
    // all in one batch with causal attention off (as libmtmd decodes it)
    void decode_rows(seg_rows & r, bool last, bool logits_last) {
        r.h.clear();
        r.cells.assign((size_t) n_caches(), {});
        const int64_t m = r.m();
        const int64_t step = r.seg->non_causal ? m : mi.n_batch;
        if (r.seg->non_causal) llama_set_causal_attn(lctx, false);
        try {
            for (int64_t lo = 0; lo < m; lo += step) {
                const int64_t hi = std::min(lo + step, m);
                decode(r, lo, hi, logits_last && hi == m, last, r.cells);
            }
        } catch (...) {
            if (r.seg->non_causal) llama_set_causal_attn(lctx, true);
            throw;
        }
        if (r.seg->non_causal) llama_set_causal_attn(lctx, true);
    }

    // layers [0, n_layers) of the new rows' cells := the merge's weighted combination of the
    // previous rows' stored K/V (src, previous row order), in one cache
    void compact(int32_t cache, const std::vector<int32_t> & src, const std::vector<int32_t> & dst_of_src,
                 const std::vector<float> & weight, const std::vector<int32_t> & dst, int32_t n_layers) {
        select(cache);
        const bool ok = llama_kv_cells_merge(lctx, 0, n_layers, (int32_t) src.size(), src.data(), dst_of_src.data(),
                                             weight.data(), (int32_t) dst.size(), dst.data());
        select(0);
        if (!ok) llama_failed("llama.cpp could not compact the KV cells");
    }

    void set_layers(int32_t cache, const std::vector<int32_t> & cells, int32_t il_begin, int32_t il_end) {
        select(cache);
        const bool ok = llama_kv_cells_set_layers(lctx, (int32_t) cells.size(), cells.data(), il_begin, il_end);
        select(0);
        if (!ok) llama_failed("llama.cpp could not restrict the KV cells to layers [%d, %d)", il_begin, il_end);
    }

    void run(const lightkv_segment * segs, int32_t n_segs, lightkv_layer_prefill & res);
};

void driver::run(const lightkv_segment * segs, int32_t n_segs, lightkv_layer_prefill & res) {
    const int32_t n_pos = mi.mrope ? 4 : 1;
    const bool compact_kv = sched.kv == LIGHTKV_KV_COMPACT;
    const bool renumber = sched.positions == LIGHTKV_POSITIONS_RENUMBER;
    const int32_t start = p.turn_start >= 0 ? p.turn_start : segs[0].pos[0];

    std::vector<seg_rows> rows((size_t) n_segs);
    int64_t n_vis = 0;
    for (int32_t i = 0; i < n_segs; i++) {
        const lightkv_segment & s = segs[i];
        seg_rows & r = rows[i];
        r.seg = &s;
        r.orig.resize((size_t) s.n);
        std::iota(r.orig.begin(), r.orig.end(), 0);
        r.pos.resize((size_t) (n_pos * s.n));
        for (int32_t k = 0; k < n_pos; k++) {  // text with one row of positions: repeated
            const int32_t src = k < s.n_pos ? k : 0;
            std::memcpy(&r.pos[k * s.n], s.pos + src * s.n, (size_t) s.n * sizeof(int32_t));
        }
        if (r.image()) {
            n_vis += s.n;
            r.x.assign(s.embd, s.embd + s.n * mi.n_embd);
            window_grid(s, &r.grid_rows, &r.grid_cols);
            r.gpos.resize((size_t) (2 * s.n));
            for (int64_t j = 0; j < s.n; j++) {
                r.gpos[2 * j] = s.cells ? s.cells[2 * j] : j / r.grid_cols;
                r.gpos[2 * j + 1] = s.cells ? s.cells[2 * j + 1] : j % r.grid_cols;
            }
        } else {
            r.tokens = true;
        }
    }

    std::vector<int32_t> bounds{0};
    for (const auto & st : sched.stages) bounds.push_back(st.layer + 1);
    bounds.push_back(mi.n_layer);

    res.schedule = std::make_unique<lightkv_schedule>(sched);
    lightkv_schedule_report * rep = nullptr;
    check_ok(nullptr, lightkv_schedule_report_create(res.schedule.get(), n_vis, &rep));
    res.report.reset(rep);

    held.assign((size_t) n_caches(), {});
    for (int32_t c = 0; c < n_caches(); c++) held[c].assign((size_t) mi.cache_size[c], 0);
    std::vector<std::vector<int32_t>> prev_cells;          // per cache: cells of the rows entering
    // per row group: (assign into the new rows, weight) of the last merge
    std::vector<std::pair<std::vector<int64_t>, std::vector<float>>> maps;
    std::vector<std::vector<int64_t>> to_rows;             // exact + renumber: a range's cells -> row
    int64_t cells_before = -1;

    check_ok(ctx, lightkv_capture_reset(cap));
    for (size_t k = 0; k + 1 < bounds.size(); k++) {
        const int32_t a = bounds[k], b = bounds[k + 1];
        const bool last = k + 2 == bounds.size();
        if (!llama_set_layer_range(lctx, a, b)) llama_failed("llama.cpp refused the layer range [%d, %d)", a, b);
        if (!prev_cells.empty() && compact_kv) {
            // the rows enter the range in fresh cells: free the turn's cells (their K/V of the
            // layers before a stay in the tensors until the compaction reads them)
            for (int32_t c = 0; c < n_caches(); c++) {
                select(c);
                const bool ok = llama_kv_cells_rm(lctx, (int32_t) prev_cells[c].size(), prev_cells[c].data());
                select(0);
                if (!ok) llama_failed("llama.cpp could not free the turn's KV cells");
                std::fill(held[c].begin(), held[c].end(), 0);
            }
        } else if (!prev_cells.empty()) {
            // exact: the previous range's cells stay, seen by its layers only
            for (int32_t c = 0; c < n_caches(); c++) set_layers(c, prev_cells[c], bounds[k - 1], a);
            res.ranges.push_back({bounds[k - 1], a, prev_cells});
        }
        // what the capture copies in this range: the observed layers' queries (and K cache),
        // and the merge layer's Q and K
        std::vector<int32_t> want_layers, want_kinds;
        for (int32_t i = 0; i < p.n_observe; i++) {
            const int32_t li = p.observe_layers[i];
            if (li >= a && li < b) {
                want_layers.push_back(li);
                want_kinds.push_back(LIGHTKV_CAPTURE_Q | LIGHTKV_CAPTURE_K_CACHE);
            }
        }
        if (!last) {
            size_t j = 0;
            while (j < want_layers.size() && want_layers[j] != b - 1) j++;
            if (j == want_layers.size()) {
                want_layers.push_back(b - 1);
                want_kinds.push_back(0);
            }
            want_kinds[j] |= LIGHTKV_CAPTURE_Q | LIGHTKV_CAPTURE_K;
        }
        check_ok(ctx, lightkv_capture_want(cap, want_layers.data(), want_kinds.data(), (int32_t) want_layers.size()));
        // set after every want: llama.cpp then builds the next graph anew, with the marks
        llama_set_graph_hook(lctx, want_layers.empty() ? nullptr : lightkv_capture_graph,
                             want_layers.empty() ? nullptr : cap);
        for (size_t i = 0; i < rows.size(); i++) decode_rows(rows[i], last, last && i + 1 == rows.size());

        int64_t n_rows = 0;
        for (const auto & r : rows) n_rows += r.m();
        for (size_t i = 0; i < want_layers.size(); i++) {
            if (!(want_kinds[i] & LIGHTKV_CAPTURE_Q)) continue;
            for (int32_t kind : {LIGHTKV_CAPTURE_Q, LIGHTKV_CAPTURE_K}) {
                if (kind == LIGHTKV_CAPTURE_K && !(want_kinds[i] & LIGHTKV_CAPTURE_K)) continue;
                int64_t got = 0;
                check_ok(ctx, lightkv_capture_shape(cap, want_layers[i], kind, &got, nullptr, nullptr));
                if (got != n_rows) {
                    llama_failed("llama.cpp's graph gave no %s-%d for every row (the architecture names it "
                                 "otherwise)", kind == LIGHTKV_CAPTURE_Q ? "Qcur" : "Kcur", want_layers[i]);
                }
            }
        }
        std::vector<std::vector<int32_t>> new_cells((size_t) n_caches());
        for (int32_t c = 0; c < n_caches(); c++) {
            for (const auto & r : rows) new_cells[c].insert(new_cells[c].end(), r.cells[c].begin(), r.cells[c].end());
        }
        if (cells_before < 0) cells_before = (int64_t) new_cells[0].size();
        if (!maps.empty() && compact_kv) {
            const auto t0 = clock_type::now();
            std::vector<int32_t> dst_of_src;
            std::vector<float>   weight;
            int64_t base = 0;
            for (size_t i = 0; i < rows.size(); i++) {
                for (int64_t v : maps[i].first) dst_of_src.push_back((int32_t) (v + base));
                weight.insert(weight.end(), maps[i].second.begin(), maps[i].second.end());
                base += rows[i].m();
            }
            for (int32_t c = 0; c < n_caches(); c++) compact(c, prev_cells[c], dst_of_src, weight, new_cells[c], a);
            res.t_compact_ms += ms_since(t0);
        }
        if (last) {
            if (!compact_kv) {
                for (int32_t c = 0; c < n_caches(); c++) set_layers(c, new_cells[c], a, b);
                res.ranges.push_back({a, b, new_cells});
            }
            const float * logits = llama_get_logits_ith(lctx, -1);
            if (!logits) llama_failed("llama.cpp returned no logits");
            res.logits.assign(logits, logits + mi.n_vocab);
            break;
        }

        // guidance from layer b-1's Q/K, one graph for every image (the totals do not depend
        // on which rows are read), then each image merged in its windows
        const lightkv_stage & stage = sched.stages[k];
        std::vector<int64_t> offsets{0};
        for (const auto & r : rows) offsets.push_back(offsets.back() + r.m());
        std::vector<int64_t> text_idx, vis_idx;
        std::vector<size_t>  guided;
        for (size_t i = 0; i < rows.size(); i++) {
            const bool img = rows[i].image();
            if (img && stage.ratio == 0.0) continue;
            if (img) guided.push_back(i);
            for (int64_t j = offsets[i]; j < offsets[i + 1]; j++) (img ? vis_idx : text_idx).push_back(j);
        }
        std::vector<float> scores_all(vis_idx.size());
        if (!guided.empty()) {
            const auto t0 = clock_type::now();
            float scale = mi.guidance_scale;
            if (scale <= 0.0f) {
                int64_t head_dim = 0;
                check_ok(ctx, lightkv_capture_shape(cap, b - 1, LIGHTKV_CAPTURE_Q, nullptr, nullptr, &head_dim));
                scale = 1.0f / std::sqrt((float) head_dim);
            }
            check_ok(ctx, lightkv_capture_guidance(cap, b - 1, vis_idx.data(), (int64_t) vis_idx.size(),
                                                   text_idx.data(), (int64_t) text_idx.size(), scale,
                                                   scores_all.data()));
            res.t_guidance_ms += ms_since(t0);
        }
        maps.assign(rows.size(), {});
        int64_t vis_in = 0, vis_out = 0, g_off = 0;
        for (size_t i = 0; i < rows.size(); i++) {
            seg_rows & r = rows[i];
            const int64_t m = r.m();
            r.tokens = false;
            if (!r.image() || stage.ratio == 0.0) {
                r.x.swap(r.h);
                maps[i].first.resize((size_t) m);
                std::iota(maps[i].first.begin(), maps[i].first.end(), 0);
                maps[i].second.assign((size_t) m, 1.0f);
                if (r.image()) {
                    vis_in += m;
                    vis_out += m;
                }
                continue;
            }
            std::vector<float> scores(scores_all.begin() + g_off, scores_all.begin() + g_off + m);
            g_off += m;
            const auto t0 = clock_type::now();
            // a raster no earlier stage merged: the plain grid (the published padded square
            // without one); else every row at its cell of the grid
            const bool first = m == r.seg->n && !r.seg->cells;
            lightkv_merge_params mp = lightkv_merge_params_default();
            mp.windows = stage.windows;
            mp.ratio = stage.ratio;
            mp.grid_rows = (first && r.seg->grid_rows == 0) ? 0 : r.grid_rows;
            mp.grid_cols = (first && r.seg->grid_rows == 0) ? 0 : r.grid_cols;
            mp.use_threshold = sched.use_threshold;
            mp.threshold = sched.threshold;
            const int64_t * at = first ? nullptr : r.gpos.data();
            // the published stage, or kept to its budget with LightKV-protect
            lightkv_merge_result * raw = nullptr;
            if (p.protect == 0.0) {
                check_ok(ctx, lightkv_merge_run_at(ctx, r.h.data(), m, mi.n_embd, scores.data(), &mp, at, &raw));
            } else {
                check_ok(ctx, lightkv_merge_run_budget(ctx, r.h.data(), m, mi.n_embd, scores.data(), &mp, at,
                                                       p.protect, &raw));
            }
            stage_merge sm = take(raw);
            res.t_merge_ms += ms_since(t0);
            std::vector<int64_t> orig, gpos;
            std::vector<int32_t> pos((size_t) (n_pos * sm.kept.size()));
            const int64_t mk = (int64_t) sm.kept.size();
            for (int64_t j = 0; j < mk; j++) {
                const int64_t src = sm.kept[j];
                orig.push_back(r.orig[src]);
                gpos.push_back(r.gpos[2 * src]);
                gpos.push_back(r.gpos[2 * src + 1]);
                for (int32_t q = 0; q < n_pos; q++) pos[q * mk + j] = r.pos[q * m + src];
            }
            r.orig.swap(orig);
            r.gpos.swap(gpos);
            r.pos.swap(pos);
            r.x.swap(sm.x);
            maps[i] = {std::move(sm.assign), std::move(sm.weight)};
            vis_in += m;
            vis_out += mk;
        }
        if (!compact_kv && renumber) {
            // old row (previous order) -> new row; the earlier ranges' maps compose with it
            std::vector<int64_t> step;
            int64_t base = 0;
            for (size_t i = 0; i < rows.size(); i++) {
                for (int64_t v : maps[i].first) step.push_back(v + base);
                base += rows[i].m();
            }
            for (auto & t : to_rows) {
                for (auto & d : t) d = step[d];
            }
            to_rows.push_back(std::move(step));
        }
        if (renumber) {
            int32_t q = start;
            for (auto & r : rows) {
                const int64_t m = r.m();
                for (int64_t j = 0; j < m; j++) {
                    for (int32_t s = 0; s < n_pos; s++) r.pos[s * m + j] = q;
                    q++;
                }
            }
        }
        check_ok(nullptr, lightkv_schedule_report_stage(res.report.get(), vis_in, vis_out));
        prev_cells = std::move(new_cells);
    }
    if (!compact_kv && renumber) {
        // the earlier ranges' rows were stored at positions beyond the renumbered turn's end,
        // where the causal mask would hide them from every later token: each takes the position
        // of the final row it was merged into; K keeps the rotation it was stored with, as in
        // the reference (patch 0006)
        std::vector<int32_t> final_pos;
        for (const auto & r : rows) final_pos.insert(final_pos.end(), r.pos.begin(), r.pos.begin() + r.m());
        for (size_t i = 0; i < to_rows.size(); i++) {
            std::vector<llama_pos> pos;
            for (int64_t d : to_rows[i]) pos.push_back(final_pos[d]);
            for (int32_t c = 0; c < n_caches(); c++) {
                const auto & cells = res.ranges[i].cells[c];
                select(c);
                const bool ok = llama_kv_cells_set_pos(lctx, (int32_t) cells.size(), cells.data(), pos.data());
                select(0);
                if (!ok) llama_failed("llama.cpp could not set the KV cells' positions");
            }
        }
    }

    // the final rows
    res.n_pos = n_pos;
    res.rows = 0;
    for (const auto & r : rows) res.rows += r.m();
    res.positions.assign((size_t) (n_pos * res.rows), 0);
    res.cells.assign((size_t) n_caches(), {});
    int64_t off = 0;
    for (const auto & r : rows) {
        for (int32_t q = 0; q < n_pos; q++) {
            std::memcpy(&res.positions[q * res.rows + off], &r.pos[q * r.m()], (size_t) r.m() * sizeof(int32_t));
        }
        for (int32_t c = 0; c < n_caches(); c++) res.cells[c].insert(res.cells[c].end(), r.cells[c].begin(), r.cells[c].end());
        if (r.image()) res.kept.push_back(r.orig);
        off += r.m();
    }
    if (compact_kv) res.ranges = {{0, mi.n_layer, res.cells}};
    int64_t cells_after = 0;
    for (const auto & rg : res.ranges) cells_after += (int64_t) rg.cells[0].size();
    check_ok(nullptr, lightkv_schedule_report_cells(res.report.get(), cells_before, cells_after));
}

}  // namespace

lightkv_status lightkv_layer_mode_check(llama_context * lctx) {
    return guarded(nullptr, [&] { read_model(lctx, 0); });
}

lightkv_status lightkv_layer_prefill_check(llama_context * lctx, const lightkv_segment * segs, int32_t n_segs,
                                           const lightkv_layer_prefill_params * params) {
    return guarded(nullptr, [&] {
        const model_info mi = read_model(lctx, params ? params->n_batch : 0);
        check_turn(mi, segs, n_segs, params, false);
    });
}

lightkv_status lightkv_layer_prefill_run(lightkv_capture * cap, llama_context * lctx, const lightkv_segment * segs,
                                         int32_t n_segs, const lightkv_layer_prefill_params * params,
                                         lightkv_layer_prefill ** out) {
    lightkv_context * ctx = capture_context(cap);
    bool started = false;
    const lightkv_status st = guarded(ctx, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!cap) LKV_INVALID("cap must not be NULL");
        const model_info mi = read_model(lctx, params ? params->n_batch : 0);
        check_turn(mi, segs, n_segs, params, true);
        if (!mi.mrope) llama_set_position_gaps(lctx, true);  // kept rows keep their positions
        auto res = std::make_unique<lightkv_layer_prefill>();
        driver d{cap, ctx, lctx, mi, *params, *params->schedule, {}};
        started = true;
        d.run(segs, n_segs, *res);
        *out = res.release();
    });
    if (started) {  // whatever happened: llama.cpp as stock again
        llama_set_graph_hook(lctx, nullptr, nullptr);
        llama_set_layer_range(lctx, 0, -1);
        llama_kv_cells_select(lctx, 0);
        lightkv_capture_want(cap, nullptr, nullptr, 0);
    }
    return st;
}

void lightkv_layer_prefill_free(lightkv_layer_prefill * r) { delete r; }

const float * lightkv_layer_prefill_logits(const lightkv_layer_prefill * r, int32_t * n_vocab) {
    if (n_vocab) *n_vocab = r ? (int32_t) r->logits.size() : 0;
    return r ? r->logits.data() : nullptr;
}

int64_t lightkv_layer_prefill_rows(const lightkv_layer_prefill * r) { return r ? r->rows : 0; }

const int32_t * lightkv_layer_prefill_positions(const lightkv_layer_prefill * r, int32_t * n_pos) {
    if (n_pos) *n_pos = r ? r->n_pos : 0;
    return r ? r->positions.data() : nullptr;
}

int32_t lightkv_layer_prefill_n_caches(const lightkv_layer_prefill * r) { return r ? (int32_t) r->cells.size() : 0; }

const int32_t * lightkv_layer_prefill_cells(const lightkv_layer_prefill * r, int32_t cache) {
    if (!r || cache < 0 || cache >= (int32_t) r->cells.size()) return nullptr;
    return r->cells[cache].data();
}

int32_t lightkv_layer_prefill_n_images(const lightkv_layer_prefill * r) { return r ? (int32_t) r->kept.size() : 0; }

const int64_t * lightkv_layer_prefill_kept(const lightkv_layer_prefill * r, int32_t image, int64_t * n) {
    if (!r || image < 0 || image >= (int32_t) r->kept.size()) {
        if (n) *n = 0;
        return nullptr;
    }
    if (n) *n = (int64_t) r->kept[image].size();
    return r->kept[image].data();
}

int32_t lightkv_layer_prefill_n_ranges(const lightkv_layer_prefill * r) { return r ? (int32_t) r->ranges.size() : 0; }

const int32_t * lightkv_layer_prefill_range(const lightkv_layer_prefill * r, int32_t range, int32_t cache,
                                            int32_t * il_begin, int32_t * il_end, int64_t * n) {
    if (!r || range < 0 || range >= (int32_t) r->ranges.size() || cache < 0 ||
        cache >= (int32_t) r->ranges[range].cells.size()) {
        if (n) *n = 0;
        return nullptr;
    }
    const auto & rg = r->ranges[range];
    if (il_begin) *il_begin = rg.il_begin;
    if (il_end) *il_end = rg.il_end;
    if (n) *n = (int64_t) rg.cells[cache].size();
    return rg.cells[cache].data();
}

const lightkv_schedule_report * lightkv_layer_prefill_report(const lightkv_layer_prefill * r) {
    return r ? r->report.get() : nullptr;
}

void lightkv_layer_prefill_times(const lightkv_layer_prefill * r, double * guidance_ms, double * merge_ms,
                                 double * compact_ms) {
    if (guidance_ms) *guidance_ms = r ? r->t_guidance_ms : 0.0;
    if (merge_ms) *merge_ms = r ? r->t_merge_ms : 0.0;
    if (compact_ms) *compact_ms = r ? r->t_compact_ms : 0.0;
}
