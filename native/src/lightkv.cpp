// LightKV C API: validation, window layout, the two merge graphs and the host step between
// them, guidance, backends. The graph builders themselves are in lightkv_graphs.cpp.
//
// What runs where, and why:
//   graph 1 (ggml, chosen backend): gather the sources and destinations of every window,
//     cosine similarity (batched mul_mat, O(N * n_w * D)), best destination + its score.
//   host (O(N) integers and floats): the top-r choice per window, the threshold, the merge
//     groups and their weights, the output order. Two reasons it is not a graph:
//     (a) ggml_argsort / ggml_top_k are unstable on CUDA and Metal (bitonic sorts), while
//         the method fixes ties (equal scores -> lower source index first);
//     (b) the number of output rows M depends on the data (threshold), and a ggml graph has
//         static shapes: graph 2 can only be built once M is known.
//   graph 2 (ggml, chosen backend): the guided weighted aggregation (batched mul_mat of a
//     per-window weight matrix and the window's member tokens, gathered member-major on the
//     host); the re-ordering by original index is a host row copy (docs/ggml-ops.md, "What
//     runs on the host besides").
// Both graphs run through ggml_backend_sched over [chosen backend, CPU]: any op the chosen
// backend does not support runs on the CPU, with the scheduler's copies in between. On a
// CPU context (nothing to fall back to) they run without it (lightkv_context::cpu_only).
// A plan keeps what does not change between its runs: x's buffer, graph 1 with its window
// indices, padding mask and tie ramp, and graph 1's allocation (in a scheduler of its own,
// or a buffer of its own on a CPU context); a run uploads x, computes graph 1 as it stands,
// and builds graph 2 with the weights.
// The guidance model and the GGUF reader are in lightkv_guidance.cpp.
#include "lightkv.h"
#include "lightkv_graphs.h"
#include "lightkv_internal.h"

#include <algorithm>
#include <cmath>
#include <cctype>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace lightkv {

thread_local std::string g_thread_error;

[[noreturn]] void fail(lightkv_status status, const char * fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    throw lkv_error{status, buf};
}

int64_t checked_mul(int64_t a, int64_t b, const char * what) {
    if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) {
        fail(LIGHTKV_ERR_OUT_OF_MEMORY, "%s is too large (%lld x %lld)", what, (long long) a, (long long) b);
    }
    const int64_t p = a * b;
    if (p > MAX_ELEMS) {
        fail(LIGHTKV_ERR_OUT_OF_MEMORY, "%s is too large (%lld elements)", what, (long long) p);
    }
    return p;
}

ctx_ptr new_meta_context(size_t n_tensors) {
    ggml_init_params p = {
        /*.mem_size   =*/ ggml_tensor_overhead() * n_tensors + ggml_graph_overhead_custom(512, false),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context * c = ggml_init(p);
    if (!c) fail(LIGHTKV_ERR_OUT_OF_MEMORY, "ggml_init failed");
    return ctx_ptr(c);
}

}  // namespace lightkv

using namespace lightkv;

namespace {

constexpr double  EPS_WEIGHT  = 1e-8;   // max(sum of weights, 1e-8), as the method states
constexpr float   PAD_MASK    = -4.0f;  // added to padding destination slots (cosines >= -1)
constexpr double  SMALL_GRAPH_WORK = 4.0 * (1 << 20);  // multiply-adds run on one CPU thread (run_allocated)

// ------------------------------------------------------------------------------- backends
void ensure_backends_loaded() {
    // a build with GGML_BACKEND_DL registers nothing until the backends are loaded
    if (ggml_backend_dev_count() == 0) {
        ggml_backend_load_all();
    }
}

ggml_backend_dev_t find_device(const char * name) {
    ensure_backends_loaded();
    const size_t n = ggml_backend_dev_count();
    auto ieq = [](const char * a, const char * b) {
        for (; *a && *b; ++a, ++b) {
            if (tolower((unsigned char) *a) != tolower((unsigned char) *b)) return false;
        }
        return *a == *b;
    };
    if (name == nullptr || name[0] == '\0') {
        for (auto type : {GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU, GGML_BACKEND_DEVICE_TYPE_CPU}) {
            if (ggml_backend_dev_t dev = ggml_backend_dev_by_type(type)) return dev;
        }
        fail(LIGHTKV_ERR_BACKEND, "no ggml backend is available");
    }
    if (ieq(name, "cpu")) {
        if (ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)) return dev;
    }
    if (ieq(name, "gpu")) {
        for (auto type : {GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU}) {
            if (ggml_backend_dev_t dev = ggml_backend_dev_by_type(type)) return dev;
        }
    }
    for (size_t i = 0; i < n; i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ieq(ggml_backend_dev_name(dev), name)) return dev;
    }
    std::string avail;
    for (size_t i = 0; i < n; i++) {
        avail += (i ? ", " : "");
        avail += ggml_backend_dev_name(ggml_backend_dev_get(i));
    }
    fail(LIGHTKV_ERR_BACKEND, "no ggml backend named '%s' (available: %s)", name, avail.c_str());
}

void set_threads(ggml_backend_t backend, int n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    if (!reg) return;
    auto fn = (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (fn) fn(backend, n_threads);
}

}  // namespace

// ------------------------------------------------------------------------------- context
lightkv_context::~lightkv_context() {
    if (sched) ggml_backend_sched_free(sched);
    if (cpu && cpu != primary) ggml_backend_free(cpu);
    if (primary) ggml_backend_free(primary);
}

buf_ptr lightkv_context::alloc_inputs(ggml_context * meta) {
    ggml_backend_buffer_t b = ggml_backend_alloc_ctx_tensors(meta, primary);
    if (!b) fail(LIGHTKV_ERR_OUT_OF_MEMORY, "could not allocate %s memory for the inputs", name.c_str());
    ggml_backend_buffer_set_usage(b, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    n_buffers++;
    return buf_ptr(b);
}

void lightkv_context::place_tensors(scratch_slot slot, ggml_context * meta) {
    ggml_backend_buffer_type_t buft = ggml_backend_get_default_buffer_type(primary);
    const size_t align = ggml_backend_buft_get_alignment(buft);
    size_t total = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
        if (!t->view_src) total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
    }
    buf_ptr & buf = scratch[slot];
    if (!buf || ggml_backend_buffer_get_size(buf.get()) < total) {
        buf.reset();  // the old one first: its tensors are dead
        ggml_backend_buffer_t b = ggml_backend_buft_alloc_buffer(buft, total);
        if (!b) fail(LIGHTKV_ERR_OUT_OF_MEMORY, "could not allocate %s memory for a graph's tensors", name.c_str());
        // as alloc_inputs (the scheduler places ops that read inputs on this backend)
        ggml_backend_buffer_set_usage(b, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        buf.reset(b);
        n_buffers++;
    }
    char * at = (char *) ggml_backend_buffer_get_base(buf.get());
    for (ggml_tensor * t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
        if (t->view_src) continue;
        if (ggml_backend_tensor_alloc(buf.get(), t, at) != GGML_STATUS_SUCCESS) {
            fail(LIGHTKV_ERR_INTERNAL, "could not place a tensor in its buffer");
        }
        at += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
    }
    // views after what they view (which may sit in another buffer)
    for (ggml_tensor * t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
        if (t->view_src && ggml_backend_view_init(t) != GGML_STATUS_SUCCESS) {
            fail(LIGHTKV_ERR_INTERNAL, "could not place a view in its buffer");
        }
    }
}

sched_ptr lightkv_context::new_sched() const {
    ggml_backend_t backends[2] = {primary, cpu};
    const int n_backends = cpu == primary ? 1 : 2;
    ggml_backend_sched_t s = ggml_backend_sched_new(backends, nullptr, n_backends, 512, false, false);
    if (!s) fail(LIGHTKV_ERR_BACKEND, "could not create a ggml scheduler");
    return sched_ptr(s);
}

void lightkv_context::alloc_graph(ggml_backend_sched_t s, ggml_cgraph * gf) {
    if (!force_cpu_ops.empty() && cpu != primary) {
        for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
            ggml_tensor * node = ggml_graph_node(gf, i);
            for (const auto & op : force_cpu_ops) {
                if (op == ggml_op_desc(node)) ggml_backend_sched_set_tensor_backend(s, node, cpu);
            }
        }
    }
    if (!ggml_backend_sched_alloc_graph(s, gf)) {
        fail(LIGHTKV_ERR_OUT_OF_MEMORY, "could not allocate the %s compute buffers", name.c_str());
    }
    n_graph_allocs++;
}

buf_ptr lightkv_context::graph_buffer(ggml_context * g) {
    ggml_backend_buffer_t b = ggml_backend_alloc_ctx_tensors(g, cpu);
    if (!b) fail(LIGHTKV_ERR_OUT_OF_MEMORY, "could not allocate the %s compute buffers", name.c_str());
    n_graph_allocs++;
    n_buffers++;
    return buf_ptr(b);
}

