/*
 * lightkv.h - the LightKV token merge and its prompt guidance, as ggml graphs.
 *
 * One merge stage (docs/method.md, "One merge stage"): the N vision tokens x [N, D]
 * of one image are cut into W x W spatial windows; inside each window the tokens alternate
 * source / destination, each source finds its most cosine-similar destination, and the
 * r = min(floor(ratio * n_w), n_w / 2) best-matching sources of the window are merged into
 * their destination with a guidance-weighted mean. Output rows are the kept tokens in
 * ascending original index.
 *
 * Ownership: every object is created by a *_create / *_run call and released by the
 * matching *_free call (NULL is accepted by every *_free). A result owns its arrays;
 * the pointers returned by the accessors stay valid until the result is freed.
 * A plan keeps a pointer to its context: free plans before their context.
 * Threads: a context (and its plans) must be used by one thread at a time; different
 * contexts are independent.
 *
 * Errors: no call aborts the process on bad input. Every call that can fail returns a
 * lightkv_status; the message of the last failure is lightkv_last_error(ctx) (or
 * lightkv_last_error(NULL) for calls that failed before a context existed; that message is
 * per thread).
 */
#ifndef LIGHTKV_H
#define LIGHTKV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(LIGHTKV_BUILD)
#    define LIGHTKV_API __declspec(dllexport)
#  else
#    define LIGHTKV_API __declspec(dllimport)
#  endif
#else
#  define LIGHTKV_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define LIGHTKV_API_VERSION 1

typedef enum lightkv_status {
    LIGHTKV_OK                   = 0,
    LIGHTKV_ERR_INVALID_ARGUMENT = 1, /* bad shape, parameter or value (NaN/Inf, ...)   */
    LIGHTKV_ERR_OUT_OF_MEMORY    = 2, /* host or device allocation failed                */
    LIGHTKV_ERR_BACKEND          = 3, /* unknown backend, backend init or compute failed */
    LIGHTKV_ERR_NUMERIC          = 4, /* a float32 intermediate overflowed (input values too large) */
    LIGHTKV_ERR_INTERNAL         = 5, /* a bug: please report                            */
} lightkv_status;

typedef struct lightkv_context      lightkv_context;
typedef struct lightkv_merge_plan   lightkv_merge_plan;
typedef struct lightkv_merge_result lightkv_merge_result;
typedef struct lightkv_gguf          lightkv_gguf;
typedef struct lightkv_guidance_model lightkv_guidance_model;
typedef struct lightkv_capture       lightkv_capture;
struct ggml_tensor;                  /* ggml.h's; only lightkv_capture_eval takes one */
struct ggml_cgraph;                  /* ggml.h's; only lightkv_capture_graph takes one */

/* Parameters of one merge stage. */
typedef struct lightkv_merge_params {
    int32_t windows;       /* windows per side, >= 1 and <= each grid side              */
    double  ratio;         /* fraction dropped per window, in [0, 1)                     */
    int64_t grid_rows;     /* grid_rows = grid_cols = 0: published square padding        */
    int64_t grid_cols;     /*   (S = ceil(sqrt(N)), token i at (i / S, i % S));         */
                           /* otherwise grid_rows * grid_cols must equal N               */
    int32_t use_threshold; /* nonzero: a source whose best cosine is below threshold     */
    double  threshold;     /*   never merges (finite value required)                     */
} lightkv_merge_params;

typedef struct lightkv_context_params {
    const char * backend;       /* ggml device name ("CPU", "CUDA0", "MTL0", "Vulkan0"),
                                   "cpu", "gpu" (first GPU), or NULL / "" = best available */
    int32_t      n_threads;     /* CPU threads; <= 0: all hardware threads                 */
    const char * force_cpu_ops; /* NULL, or comma-separated ggml op names (e.g.
                                   "ARGMAX,STEP") whose nodes are pinned to the CPU backend:
                                   emulates a backend lacking them (tests the fallback path) */
} lightkv_context_params;

LIGHTKV_API int                    lightkv_api_version(void);
LIGHTKV_API const char *           lightkv_status_string(lightkv_status status);
LIGHTKV_API lightkv_merge_params   lightkv_merge_params_default(void);   /* windows 1, ratio 0.5, square padding, no threshold */
LIGHTKV_API lightkv_context_params lightkv_context_params_default(void); /* best backend, all threads, nothing forced */

/* Names of the ggml devices available in this process (static strings owned by ggml).
 * Writes min(capacity, total) names; *count receives the total. names may be NULL when
 * capacity is 0. */
LIGHTKV_API lightkv_status lightkv_backends_list(const char ** names, size_t capacity, size_t * count);

/* --- context: a ggml backend (+ the CPU backend for fallback) and its scheduler --------- */
LIGHTKV_API lightkv_status lightkv_context_create(const char * backend, lightkv_context ** out);
LIGHTKV_API lightkv_status lightkv_context_create_ext(const lightkv_context_params * params, lightkv_context ** out);
LIGHTKV_API void           lightkv_context_free(lightkv_context * ctx);
LIGHTKV_API const char *   lightkv_context_backend(const lightkv_context * ctx); /* device name */
/* message of the last failure on ctx ("" if none); ctx NULL: this thread's last failure */
LIGHTKV_API const char *   lightkv_last_error(const lightkv_context * ctx);
/* number of backend splits of the graphs of the last successful call (1 per graph when the
 * whole graph ran on one backend); for tests of the fallback path */
