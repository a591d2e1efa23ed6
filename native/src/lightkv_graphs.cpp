// Graph builders of the LightKV merge and guidance (see lightkv_graphs.h).
#include "lightkv_graphs.h"

namespace lightkv {

ggml_tensor * gather_windows(ggml_context * ctx, ggml_tensor * x, ggml_tensor * idx,
                             int64_t n_slot, int64_t n_win) {
    ggml_tensor * rows = ggml_get_rows(ctx, x, idx);               // [D, n_slot * n_win]
    return ggml_reshape_3d(ctx, rows, x->ne[0], n_slot, n_win);   // [D, n_slot, n_win]
}

ggml_tensor * row_norms(ggml_context * ctx, ggml_tensor * t) {
    return ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, t)));  // [1, n, w]
}

ggml_tensor * window_cosine(ggml_context * ctx, ggml_tensor * src, ggml_tensor * dst) {
    const int64_t n_dst = dst->ne[1];
    const int64_t n_win = src->ne[2];

    // dot[j, i, w] = dst_j . src_i, one matrix product per window (batched over ne2)
    ggml_tensor * dot = ggml_mul_mat(ctx, dst, src);                          // [n_dst, n_src, w]

    // |dst_j| |src_i| + 1e-8, the spec's denominator (not a normalise-then-dot: same
    // formula as the reference, so tiny vectors compare the same way)
    ggml_tensor * n_d = ggml_reshape_3d(ctx, row_norms(ctx, dst), n_dst, 1, n_win);  // [n_dst, 1, w]
    ggml_tensor * n_s = row_norms(ctx, src);                                         // [1, n_src, w]
    ggml_tensor * den = ggml_mul(ctx, ggml_repeat(ctx, n_d, dot), n_s);              // [n_dst, n_src, w]
    den = ggml_scale_bias(ctx, den, 1.0f, 1e-8f);

    return ggml_div(ctx, dot, den);
}

best_match best_destination(ggml_context * ctx, ggml_tensor * sim, ggml_tensor * dst_mask,
                            ggml_tensor * ramp) {
    const int64_t n_dst = sim->ne[0];
    const int64_t n_src = sim->ne[1];
    const int64_t n_win = sim->ne[2];
    const int64_t rows  = n_src * n_win;

    ggml_tensor * masked = ggml_add(ctx, sim, dst_mask);                              // padding slots -> < -2

    // 1) some maximum: ggml_argmax returns *an* index of the row maximum; which one on a tie
    //    is backend-specific (CPU: first; CUDA: warp-shuffle order), so only its value is used.
    ggml_tensor * any_arg = ggml_argmax(ctx, ggml_reshape_2d(ctx, masked, n_dst, rows));  // I32 [rows]
    //    the value at that index: every element is its own 1-element row, batched per
    //    source row, so get_rows picks masked[any_arg[r], r] for every row r
    ggml_tensor * best = ggml_get_rows(ctx,
                                       ggml_reshape_3d(ctx, masked, 1, n_dst, rows),
                                       ggml_reshape_2d(ctx, any_arg, 1, rows));        // [1, 1, rows]

    // 2) deterministic tie rule (lower destination wins) on every backend: mark the
    //    maxima (masked >= best, exact float compare via step), weight each mark by the
    //    strictly decreasing ramp n_dst - j and take the argmax again: the maximum of that
    //    product is unique, so the second argmax has no tie left to break.
    ggml_tensor * diff    = ggml_sub(ctx, masked, ggml_reshape_3d(ctx, best, 1, n_src, n_win));  // <= 0, 0 at maxima
    ggml_tensor * below   = ggml_step(ctx, ggml_neg(ctx, diff));                      // 1 where masked < best
    ggml_tensor * is_max  = ggml_scale_bias(ctx, below, -1.0f, 1.0f);                  // 1 at maxima, else 0
    ggml_tensor * keyed   = ggml_mul(ctx, is_max, ramp);                               // n_dst - j at maxima
    ggml_tensor * first   = ggml_argmax(ctx, ggml_reshape_2d(ctx, keyed, n_dst, rows));  // I32 [rows]

    return { first, ggml_reshape_1d(ctx, best, rows) };
}