// Multiply-adds of the graph's matrix products plus one per element of every other node.
static double graph_work(ggml_cgraph * gf) {
    double work = 0.0;
    for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
        const ggml_tensor * t = ggml_graph_node(gf, i);
        const double per = t->op == GGML_OP_MUL_MAT ? (double) t->src[0]->ne[0] : 1.0;
        work += (double) ggml_nelements(t) * per;
    }
    return work;
}

void lightkv_context::run_allocated(ggml_backend_sched_t s, ggml_cgraph * gf) {
    // The CPU backend puts its threads through a barrier after every node. A merge or
    // guidance graph of a small image (64 rows: ~1M multiply-adds, ~0.1 ms on one core)
    // loses more there than the split gains: measured with the context's 2 threads, a
    // 5-stage merge took 1.6 ms at best against 1.3 ms on one thread, and on a machine busy
    // with other work the median went to 18-34 ms (a barrier waits for a descheduled
    // thread) against 5.7-6.5 ms. So graphs below SMALL_GRAPH_WORK run on one thread.
    set_threads(cpu, graph_work(gf) < SMALL_GRAPH_WORK ? 1 : n_threads);
    last_splits += s ? ggml_backend_sched_get_n_splits(s) : 1;
    n_graphs++;
    const ggml_status st = s ? ggml_backend_sched_graph_compute(s, gf) : ggml_backend_graph_compute(cpu, gf);
    if (st == GGML_STATUS_ALLOC_FAILED) fail(LIGHTKV_ERR_OUT_OF_MEMORY, "%s: allocation failed during compute", name.c_str());
    if (st != GGML_STATUS_SUCCESS) fail(LIGHTKV_ERR_BACKEND, "%s: graph compute failed (status %d)", name.c_str(), (int) st);
}

void lightkv_context::compute_result(ggml_context * g, ggml_tensor * result, float * out, int64_t n,
                                     const char * what, ggml_tensor * pin, ggml_backend_t pin_to) {
    ggml_set_output(result);
    ggml_cgraph * gf = ggml_new_graph_custom(g, 512, false);
    ggml_build_forward_expand(gf, result);
    ggml_backend_sched_reset(sched);
    if (pin && pin_to) ggml_backend_sched_set_tensor_backend(sched, pin, pin_to);
    alloc_graph(sched, gf);
    run_allocated(sched, gf);
    ggml_backend_tensor_get(result, out, 0, (size_t) n * sizeof(float));
    lightkv::check_finite_result(out, n, what);
}

// ------------------------------------------------------------------------------- plan
namespace {

struct window {
    std::vector<int64_t> tokens;  // ascending original index
    // roles, ascending input index: unprotected tokens alternate source / destination;
    // protected ones are never sources (LIGHTKV_PROTECT_RECEIVE: destinations too;
    // LIGHTKV_PROTECT_KEEP: no role). Without protection src = tokens[0::2], dst = tokens[1::2].
    std::vector<int64_t> src, dst;
    int64_t              budget = 0;  // r
};

// Part index of every coordinate of an axis of `len` cut into `w` parts, the first len % w
// parts one longer.
std::vector<int64_t> cut_axis(int64_t len, int64_t w) {
    std::vector<int64_t> part(len);
    const int64_t base = len / w, extra = len % w;
    int64_t c = 0;
    for (int64_t p = 0; p < w; p++) {
        const int64_t size = base + (p < extra ? 1 : 0);
        for (int64_t i = 0; i < size; i++) part[c++] = p;
    }
    return part;
}

}  // namespace

struct lightkv_merge_plan {
    lightkv_context *    ctx = nullptr;
    int64_t              n = 0, d = 0;
    lightkv_merge_params params{};
    std::vector<uint8_t> protect;      // [n] 1 = protected (empty: none)
    int32_t              protect_mode = LIGHTKV_PROTECT_RECEIVE;
    std::vector<window>  windows;      // non-empty windows
    std::vector<int64_t> active;       // windows with budget > 0 (those that need similarity)
    int64_t              s_pad = 0;    // max sources in an active window
    int64_t              d_pad = 0;    // max destinations in an active window
    int64_t              rows_without_threshold = 0;

    // What does not change between runs, made by the first run and kept: x's buffer on the
    // chosen backend, the similarity graph (graph 1) with its index/mask/ramp inputs, and
    // that graph's allocation in a scheduler of the plan's own (the context's scheduler is
    // reset by every other graph; on a CPU context: g1_buf, no scheduler). A run uploads x,
    // computes graph 1 as allocated, and builds graph 2 (whose shapes depend on the merge
    // groups) with the score-derived weights.
    ctx_ptr              x_meta;
    buf_ptr              x_buf;
    ggml_tensor *        t_x = nullptr;
    ctx_ptr              g1_in_meta;   // t_src, t_dst, t_mask, t_ramp
    buf_ptr              g1_in_buf;
    ctx_ptr              g1_meta;      // the graph's nodes
    ggml_cgraph *        g1 = nullptr;
    lightkv::best_match  g1_best{};
    int                  g1_rescale_exp = 0;  // the exponent graph 1 was built for
    sched_ptr            g1_sched;
    // a one-shot plan (lightkv_merge_run*, each stage of lightkv_merge_reduce) runs once:
    // graph 1 is allocated in the context's scheduler (it is read before graph 2 resets it,
    // and a scheduler of its own per call cost more than the merge itself, ~3 of 4.7 ms at
    // 64 x 128), and x and graph 1's inputs sit in the context's reused input buffers
    bool                 one_shot = false;

    buf_ptr              g1_buf;       // graph 1's tensors on a CPU context (no scheduler)

    // where graph 1 is allocated: nullptr on a CPU context (g1_buf)
    ggml_backend_sched_t sched() const { return ctx->cpu_only() ? nullptr : one_shot ? ctx->sched : g1_sched.get(); }

    // test counters (lightkv_merge_plan_stats)
    int64_t              n_runs = 0;
    int64_t              n_const_uploads = 0;  // uploads of window indices, masks, ramps
    int64_t              n_allocs = 0;         // buffers and graph allocations made for the plan
};

struct lightkv_merge_result {
    int64_t              n = 0, m = 0, d = 0;
    std::vector<float>   x;
    std::vector<int64_t> kept;
    std::vector<int64_t> assign;
    std::vector<float>   weight;
    // lightkv_merge_reduce: windows per side and rows left after each stage it ran
    std::vector<int32_t> stage_windows;
    std::vector<int64_t> stage_rows;
    // what the call that made it did (lightkv_merge_result_work)
    int64_t              n_graphs = 0, n_graph_allocs = 0, n_buffers = 0;
};

namespace {

void validate_params(int64_t n, int64_t d, const lightkv_merge_params * p, bool has_positions,
                     int64_t * rows, int64_t * cols) {
    if (!p) LKV_INVALID("params must not be NULL");
    if (n <= 0) LKV_INVALID("x must hold at least one token (N == %lld)", (long long) n);
    if (d <= 0) LKV_INVALID("x must have at least one feature (D == %lld)", (long long) d);
    if (n > MAX_TOKENS) LKV_INVALID("N = %lld tokens is more than the supported %lld", (long long) n, (long long) MAX_TOKENS);
    checked_mul(n, d, "x");
    if (p->windows < 1) LKV_INVALID("windows must be >= 1, got %d", (int) p->windows);
    if (!(p->ratio >= 0.0 && p->ratio < 1.0)) LKV_INVALID("ratio must be in [0, 1), got %g", p->ratio);
    if (p->use_threshold && !std::isfinite(p->threshold)) LKV_INVALID("threshold must be finite, got %g", p->threshold);
    if (has_positions) {
        // survivors of earlier stages on the ORIGINAL grid: the grid is required and may
        // hold more cells than there are tokens
        if (p->grid_rows <= 0 || p->grid_cols <= 0) {
            LKV_INVALID("positions need the original grid (rows, cols > 0), got (%lld, %lld)",
                        (long long) p->grid_rows, (long long) p->grid_cols);
        }
        if (p->grid_rows > MAX_TOKENS || p->grid_cols > MAX_TOKENS) {
            LKV_INVALID("grid %lldx%lld is too large", (long long) p->grid_rows, (long long) p->grid_cols);
        }
        if (p->grid_rows * p->grid_cols < n) {
            LKV_INVALID("grid %lldx%lld has fewer cells than N = %lld tokens",
                        (long long) p->grid_rows, (long long) p->grid_cols, (long long) n);
        }
        *rows = p->grid_rows;
        *cols = p->grid_cols;
    } else if (p->grid_rows == 0 && p->grid_cols == 0) {
        int64_t s = (int64_t) std::sqrt((double) n);
        while (s * s < n) s++;
        while (s > 1 && (s - 1) * (s - 1) >= n) s--;
        *rows = *cols = s;
    } else {
        if (p->grid_rows <= 0 || p->grid_cols <= 0) {
            LKV_INVALID("grid must be positive (rows, cols), got (%lld, %lld)", (long long) p->grid_rows, (long long) p->grid_cols);
        }
        if (p->grid_rows > n || p->grid_cols > n || p->grid_rows * p->grid_cols != n) {
            LKV_INVALID("grid %lldx%lld does not match N = %lld", (long long) p->grid_rows, (long long) p->grid_cols, (long long) n);
        }
        *rows = p->grid_rows;
        *cols = p->grid_cols;
    }
    const int64_t side = std::min(*rows, *cols);
    if (p->windows > side) {
        LKV_INVALID("windows=%d is larger than a grid side of %lld", (int) p->windows, (long long) side);
    }
}

int64_t budget(int64_t n_window, double ratio) {
    // math.floor of the double product, exactly as the reference computes it
    const int64_t r = (int64_t) std::floor(ratio * (double) n_window);
    return std::min(r, n_window / 2);
}

// positions [n][2] (row, col): inside the rows x cols grid and pairwise distinct
void validate_positions(const int64_t * pos, int64_t n, int64_t rows, int64_t cols) {
    std::vector<int64_t> cell((size_t) n);
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = pos[2 * i], c = pos[2 * i + 1];
        if (r < 0 || r >= rows || c < 0 || c >= cols) {
            LKV_INVALID("position %lld = (%lld, %lld) is outside the %lldx%lld grid", (long long) i,
                        (long long) r, (long long) c, (long long) rows, (long long) cols);
        }
        cell[i] = r * cols + c;  // < 2^60: rows, cols <= MAX_TOKENS
    }
    std::sort(cell.begin(), cell.end());
    for (int64_t i = 1; i < n; i++) {
        if (cell[i] == cell[i - 1]) {
            LKV_INVALID("positions contain a duplicate (%lld, %lld)", (long long) (cell[i] / cols),
                        (long long) (cell[i] % cols));
        }
    }
}

