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

#ifdef __cplusplus
}
#endif

#endif /* LIGHTKV_H */
