// What the translation units of liblightkv share: errors (thrown inside, turned into a status
// at the C boundary by `guarded`), RAII for ggml objects, and the context (a backend, the CPU
// fallback and a scheduler). Not part of the public API.
#pragma once

#include "lightkv.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace lightkv {

// ------------------------------------------------------------------------------- errors
struct lkv_error {
    lightkv_status status;
    std::string    message;
};

// message of the last failure of a call made without a context (per thread)
extern thread_local std::string g_thread_error;

[[noreturn]] void fail(lightkv_status status, const char * fmt, ...);

#define LKV_INVALID(...) ::lightkv::fail(LIGHTKV_ERR_INVALID_ARGUMENT, __VA_ARGS__)

constexpr int64_t MAX_TOKENS = (int64_t) 1 << 30;  // indices are int32 inside the graphs
constexpr int64_t MAX_ELEMS  = (int64_t) 1 << 40;  // any single tensor, in elements

// a * b, failing (out of memory) when the product overflows or exceeds MAX_ELEMS
int64_t checked_mul(int64_t a, int64_t b, const char * what);

// ------------------------------------------------------------------------------- RAII
struct ctx_deleter   { void operator()(ggml_context * c) const { ggml_free(c); } };
struct buf_deleter   { void operator()(ggml_backend_buffer_t b) const { ggml_backend_buffer_free(b); } };
struct sched_deleter { void operator()(ggml_backend_sched_t s) const { ggml_backend_sched_free(s); } };
using ctx_ptr   = std::unique_ptr<ggml_context, ctx_deleter>;
using buf_ptr   = std::unique_ptr<ggml_backend_buffer, buf_deleter>;
using sched_ptr = std::unique_ptr<ggml_backend_sched, sched_deleter>;

// a ggml context for tensor and graph metadata only (no_alloc): n_tensors tensors and one
// graph of up to 512 nodes
ctx_ptr new_meta_context(size_t n_tensors);

// Indices into a sequence of n_seq: each in [0, n_seq), no duplicates (seen: scratch).
void check_indices(const int64_t * idx, int64_t n, int64_t n_seq, const char * what, std::vector<char> & seen);
// every value finite (else LIGHTKV_ERR_INVALID_ARGUMENT naming `what`)
void check_finite(const float * v, int64_t n, const char * what);
// every value of a graph's result finite (else LIGHTKV_ERR_NUMERIC: q.k overflowed float32)
void check_finite_result(const float * v, int64_t n, const char * what);
// attention_received's mask [n_query][n_key]: 0 where k_pos[j] <= q_pos[i] (llama.cpp's causal
// mask by position), -inf elsewhere; a query that sees no key is LIGHTKV_ERR_INVALID_ARGUMENT
std::vector<float> causal_mask(const int32_t * q_pos, int64_t n_query, const int32_t * k_pos, int64_t n_key);
// guidance_from_qk's text_idx input: the text indices repeated for each of n_head_kv key heads
std::vector<int32_t> text_rows_per_head(const int64_t * text_idx, int64_t n_text, int64_t n_head_kv);

template <typename T>
void upload(ggml_tensor * t, const std::vector<T> & v) {
    ggml_backend_tensor_set(t, v.data(), 0, v.size() * sizeof(T));
}

}  // namespace lightkv

// ------------------------------------------------------------------------------- context
// Buffers a context reuses from call to call (lightkv_context::place_tensors): for tensors
// that are dead once the call returns (inputs, and on a CPU context a graph's nodes). One
// slot per set of tensors that must live at the same time.
enum scratch_slot {
    SCRATCH_ROWS              = 0,  // a one-shot merge's x; the guidance model's rows
    SCRATCH_SIMILARITY        = 1,  // a one-shot merge's window slots, padding mask, tie ramp
    SCRATCH_AGGREGATION       = 2,  // the aggregation's members and weights (every merge run)
    SCRATCH_SIMILARITY_GRAPH  = 3,  // CPU context: a one-shot merge's graph 1 nodes
    SCRATCH_AGGREGATION_GRAPH = 4,  // CPU context: graph 2's nodes (every merge run)
    N_SCRATCH                 = 5,
};

struct lightkv_context {
    ggml_backend_t               primary = nullptr;  // the chosen backend
    ggml_backend_t               cpu     = nullptr;  // fallback; == primary when CPU was chosen
    ggml_backend_sched_t         sched   = nullptr;  // shared by the graphs built per call
    std::string                  name;
    std::vector<std::string>     force_cpu_ops;
    std::string                  error;
    int32_t                      last_splits = 0;
    int32_t                      n_threads   = 1;        // CPU threads for graphs worth splitting
    lightkv::buf_ptr             scratch[N_SCRATCH];     // place_tensors' buffers
    // work counters since create (tests; a call reports its own share as differences):
    // graphs computed, graph allocations (in a scheduler, or in a buffer on a CPU context),
    // backend buffers allocated (for inputs, and for graphs on a CPU context)
    int64_t                      n_graphs = 0, n_graph_allocs = 0, n_buffers = 0;