// positions: NULL (token i at (i / cols, i % cols) of the grid), or [n][2] (row, col) of
// every token on the original grid (later stages: true 2D windows of the original grid)
void build_plan(lightkv_merge_plan & plan, const int64_t * positions = nullptr) {
    int64_t rows = 0, cols = 0;
    validate_params(plan.n, plan.d, &plan.params, positions != nullptr, &rows, &cols);
    if (positions) validate_positions(positions, plan.n, rows, cols);
    const int64_t W = plan.params.windows;
    const auto part_r = cut_axis(rows, W);
    const auto part_c = cut_axis(cols, W);

    std::vector<window> all((size_t) (W * W));
    if (positions) {
        for (int64_t i = 0; i < plan.n; i++) {
            const int64_t id = part_r[positions[2 * i]] * W + part_c[positions[2 * i + 1]];
            all[id].tokens.push_back(i);  // ascending input index
        }
    } else {
        for (int64_t i = 0; i < plan.n; i++) {
            const int64_t id = part_r[i / cols] * W + part_c[i % cols];
            all[id].tokens.push_back(i);  // ascending, since i ascends
        }
    }
    plan.rows_without_threshold = plan.n;
    const bool receive = plan.protect_mode == LIGHTKV_PROTECT_RECEIVE;
    for (auto & w : all) {
        if (w.tokens.empty()) continue;
        int64_t free = 0;  // unprotected tokens seen so far in this window
        for (int64_t t : w.tokens) {
            if (!plan.protect.empty() && plan.protect[t]) {
                if (receive) w.dst.push_back(t);  // ascending: the tie rule "lowest index" holds
            } else {
                (free++ % 2 == 0 ? w.src : w.dst).push_back(t);
            }
        }
        // n_w counts every token of the window (as published); a window merges at most
        // its sources, and nothing without a destination
        w.budget = w.dst.empty() ? 0
                 : std::min(budget((int64_t) w.tokens.size(), plan.params.ratio), (int64_t) w.src.size());
        plan.rows_without_threshold -= w.budget;
        plan.windows.push_back(std::move(w));
    }
    for (size_t wi = 0; wi < plan.windows.size(); wi++) {
        const window & w = plan.windows[wi];
        if (w.budget == 0) continue;
        plan.active.push_back((int64_t) wi);
        plan.s_pad = std::max(plan.s_pad, (int64_t) w.src.size());
        plan.d_pad = std::max(plan.d_pad, (int64_t) w.dst.size());
    }
}

// protect: NULL or [n] of 0 / 1; mode: a lightkv_protect_mode
void set_protection(lightkv_merge_plan & plan, const uint8_t * protect, int32_t mode) {
    if (mode != LIGHTKV_PROTECT_RECEIVE && mode != LIGHTKV_PROTECT_KEEP) {
        LKV_INVALID("protect_mode must be LIGHTKV_PROTECT_RECEIVE (0) or LIGHTKV_PROTECT_KEEP (1), got %d", (int) mode);
    }
    plan.protect_mode = mode;
    plan.protect.clear();
    if (!protect || plan.n <= 0) return;
    for (int64_t i = 0; i < plan.n; i++) {
        if (protect[i] > 1) LKV_INVALID("protect must hold 0 or 1 per token (index %lld is %d)", (long long) i, (int) protect[i]);
    }
    plan.protect.assign(protect, protect + plan.n);
}

// Bit pattern of the largest |v| of n floats. For non-negative floats the integer order of
// the bit patterns is the float order, and Inf and NaN lie above every finite value
// (>= 0x7f800000): one integer max that the compiler vectorizes, where a float max with an
// isfinite test per element does not (that scan was a tenth of a small merge).
constexpr uint32_t NONFINITE_BITS = 0x7f800000u;
uint32_t max_abs_bits(const float * v, int64_t n) {
    uint32_t top = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b;
        std::memcpy(&b, v + i, sizeof b);
        top = std::max(top, b & 0x7fffffffu);
    }
    return top;
}

// Scan x: finite, and the exponent of 2 that keeps the similarity's sums of squares inside
// float32 (returns 0 when no rescaling is needed).
int similarity_rescale_exponent(const float * x, int64_t n, int64_t d) {
    const int64_t total = n * d;
    const uint32_t top = max_abs_bits(x, total);
    if (top >= NONFINITE_BITS) {
        for (int64_t i = 0; i < total; i++) {
            if (!std::isfinite(x[i])) {
                LKV_INVALID("x contains NaN or Inf (row %lld, column %lld)", (long long) (i / d), (long long) (i % d));
            }
        }
    }
    float max_abs;
    std::memcpy(&max_abs, &top, sizeof max_abs);
    // sum of d squares must stay well below FLT_MAX (3.4e38): aim for max^2 * d <= 2^100
    const double need = (double) max_abs * (double) max_abs * (double) d;
    if (need <= 0x1p100) return 0;
    int e = 0;
    std::frexp(std::sqrt(need / 0x1p100), &e);
    return e;  // scale by 2^-e (exact in float32 for all values that matter)
}

// the aggregation's output: every value finite (else LIGHTKV_ERR_NUMERIC)
void check_rows_finite(const float * v, int64_t n) {
    if (max_abs_bits(v, n) >= NONFINITE_BITS) {
        fail(LIGHTKV_ERR_NUMERIC, "the merged rows are not finite (values too large for float32)");
    }
}

void validate_scores(const float * s, int64_t n) {
    if (!s) return;
    for (int64_t i = 0; i < n; i++) {
        if (!std::isfinite(s[i])) LKV_INVALID("scores contain NaN or Inf (index %lld)", (long long) i);
        if (s[i] < 0.0f) LKV_INVALID("scores must be >= 0 (index %lld is %g)", (long long) i, (double) s[i]);
    }
}

