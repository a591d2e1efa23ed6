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

// Step 6: guided aggregation. members_t [K, D, w]: the tokens of every merge group of a
// window, member-major (gathered on the host: ggml's CPU cont of a transposed tensor copies
// one element per memcpy call, the largest cost of a small merge); weights [K, G, w]:
// weights[k, g, w] = coefficient of member k in group g (each column sums to 1). Result:
// [D, G, w], one merged row per group.
// Step 7 (re-ordering by original index: the kept rows copied, the merged rows in their
// destination's place) is a row copy on the host: see lightkv.cpp.
ggml_tensor * aggregate_groups(ggml_context * ctx, ggml_tensor * members_t, ggml_tensor * weights);

// Guidance totals of every query from the text keys alone (the core of the two builders
// below): total_i = sum_h sum_{j in text} softmax_over_queries(scale * q_h K_h^T)[i, j].
// q [d, S, H], k_text [d, T, H_kv] (H % H_kv == 0). Result: [1, S], float32 accumulation.
ggml_tensor * guidance_totals(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k_text, float scale);

// Guidance from one layer's queries and keys (after RoPE):
//   g_i = sum_h sum_{j in text} softmax_over_queries(scale * q_h K_h^T)[i, j],  i in vision.
// q [d, S, H], k [d, S, H_kv] (H % H_kv == 0; query head h reads key head h / (H / H_kv)),
// text_idx I32 [T, H_kv] (the text positions, repeated per key head), vision_idx I32 [V].
// Result: [1, V], float32 accumulation.
ggml_tensor * guidance_from_qk(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k,
                               ggml_tensor * text_idx, ggml_tensor * vision_idx, float scale);

// Attention each key receives from a window of queries (KV eviction's importance):
//   r_j = sum_h sum_i softmax_over_keys(scale * q_h K_h^T + mask)[i, j]
// q [d, W, H], k [d, N, H_kv] (H % H_kv == 0; query head h reads key head h / (H / H_kv)),
// mask F32 [N, W]: 0 where query i sees key j, -inf elsewhere (every query sees a key).
// Result: [1, N], float32 accumulation.
ggml_tensor * attention_received(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k,
                                 ggml_tensor * mask, float scale);

// --- a text model's own layer input (lightkv_guidance_model) ---------------------------------
// llama.cpp's build_norm(LLM_NORM_RMS): x / sqrt(mean(x^2) + eps) over ne0, times weight [ne0].
ggml_tensor * rms_norm_weighted(ggml_context * ctx, ggml_tensor * x, ggml_tensor * weight, float eps);

// One of the layer's projections, as llama.cpp's build_qkv applies it.
struct projection {
    ggml_tensor * w;      // [D, n_out], the stored (quantized) type
    ggml_tensor * scale;  // [1] F32 or nullptr (a per-tensor scale, "blk.L.attn_q.scale")
    ggml_tensor * bias;   // [n_out] F32 or nullptr
    ggml_tensor * norm;   // [head_dim] F32 (per head), [n_out] F32 (whole row) or nullptr
};

// h [D, S] -> w h (* scale) (+ bias), RMS norm per head (or over the row), heads on ne2:
// [head_dim, S, n_out / head_dim].
ggml_tensor * project_heads(ggml_context * ctx, ggml_tensor * h, const projection & p,
                            int64_t head_dim, float eps);

// The first layer's attention input and its guidance, in one graph:
// vision [D_inp, N] (the layer reads its first D columns; D_inp > D: deepstack features),
// text [D, T] (token embedding rows). Result: [1, N + T] totals (the first N are the vision
// rows' guidance).
struct layer_input {
    ggml_tensor * attn_norm;   // [D] F32
    projection    q, k;
    int64_t       head_dim;
    float         eps;          // the layer's RMS norm epsilon
    float         kq_scale;     // logit scale
    float         text_scale;   // factor on the token rows (Gemma: sqrt(D))
    float         vision_scale; // factor on the embedding rows
};
ggml_tensor * guidance_from_layer_input(ggml_context * ctx, ggml_tensor * vision, ggml_tensor * text,
                                        const layer_input & l);

}  // namespace lightkv