    ~lightkv_context();

    // Input tensors are allocated in a buffer of the chosen backend marked as WEIGHTS:
    // the scheduler then assigns the ops that read them to that backend (plain graph inputs
    // would be placed on the CPU and pull the whole graph there).
    lightkv::buf_ptr alloc_inputs(ggml_context * meta);

    // The tensors of meta (views included) in the context's buffer of `slot` on the chosen
    // backend, reallocated only when they do not fit: for tensors dead once the call returns
    // (the previous tensors placed in that slot are dead from then on). A small merge
    // allocated three input buffers and two graph allocations per stage before this.
    void place_tensors(scratch_slot slot, ggml_context * meta);

    // A scheduler of its own over [chosen backend, CPU], for a graph that stays allocated
    // across calls (a merge plan's similarity graph).
    lightkv::sched_ptr new_sched() const;

    // Assign the nodes of gf to backends (force_cpu_ops) and allocate it in `s`; the
    // allocation stays valid until `s` is reset.
    void alloc_graph(ggml_backend_sched_t s, ggml_cgraph * gf);

    // A graph of a CPU context runs without a scheduler (one backend: nothing to split, copy
    // or fall back to): graph_buffer gives every tensor of its meta context g one buffer of
    // their own, and run_allocated(nullptr, gf) computes it on the CPU backend. The
    // scheduler's graph split and allocator planning were a fifth of a small merge.
    // (place_tensors(slot, g) is the same for a graph that dies with the call.)
    bool cpu_only() const { return primary == cpu; }
    lightkv::buf_ptr graph_buffer(ggml_context * g);

    // Run a graph allocated in `s` by alloc_graph, or (s nullptr) by graph_buffer.
    void run_allocated(ggml_backend_sched_t s, ggml_cgraph * gf);

    // Allocate (in the shared scheduler) and run one graph; the outputs stay readable until
    // the next call of compute.
    // Build the graph that ends in `result` (a [n] float32 tensor of meta context g), run it
    // in the shared scheduler (`pin`, if given, on backend `pin_to`), copy its n values to
    // `out` and check them finite (else LIGHTKV_ERR_NUMERIC naming `what`).
    void compute_result(ggml_context * g, ggml_tensor * result, float * out, int64_t n,
                        const char * what, ggml_tensor * pin = nullptr, ggml_backend_t pin_to = nullptr);

    // Allocate and run the graph gf of meta context g: in the buffer of `slot` on a CPU
    // context, else in the shared scheduler; the outputs stay readable until the next use
    // of either.
    void compute(ggml_context * g, ggml_cgraph * gf, scratch_slot slot) {
        if (cpu_only()) {
            place_tensors(slot, g);
            n_graph_allocs++;
            run_allocated(nullptr, gf);
            return;
        }
        ggml_backend_sched_reset(sched);
        alloc_graph(sched, gf);
        run_allocated(sched, gf);
    }
};

namespace lightkv {

// Run `body`, turning every exception into a status + message (never let one cross the C
// boundary).
template <typename F>
lightkv_status guarded(lightkv_context * ctx, F && body) {
    try {
        body();
        if (ctx) ctx->error.clear();
        return LIGHTKV_OK;
    } catch (const lkv_error & e) {
        g_thread_error = e.message;
        if (ctx) ctx->error = e.message;
        return e.status;
    } catch (const std::bad_alloc &) {
        g_thread_error = "out of host memory";
        if (ctx) ctx->error = g_thread_error;
        return LIGHTKV_ERR_OUT_OF_MEMORY;
    } catch (const std::exception & e) {
        g_thread_error = std::string("internal error: ") + e.what();
        if (ctx) ctx->error = g_thread_error;
        return LIGHTKV_ERR_INTERNAL;
    } catch (...) {
        g_thread_error = "internal error";
        if (ctx) ctx->error = g_thread_error;
        return LIGHTKV_ERR_INTERNAL;
    }
}

}  // namespace lightkv

// ------------------------------------------------------------------------------- layer mode
// lightkv_schedule.cpp owns the rules; lightkv_layer_prefill.cpp runs them
struct lightkv_schedule {
    std::vector<lightkv_stage> stages;
    int32_t                    n_layer = 0;
    int32_t                    use_threshold = 0;
    double                     threshold = 0.0;
    lightkv_kv_policy          kv = LIGHTKV_KV_COMPACT;
    lightkv_positions_policy   positions = LIGHTKV_POSITIONS_KEEP;
};

struct lightkv_schedule_report {
    const lightkv_schedule * s = nullptr;
    int64_t                  vision_rows = 0;
    std::vector<int64_t>     in, out;
    int64_t                  cells_before = 0, cells_after = 0;
};

namespace lightkv {
// the lightkv context a capture computes on (lightkv_capture.cpp)
lightkv_context * capture_context(lightkv_capture * cap);
}  // namespace lightkv