// graph 1 of a plan, made once: its constant inputs (window slots, padding mask, tie ramp)
// uploaded, the graph built over plan.t_x and allocated in the plan's scheduler
void build_similarity_graph(lightkv_merge_plan & plan, int rescale_exp) {
    lightkv_context & lc = *plan.ctx;
    const int64_t n_act = (int64_t) plan.active.size();
    const int64_t s_pad = plan.s_pad, d_pad = plan.d_pad;

    if (!plan.g1_in_meta) {
        // ---- host-side layout of the active windows
        std::vector<int32_t> idx_src((size_t) checked_mul(s_pad, n_act, "source slots"), 0);
        std::vector<int32_t> idx_dst((size_t) checked_mul(d_pad, n_act, "destination slots"), 0);
        std::vector<float>   mask((size_t) (d_pad * n_act), PAD_MASK);
        std::vector<float>   ramp((size_t) d_pad);
        checked_mul(checked_mul(s_pad, d_pad, "similarity"), n_act, "similarity");
        for (int64_t j = 0; j < d_pad; j++) ramp[j] = (float) (d_pad - j);
        for (int64_t a = 0; a < n_act; a++) {
            const window & w = plan.windows[plan.active[a]];
            for (size_t p = 0; p < w.src.size(); p++) idx_src[a * s_pad + p] = (int32_t) w.src[p];
            for (size_t p = 0; p < w.dst.size(); p++) {
                idx_dst[a * d_pad + p] = (int32_t) w.dst[p];
                mask[a * d_pad + p]    = 0.0f;
            }
        }
        plan.g1_in_meta = new_meta_context(4);
        ggml_context * m = plan.g1_in_meta.get();
        ggml_tensor * t_src  = ggml_new_tensor_1d(m, GGML_TYPE_I32, s_pad * n_act);
        ggml_tensor * t_dst  = ggml_new_tensor_1d(m, GGML_TYPE_I32, d_pad * n_act);
        ggml_tensor * t_mask = ggml_new_tensor_3d(m, GGML_TYPE_F32, d_pad, 1, n_act);
        ggml_tensor * t_ramp = ggml_new_tensor_3d(m, GGML_TYPE_F32, d_pad, 1, 1);
        ggml_set_name(t_src, "src");
        ggml_set_name(t_dst, "dst");
        ggml_set_name(t_mask, "mask");
        ggml_set_name(t_ramp, "ramp");
        if (plan.one_shot) {
            lc.place_tensors(SCRATCH_SIMILARITY, m);  // a one-shot plan: its inputs die with the call
        } else {
            plan.g1_in_buf = lc.alloc_inputs(m);
            plan.n_allocs++;
        }
        upload(t_src, idx_src);
        upload(t_dst, idx_dst);
        upload(t_mask, mask);
        upload(t_ramp, ramp);
        plan.n_const_uploads += 4;
    }
    ggml_context * m = plan.g1_in_meta.get();
    ggml_tensor * t_src  = ggml_get_tensor(m, "src");
    ggml_tensor * t_dst  = ggml_get_tensor(m, "dst");
    ggml_tensor * t_mask = ggml_get_tensor(m, "mask");
    ggml_tensor * t_ramp = ggml_get_tensor(m, "ramp");

    plan.g1 = nullptr;
    plan.g1_meta = new_meta_context(64);
    ggml_context * g = plan.g1_meta.get();
    ggml_tensor * x = plan.t_x;
    if (rescale_exp != 0) {
        // inputs whose squares would overflow float32: cosine is scale-free, so rescale by an
        // exact power of two (only the 1e-8 of the denominator sees the difference)
        x = ggml_scale(g, plan.t_x, std::ldexp(1.0f, -rescale_exp));
    }
    ggml_tensor * src = lightkv::gather_windows(g, x, t_src, s_pad, n_act);
    ggml_tensor * dst = lightkv::gather_windows(g, x, t_dst, d_pad, n_act);
    ggml_tensor * sim = lightkv::window_cosine(g, src, dst);
    lightkv::best_match best = lightkv::best_destination(g, sim, t_mask, t_ramp);
    ggml_set_output(best.index);
    ggml_set_output(best.score);
    ggml_cgraph * gf = ggml_new_graph_custom(g, 512, false);
    ggml_build_forward_expand(gf, best.index);
    ggml_build_forward_expand(gf, best.score);

    if (lc.cpu_only() && plan.one_shot) {
        lc.place_tensors(SCRATCH_SIMILARITY_GRAPH, g);
        lc.n_graph_allocs++;
    } else if (lc.cpu_only()) {
        plan.g1_buf = lc.graph_buffer(g);
    } else {
        if (!plan.one_shot && !plan.g1_sched) plan.g1_sched = lc.new_sched();
        ggml_backend_sched_reset(plan.sched());
        lc.alloc_graph(plan.sched(), gf);
    }
    plan.n_allocs++;
    plan.g1 = gf;
    plan.g1_best = best;
    plan.g1_rescale_exp = rescale_exp;
}

// graph 1 + host selection: dst_of[i] = the token that token i merges into (i itself when
// it stays). x is already in plan.t_x.
std::vector<int64_t> match_sources(lightkv_merge_plan & plan, int rescale_exp) {
    std::vector<int64_t> dst_of(plan.n);
    std::iota(dst_of.begin(), dst_of.end(), 0);
    if (plan.active.empty()) return dst_of;

    lightkv_context & lc = *plan.ctx;
    const int64_t n_act = (int64_t) plan.active.size();
    const int64_t s_pad = plan.s_pad;

    // ---- graph 1: built and allocated by the first run (again only if x needs another
    //      rescaling), computed as allocated by every later one
    if (!plan.g1 || plan.g1_rescale_exp != rescale_exp) build_similarity_graph(plan, rescale_exp);
    lc.run_allocated(plan.sched(), plan.g1);
    const lightkv::best_match best = plan.g1_best;

    std::vector<int32_t> best_slot((size_t) (s_pad * n_act));
    std::vector<float>   best_cos((size_t) (s_pad * n_act));
    ggml_backend_tensor_get(best.index, best_slot.data(), 0, best_slot.size() * sizeof(int32_t));
    ggml_backend_tensor_get(best.score, best_cos.data(), 0, best_cos.size() * sizeof(float));

    // ---- host: top-r sources per window (stable: equal scores keep ascending source
    //      order), then the threshold
    const bool   use_thr = plan.params.use_threshold != 0;
    const double thr     = plan.params.threshold;
    std::vector<int64_t> order;
    for (int64_t a = 0; a < n_act; a++) {
        const window & w   = plan.windows[plan.active[a]];
        const int64_t  ns  = (int64_t) w.src.size();
        const int64_t  nd  = (int64_t) w.dst.size();
        const float *  cos = best_cos.data() + a * s_pad;
        const int32_t * sl = best_slot.data() + a * s_pad;
        for (int64_t k = 0; k < ns; k++) {
            if (!std::isfinite(cos[k])) {
                fail(LIGHTKV_ERR_NUMERIC, "the similarity of token %lld is not finite (values too large for float32?)",
                     (long long) w.src[k]);
            }
            if (sl[k] < 0 || sl[k] >= nd) fail(LIGHTKV_ERR_INTERNAL, "best destination slot %d out of range", (int) sl[k]);
        }
        order.resize((size_t) ns);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return cos[i] > cos[j]; });
        for (int64_t c = 0; c < w.budget; c++) {
            const int64_t k = order[c];
            if (use_thr && (double) cos[k] < thr) continue;
            dst_of[w.src[k]] = w.dst[sl[k]];
        }
    }
    return dst_of;
}

}  // namespace