LIGHTKV_API int32_t        lightkv_context_last_n_splits(const lightkv_context * ctx);

/* --- merge ---------------------------------------------------------------------------------- */
/* A plan fixes N, D and the parameters (window layout, budgets) and can be run many times. */
LIGHTKV_API lightkv_status lightkv_merge_plan_create(lightkv_context * ctx, int64_t n, int64_t d,
                                                     const lightkv_merge_params * params,
                                                     lightkv_merge_plan ** out);
LIGHTKV_API void           lightkv_merge_plan_free(lightkv_merge_plan * plan);
/* number of output rows when no threshold blocks a merge (= N - sum of window budgets) */
LIGHTKV_API int64_t        lightkv_merge_plan_rows_without_threshold(const lightkv_merge_plan * plan);

/* What a plan keeps between runs (test counters): n_runs runs; n_const_uploads uploads of
 * the plan's constant inputs (window indices, padding mask, tie ramp: 4, made by the first run
 * that needs a similarity graph); n_allocs buffers and graph allocations made for the plan
 * (x's buffer, the constant inputs' buffer, the similarity graph's allocation: 3 by the first
 * run; later runs add none unless x needs another overflow rescaling). Every run also uploads
 * x, and builds the aggregation graph, whose shapes depend on the merge groups, with its
 * score-derived weights. Any pointer may be NULL. */
LIGHTKV_API lightkv_status lightkv_merge_plan_stats(const lightkv_merge_plan * plan, int64_t * n_runs,
                                                    int64_t * n_const_uploads, int64_t * n_allocs);

/* x: [N, D] row-major float32, finite. scores: [N] finite, >= 0, or NULL (all weights 1). */
LIGHTKV_API lightkv_status lightkv_merge_plan_run(lightkv_merge_plan * plan, const float * x,
                                                  const float * scores, lightkv_merge_result ** out);
/* plan_create + plan_run + plan_free in one call */
LIGHTKV_API lightkv_status lightkv_merge_run(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                             const float * scores, const lightkv_merge_params * params,
                                             lightkv_merge_result ** out);

/* Later stages of a progressive schedule: true 2D windows of the ORIGINAL grid.
 * positions: [n][2] int64 row-major (row, col) of every token on the original grid of
 * params->grid_rows x params->grid_cols (both required, > 0; n <= rows * cols: the
 * survivors of earlier stages, normally in ascending original index). Positions must be
 * inside the grid and pairwise distinct (else LIGHTKV_ERR_INVALID_ARGUMENT). Token i belongs
 * to the window of positions[i] under the windows x windows cut of the original grid
 * (windows <= each grid side); inside a window tokens alternate source / destination in
 * ascending input index; budgets count the tokens present in the window. Everything else
 * (ties, threshold, weights, output order) as lightkv_merge_plan_create / _run.
 * positions NULL: exactly lightkv_merge_plan_create / lightkv_merge_run. */
LIGHTKV_API lightkv_status lightkv_merge_plan_create_at(lightkv_context * ctx, int64_t n, int64_t d,
                                                        const lightkv_merge_params * params,
                                                        const int64_t * positions,
                                                        lightkv_merge_plan ** out);
LIGHTKV_API lightkv_status lightkv_merge_run_at(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                                const float * scores, const lightkv_merge_params * params,
                                                const int64_t * positions, lightkv_merge_result ** out);

/* --- protection (method lightkv-protect, docs/merge-variants.md) ---------------------------
 * The tokens the prompt points at are never merge sources, so they survive every stage intact
 * but for what they absorb. Inside each window the UNPROTECTED tokens alternate source /
 * destination in ascending input index (without protection this is exactly the published
 * alternation); a protected token is, by protect_mode: */
typedef enum lightkv_protect_mode {
    LIGHTKV_PROTECT_RECEIVE = 0, /* a destination too (in ascending index among the others):
                                    it may absorb similar sources (the lightkv-protect default) */
    LIGHTKV_PROTECT_KEEP    = 1, /* no role at all: it passes the stage untouched */
} lightkv_protect_mode;
/* A window's budget becomes r = min(floor(ratio * n_w), n_w / 2, its sources), n_w still
 * counting every token of the window; r = 0 when it has no destination. Everything else (top-r
 * sources by best cosine, ties, threshold, weights, output order) as lightkv_merge_plan_run.
 * protect: [n] 0 / 1 per token (1 = protected; another value is LIGHTKV_ERR_INVALID_ARGUMENT),
 * or NULL: no protection, exactly lightkv_merge_plan_create_at / lightkv_merge_run_at.
 * A progressive schedule chooses the protected set once (lightkv_protect_top on the first
 * stage's scores) and carries each kept row's flag to the next stage. */
LIGHTKV_API lightkv_status lightkv_merge_plan_create_protected(lightkv_context * ctx, int64_t n, int64_t d,
                                                               const lightkv_merge_params * params,
                                                               const int64_t * positions,
                                                               const uint8_t * protect, int32_t protect_mode,
                                                               lightkv_merge_plan ** out);
LIGHTKV_API lightkv_status lightkv_merge_run_protected(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                                       const float * scores, const lightkv_merge_params * params,
                                                       const int64_t * positions, const uint8_t * protect,
                                                       int32_t protect_mode, lightkv_merge_result ** out);
