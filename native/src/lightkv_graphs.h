// Graph builders of the LightKV merge and guidance: one function per step, ggml ops only.
//
// Layout conventions (ggml order: ne0 is the contiguous axis):
//   x        [D, N]          the tokens, one row per token (= row-major [N, D] in C)
//   windows  [D, n, n_win]   tokens gathered window-major, n slots per window (padded)
//   sim      [n_dst, n_src, n_win]  cosine of every (source, destination) pair of a window
//
// Every op used here is implemented by the CPU, CUDA and Metal backends of the pinned
// ggml (docs/ggml-ops.md lists them with the supports_op function each claim comes from);
// the scheduler runs anything a backend refuses on the CPU.
#pragma once

#include "ggml.h"

#include <cstdint>

namespace lightkv {

// Step 1: gather tokens into the window-major, padded layout.
// idx: I32 [n_slot * n_win], the token index of every slot (padding slots point at any
// valid token; later steps mask or zero-weight them). Result: [D, n_slot, n_win].
ggml_tensor * gather_windows(ggml_context * ctx, ggml_tensor * x, ggml_tensor * idx,
                             int64_t n_slot, int64_t n_win);

// Step 2: L2 norm of every row: [D, n, w] -> [1, n, w].
ggml_tensor * row_norms(ggml_context * ctx, ggml_tensor * t);

// Step 3: cosine similarity dot / (|a| |b| + 1e-8) between every source and every
// destination of the same window (batched matrix product over windows).
// src [D, n_src, w], dst [D, n_dst, w] -> [n_dst, n_src, w].
ggml_tensor * window_cosine(ggml_context * ctx, ggml_tensor * src, ggml_tensor * dst);

// Step 4: best destination of every source, ties -> lower destination slot.
// dst_mask [n_dst, 1, w]: 0 for real destinations, -4 for padding slots (cosines are in
// [-1, 1], so a padding slot never wins). ramp [n_dst, 1, 1]: n_dst - j at slot j.
// Results: index I32 [n_src * w] (destination slot), score F32 [n_src * w] (its cosine).
struct best_match {
    ggml_tensor * index;
    ggml_tensor * score;
};
best_match best_destination(ggml_context * ctx, ggml_tensor * sim, ggml_tensor * dst_mask,
                            ggml_tensor * ramp);

// Step 5 (top-r per window) runs on the host between the two graphs: see lightkv.cpp.

// Step 6: guided aggregation. members [D, K, w]: the tokens of every merge group of a
// window; weights [K, G, w]: weights[k, g, w] = coefficient of member k in group g (each
// column sums to 1). Result: [D, G, w], one merged row per group.
ggml_tensor * aggregate_groups(ggml_context * ctx, ggml_tensor * members, ggml_tensor * weights);

// Step 7: re-order by original index. Output row m is row out_idx[m] of the table
// [x ; merged] (x [D, N] first, then the G * w merged rows): untouched tokens are copied
// bit for bit, merged groups come from step 6. out_idx: I32 [M]. Result: [D, M].
ggml_tensor * reorder_rows(ggml_context * ctx, ggml_tensor * x, ggml_tensor * merged,
                           ggml_tensor * out_idx);

// Guidance from one layer's queries and keys (after RoPE):
//   g_i = sum_h sum_{j in text} softmax_over_queries(scale * q_h K_h^T)[i, j],  i in vision.
// q [d, S, H], k [d, S, H_kv] (H % H_kv == 0; query head h reads key head h / (H / H_kv)),
// text_idx I32 [T, H_kv] (the text positions, repeated per key head), vision_idx I32 [V].
// Result: [1, V], float32 accumulation.
ggml_tensor * guidance_from_qk(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k,
                               ggml_tensor * text_idx, ggml_tensor * vision_idx, float scale);

}  // namespace lightkv