namespace {

void run_plan(lightkv_merge_plan & plan, const float * x_host, const float * scores, lightkv_merge_result ** out) {
    if (!out) LKV_INVALID("out must not be NULL");
    *out = nullptr;
    if (!x_host) LKV_INVALID("x must not be NULL");
    lightkv_context & lc = *plan.ctx;
    const int64_t n = plan.n, d = plan.d;
    const int rescale_exp = similarity_rescale_exponent(x_host, n, d);
    validate_scores(scores, n);
    lc.last_splits = 0;

    // ---- x on the chosen backend (shared by both graphs; its buffer is the plan's)
    if (!plan.x_meta) {
        plan.x_meta = new_meta_context(1);
        plan.t_x = ggml_new_tensor_2d(plan.x_meta.get(), GGML_TYPE_F32, d, n);
        if (plan.one_shot) {
            lc.place_tensors(SCRATCH_ROWS, plan.x_meta.get());  // a one-shot plan
        } else {
            plan.x_buf = lc.alloc_inputs(plan.x_meta.get());
            plan.n_allocs++;
        }
    }
    ggml_tensor * t_x = plan.t_x;
    ggml_backend_tensor_set(t_x, x_host, 0, ggml_nbytes(t_x));
    plan.n_runs++;

    // ---- graph 1 + host selection
    const std::vector<int64_t> dst_of = match_sources(plan, rescale_exp);

    // ---- groups and weights (host, double precision, O(N))
    auto res = std::make_unique<lightkv_merge_result>();
    res->n = n;
    res->d = d;
    res->assign.resize((size_t) n);
    res->weight.assign((size_t) n, 1.0f);
    std::vector<int64_t> row_of((size_t) n, -1);
    for (int64_t i = 0; i < n; i++) {
        if (dst_of[i] == i) {
            row_of[i] = (int64_t) res->kept.size();
            res->kept.push_back(i);
        }
    }
    const int64_t m = (int64_t) res->kept.size();
    res->m = m;
    for (int64_t i = 0; i < n; i++) res->assign[i] = row_of[dst_of[i]];

    // members of every group (destination first, then its sources, ascending)
    std::vector<std::vector<int64_t>> group_of_row((size_t) m);
    for (int64_t i = 0; i < n; i++) {
        if (dst_of[i] != i) group_of_row[res->assign[i]].push_back(i);
    }
    struct group { int64_t row; std::vector<int64_t> members; std::vector<double> weights; };
    std::vector<std::vector<group>> groups_by_window(plan.windows.size());
    {
        // window of every token
        std::vector<int32_t> win_of((size_t) n);
        for (size_t wi = 0; wi < plan.windows.size(); wi++) {
            for (int64_t t : plan.windows[wi].tokens) win_of[t] = (int32_t) wi;
        }
        for (int64_t row = 0; row < m; row++) {
            if (group_of_row[row].empty()) continue;
            group gr;
            gr.row = row;
            gr.members.push_back(res->kept[row]);
            gr.members.insert(gr.members.end(), group_of_row[row].begin(), group_of_row[row].end());
            double total = 0.0;
            for (int64_t t : gr.members) total += scores ? (double) scores[t] : 1.0;
            for (int64_t t : gr.members) {
                const double g = scores ? (double) scores[t] : 1.0;
                // all-zero group: equal weights instead of a zero vector
                gr.weights.push_back(total == 0.0 ? 1.0 / (double) gr.members.size() : g / std::max(total, EPS_WEIGHT));
            }
            for (size_t k = 0; k < gr.members.size(); k++) res->weight[gr.members[k]] = (float) gr.weights[k];
            groups_by_window[win_of[res->kept[row]]].push_back(std::move(gr));
        }
    }

    res->x.resize((size_t) checked_mul(m, d, "output"));
    std::vector<int64_t> merge_windows;
    int64_t k_pad = 0, g_pad = 0;
    for (size_t wi = 0; wi < groups_by_window.size(); wi++) {
        const auto & gs = groups_by_window[wi];
        if (gs.empty()) continue;
        merge_windows.push_back((int64_t) wi);
        int64_t members = 0;
        for (const auto & gr : gs) members += (int64_t) gr.members.size();
        k_pad = std::max(k_pad, members);
        g_pad = std::max(g_pad, (int64_t) gs.size());
    }
    // the member axis is the contracted axis of the aggregation's mul_mat: a multiple of
    // 64 lets the CPU backend use its tiled sgemm (which needs K % 16 == 0) instead of
    // one dot product per output; the extra members have weight 0
    k_pad = (k_pad + 63) / 64 * 64;

    if (merge_windows.empty()) {
        // nothing merged (ratio too small for every window, or the threshold blocked all
        // merges): the output is x itself
        std::memcpy(res->x.data(), x_host, (size_t) (n * d) * sizeof(float));
        *out = res.release();
        return;
    }

    // ---- graph 2: the aggregation, over the members gathered here member-major (the
    //      layout the matrix product contracts over; padding slots hold token 0 with weight 0)
    const int64_t n_mw = (int64_t) merge_windows.size();
    std::vector<float>   members_t((size_t) checked_mul(checked_mul(k_pad, d, "merge members"), n_mw, "merge members"));
    std::vector<float>   wmat((size_t) checked_mul(checked_mul(k_pad, g_pad, "merge weights"), n_mw, "merge weights"), 0.0f);
    std::vector<int64_t> merged_of((size_t) m, -1);  // merged row (a * g_pad + gi) of every output row
    for (int64_t a = 0; a < n_mw; a++) {
        std::vector<int64_t> slot((size_t) k_pad, 0);  // token of every member slot
        int64_t k = 0;
        const auto & gs = groups_by_window[merge_windows[a]];
        for (size_t gi = 0; gi < gs.size(); gi++) {
            for (size_t j = 0; j < gs[gi].members.size(); j++, k++) {
                slot[k] = gs[gi].members[j];
                wmat[(a * g_pad + (int64_t) gi) * k_pad + k] = (float) gs[gi].weights[j];
            }
            merged_of[gs[gi].row] = a * g_pad + (int64_t) gi;
        }
        // column c of the members = feature c of each member row (writes in order); the
        // padding slots repeat token 0's feature
        float * mt = members_t.data() + a * k_pad * d;
        for (int64_t c = 0; c < d; c++) {
            const float * col = x_host + c;
            for (int64_t kk = 0; kk < k; kk++) mt[c * k_pad + kk] = col[slot[kk] * d];
            std::fill(mt + c * k_pad + k, mt + (c + 1) * k_pad, col[0]);
        }
    }

    ctx_ptr in_meta = new_meta_context(2);
    ggml_tensor * t_mem = ggml_new_tensor_3d(in_meta.get(), GGML_TYPE_F32, k_pad, d, n_mw);
    ggml_tensor * t_w   = ggml_new_tensor_3d(in_meta.get(), GGML_TYPE_F32, k_pad, g_pad, n_mw);
    lc.place_tensors(SCRATCH_AGGREGATION, in_meta.get());
    upload(t_mem, members_t);
    upload(t_w, wmat);

    ctx_ptr g = new_meta_context(8);
    ggml_tensor * merged = lightkv::aggregate_groups(g.get(), t_mem, t_w);  // [D, g_pad, n_mw]
    ggml_set_output(merged);
    ggml_cgraph * gf = ggml_new_graph_custom(g.get(), 512, false);
    ggml_build_forward_expand(gf, merged);
    lc.compute(g.get(), gf, SCRATCH_AGGREGATION_GRAPH);
    std::vector<float> merged_rows((size_t) (d * g_pad * n_mw));
    ggml_backend_tensor_get(merged, merged_rows.data(), 0, merged_rows.size() * sizeof(float));
    check_rows_finite(merged_rows.data(), (int64_t) merged_rows.size());

    // ---- re-order by original index: kept rows copied bit for bit, merged rows in their
    //      destination's place
    for (int64_t row = 0; row < m; row++) {
        const float * from = merged_of[row] >= 0 ? merged_rows.data() + merged_of[row] * d
                                                 : x_host + res->kept[row] * d;
        std::memcpy(res->x.data() + row * d, from, (size_t) d * sizeof(float));
    }
    *out = res.release();
}

// The context's work counters when a call began; record() stores the call's share in its result.
struct work_mark {
    const lightkv_context & lc;
    const int64_t graphs, graph_allocs, buffers;
    explicit work_mark(const lightkv_context & c)
        : lc(c), graphs(c.n_graphs), graph_allocs(c.n_graph_allocs), buffers(c.n_buffers) {}
    void record(lightkv_merge_result & r) const {
        r.n_graphs = lc.n_graphs - graphs;
        r.n_graph_allocs = lc.n_graph_allocs - graph_allocs;
        r.n_buffers = lc.n_buffers - buffers;
    }
};

// Stages of the merge on what is left until `target` rows remain (lightkv_merge_reduce and
// lightkv_merge_run_budget): every stage cuts windows x windows true 2D windows of the
// rows x cols grid at the rows' positions gpos [n][2] (survivors keep theirs); the first runs
// at first_ratio when >= 0, every other at min((m - target) / m + 1e-9, 0.5); a stage that
// merges nothing is followed by one with a single window, and the loop stops when a single
// window merges nothing. The rows, their scores (summed over what a row absorbed: the next
// stage's weights), protected flags (prot, empty: none; carried with the rows) and composed
// weights stay here between stages.
void reduce_rows(lightkv_context & lc, const float * x, int64_t n, int64_t d, const float * scores,
                 int64_t rows, int64_t cols, const std::vector<int64_t> & gpos, int32_t windows,
                 double first_ratio, int64_t target, std::vector<uint8_t> prot, int32_t protect_mode,
                 lightkv_merge_result & res) {
    std::vector<float>   cur(x, x + n * d);                  // the rows of the current stage
    std::vector<float>   sc;                                  // their scores (empty: unguided)
    if (scores) sc.assign(scores, scores + n);
    std::vector<int64_t> kept((size_t) n), assign((size_t) n), pos;
    std::iota(kept.begin(), kept.end(), 0);                   // input index of every row
    std::iota(assign.begin(), assign.end(), 0);               // row of every input token
    std::vector<double>  weight((size_t) n, 1.0);             // composed coefficients
    int32_t w = (int32_t) std::min<int64_t>(windows, std::min(rows, cols));
    bool first = true;
    while ((int64_t) kept.size() > target) {
        const int64_t m = (int64_t) kept.size();
        lightkv_merge_plan plan;
        plan.ctx = &lc;
        plan.n = m;
        plan.d = d;
        plan.params = lightkv_merge_params_default();
        plan.params.windows = w;
        plan.params.ratio = first && first_ratio >= 0.0
                                ? first_ratio
                                : std::min((double) (m - target) / (double) m + 1e-9, 0.5);
        first = false;
        plan.params.grid_rows = rows;
        plan.params.grid_cols = cols;
        plan.one_shot = true;
        pos.resize((size_t) (2 * m));
        for (int64_t i = 0; i < m; i++) {  // survivors at their cell of the grid
            pos[2 * i] = gpos[2 * kept[i]];
            pos[2 * i + 1] = gpos[2 * kept[i] + 1];
        }
        set_protection(plan, prot.empty() ? nullptr : prot.data(), protect_mode);
        build_plan(plan, pos.data());
        lightkv_merge_result * raw = nullptr;
        run_plan(plan, cur.data(), sc.empty() ? nullptr : sc.data(), &raw);
        std::unique_ptr<lightkv_merge_result> st(raw);
        if (st->m == m) {
            if (w == 1) break;  // nothing left to merge
            w = 1;              // the remainder is below one token per window: one window
            continue;
        }
        for (int64_t i = 0; i < n; i++) {
            weight[i] *= (double) st->weight[assign[i]];
            assign[i] = st->assign[assign[i]];
        }
        if (!sc.empty()) {  // a merged row carries the scores of everything it absorbed
            std::vector<double> total((size_t) st->m, 0.0);
            for (int64_t i = 0; i < m; i++) total[st->assign[i]] += (double) sc[i];
            sc.assign(total.begin(), total.end());
        }
        std::vector<int64_t> next((size_t) st->m);
        for (int64_t j = 0; j < st->m; j++) next[j] = kept[st->kept[j]];
        kept.swap(next);
        if (!prot.empty()) {
            std::vector<uint8_t> flags((size_t) st->m);
            for (int64_t j = 0; j < st->m; j++) flags[j] = prot[st->kept[j]];
            prot.swap(flags);
        }
        cur.swap(st->x);
        res.stage_windows.push_back(w);
        res.stage_rows.push_back(st->m);
    }
    res.n = n;
    res.d = d;
    res.m = (int64_t) kept.size();
    res.x = std::move(cur);
    res.kept = std::move(kept);
    res.assign = std::move(assign);
    res.weight.assign(weight.begin(), weight.end());
}

// The progressive schedule of lightkv_merge_reduce: reduce_rows on the raster of the grid.
void run_reduce(lightkv_context & lc, const float * x, int64_t n, int64_t d, const float * scores,
                const lightkv_reduce_params & rp, lightkv_merge_result ** out) {
    if (!out) LKV_INVALID("out must not be NULL");
    *out = nullptr;
    if (!x) LKV_INVALID("x must not be NULL");
    lightkv_merge_params grid = lightkv_merge_params_default();
    grid.grid_rows = rp.grid_rows;
    grid.grid_cols = rp.grid_cols;
    int64_t rows = 0, cols = 0;
    validate_params(n, d, &grid, false, &rows, &cols);  // N, D and the grid
    if (rp.windows < 1) LKV_INVALID("windows must be >= 1, got %d", (int) rp.windows);
    if (rp.target < 1 || rp.target > n) {
        LKV_INVALID("target must be in [1, N = %lld], got %lld", (long long) n, (long long) rp.target);
    }
    if (rp.protect_count < 0 || rp.protect_count > rp.target) {
        LKV_INVALID("protect_count must be in [0, target = %lld], got %lld", (long long) rp.target,
                    (long long) rp.protect_count);
    }
    if (rp.protect_mode != LIGHTKV_PROTECT_RECEIVE && rp.protect_mode != LIGHTKV_PROTECT_KEEP) {
        LKV_INVALID("protect_mode must be LIGHTKV_PROTECT_RECEIVE (0) or LIGHTKV_PROTECT_KEEP (1), got %d",
                    (int) rp.protect_mode);
    }
    if (rp.protect_count > 0 && !scores) LKV_INVALID("protecting %lld rows needs their scores", (long long) rp.protect_count);
    validate_scores(scores, n);
    std::vector<uint8_t> prot;                                // the protected flags (empty: none)
    if (rp.protect_count > 0) {
        prot.resize((size_t) n);
        if (lightkv_protect_top(scores, n, rp.protect_count, prot.data()) != LIGHTKV_OK) {
            fail(LIGHTKV_ERR_INTERNAL, "could not choose the protected rows");
        }
    }
    std::vector<int64_t> gpos((size_t) (2 * n));
    for (int64_t i = 0; i < n; i++) {
        gpos[2 * i] = i / cols;
        gpos[2 * i + 1] = i % cols;
    }
    auto res = std::make_unique<lightkv_merge_result>();
    reduce_rows(lc, x, n, d, scores, rows, cols, gpos, rp.windows, -1.0, rp.target, std::move(prot),
                rp.protect_mode, *res);
    *out = res.release();
}

// lightkv_merge_run_budget: the published stage's budget, the protected set, reduce_rows.
void run_budget(lightkv_context & lc, const float * x, int64_t n, int64_t d, const float * scores,
                const lightkv_merge_params & p, const int64_t * positions, double protect,
                lightkv_merge_result ** out) {
    if (!out) LKV_INVALID("out must not be NULL");
    *out = nullptr;
    if (!x) LKV_INVALID("x must not be NULL");
    if (!(protect >= 0.0 && protect <= 1.0)) LKV_INVALID("protect must be in [0, 1], got %g", protect);
    if (p.use_threshold) LKV_INVALID("a stage merged to its budget takes no threshold");
    if (protect > 0.0 && !scores) LKV_INVALID("protect %g needs scores", protect);
    // the budget: what the published stage keeps of these rows
    lightkv_merge_plan plan;
    plan.ctx = &lc;
    plan.n = n;
    plan.d = d;
    plan.params = p;
    plan.one_shot = true;
    build_plan(plan, positions);                  // validates N, D, the grid and positions
    validate_scores(scores, n);
    const int64_t target = plan.rows_without_threshold;
    int64_t rows = 0, cols = 0;
    validate_params(n, d, &p, positions != nullptr, &rows, &cols);
    std::vector<int64_t> gpos((size_t) (2 * n));
    for (int64_t i = 0; i < n; i++) {
        gpos[2 * i] = positions ? positions[2 * i] : i / cols;
        gpos[2 * i + 1] = positions ? positions[2 * i + 1] : i % cols;
    }
    // receive mode: round(protect * budget) rows (round half to even, as the reference's
    // Python round), at most the budget
    const int64_t count = std::min<int64_t>((int64_t) std::nearbyint(protect * (double) target), target);
    std::vector<uint8_t> prot;
    if (count > 0) {
        prot.resize((size_t) n);
        if (lightkv_protect_top(scores, n, count, prot.data()) != LIGHTKV_OK) {
            fail(LIGHTKV_ERR_INTERNAL, "could not choose the protected rows");
        }
    }
    auto res = std::make_unique<lightkv_merge_result>();
    reduce_rows(lc, x, n, d, scores, rows, cols, gpos, p.windows, p.ratio, target, std::move(prot),
                LIGHTKV_PROTECT_RECEIVE, *res);
    *out = res.release();
}

}  // namespace

