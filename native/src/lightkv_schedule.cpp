// Layer mode's schedule (validation, nominal kept fraction) and the report of a run: the one
// home of both, so that the Python driver (lightkv_edge/layer_mode.py) and any C caller
// accept the same schedules and report the same numbers. See lightkv.h, "layer mode".
#include "lightkv_internal.h"

#include <cmath>
#include <vector>

using namespace lightkv;

namespace {

void check_policies(int32_t kv, int32_t positions) {
    if (kv != LIGHTKV_KV_COMPACT && kv != LIGHTKV_KV_EXACT) {
        LKV_INVALID("unknown KV policy %d", kv);
    }
    if (positions != LIGHTKV_POSITIONS_KEEP && positions != LIGHTKV_POSITIONS_RENUMBER) {
        LKV_INVALID("unknown positions policy %d", positions);
    }
}

// the vision rows present at each layer (present[k] over the layers of range k), averaged
double layer_average(const std::vector<lightkv_stage> & stages, int32_t n_layer,
                     const std::vector<double> & present) {
    double  sum  = 0.0;
    int32_t prev = 0;
    for (size_t k = 0; k < stages.size(); ++k) {
        sum += present[k] * (stages[k].layer + 1 - prev);
        prev = stages[k].layer + 1;
    }
    sum += present[stages.size()] * (n_layer - prev);
    return sum / n_layer;
}

}  // namespace

lightkv_status lightkv_policies_check(int32_t kv, int32_t positions) {
    return guarded(nullptr, [&] { check_policies(kv, positions); });
}

lightkv_status lightkv_schedule_create(const lightkv_schedule_params * p, int32_t n_layer,
                                       lightkv_schedule ** out) {
    return guarded(nullptr, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!p) LKV_INVALID("params must not be NULL");
        if (n_layer < 2) LKV_INVALID("layer mode needs a model of at least 2 layers, got %d", n_layer);
        if (p->n_stages <= 0 || !p->stages) LKV_INVALID("the layer-mode schedule has no stage");
        check_policies(p->kv, p->positions);
        if (p->use_threshold && !std::isfinite(p->threshold)) LKV_INVALID("threshold must be finite");
        for (int32_t i = 0; i < p->n_stages; ++i) {
            const lightkv_stage & st = p->stages[i];
            if (st.layer < 0 || st.layer >= n_layer - 1) {
                LKV_INVALID("schedule layer %d is outside [0, %d) for a model of %d layers",
                            st.layer, n_layer - 1, n_layer);
            }
            if (st.windows < 1) LKV_INVALID("schedule windows must be an integer >= 1, got %d", st.windows);
            if (!(st.ratio >= 0.0 && st.ratio < 1.0)) {
                LKV_INVALID("schedule ratio must be in [0, 1), got %g", st.ratio);
            }
            if (i > 0 && st.layer <= p->stages[i - 1].layer) {
                std::string layers;
                for (int32_t j = 0; j < p->n_stages; ++j) {
                    layers += (j ? ", " : "") + std::to_string(p->stages[j].layer);
                }
                LKV_INVALID("schedule layers must be strictly increasing, got [%s]", layers.c_str());
            }
        }
        auto s = std::make_unique<lightkv_schedule>();
        s->stages.assign(p->stages, p->stages + p->n_stages);
        s->n_layer       = n_layer;
        s->use_threshold = p->use_threshold ? 1 : 0;
        s->threshold     = p->threshold;
        s->kv            = p->kv;
        s->positions     = p->positions;
        *out = s.release();
    });
}

void lightkv_schedule_free(lightkv_schedule * s) { delete s; }

lightkv_status lightkv_schedule_check_grid(const lightkv_schedule * s, int64_t rows, int64_t cols) {
    return guarded(nullptr, [&] {
        if (!s) LKV_INVALID("schedule must not be NULL");
        if (rows < 1 || cols < 1) LKV_INVALID("image grid %lldx%lld is empty", (long long) rows, (long long) cols);
        for (const auto & st : s->stages) {
            if (st.windows > rows || st.windows > cols) {
                LKV_INVALID("schedule windows %d exceed the image grid %lldx%lld", st.windows,
                            (long long) rows, (long long) cols);
            }
        }
    });
}

double lightkv_schedule_keep_fraction(const lightkv_schedule * s) {
    if (!s) return NAN;
    std::vector<double> present{1.0};
    for (const auto & st : s->stages) present.push_back(present.back() * (1.0 - st.ratio));
    return layer_average(s->stages, s->n_layer, present);
}

lightkv_status lightkv_schedule_report_create(const lightkv_schedule * s, int64_t vision_rows,
                                              lightkv_schedule_report ** out) {
    return guarded(nullptr, [&] {
        if (!out) LKV_INVALID("out must not be NULL");
        *out = nullptr;
        if (!s) LKV_INVALID("schedule must not be NULL");
        if (vision_rows < 0) LKV_INVALID("vision rows must be >= 0");
        auto r = std::make_unique<lightkv_schedule_report>();
        r->s = s;
        r->vision_rows = vision_rows;
        *out = r.release();
    });
}

void lightkv_schedule_report_free(lightkv_schedule_report * r) { delete r; }

lightkv_status lightkv_schedule_report_stage(lightkv_schedule_report * r, int64_t vision_in, int64_t vision_out) {
    return guarded(nullptr, [&] {
        if (!r) LKV_INVALID("report must not be NULL");
        if (r->in.size() >= r->s->stages.size()) LKV_INVALID("every stage of the schedule is reported already");
        const int64_t prev = r->out.empty() ? r->vision_rows : r->out.back();
        if (vision_in != prev || vision_out < 0 || vision_out > vision_in) {
            LKV_INVALID("stage %zu: vision rows %lld -> %lld do not follow %lld", r->in.size(),
                        (long long) vision_in, (long long) vision_out, (long long) prev);
        }
        r->in.push_back(vision_in);
        r->out.push_back(vision_out);
    });
}

lightkv_status lightkv_schedule_report_cells(lightkv_schedule_report * r, int64_t cells_before, int64_t cells_after) {
    return guarded(nullptr, [&] {
        if (!r) LKV_INVALID("report must not be NULL");
        if (cells_before < 0 || cells_after < 0) LKV_INVALID("cell counts must be >= 0");
        r->cells_before = cells_before;
        r->cells_after  = cells_after;
    });
}

int32_t lightkv_schedule_report_n_stages(const lightkv_schedule_report * r) {
    return r ? (int32_t) r->in.size() : 0;
}

lightkv_status lightkv_schedule_report_stage_rows(const lightkv_schedule_report * r, int32_t i,
                                                  int64_t * vision_in, int64_t * vision_out) {
    return guarded(nullptr, [&] {
        if (!r || i < 0 || (size_t) i >= r->in.size()) LKV_INVALID("no stage %d in the report", i);
        if (vision_in)  *vision_in  = r->in[i];
        if (vision_out) *vision_out = r->out[i];
    });
}

double lightkv_schedule_report_keep_fraction(const lightkv_schedule_report * r) {
    if (!r || r->in.size() != r->s->stages.size()) return NAN;
    if (r->vision_rows == 0) return 1.0;
    std::vector<double> present{1.0};
    for (int64_t o : r->out) present.push_back((double) o / (double) r->vision_rows);
    return layer_average(r->s->stages, r->s->n_layer, present);
}

int64_t lightkv_schedule_report_cells_freed(const lightkv_schedule_report * r) {
    return r && r->cells_before > r->cells_after ? r->cells_before - r->cells_after : 0;
}