ggml_tensor * aggregate_groups(ggml_context * ctx, ggml_tensor * members_t, ggml_tensor * weights) {
    // merged[:, g, w] = sum_k weights[k, g, w] * members[:, k, w]: a matrix product per
    // window contracting over the member axis (ne0 of both)
    return ggml_mul_mat(ctx, members_t, weights);   // [D, G, w]
}

ggml_tensor * guidance_totals(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k_text, float scale) {
    const int64_t n_seq  = q->ne[1];
    const int64_t n_head = q->ne[2];
    const int64_t n_text = k_text->ne[1];

    // zero keys up to a multiple of 4: the CPU backend multiplies by its tiled sgemm only
    // when the first operand has a multiple of 4 rows, and otherwise with one dot product
    // per logit (scalar below 64 elements: half the guidance of a small image); the padded
    // keys' columns are dropped before the sum
    const int64_t n_key = (n_text + 3) / 4 * 4;
    ggml_tensor * keys  = n_key == n_text ? k_text : ggml_pad(ctx, k_text, 0, (int) (n_key - n_text), 0, 0);  // [d, T4, H_kv]

    // logits[j, i, h] = k_j . q_i; ggml broadcasts the H_kv key heads over the H query
    // heads exactly as repeat_interleave does (query head h -> key head h / (H / H_kv))
    ggml_tensor * logits = ggml_mul_mat(ctx, keys, q);                       // [T4, S, H]

    // softmax over the QUERY axis: put the queries on ne0 (no causal mask, f32)
    ggml_tensor * per_key = ggml_cont(ctx, ggml_transpose(ctx, logits));    // [S, T4, H]
    ggml_tensor * p       = ggml_soft_max_ext(ctx, per_key, nullptr, scale, 0.0f);

    // sum over heads and text keys: queries back on ne1, then a row sum
    ggml_tensor * by_row = nullptr;
    if (n_key == n_text) {
        ggml_tensor * p_2d = ggml_reshape_2d(ctx, p, n_seq, n_text * n_head);           // [S, T*H]
        by_row = ggml_cont(ctx, ggml_transpose(ctx, p_2d));                              // [T*H, S]
    } else {
        ggml_tensor * p_text = ggml_view_3d(ctx, p, n_seq, n_text, n_head, p->nb[1], p->nb[2], 0);  // [S, T, H]
        by_row = ggml_cont(ctx, ggml_permute(ctx, p_text, 2, 0, 1, 3));                 // [T, H, S]
        by_row = ggml_reshape_2d(ctx, by_row, n_text * n_head, n_seq);                   // [T*H, S]
    }
    return ggml_sum_rows(ctx, by_row);                                        // [1, S]
}

ggml_tensor * guidance_from_qk(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k,
                               ggml_tensor * text_idx, ggml_tensor * vision_idx, float scale) {
    // only the text-key columns of Q K^T matter (the softmax runs per key)
    ggml_tensor * k_text = ggml_get_rows(ctx, k, text_idx);                 // [d, T, H_kv]
    ggml_tensor * total  = guidance_totals(ctx, q, k_text, scale);          // [1, S]

    // keep the vision queries
    return ggml_get_rows(ctx, total, vision_idx);                             // [1, V]
}