namespace lightkv {

void check_indices(const int64_t * idx, int64_t n, int64_t n_seq, const char * what, std::vector<char> & seen) {
    if (n < 0) LKV_INVALID("%s count must be >= 0", what);
    if (n > 0 && !idx) LKV_INVALID("%s indices must not be NULL", what);
    seen.assign((size_t) n_seq, 0);
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= n_seq) LKV_INVALID("%s indices must be in [0, %lld), got %lld", what, (long long) n_seq, (long long) idx[i]);
        if (seen[idx[i]]) LKV_INVALID("%s indices contain duplicates (%lld)", what, (long long) idx[i]);
        seen[idx[i]] = 1;
    }
}

void check_finite(const float * v, int64_t n, const char * what) {
    for (int64_t i = 0; i < n; i++) {
        if (!std::isfinite(v[i])) LKV_INVALID("%s contains NaN or Inf", what);
    }
}

void check_finite_result(const float * v, int64_t n, const char * what) {
    for (int64_t i = 0; i < n; i++) {
        if (!std::isfinite(v[i])) fail(LIGHTKV_ERR_NUMERIC, "%s are not finite (q.k overflows float32)", what);
    }
}

std::vector<float> causal_mask(const int32_t * q_pos, int64_t n_query, const int32_t * k_pos, int64_t n_key) {
    // a query that sees no key would divide by zero in the softmax: refused here
    std::vector<float> mask((size_t) (n_query * n_key));
    for (int64_t i = 0; i < n_query; i++) {
        bool any = false;
        for (int64_t j = 0; j < n_key; j++) {
            const bool sees = k_pos[j] <= q_pos[i];
            mask[(size_t) (i * n_key + j)] = sees ? 0.0f : -INFINITY;
            any = any || sees;
        }
        if (!any) LKV_INVALID("query %lld (position %d) sees no key", (long long) i, q_pos[i]);
    }
    return mask;
}

std::vector<int32_t> text_rows_per_head(const int64_t * text_idx, int64_t n_text, int64_t n_head_kv) {
    std::vector<int32_t> ti((size_t) (n_text * n_head_kv));
    for (int64_t h = 0; h < n_head_kv; h++) {
        for (int64_t j = 0; j < n_text; j++) ti[h * n_text + j] = (int32_t) text_idx[j];
    }
    return ti;
}

}  // namespace lightkv