/* The protected set of the reference (lightkv_edge.reference.variants): the `count` tokens
 * with the highest scores, equal scores to the lower index. scores [n] finite, >= 0 (may be
 * NULL when count == 0); count in [0, n]; out_mask: caller-owned [n], 1 = protected. */
LIGHTKV_API lightkv_status lightkv_protect_top(const float * scores, int64_t n, int64_t count, uint8_t * out_mask);

/* --- the progressive schedule in one call (embed mode's merge of one image) ---------------
 * Stages of the merge until `target` rows remain: stage k runs on the rows left by stage k-1
 * with ratio min((m - target) / m + 1e-9, 0.5) (m: its rows; the epsilon keeps an exact
 * product exact), true 2D windows of the ORIGINAL grid (grid_rows x grid_cols; 0 x 0: the
 * published square padding), `windows` per side (clamped to the grid's shorter side); a
 * stage that merges nothing is followed by one with a single window, and the schedule stops
 * when a single window merges nothing. The protected set (lightkv_protect_top of the
 * scores, protect_count rows) is chosen once, on the input, and carried with the rows; a
 * merged row carries the summed scores of what it absorbed (float64 sums, stored float32).
 * With protect_count 0 every stage is the published one. One call instead of a call per
 * stage: the rows, scores and flags never leave the library between stages. */
typedef struct lightkv_reduce_params {
    int64_t target;         /* rows to keep, in [1, N]                                      */
    int32_t windows;        /* first stage's windows per side, >= 1                         */
    int64_t grid_rows;      /* the image's grid: rows * cols == N, or 0 x 0 (square padding) */
    int64_t grid_cols;
    int64_t protect_count;  /* rows never sources, in [0, target]; > 0 needs scores          */
    int32_t protect_mode;   /* a lightkv_protect_mode                                       */
} lightkv_reduce_params;
/* x [N, D] and scores [N] (or NULL: unguided) as lightkv_merge_plan_run. The result is over
 * the ORIGINAL tokens: kept = original index of each row, assign = row of every input token,
 * weight = its composed coefficient (x[j] = sum over assign == j of weight * x_in). */
LIGHTKV_API lightkv_status lightkv_merge_reduce(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                                const float * scores, const lightkv_reduce_params * params,
                                                lightkv_merge_result ** out);
/* One merge stage kept to the published stage's budget, with LightKV-protect (a layer-mode
 * stage; spec: reference MergeState.step(protect=...)). The budget B is the rows the published
 * stage (params, positions: as lightkv_merge_run_at; no threshold) keeps of these rows; the
 * round(protect * B) rows with the highest scores (round half to even; ties: the lower index)
 * are never sources (LIGHTKV_PROTECT_RECEIVE); the stage merges at params->ratio in its windows
 * with that rule, then, as lightkv_merge_reduce, on what is left (a window short of sources
 * leaves more than B) until B rows remain, every step in true 2D windows of the grid at the
 * rows' positions (positions NULL: the raster of the grid, or of the padded square). The
 * result is over the input rows (kept = input index of each row; assign and weight composed
 * over the steps). scores [n] are required when protect > 0. */
LIGHTKV_API lightkv_status lightkv_merge_run_budget(lightkv_context * ctx, const float * x, int64_t n, int64_t d,
                                                    const float * scores, const lightkv_merge_params * params,
                                                    const int64_t * positions, double protect,
                                                    lightkv_merge_result ** out);
/* The stages a lightkv_merge_reduce result ran (0 for other results), and the windows per
 * side and the rows left after each (caller-owned [count] each; either may be NULL). */
LIGHTKV_API int32_t         lightkv_merge_result_stages(const lightkv_merge_result * r, int32_t * windows,
                                                        int64_t * rows, int32_t count);

/* What the call that made r did (test counters): graphs computed, graph allocations (in a
 * scheduler, or on a CPU context in a buffer), and backend buffers allocated for inputs and
 * graphs (0 when the buffers the context reuses were large enough). Any pointer may be NULL. */
LIGHTKV_API lightkv_status  lightkv_merge_result_work(const lightkv_merge_result * r, int64_t * n_graphs,
                                                      int64_t * n_graph_allocs, int64_t * n_buffers);

LIGHTKV_API int64_t         lightkv_merge_result_rows(const lightkv_merge_result * r);   /* M */
LIGHTKV_API int64_t         lightkv_merge_result_tokens(const lightkv_merge_result * r); /* N */
LIGHTKV_API int64_t         lightkv_merge_result_dim(const lightkv_merge_result * r);    /* D */
LIGHTKV_API const float *   lightkv_merge_result_x(const lightkv_merge_result * r);      /* [M, D] */
LIGHTKV_API const int64_t * lightkv_merge_result_kept(const lightkv_merge_result * r);   /* [M] ascending */
LIGHTKV_API const int64_t * lightkv_merge_result_assign(const lightkv_merge_result * r); /* [N] row of each token */
LIGHTKV_API const float *   lightkv_merge_result_weight(const lightkv_merge_result * r); /* [N] coefficient of each token in its row */
LIGHTKV_API void            lightkv_merge_result_free(lightkv_merge_result * r);