ggml_tensor * attention_received(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k,
                                 ggml_tensor * mask, float scale) {
    const int64_t n_key   = k->ne[1];
    const int64_t n_query = q->ne[1];
    const int64_t n_head  = q->ne[2];

    // logits[j, i, h] = k_j . q_i (key heads broadcast over query heads, as in guidance)
    ggml_tensor * logits = ggml_mul_mat(ctx, k, q);                              // [N, W, H]
    // softmax over the KEY axis, the one attention itself uses; the mask (one per head,
    // broadcast) hides the keys a query did not see
    ggml_tensor * p      = ggml_soft_max_ext(ctx, logits, mask, scale, 0.0f);    // [N, W, H]
    // sum over queries and heads: keys onto ne1, then a row sum
    ggml_tensor * p_2d   = ggml_reshape_2d(ctx, p, n_key, n_query * n_head);      // [N, W*H]
    ggml_tensor * by_key = ggml_cont(ctx, ggml_transpose(ctx, p_2d));             // [W*H, N]
    return ggml_sum_rows(ctx, by_key);                                            // [1, N]
}

ggml_tensor * rms_norm_weighted(ggml_context * ctx, ggml_tensor * x, ggml_tensor * weight, float eps) {
    ggml_tensor * normed = ggml_rms_norm(ctx, x, eps);   // same shape as x
    return ggml_mul(ctx, normed, weight);                 // weight [ne0] broadcast
}

ggml_tensor * project_heads(ggml_context * ctx, ggml_tensor * h, const projection & p,
                            int64_t head_dim, float eps) {
    const int64_t n_seq  = h->ne[1];
    const int64_t n_out  = p.w->ne[1];
    const int64_t n_head = n_out / head_dim;

    ggml_tensor * y = ggml_mul_mat(ctx, p.w, h);                              // [n_out, S]
    if (p.scale) y = ggml_mul(ctx, y, p.scale);                               // [n_out, S]
    if (p.bias)  y = ggml_add(ctx, y, p.bias);                                // [n_out, S]
    if (p.norm && p.norm->ne[0] == n_out && n_head > 1) {
        y = rms_norm_weighted(ctx, y, p.norm, eps);                           // over the row (OLMo 2)
    }
    y = ggml_reshape_3d(ctx, y, head_dim, n_head, n_seq);                     // [hd, H, S]
    if (p.norm && (p.norm->ne[0] != n_out || n_head == 1)) {
        y = rms_norm_weighted(ctx, y, p.norm, eps);                           // per head
    }
    return ggml_cont(ctx, ggml_permute(ctx, y, 0, 2, 1, 3));                  // [hd, S, H]
}

ggml_tensor * guidance_from_layer_input(ggml_context * ctx, ggml_tensor * vision, ggml_tensor * text,
                                        const layer_input & l) {
    const int64_t n_embd   = text->ne[0];
    const int64_t n_vision = vision->ne[1];
    const int64_t n_text   = text->ne[1];

    // the layer's input rows: the image rows' first D columns, then the prompt's tokens,
    // each scaled as llama.cpp scales that kind of input
    ggml_tensor * v = vision;
    if (vision->ne[0] != n_embd) {
        v = ggml_cont(ctx, ggml_view_2d(ctx, vision, n_embd, n_vision, vision->nb[1], 0));  // [D, N]
    }
    if (l.vision_scale != 1.0f) v = ggml_scale(ctx, v, l.vision_scale);                   // [D, N]
    ggml_tensor * t = l.text_scale != 1.0f ? ggml_scale(ctx, text, l.text_scale) : text;  // [D, T]
    ggml_tensor * x = ggml_concat(ctx, v, t, 1);                                          // [D, S]

    // the attention input norm, then Q for every row and K for the text rows only (the
    // guidance reads no other key)
    ggml_tensor * h      = rms_norm_weighted(ctx, x, l.attn_norm, l.eps);                 // [D, S]
    ggml_tensor * h_text = ggml_view_2d(ctx, h, n_embd, n_text, h->nb[1], n_vision * h->nb[1]);  // [D, T]
    ggml_tensor * q      = project_heads(ctx, h, l.q, l.head_dim, l.eps);                 // [hd, S, H]
    ggml_tensor * k_text = project_heads(ctx, h_text, l.k, l.head_dim, l.eps);            // [hd, T, H_kv]

    return guidance_totals(ctx, q, k_text, l.kq_scale);                                   // [1, S]
}

}  // namespace lightkv