// =============================================================================== C API
extern "C" {

int lightkv_api_version(void) { return LIGHTKV_API_VERSION; }

const char * lightkv_status_string(lightkv_status s) {
    switch (s) {
        case LIGHTKV_OK:                   return "ok";
        case LIGHTKV_ERR_INVALID_ARGUMENT: return "invalid argument";
        case LIGHTKV_ERR_OUT_OF_MEMORY:    return "out of memory";
        case LIGHTKV_ERR_BACKEND:          return "backend error";
        case LIGHTKV_ERR_NUMERIC:          return "numeric overflow";
        case LIGHTKV_ERR_INTERNAL:         return "internal error";
    }
    return "unknown status";
}

lightkv_merge_params lightkv_merge_params_default(void) {
    lightkv_merge_params p;
    p.windows = 1;
    p.ratio = 0.5;
    p.grid_rows = 0;
    p.grid_cols = 0;
    p.use_threshold = 0;
    p.threshold = 0.0;
    return p;
}

lightkv_context_params lightkv_context_params_default(void) {
    lightkv_context_params p;
    p.backend = nullptr;
    p.n_threads = 0;
    p.force_cpu_ops = nullptr;
    return p;
}

lightkv_status lightkv_backends_list(const char ** names, size_t capacity, size_t * count) {
    return guarded(nullptr, [&] {
        if (!count) LKV_INVALID("count must not be NULL");
        if (capacity > 0 && !names) LKV_INVALID("names must not be NULL when capacity > 0");
        ensure_backends_loaded();
        const size_t n = ggml_backend_dev_count();
        for (size_t i = 0; i < n && i < capacity; i++) names[i] = ggml_backend_dev_name(ggml_backend_dev_get(i));
        *count = n;
    });
}

lightkv_status lightkv_context_create(const char * backend, lightkv_context ** out) {
    lightkv_context_params p = lightkv_context_params_default();
    p.backend = backend;
    return lightkv_context_create_ext(&p, out);
}

lightkv_status lightkv_context_create_ext(const lightkv_context_params * params, lightkv_context ** out) {
    return guarded(nullptr, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!params) LKV_INVALID("params must not be NULL");
        auto lc = std::make_unique<lightkv_context>();
        ggml_backend_dev_t dev = find_device(params->backend);
        lc->name = ggml_backend_dev_name(dev);
        lc->primary = ggml_backend_dev_init(dev, nullptr);
        if (!lc->primary) fail(LIGHTKV_ERR_BACKEND, "could not initialise the ggml backend %s", lc->name.c_str());
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            lc->cpu = lc->primary;
        } else {
            ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
            if (!cpu_dev) fail(LIGHTKV_ERR_BACKEND, "the ggml CPU backend is missing");
            lc->cpu = ggml_backend_dev_init(cpu_dev, nullptr);
            if (!lc->cpu) fail(LIGHTKV_ERR_BACKEND, "could not initialise the ggml CPU backend");
        }
        int n_threads = params->n_threads;
        if (n_threads <= 0) n_threads = (int) std::max(1u, std::thread::hardware_concurrency());
        lc->n_threads = n_threads;
        set_threads(lc->cpu, n_threads);

        if (params->force_cpu_ops) {
            std::string s = params->force_cpu_ops, cur;
            for (char c : s + ",") {
                if (c == ',' || c == ' ') {
                    if (!cur.empty()) lc->force_cpu_ops.push_back(cur);
                    cur.clear();
                } else {
                    cur += (char) toupper((unsigned char) c);
                }
            }
        }

        ggml_backend_t backends[2] = {lc->primary, lc->cpu};
        const int n_backends = lc->cpu == lc->primary ? 1 : 2;
        lc->sched = ggml_backend_sched_new(backends, nullptr, n_backends, 512, false, false);
        if (!lc->sched) fail(LIGHTKV_ERR_BACKEND, "could not create the ggml scheduler");
        *out = lc.release();
    });
}

void lightkv_context_free(lightkv_context * ctx) { delete ctx; }

const char * lightkv_context_backend(const lightkv_context * ctx) { return ctx ? ctx->name.c_str() : ""; }

const char * lightkv_last_error(const lightkv_context * ctx) {
    return ctx ? ctx->error.c_str() : g_thread_error.c_str();
}

int32_t lightkv_context_last_n_splits(const lightkv_context * ctx) { return ctx ? ctx->last_splits : 0; }

lightkv_status lightkv_merge_plan_create(lightkv_context * ctx, int64_t n, int64_t d,
                                         const lightkv_merge_params * params, lightkv_merge_plan ** out) {
    return lightkv_merge_plan_create_at(ctx, n, d, params, nullptr, out);
}

lightkv_status lightkv_merge_plan_create_at(lightkv_context * ctx, int64_t n, int64_t d,
                                            const lightkv_merge_params * params, const int64_t * positions,
                                            lightkv_merge_plan ** out) {
    return lightkv_merge_plan_create_protected(ctx, n, d, params, positions, nullptr, LIGHTKV_PROTECT_RECEIVE, out);
}

lightkv_status lightkv_merge_plan_create_protected(lightkv_context * ctx, int64_t n, int64_t d,
                                                   const lightkv_merge_params * params, const int64_t * positions,
                                                   const uint8_t * protect, int32_t protect_mode,
                                                   lightkv_merge_plan ** out) {
    return guarded(ctx, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        if (!params) LKV_INVALID("params must not be NULL");
        auto plan = std::make_unique<lightkv_merge_plan>();
        plan->ctx = ctx;
        plan->n = n;
        plan->d = d;
        plan->params = *params;
        set_protection(*plan, protect, protect_mode);
        build_plan(*plan, positions);
        *out = plan.release();
    });
}

void lightkv_merge_plan_free(lightkv_merge_plan * plan) { delete plan; }

int64_t lightkv_merge_plan_rows_without_threshold(const lightkv_merge_plan * plan) {
    return plan ? plan->rows_without_threshold : 0;
}

lightkv_status lightkv_merge_plan_stats(const lightkv_merge_plan * plan, int64_t * n_runs,
                                        int64_t * n_const_uploads, int64_t * n_allocs) {
    return guarded(plan ? plan->ctx : nullptr, [&] {
        if (!plan) LKV_INVALID("plan must not be NULL");
        if (n_runs) *n_runs = plan->n_runs;
        if (n_const_uploads) *n_const_uploads = plan->n_const_uploads;
        if (n_allocs) *n_allocs = plan->n_allocs;
    });
}

lightkv_status lightkv_merge_plan_run(lightkv_merge_plan * plan, const float * x, const float * scores,
                                      lightkv_merge_result ** out) {
    lightkv_context * ctx = plan ? plan->ctx : nullptr;
    return guarded(ctx, [&] {
        if (!plan) LKV_INVALID("plan must not be NULL");
        const work_mark mark(*ctx);
        run_plan(*plan, x, scores, out);
        mark.record(**out);
    });
}

lightkv_status lightkv_merge_run(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                 const float * scores, const lightkv_merge_params * params,
                                 lightkv_merge_result ** out) {
    return lightkv_merge_run_at(ctx, x, n, d, scores, params, nullptr, out);
}

lightkv_status lightkv_merge_run_at(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                    const float * scores, const lightkv_merge_params * params,
                                    const int64_t * positions, lightkv_merge_result ** out) {
    return lightkv_merge_run_protected(ctx, x, n, d, scores, params, positions, nullptr,
                                       LIGHTKV_PROTECT_RECEIVE, out);
}

lightkv_status lightkv_merge_run_protected(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                           const float * scores, const lightkv_merge_params * params,
                                           const int64_t * positions, const uint8_t * protect,
                                           int32_t protect_mode, lightkv_merge_result ** out) {
    return guarded(ctx, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        if (!params) LKV_INVALID("params must not be NULL");
        lightkv_merge_plan plan;
        plan.ctx = ctx;
        plan.n = n;
        plan.d = d;
        plan.params = *params;
        plan.one_shot = true;
        set_protection(plan, protect, protect_mode);
        build_plan(plan, positions);
        const work_mark mark(*ctx);
        run_plan(plan, x, scores, out);
        mark.record(**out);
    });
}

lightkv_status lightkv_protect_top(const float * scores, int64_t n, int64_t count, uint8_t * out_mask) {
    return guarded(nullptr, [&] {
        if (n < 0) LKV_INVALID("n must be >= 0, got %lld", (long long) n);
        if (n > MAX_TOKENS) LKV_INVALID("n = %lld tokens is more than the supported %lld", (long long) n, (long long) MAX_TOKENS);
        if (count < 0 || count > n) LKV_INVALID("count must be in [0, %lld], got %lld", (long long) n, (long long) count);
        if (n > 0 && !out_mask) LKV_INVALID("out_mask must not be NULL");
        if (count > 0 && !scores) LKV_INVALID("protecting %lld tokens needs their scores", (long long) count);
        validate_scores(scores, n);
        std::vector<int64_t> order((size_t) n);
        std::iota(order.begin(), order.end(), 0);
        // the highest scores first; equal scores: the lower index first (stable)
        std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return scores[i] > scores[j]; });
        std::fill(out_mask, out_mask + n, (uint8_t) 0);
        for (int64_t k = 0; k < count; k++) out_mask[order[k]] = 1;
    });
}