/* --- guidance --------------------------------------------------------------------------------- */
/* g_i = sum_h sum_{j in text} softmax over all S queries of (scale * q_h . k_j) at query i,
 * for every i in vision_idx. q [n_head, n_seq, head_dim], k [n_head_kv, n_seq, head_dim]
 * (row-major float32, after RoPE; n_head % n_head_kv == 0, query head h uses key head
 * h / (n_head / n_head_kv)); no causal mask; float32 accumulation. Indices in [0, n_seq),
 * without duplicates. scale must be finite; pass 1/sqrt(head_dim) for the usual default.
 * out_scores: caller-owned [n_vision]. */
LIGHTKV_API lightkv_status lightkv_guidance_scores(lightkv_context * ctx,
                                                   const float * q, const float * k,
                                                   int64_t n_head, int64_t n_head_kv,
                                                   int64_t n_seq, int64_t head_dim,
                                                   const int64_t * vision_idx, int64_t n_vision,
                                                   const int64_t * text_idx, int64_t n_text,
                                                   float scale, float * out_scores);

/* --- attention received (KV eviction) ------------------------------------------------------ */
/* r_j = sum_h sum_i softmax over the keys of (scale * q_h[i] . k_h'[j]), with query i seeing
 * key j only where k_pos[j] <= q_pos[i] (causal by position, as llama.cpp's mask), for every
 * key j. q [n_head, n_query, head_dim], k [n_head_kv, n_key, head_dim] (row-major float32,
 * after RoPE; query head h uses key head h / (n_head / n_head_kv)). Every query must see at
 * least one key. out: caller-owned [n_key]. */
LIGHTKV_API lightkv_status lightkv_attention_received(lightkv_context * ctx,
                                                      const float * q, const float * k,
                                                      int64_t n_head, int64_t n_head_kv,
                                                      int64_t n_query, int64_t n_key, int64_t head_dim,
                                                      const int32_t * q_pos, const int32_t * k_pos,
                                                      float scale, float * out);

/* --- capture: a llama.cpp graph's Q/K, kept on the context's backend --------------------------
 * The capture takes the wanted ROPE nodes named "Qcur-<layer>" / "Kcur-<layer>" (the query and
 * key heads after RoPE, f32 [head_dim, n_head, n_tokens]; the projections before RoPE carry the
 * same names and are not taken) of each graph llama.cpp computes and copies each into a tensor
 * the capture owns in a buffer of ctx's backend (device to device when llama.cpp computed it on
 * that device), appended along the token axis: the micro-batches of one or several decodes
 * concatenate, in compute order, until lightkv_capture_reset. Nothing goes to host memory; the
 * reads below run their graphs on the captured tensors. It sees llama.cpp's graphs one of two
 * ways, the same rows bit for bit:
 *  - the graph hook (patch 0007; preferred): lightkv_capture_graph has the signature of
 *    llama_graph_hook: llama_set_graph_hook(lctx, lightkv_capture_graph, cap). When llama.cpp
 *    builds a graph, the wanted nodes are marked as outputs (llama.cpp then plans the graph's
 *    memory so that theirs is kept to the end); after it computed the graph, they are copied. Nothing splits the compute. A graph built
 *    before a lightkv_capture_want does not keep the newly wanted nodes: set the hook again
 *    after each want (setting it makes llama.cpp build the next graph anew); a wanted node that
 *    was not kept is a failure (below), never a read of reused memory.
 *  - the eval callback: lightkv_capture_eval has the signature of
 *    ggml_backend_sched_eval_callback: llama_set_eval_callback(lctx, lightkv_capture_eval, cap).
 *    llama.cpp asks it about every node; it answers ask=true only for the wanted nodes, and each
 *    one answered so ends a piece of the graph: the scheduler computes up to it, synchronises
 *    the backend and calls back (a graph reading L nodes runs in L + 1 pieces).
 *
 * A failure inside the hook or callback (a node of another type or shape, out of memory, a
 * wanted node its graph did not keep) cannot be returned through llama.cpp: the capture keeps the first one, copies nothing more, and every
 * read call fails with it (LIGHTKV_ERR_BACKEND) until lightkv_capture_reset.
 * Ownership: lightkv_capture_create / lightkv_capture_free; the capture keeps a pointer to ctx
 * (free it before ctx). Do not free, reset or read a capture while llama.cpp computes with it
 * set; unset the hook or callback before freeing it. */
typedef enum lightkv_capture_kind {
    LIGHTKV_CAPTURE_Q       = 1,  /* "Qcur-<layer>" */
    LIGHTKV_CAPTURE_K       = 2,  /* "Kcur-<layer>" */
    LIGHTKV_CAPTURE_K_CACHE = 4,  /* no rows: the layer's K cache tensor, found as the one its
                                     Kcur is stored into (a SET_ROWS node; looked at, never
                                     split on or marked); llama.cpp owns it: read it only
                                     while that context lives (lightkv_capture_reset forgets
                                     it) */
} lightkv_capture_kind;

LIGHTKV_API lightkv_status lightkv_capture_create(lightkv_context * ctx, lightkv_capture ** out);
LIGHTKV_API void           lightkv_capture_free(lightkv_capture * cap);
/* The nodes copied from now on: for each i < n, kinds[i] (LIGHTKV_CAPTURE_Q, _K, _K_CACHE, or'ed)
 * of layers[i]; layers distinct, in [0, 2^20); n 0: none. Rows captured before stay readable,
 * also those of layers no longer wanted. */
LIGHTKV_API lightkv_status lightkv_capture_want(lightkv_capture * cap, const int32_t * layers,
                                                const int32_t * kinds, int32_t n);
/* Forget every captured row (the buffers stay for the next rows) and a kept failure. */
LIGHTKV_API lightkv_status lightkv_capture_reset(lightkv_capture * cap);
/* The eval callback (see above); user_data NULL: wants nothing. Never stops the computation. */
LIGHTKV_API bool           lightkv_capture_eval(struct ggml_tensor * t, bool ask, void * user_data);
/* The graph hook (see above); user_data NULL: does nothing. */
LIGHTKV_API void           lightkv_capture_graph(struct ggml_cgraph * gf, bool computed, void * user_data);
/* Rows captured of (layer, kind) so far and their heads (0, 0, 0 when none); kind Q or K. */
LIGHTKV_API lightkv_status lightkv_capture_shape(const lightkv_capture * cap, int32_t layer, int32_t kind,
                                                 int64_t * n_rows, int64_t * n_head, int64_t * head_dim);
/* Counters since create: nodes the eval callback was asked about, nodes it answered "wanted"
 * (each one a piece of a graph computed apart), nodes the graph hook marked as outputs (once
 * per graph built; a reused graph keeps them), copies made (one per wanted node and
 * micro-batch, either way). Any pointer may be NULL. */
LIGHTKV_API lightkv_status lightkv_capture_stats(const lightkv_capture * cap, int64_t * n_asked,
                                                 int64_t * n_wanted, int64_t * n_marked,
                                                 int64_t * n_copied);
/* Host copy of captured rows [row0, row0 + n_rows) as [n_rows][n_head][head_dim] float32
 * (tests and debugging; the reads below need none). */
LIGHTKV_API lightkv_status lightkv_capture_read(lightkv_capture * cap, int32_t layer, int32_t kind,
                                                int64_t row0, int64_t n_rows, float * out);
/* lightkv_guidance_scores of layer's captured Q and K, every captured row being the sequence
 * (n_seq = the rows; Q and K must have as many), in one graph on ctx's backend; only the
 * [n_vision] scores come to the host. Indices, scale and out_scores as there. */
LIGHTKV_API lightkv_status lightkv_capture_guidance(lightkv_capture * cap, int32_t layer,
                                                    const int64_t * vision_idx, int64_t n_vision,
                                                    const int64_t * text_idx, int64_t n_text,
                                                    float scale, float * out_scores);
/* lightkv_attention_received with the queries = the LAST n_query captured Q rows of layer
 * (q_pos [n_query] their positions) and the keys = rows cells[0..n_key) of layer's K cache
 * (LIGHTKV_CAPTURE_K_CACHE wanted during the decodes; any stored type ggml's get_rows reads,
 * converted to float32; a single-stream cache), read where the cache is when one of ctx's
 * backends can (the same device, or a host buffer), else gathered through the host. Cells
 * in [0, cache size); k_pos [n_key] their positions. Nothing but the [n_key] scores comes to
 * the host. */
LIGHTKV_API lightkv_status lightkv_capture_attention_received(lightkv_capture * cap, int32_t layer,
                                                                    int64_t n_query, const int32_t * cells,
                                                                    int64_t n_key, const int32_t * q_pos,
                                                                    const int32_t * k_pos, float scale,
                                                                    float * out);

/* --- GGUF metadata -------------------------------------------------------------------------- */
/* The header, key/values and tensor infos of a GGUF file, read by ggml's own gguf reader
 * (no tensor data). A file that is not a readable GGUF (bad magic, truncated, corrupt, an
 * inconsistent tensor table) gives LIGHTKV_ERR_INVALID_ARGUMENT with ggml's reason, never an
 * abort. */
LIGHTKV_API lightkv_status lightkv_gguf_open(const char * path, lightkv_gguf ** out);
LIGHTKV_API void           lightkv_gguf_free(lightkv_gguf * f);

typedef enum lightkv_gguf_kind {
    LIGHTKV_GGUF_ABSENT = 0,
    LIGHTKV_GGUF_INT    = 1,  /* any integer type: *int_value                                  */
    LIGHTKV_GGUF_FLOAT  = 2,  /* float32 / float64: *float_value                               */
    LIGHTKV_GGUF_BOOL   = 3,  /* *int_value 0 or 1                                              */
    LIGHTKV_GGUF_STRING = 4,  /* *str_value, owned by f (valid until lightkv_gguf_free)         */
    LIGHTKV_GGUF_ARRAY  = 5,  /* *int_value = number of elements                                */
} lightkv_gguf_kind;

/* One metadata value: *kind says which of the outputs is set (any output pointer may be
 * NULL). A uint64 above INT64_MAX is LIGHTKV_ERR_INVALID_ARGUMENT. */
LIGHTKV_API lightkv_status lightkv_gguf_value(const lightkv_gguf * f, const char * key, int32_t * kind,
                                              int64_t * int_value, double * float_value,
                                              const char ** str_value);
LIGHTKV_API int64_t        lightkv_gguf_n_tensors(const lightkv_gguf * f);
LIGHTKV_API int32_t        lightkv_gguf_has_tensor(const lightkv_gguf * f, const char * name);