lightkv_status lightkv_merge_reduce(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                    const float * scores, const lightkv_reduce_params * params,
                                    lightkv_merge_result ** out) {
    return guarded(ctx, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        if (!params) LKV_INVALID("params must not be NULL");
        const work_mark mark(*ctx);
        run_reduce(*ctx, x, n, d, scores, *params, out);
        mark.record(**out);
    });
}

lightkv_status lightkv_merge_run_budget(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                        const float * scores, const lightkv_merge_params * params,
                                        const int64_t * positions, double protect, lightkv_merge_result ** out) {
    return guarded(ctx, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        if (!params) LKV_INVALID("params must not be NULL");
        const work_mark mark(*ctx);
        run_budget(*ctx, x, n, d, scores, *params, positions, protect, out);
        mark.record(**out);
    });
}

int32_t lightkv_merge_result_stages(const lightkv_merge_result * r, int32_t * windows, int64_t * rows,
                                    int32_t count) {
    if (!r) return 0;
    const int32_t k = (int32_t) r->stage_rows.size();
    for (int32_t i = 0; i < std::min(k, count); i++) {
        if (windows) windows[i] = r->stage_windows[i];
        if (rows) rows[i] = r->stage_rows[i];
    }
    return k;
}

lightkv_status lightkv_merge_result_work(const lightkv_merge_result * r, int64_t * n_graphs,
                                        int64_t * n_graph_allocs, int64_t * n_buffers) {
    return guarded(nullptr, [&] {
        if (!r) LKV_INVALID("result must not be NULL");
        if (n_graphs) *n_graphs = r->n_graphs;
        if (n_graph_allocs) *n_graph_allocs = r->n_graph_allocs;
        if (n_buffers) *n_buffers = r->n_buffers;
    });
}

int64_t lightkv_merge_result_rows(const lightkv_merge_result * r)   { return r ? r->m : 0; }
int64_t lightkv_merge_result_tokens(const lightkv_merge_result * r) { return r ? r->n : 0; }
int64_t lightkv_merge_result_dim(const lightkv_merge_result * r)    { return r ? r->d : 0; }
const float *   lightkv_merge_result_x(const lightkv_merge_result * r)      { return r ? r->x.data() : nullptr; }
const int64_t * lightkv_merge_result_kept(const lightkv_merge_result * r)   { return r ? r->kept.data() : nullptr; }
const int64_t * lightkv_merge_result_assign(const lightkv_merge_result * r) { return r ? r->assign.data() : nullptr; }
const float *   lightkv_merge_result_weight(const lightkv_merge_result * r) { return r ? r->weight.data() : nullptr; }
void lightkv_merge_result_free(lightkv_merge_result * r) { delete r; }

lightkv_status lightkv_guidance_scores(lightkv_context * ctx, const float * q, const float * k,
                                       int64_t n_head, int64_t n_head_kv, int64_t n_seq, int64_t head_dim,
                                       const int64_t * vision_idx, int64_t n_vision,
                                       const int64_t * text_idx, int64_t n_text,
                                       float scale, float * out_scores) {
    return guarded(ctx, [&] {
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        if (n_head < 1 || n_head_kv < 1 || n_seq < 1 || head_dim < 1) {
            LKV_INVALID("q/k shapes must be positive (n_head %lld, n_head_kv %lld, n_seq %lld, head_dim %lld)",
                        (long long) n_head, (long long) n_head_kv, (long long) n_seq, (long long) head_dim);
        }
        if (n_head % n_head_kv != 0) {
            LKV_INVALID("n_head %lld is not a multiple of n_head_kv %lld", (long long) n_head, (long long) n_head_kv);
        }
        if (n_seq > MAX_TOKENS) LKV_INVALID("n_seq %lld is too large", (long long) n_seq);
        if (!q || !k) LKV_INVALID("q and k must not be NULL");
        if (!std::isfinite(scale)) LKV_INVALID("scale must be finite");
        const int64_t nq = checked_mul(checked_mul(n_head, n_seq, "q"), head_dim, "q");
        const int64_t nk = checked_mul(checked_mul(n_head_kv, n_seq, "k"), head_dim, "k");
        std::vector<char> seen;
        check_indices(vision_idx, n_vision, n_seq, "vision", seen);
        check_indices(text_idx, n_text, n_seq, "text", seen);
        if (n_vision > 0 && !out_scores) LKV_INVALID("out_scores must not be NULL");
        check_finite(q, nq, "q");
        check_finite(k, nk, "k");
        ctx->last_splits = 0;
        if (n_vision == 0) return;
        if (n_text == 0) {  // an empty sum
            std::fill(out_scores, out_scores + n_vision, 0.0f);
            return;
        }
        checked_mul(checked_mul(n_text, n_seq, "logits"), n_head, "logits");

        ctx_ptr in_meta = new_meta_context(4);
        ggml_tensor * t_q = ggml_new_tensor_3d(in_meta.get(), GGML_TYPE_F32, head_dim, n_seq, n_head);
        ggml_tensor * t_k = ggml_new_tensor_3d(in_meta.get(), GGML_TYPE_F32, head_dim, n_seq, n_head_kv);
        ggml_tensor * t_t = ggml_new_tensor_2d(in_meta.get(), GGML_TYPE_I32, n_text, n_head_kv);
        ggml_tensor * t_v = ggml_new_tensor_1d(in_meta.get(), GGML_TYPE_I32, n_vision);
        buf_ptr in_buf = ctx->alloc_inputs(in_meta.get());
        ggml_backend_tensor_set(t_q, q, 0, ggml_nbytes(t_q));
        ggml_backend_tensor_set(t_k, k, 0, ggml_nbytes(t_k));
        std::vector<int32_t> vi(vision_idx, vision_idx + n_vision);
        upload(t_t, text_rows_per_head(text_idx, n_text, n_head_kv));
        upload(t_v, vi);

        ctx_ptr g = new_meta_context(32);
        ggml_tensor * gs = lightkv::guidance_from_qk(g.get(), t_q, t_k, t_t, t_v, scale);
        ctx->compute_result(g.get(), gs, out_scores, n_vision, "guidance scores");
    });
}

lightkv_status lightkv_attention_received(lightkv_context * ctx, const float * q, const float * k,
                                          int64_t n_head, int64_t n_head_kv, int64_t n_query, int64_t n_key,
                                          int64_t head_dim, const int32_t * q_pos, const int32_t * k_pos,
                                          float scale, float * out) {
    return guarded(ctx, [&] {
        if (!ctx) LKV_INVALID("ctx must not be NULL");
        if (n_head < 1 || n_head_kv < 1 || n_query < 1 || n_key < 1 || head_dim < 1) {
            LKV_INVALID("q/k shapes must be positive (n_head %lld, n_head_kv %lld, n_query %lld, n_key %lld, head_dim %lld)",
                        (long long) n_head, (long long) n_head_kv, (long long) n_query, (long long) n_key,
                        (long long) head_dim);
        }
        if (n_head % n_head_kv != 0) {
            LKV_INVALID("n_head %lld is not a multiple of n_head_kv %lld", (long long) n_head, (long long) n_head_kv);
        }
        if (n_query > MAX_TOKENS || n_key > MAX_TOKENS) LKV_INVALID("too many queries or keys");
        if (!q || !k || !q_pos || !k_pos || !out) LKV_INVALID("q, k, q_pos, k_pos and out must not be NULL");
        if (!std::isfinite(scale)) LKV_INVALID("scale must be finite");
        const int64_t nq = checked_mul(checked_mul(n_head, n_query, "q"), head_dim, "q");
        const int64_t nk = checked_mul(checked_mul(n_head_kv, n_key, "k"), head_dim, "k");
        checked_mul(checked_mul(n_query, n_key, "logits"), n_head, "logits");
        check_finite(q, nq, "q");
        check_finite(k, nk, "k");
        const std::vector<float> mask = causal_mask(q_pos, n_query, k_pos, n_key);
        ctx->last_splits = 0;

        ctx_ptr in_meta = new_meta_context(3);
        ggml_tensor * t_q = ggml_new_tensor_3d(in_meta.get(), GGML_TYPE_F32, head_dim, n_query, n_head);
        ggml_tensor * t_k = ggml_new_tensor_3d(in_meta.get(), GGML_TYPE_F32, head_dim, n_key, n_head_kv);
        ggml_tensor * t_m = ggml_new_tensor_2d(in_meta.get(), GGML_TYPE_F32, n_key, n_query);
        buf_ptr in_buf = ctx->alloc_inputs(in_meta.get());
        ggml_backend_tensor_set(t_q, q, 0, ggml_nbytes(t_q));
        ggml_backend_tensor_set(t_k, k, 0, ggml_nbytes(t_k));
        ggml_backend_tensor_set(t_m, mask.data(), 0, ggml_nbytes(t_m));

        ctx_ptr g = new_meta_context(16);
        ggml_tensor * r = lightkv::attention_received(g.get(), t_q, t_k, t_m, scale);
        ctx->compute_result(g.get(), r, out, n_key, "attention scores");
    });
}

}  // extern "C"