/* --- guidance from a text model's own first layer ------------------------------------------ */
/* The attention input of one layer of a llama.cpp text model, read from its GGUF with ggml's
 * gguf reader: blk.L.attn_norm, blk.L.attn_q / attn_k (weights in their stored type, e.g.
 * Q4_K, in a buffer of ctx's backend; biases, llama.cpp's optional per-tensor .scale, and the
 * per-head blk.L.attn_q_norm / attn_k_norm where the model has them), and token_embd rows
 * read from the file on demand (the table is not loaded: llama.cpp holds it already).
 * Models without separate attn_q / attn_k (a fused attn_qkv), with a LayerNorm (attn_norm
 * bias) or with an architecture whose first layer is not this (gemma3n) are
 * LIGHTKV_ERR_INVALID_ARGUMENT. The model keeps a pointer to ctx: free it before ctx. */
LIGHTKV_API lightkv_status lightkv_guidance_model_create(lightkv_context * ctx, const char * gguf_path,
                                                         int32_t layer, lightkv_guidance_model ** out);
LIGHTKV_API void           lightkv_guidance_model_free(lightkv_guidance_model * model);

/* What the model read and how it will compute (llama.cpp's rules for the architecture). */
typedef struct lightkv_guidance_info {
    int64_t n_embd;        /* D: width of a text row and of the layer's input              */
    int64_t n_embd_inp;    /* width of a vision row: D, or D x (1 + deepstack layers)        */
    int64_t n_vocab;
    int64_t n_head, n_head_kv, head_dim;
    int32_t layer;
    int32_t weight_type;   /* ggml_type of attn_q (e.g. 8 = Q8_0, 12 = Q4_K)                 */
    int32_t has_q_bias, has_k_bias, has_q_norm, has_k_norm;
    float   rms_eps;       /* the layer's RMS norm epsilon                                  */
    float   kq_scale;      /* logit scale: attention.scale, Gemma 3's rule, or 1/sqrt(head_dim) */
    float   text_scale;    /* factor on token embeddings (Gemma: sqrt(n_embd); embedding_scale) */
    float   vision_scale;  /* factor on embedding rows (1 unless llama.cpp scales every input) */
    char    arch[64];      /* general.architecture                                           */
} lightkv_guidance_info;
LIGHTKV_API lightkv_status lightkv_guidance_model_info(const lightkv_guidance_model * model,
                                                       lightkv_guidance_info * out);

/* Guidance of n_vision image rows from the prompt's n_text tokens, in ONE ggml graph on the
 * context's backend: the token rows (token_embd, dequantized by ggml) scaled by text_scale,
 * the image rows (the first n_embd of their n_embd_inp columns) by vision_scale, RMS norm x
 * attn_norm, Q = attn_q x + bias for all N + T rows and K = attn_k x + bias for the T text
 * rows, per-head Q/K norms, no RoPE; then
 *   g_i = sum_h sum_{j in text} softmax over all N + T queries of (kq_scale * q_h . k_j) at i.
 * vision: [n_vision, n_embd_inp] row-major float32, finite; text_tokens: [n_text] ids in
 * [0, n_vocab); out_scores: caller-owned [n_vision]. n_text == 0 gives all zeros. */
LIGHTKV_API lightkv_status lightkv_guidance_model_scores(lightkv_guidance_model * model,
                                                         const float * vision, int64_t n_vision,
                                                         const int32_t * text_tokens, int64_t n_text,
                                                         float * out_scores);

/* --- layer mode: the schedule and its report ------------------------------------------------ */
/* Layer mode merges each image's rows after given decoder layers of the LLM (docs/layer-mode.md).
 * What a schedule is, which ones are valid, and what a run reports live here, once; the
 * prefill of a turn under a schedule is lightkv_layer_prefill (below), over the patched
 * llama.cpp (native/patches/0001, 0003-0007).
 *
 * A stage merges what decoder layer `layer` (0-based) outputs, in windows x windows windows
 * of each image's original grid, dropping `ratio` of each window's rows. Valid schedules
 * (else LIGHTKV_ERR_INVALID_ARGUMENT naming the bad value): at least one stage; layers
 * strictly increasing in [0, n_layer - 1) (a merge after the last layer saves nothing);
 * windows >= 1; ratio in [0, 1); a finite threshold when use_threshold; kv and positions
 * known (every pair: under EXACT with RENUMBER the driver moves the recorded positions of
 * the rows before each merge below the turn's renumbered end, patch 0006). */
typedef enum lightkv_kv_policy {
    LIGHTKV_KV_COMPACT = 0,  /* after the prefill every layer holds only the final rows     */
    LIGHTKV_KV_EXACT   = 1,  /* each layer keeps the rows it ran on (more cells than off)   */
} lightkv_kv_policy;

typedef enum lightkv_positions_policy {
    LIGHTKV_POSITIONS_KEEP     = 0,  /* a merged row keeps its destination's position      */
    LIGHTKV_POSITIONS_RENUMBER = 1,  /* the turn's rows are renumbered after each merge    */
} lightkv_positions_policy;

typedef struct lightkv_stage {
    int32_t layer;
    int32_t windows;
    double  ratio;
} lightkv_stage;

typedef struct lightkv_schedule_params {
    const lightkv_stage *    stages;
    int32_t                  n_stages;
    int32_t                  use_threshold;  /* nonzero: sources below threshold never merge */
    double                   threshold;
    lightkv_kv_policy        kv;
    lightkv_positions_policy positions;
} lightkv_schedule_params;

typedef struct lightkv_schedule        lightkv_schedule;
typedef struct lightkv_schedule_report lightkv_schedule_report;

/* Validate (see above) for a model of n_layer decoder layers and copy the parameters. */
LIGHTKV_API lightkv_status lightkv_schedule_create(const lightkv_schedule_params * params, int32_t n_layer,
                                                   lightkv_schedule ** out);
LIGHTKV_API void           lightkv_schedule_free(lightkv_schedule * s);
/* The policy pair alone (what lightkv_schedule_create checks of it), before any schedule. */
LIGHTKV_API lightkv_status lightkv_policies_check(int32_t kv, int32_t positions);
/* An image of grid rows x cols under this schedule: every stage's windows <= min(rows, cols). */
LIGHTKV_API lightkv_status lightkv_schedule_check_grid(const lightkv_schedule * s, int64_t rows, int64_t cols);
/* The paper's kept fraction if every stage keeps exactly (1 - ratio): the vision rows present
 * at each layer, averaged over the n_layer layers. */
LIGHTKV_API double         lightkv_schedule_keep_fraction(const lightkv_schedule * s);

/* What a prefill did: create with the turn's vision rows, add each stage's vision rows in
 * and out in order, then the turn's KV cells before and after (compact frees cells; exact
 * adds a range of cells per stage). */
LIGHTKV_API lightkv_status lightkv_schedule_report_create(const lightkv_schedule * s, int64_t vision_rows,
                                                          lightkv_schedule_report ** out);
LIGHTKV_API void           lightkv_schedule_report_free(lightkv_schedule_report * r);
LIGHTKV_API lightkv_status lightkv_schedule_report_stage(lightkv_schedule_report * r, int64_t vision_in,
                                                         int64_t vision_out);
LIGHTKV_API lightkv_status lightkv_schedule_report_cells(lightkv_schedule_report * r, int64_t cells_before,
                                                         int64_t cells_after);
LIGHTKV_API int32_t        lightkv_schedule_report_n_stages(const lightkv_schedule_report * r); /* added so far */
/* stage i's vision rows in / out (any pointer may be NULL) */
LIGHTKV_API lightkv_status lightkv_schedule_report_stage_rows(const lightkv_schedule_report * r, int32_t i,
                                                              int64_t * vision_in, int64_t * vision_out);
/* the layer-averaged kept fraction as run (1 with no vision rows); needs every stage added */
LIGHTKV_API double         lightkv_schedule_report_keep_fraction(const lightkv_schedule_report * r);
/* cells_before - cells_after when that is positive, else 0 */
LIGHTKV_API int64_t        lightkv_schedule_report_cells_freed(const lightkv_schedule_report * r);

/* --- layer mode: the prefill of one turn ----------------------------------------------------- */
/* lightkv_layer_prefill runs one turn of a conversation through a llama.cpp context with the
 * schedule's merges inside the LLM (docs/layer-mode.md, "The driver"):
 *
 *   range 0: every row of the turn (text tokens, image embeddings) through layers
 *            [0, l1 + 1) (patch 0003's layer range); the hidden state leaving layer l1 comes
 *            back, and layer l1's post-RoPE Q/K stay on cap's backend (patch 0007's graph
 *            hook, lightkv_capture_graph);
 *   merge:   each image's rows are merged in its own windows, guided by layer l1's attention
 *            from the turn's text rows (lightkv_capture_guidance: only the scores come to the
 *            host);
 *   KV:      compact: the turn's cells are freed before the kept rows run through the next
 *            range into fresh cells, whose layers [0, l1 + 1) are then filled with the merge's
 *            weighted combination of the stored K/V (patch 0004); exact: each range's cells
 *            stay, seen only by that range's layers (patch 0005);
 *   ...      and so on; the last range ends at the model's depth and gives the logits.
 *
 * Ground truth: lightkv_edge.reference.prefill_with_merge. The llama, qwen2, qwen2vl and
 * gemma3 graphs with one KV cache or the iSWA pair (a cell in each cache per row: every step
 * on cells runs per cache) are covered. Normal-RoPE models get position gaps (patch 0001) on
 * the context, for good: merged rows keep their positions, and later decodes need it too. */
struct llama_context;

typedef enum lightkv_segment_kind {
    LIGHTKV_SEGMENT_TEXT  = 0,
    LIGHTKV_SEGMENT_IMAGE = 1,
} lightkv_segment_kind;

/* A run of rows of the turn, in order; the last one must be text (the logits). */
typedef struct lightkv_segment {
    int32_t         kind;       /* lightkv_segment_kind                                       */
    int64_t         n;          /* rows, >= 1                                                 */
    const int32_t * tokens;     /* text: [n] token ids                                        */
    const float *   embd;       /* image: [n][n_embd] float32 row-major, finite               */
    const int32_t * pos;        /* [n_pos][n] row-major: n_pos 1, or 4 on an M-RoPE model
                                   (t, y, x, z: an image's sections; text uses row 0 for all) */
    int32_t         n_pos;
    int64_t         grid_rows;  /* image: its token grid, rows * cols == n; 0 x 0: none (the  */
    int64_t         grid_cols;  /*   windows are cut on the published padded square)          */
    const int64_t * cells;      /* image: [n][2] (row, col) of every row on that grid (or     */
                                /*   square), distinct; NULL: raster order                     */
    int32_t         non_causal; /* image: its rows see each other both ways (Gemma 3); it is   */
                                /*   decoded in one batch per range with causal attention off */
} lightkv_segment;

typedef struct lightkv_layer_prefill_params {
    const lightkv_schedule * schedule;        /* stages and policies, for this model's depth   */
    double                   protect;         /* LightKV-protect's share of each stage's budget
                                                 in [0, 1] (0: the published stage; > 0 takes
                                                 no threshold)                                  */
    int32_t                  turn_start;      /* RENUMBER: the turn's first position; < 0: the
                                                 first segment's first position                 */
    const int32_t *          observe_layers;  /* layers whose Q rows (and K cache) stay in cap
                                                 after the prefill (KV eviction's window); the
                                                 last segment's rows are the capture's last    */
    int32_t                  n_observe;
    int32_t                  n_batch;         /* rows per llama_decode; <= 0: the context's    */
} lightkv_layer_prefill_params;

typedef struct lightkv_layer_prefill lightkv_layer_prefill;

/* Whether lctx can run layer mode (its architecture and memory are covered), computing
 * nothing; LIGHTKV_ERR_INVALID_ARGUMENT saying why not. */
LIGHTKV_API lightkv_status lightkv_layer_mode_check(struct llama_context * lctx);
/* Everything lightkv_layer_prefill checks before any compute, for segments whose tokens / embd
 * may still be NULL (a turn whose images are not encoded yet): the schedule against the model's
 * depth and each image's grid, positions, grids and cells, a non-causal image within one batch,
 * and room in a sliding-window cache. */
LIGHTKV_API lightkv_status lightkv_layer_prefill_check(struct llama_context * lctx, const lightkv_segment * segs,
                                                       int32_t n_segs, const lightkv_layer_prefill_params * params);
/* The prefill (above). cap: the capture the stages' Q/K and the observed queries go to (reset
 * first; its context runs the guidance and merges); its graph hook is set on lctx during the
 * call and removed after. Bad input: LIGHTKV_ERR_INVALID_ARGUMENT before any compute; a
 * failure of llama.cpp on the way: LIGHTKV_ERR_BACKEND (the turn's cells are then in an
 * unknown state: remove the sequence's turn before going on). */
LIGHTKV_API lightkv_status lightkv_layer_prefill_run(lightkv_capture * cap, struct llama_context * lctx,
                                                     const lightkv_segment * segs, int32_t n_segs,
                                                     const lightkv_layer_prefill_params * params,
                                                     lightkv_layer_prefill ** out);
LIGHTKV_API void           lightkv_layer_prefill_free(lightkv_layer_prefill * r);

/* The turn's last row's logits [n_vocab]. */
LIGHTKV_API const float *   lightkv_layer_prefill_logits(const lightkv_layer_prefill * r, int32_t * n_vocab);
/* The turn's final rows S (text rows and each image's final rows, in order), their
 * positions [n_pos][S] and, per KV cache (1, or 2 for the iSWA pair: 0 full-attention, 1
 * sliding-window), their cells [S]. */
LIGHTKV_API int64_t         lightkv_layer_prefill_rows(const lightkv_layer_prefill * r);
LIGHTKV_API const int32_t * lightkv_layer_prefill_positions(const lightkv_layer_prefill * r, int32_t * n_pos);
LIGHTKV_API int32_t         lightkv_layer_prefill_n_caches(const lightkv_layer_prefill * r);
LIGHTKV_API const int32_t * lightkv_layer_prefill_cells(const lightkv_layer_prefill * r, int32_t cache);
/* Per image segment (in order): the original indices of its final rows, ascending. */
LIGHTKV_API int32_t         lightkv_layer_prefill_n_images(const lightkv_layer_prefill * r);
LIGHTKV_API const int64_t * lightkv_layer_prefill_kept(const lightkv_layer_prefill * r, int32_t image, int64_t * n);
/* The turn's live cells by the layers that see them: compact, one range [0, n_layer) with the
 * final cells; exact, one per range of layers between merges. */
LIGHTKV_API int32_t         lightkv_layer_prefill_n_ranges(const lightkv_layer_prefill * r);
LIGHTKV_API const int32_t * lightkv_layer_prefill_range(const lightkv_layer_prefill * r, int32_t range, int32_t cache,
                                                        int32_t * il_begin, int32_t * il_end, int64_t * n);
/* What the run did: each stage's vision rows in / out, the kept fraction as run, the cells
 * freed (owned by r). */
LIGHTKV_API const lightkv_schedule_report * lightkv_layer_prefill_report(const lightkv_layer_prefill * r);
/* Milliseconds spent in the guidance, the merges and the KV compaction (any may be NULL). */
LIGHTKV_API void            lightkv_layer_prefill_times(const lightkv_layer_prefill * r, double * guidance_ms,
                                                        double * merge_ms, double * compact_ms);

#ifdef __cplusplus
}
#endif

#endif /* LIGHTKV_H */
