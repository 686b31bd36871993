/* The CPU multi-tensor Schedule-Free update of refadamw (kernels/native.py).
 *
 * Two calls per param group, each one OpenMP region over a list of work items
 * (a tensor's rows [r0, r1)), whatever the number of tensors; or both in one
 * region (refadamw_step) when the coefficients do not depend on the norms:
 *
 *   refadamw_row_sums:  per block, s_b = sum of g^2 over the block (blocked tensors),
 *                       and per tensor the sum of squares (its norm, squared);
 *   refadamw_update:    v, the denominator and the elementwise Schedule-Free step
 *                       (common.moments, common.denominators and
 *                       common.schedule_free_step), one block at a time:
 *
 *     s     = s_b / block_numel     (or g^2 per element), NaN -> 0, inf -> FLT_MAX
 *     v     = fresh ? w*s : lerp(v, s, w)                 (torch.lerp's formula)
 *     denom = sqrt(v) / sqrt_bias2 + eps
 *     d     = (finite g, else 0) / denom + wd*y
 *     y    <- (y + y_offset*delta) + y_step*d
 *     delta <- offset_decay*delta + offset_step*d
 *
 *   and, for an lr-free group (lf_stride > 0), on every lf_stride-th element i of each tensor, read
 *   before the step (lr_free.py): dot += g_i*(x0_k - (y_i + delta_i)), s_k <- s_k*beta3 + g_i*a where
 *   the step applies, l1 += |s_k|, with k = i/lf_stride; dot and l1 per tensor, summed in double.
 *
 * Storage may be fp32, bf16 or fp16; the math is fp32 and every write into
 * bf16/fp16 is stochastically rounded with the counter-based hash of
 * precision.py (word i of key k is mix32(i*G + k)), so the result is the
 * multi-tensor path's up to the order of the sums. Compiled with
 * -ffp-contract=off: no fused multiply-adds, the same roundings as the
 * eager path.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { WD, Y_OFFSET, Y_STEP, OFFSET_DECAY, OFFSET_STEP, V_WEIGHT, SQRT_BIAS2, EPS, N_COEF };
enum { KEY_Y, KEY_OFFSET, KEY_V, N_KEY };
enum { SALT_PARAM = 1, SALT_Z_MINUS_Y = 2, SALT_EXP_AVG_SQ = 4 }; /* precision.Salt */
#define SEG 512
#define GOLDEN 0x9E3779B9u

#ifdef __FLT16_MANT_DIG__
typedef _Float16 half_t;
#define HAS_F16 1
#else
typedef uint16_t half_t; /* fp16 tensors are not routed here (refadamw_has_f16() == 0) */
#define HAS_F16 0
#endif

int refadamw_has_f16(void) { return HAS_F16; }

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

static inline float f32_of_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static void load(const void *src, int dt, int64_t at, int n, float *out) {
    if (dt == F32) {
        memcpy(out, (const float *)src + at, (size_t)n * 4);
    } else if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < n; j++) out[j] = f32_of_bits((uint32_t)s[j] << 16);
    } else {
#if HAS_F16
        const half_t *s = (const half_t *)src + at;
        for (int j = 0; j < n; j++) out[j] = (float)s[j];
#endif
    }
}

/* Element `at + j` of the flattened tensor draws word mix32((at + j)*G + key). */
static void store(void *dst, int dt, int64_t at, int n, const float *in, uint32_t key) {
    if (dt == F32) {
        memcpy((float *)dst + at, in, (size_t)n * 4);
        return;
    }
    uint32_t first = (uint32_t)at * GOLDEN + key;
    if (dt == BF16) {
        uint16_t *d = (uint16_t *)dst + at;
        for (int j = 0; j < n; j++) {
            uint32_t r = mix32(first + (uint32_t)j * GOLDEN);
            d[j] = (uint16_t)((bits_of_f32(in[j]) + (r & 0xFFFFu)) >> 16);
        }
        return;
    }
#if HAS_F16
    half_t *d = (half_t *)dst + at;
    for (int j = 0; j < n; j++) {
        uint32_t r = mix32(first + (uint32_t)j * GOLDEN);
        float x = in[j], ax = fabsf(x);
        float normal = f32_of_bits((bits_of_f32(x) + (r & 0x1FFFu)) & ~0x1FFFu);
        float uniform = (float)((r >> 13) & 0x3FFFu) * 0x1p-14f;
        float sub = copysignf(floorf(ax / 0x1p-24f + uniform) * 0x1p-24f, x);
        d[j] = (half_t)(ax < 0x1p-14f ? sub : normal);
    }
#endif
}

/* fp32 storage is worked on in place; other dtypes through the fp32 buffer `buf`. */
static inline float *work(void *src, int dt, int64_t at, int n, float *buf) {
    if (dt == F32) return (float *)src + at;
    load(src, dt, at, n, buf);
    return buf;
}

static inline void put(void *dst, int dt, int64_t at, int n, const float *w, uint32_t key) {
    if (dt != F32) store(dst, dt, at, n, w, key);
}

static inline float finite_square(float s) {
    return s != s ? 0.0f : (s > FLT_MAX ? FLT_MAX : s);
}

static inline float lerp(float start, float end, float w) {
    return w < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

/* Sum of squares of n <= SEG floats in 64 independent lanes: vectorizes without reassociating, and
 * four vector accumulators hide the latency of the adds. The lanes are reduced by a tree of vector
 * adds, then 16 values in double; callers add segments in double, so no float sum runs long. */
#define LANES 64
static double sum_squares(const float *x, int n) {
    float lane[LANES] = {0};
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < LANES; k++) lane[k] += x[j + k] * x[j + k];
    float tail = 0.0f;
    for (; j < n; j++) tail += x[j] * x[j];
    for (int width = LANES / 2; width >= 16; width /= 2)
        for (int k = 0; k < width; k++) lane[k] += lane[k + width];
    double total = tail;
    for (int k = 0; k < 16; k++) total += lane[k];
    return total;
}

/* One param group's tensors t = 0..n-1: pointers and dtype codes of y (the parameter), g, delta = z - y
 * and v; rows and cols: blocks and their size (per-element tensors: rows = numel, cols = 1,
 * per_element = 1); sq_at: where the tensor's block sums start in `sq`. Work item i covers rows
 * [r0[i], r1[i]) of tensor item_t[i]; the items of one tensor are consecutive. coef_cols[c]: column c
 * of the per-tensor coefficients (COEF order), read at t * coef_strides[c] (stride 0: one value for
 * every tensor). steps, tensor_keys: each tensor's step after this update and its rounding key, from
 * which the keys of its three writes are derived as precision.py does. */
typedef struct {
    const int64_t *y, *g, *offset, *v;
    const int32_t *y_dt, *g_dt, *offset_dt, *v_dt;
    const int64_t *rows, *cols, *sq_at;
    const int8_t *per_element, *fresh;
    const int64_t *coef_cols, *coef_strides, *steps;
    const int32_t *tensor_keys;
    float *sq;
    double *item_sum, *tensor_sum;
    int64_t n, n_items;
    const int64_t *item_t, *r0, *r1;
    /* lr-free groups only (lf_stride = 0 otherwise): each tensor's sampled x0 and s (fp32), the step's
     * weight a (0-d fp32) and, for refadamw_update, its gate (0-d bool); per item and per tensor sums. */
    const int64_t *lf_anchor, *lf_sum;
    const float *lf_a;
    const uint8_t *lf_gate;
    float lf_beta3;
    int64_t lf_stride;
    double *lf_item_dot, *lf_item_l1, *lf_dot, *lf_l1;
} group_t;

static int64_t total_numel(const group_t *G) {
    int64_t total = 0;
    for (int64_t i = 0; i < G->n_items; i++) total += (G->r1[i] - G->r0[i]) * G->cols[G->item_t[i]];
    return total;
}

static void row_sums_item(const group_t *G, int64_t i) {
    int64_t t = G->item_t[i], c = G->cols[t];
    void *gp = (void *)G->g[t];
    int dt = G->g_dt[t];
    float buf[SEG];
    double total = 0.0;
    if (G->per_element[t]) {
        for (int64_t at = G->r0[i]; at < G->r1[i]; at += SEG) {
            int n = (int)(G->r1[i] - at < SEG ? G->r1[i] - at : SEG);
            total += sum_squares(work(gp, dt, at, n, buf), n);
        }
    } else {
        for (int64_t r = G->r0[i]; r < G->r1[i]; r++) {
            double row = 0.0;
            for (int64_t j = 0; j < c; j += SEG) {
                int n = (int)(c - j < SEG ? c - j : SEG);
                row += sum_squares(work(gp, dt, r * c + j, n, buf), n);
            }
            G->sq[G->sq_at[t] + r] = (float)row;
            total += row;
        }
    }
    G->item_sum[i] = total;
}

static void tensor_sums(const group_t *G) {
    for (int64_t t = 0; t < G->n; t++) G->tensor_sum[t] = 0.0;
    for (int64_t i = 0; i < G->n_items; i++) G->tensor_sum[G->item_t[i]] += G->item_sum[i];
}

/* The elementwise step over n elements: common.schedule_free_step's operations, in its order. DENOM(j)
 * is the denominator of element j: one value per block, or one per element. */
#define STEP_SEGMENT(DENOM)                                                   \
    for (int j = 0; j < n; j++) {                                             \
        float gj = fabsf(g[j]) <= FLT_MAX ? g[j] : 0.0f;                      \
        float d = gj / (DENOM);                                               \
        d = d + y[j] * k[WD];                                                 \
        float yj = y[j] + offset[j] * k[Y_OFFSET];                            \
        y[j] = yj + d * k[Y_STEP];                                            \
        offset[j] = offset[j] * k[OFFSET_DECAY] + d * k[OFFSET_STEP];         \
    }

static void step_block(float *restrict y, const float *restrict g, float *restrict offset, float denom, int n,
                       const float *restrict k) {
    STEP_SEGMENT(denom)
}

static void step_elements(float *restrict y, const float *restrict g, float *restrict offset,
                          const float *restrict denom, int n, const float *restrict k) {
    STEP_SEGMENT(denom[j])
}

static inline int64_t element_size(int dt) { return dt == F32 ? 4 : 2; }

/* Prefetch a tensor's elements [from, to), every cache line once (from rounded down to a line). The lr-free
 * terms' sampled reads come ahead of the sequential ones and, without it, stall on memory: the hardware
 * prefetcher follows sequential reads only (10 x 1024^2 fp32: 1.55x fused AdamW without, 1.26x with). The
 * update's own reads gain too (fixed lr: 1.30x -> 1.13x there; 640 LoRA factors 1.34x -> 1.19x). */
static inline void prefetch(const void *base, int dt, int64_t from, int64_t to) {
    int64_t per_line = 64 / element_size(dt);
    for (int64_t i = from / per_line * per_line; i < to; i += per_line)
        __builtin_prefetch((const char *)base + i * element_size(dt));
}

/* Keeps the prefetch of g and y two segments ahead of `at`, up to `end`; returns how far it reaches. */
static inline int64_t prefetch_ahead(const void *g, int g_dt, const void *y, int y_dt, int64_t fetched,
                                     int64_t at, int64_t end) {
    int64_t to = at + 2 * SEG < end ? at + 2 * SEG : end;
    if (to <= fetched) return fetched;
    prefetch(g, g_dt, fetched, to);
    prefetch(y, y_dt, fetched, to);
    return to;
}

/* The lr-free terms of the sampled elements among [at, at + n) of tensor t (g, y, offset: their fp32
 * values there, before the step), added to the item's sums. */
static void observe(const group_t *G, int64_t t, int64_t at, int n, const float *g, const float *y,
                    const float *offset, int gate, double *dot, double *l1) {
    int64_t stride = G->lf_stride, k = (at + stride - 1) / stride; /* one division per segment: they are slow */
    const float *x0 = (const float *)G->lf_anchor[t];
    float *s = (float *)G->lf_sum[t], a = *G->lf_a, beta3 = G->lf_beta3;
    for (int64_t j = k * stride - at; j < n; j += stride, k++) {
        float z = y[j] + offset[j];
        *dot += g[j] * (x0[k] - z);
        if (gate) s[k] = s[k] * beta3 + g[j] * a;
        *l1 += fabsf(s[k]);
    }
}

static void lr_free_sums(const group_t *G, int computed) {
    if (!G->lf_stride) return;
    for (int64_t t = 0; t < G->n; t++) G->lf_dot[t] = G->lf_l1[t] = 0.0;
    if (!computed) return;
    for (int64_t i = 0; i < G->n_items; i++) {
        G->lf_dot[G->item_t[i]] += G->lf_item_dot[i];
        G->lf_l1[G->item_t[i]] += G->lf_item_l1[i];
    }
}

/* precision.rounding_keys for one tensor and buffer: mix32(tensor_key ^ mix32(step*G + salt*A)). */
static inline uint32_t rounding_key(int32_t tensor_key, int64_t step, uint32_t salt) {
    uint32_t counter = (uint32_t)(int32_t)step * GOLDEN + salt * 0x7FEB352Du;
    return mix32((uint32_t)tensor_key ^ mix32(counter));
}

/* The per-tensor values update_elements and update_rows start from: coefficients and rounding keys. */
typedef struct {
    float k[N_COEF];
    uint32_t key[N_KEY];
} tensor_step_t;

static tensor_step_t tensor_step(const group_t *G, int64_t t) {
    tensor_step_t ts;
    for (int j = 0; j < N_COEF; j++) ts.k[j] = ((const float *)G->coef_cols[j])[t * G->coef_strides[j]];
    ts.key[KEY_Y] = rounding_key(G->tensor_keys[t], G->steps[t], SALT_PARAM);
    ts.key[KEY_OFFSET] = rounding_key(G->tensor_keys[t], G->steps[t], SALT_Z_MINUS_Y);
    ts.key[KEY_V] = rounding_key(G->tensor_keys[t], G->steps[t], SALT_EXP_AVG_SQ);
    return ts;
}

/* Work item i of a tensor with one v per element. */
static void update_elements(const group_t *G, int64_t i, const tensor_step_t *ts, int gate, double *dot,
                            double *l1) {
    int64_t t = G->item_t[i];
    const float *k = ts->k;
    void *yp = (void *)G->y[t], *op = (void *)G->offset[t], *vp = (void *)G->v[t], *gp = (void *)G->g[t];
    int y_dt = G->y_dt[t], g_dt = G->g_dt[t], o_dt = G->offset_dt[t], v_dt = G->v_dt[t], fresh = G->fresh[t];
    float yb[SEG], gb[SEG], ob[SEG], vb[SEG];
    int64_t fetched = G->r0[i];
    for (int64_t at = G->r0[i]; at < G->r1[i]; at += SEG) {
        int n = (int)(G->r1[i] - at < SEG ? G->r1[i] - at : SEG);
        load(gp, g_dt, at, n, gb);
        if (fresh) {
            for (int j = 0; j < n; j++) vb[j] = finite_square(gb[j] * gb[j]) * k[V_WEIGHT];
        } else {
            load(vp, v_dt, at, n, vb);
            for (int j = 0; j < n; j++) vb[j] = lerp(vb[j], finite_square(gb[j] * gb[j]), k[V_WEIGHT]);
        }
        store(vp, v_dt, at, n, vb, ts->key[KEY_V]);
        for (int j = 0; j < n; j++) vb[j] = sqrtf(vb[j]) / k[SQRT_BIAS2] + k[EPS];
        float *yw = work(yp, y_dt, at, n, yb), *ow = work(op, o_dt, at, n, ob);
        fetched = prefetch_ahead(gp, g_dt, yp, y_dt, fetched, at, G->r1[i]);
        if (G->lf_stride) observe(G, t, at, n, gb, yw, ow, gate, dot, l1);
        step_elements(yw, gb, ow, vb, n, k);
        put(yp, y_dt, at, n, yw, ts->key[KEY_Y]);
        put(op, o_dt, at, n, ow, ts->key[KEY_OFFSET]);
    }
}

/* Work item i of a blocked tensor: rows [r0, r1), one v per row. */
static void update_rows(const group_t *G, int64_t i, const tensor_step_t *ts, int gate, double *dot, double *l1) {
    int64_t t = G->item_t[i], c = G->cols[t];
    const float *k = ts->k;
    void *yp = (void *)G->y[t], *op = (void *)G->offset[t], *vp = (void *)G->v[t], *gp = (void *)G->g[t];
    int y_dt = G->y_dt[t], g_dt = G->g_dt[t], o_dt = G->offset_dt[t], v_dt = G->v_dt[t], fresh = G->fresh[t];
    float yb[SEG], gb[SEG], ob[SEG];
    int64_t fetched = G->r0[i] * c;
    for (int64_t r = G->r0[i]; r < G->r1[i]; r++) {
        float s = finite_square(G->sq[G->sq_at[t] + r] / (float)c), vr;
        if (fresh) {
            vr = s * k[V_WEIGHT];
        } else {
            load(vp, v_dt, r, 1, &vr);
            vr = lerp(vr, s, k[V_WEIGHT]);
        }
        store(vp, v_dt, r, 1, &vr, ts->key[KEY_V]);
        float denom = sqrtf(vr) / k[SQRT_BIAS2] + k[EPS];
        for (int64_t j = 0; j < c; j += SEG) {
            int n = (int)(c - j < SEG ? c - j : SEG);
            int64_t at = r * c + j;
            const float *gw = work(gp, g_dt, at, n, gb);
            float *yw = work(yp, y_dt, at, n, yb), *ow = work(op, o_dt, at, n, ob);
            fetched = prefetch_ahead(gp, g_dt, yp, y_dt, fetched, at, G->r1[i] * c);
            if (G->lf_stride) observe(G, t, at, n, gw, yw, ow, gate, dot, l1);
            step_block(yw, gw, ow, denom, n, k);
            put(yp, y_dt, at, n, yw, ts->key[KEY_Y]);
            put(op, o_dt, at, n, ow, ts->key[KEY_OFFSET]);
        }
    }
}

/* gate: whether the step applies, for the lr-free s (the update itself is gated by its coefficients). */
static void update_item(const group_t *G, int64_t i, int gate) {
    int64_t t = G->item_t[i];
    tensor_step_t ts = tensor_step(G, t);
    double dot = 0.0, l1 = 0.0;
    if (G->per_element[t])
        update_elements(G, i, &ts, gate, &dot, &l1);
    else
        update_rows(G, i, &ts, gate, &dot, &l1);
    if (G->lf_stride) {
        G->lf_item_dot[i] = dot;
        G->lf_item_l1[i] = l1;
    }
}

/* The three entry points; `threads` OpenMP threads (torch's pool) once the group holds at least
 * `parallel_numel` elements, else the calling thread alone. */

/* The block sums and each tensor's sum of squares. */
void refadamw_row_sums(const group_t *G, int threads, int64_t parallel_numel) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (total_numel(G) >= parallel_numel)
    for (int64_t i = 0; i < G->n_items; i++) row_sums_item(G, i);
    tensor_sums(G);
}

/* The update, from the block sums of refadamw_row_sums. */
void refadamw_update(const group_t *G, int threads, int64_t parallel_numel) {
    int gate = G->lf_stride && *G->lf_gate;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (total_numel(G) >= parallel_numel)
    for (int64_t i = 0; i < G->n_items; i++) update_item(G, i, gate);
    lr_free_sums(G, 1);
}

/* Both in one parallel region, for a group whose coefficients do not depend on the norms: the block
 * sums, then, only if every tensor's sum of squares is finite (the hygiene gate), the update (and the
 * lr-free terms: zero when the gate is shut). */
void refadamw_step(const group_t *G, int threads, int64_t parallel_numel) {
    int finite = 1;
#pragma omp parallel num_threads(threads) if (total_numel(G) >= parallel_numel)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < G->n_items; i++) row_sums_item(G, i);
#pragma omp single
        {
            tensor_sums(G);
            for (int64_t t = 0; t < G->n; t++) finite &= isfinite(G->tensor_sum[t]) ? 1 : 0;
        }
        if (finite) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < G->n_items; i++) update_item(G, i, 1);
        }
    }
    lr_free_sums(G, finite);
}

/* The kernel's rounding on its own, for tests: src (fp32, n values) into dst (dtype code dt), element i
 * drawing word mix32(i*G + key) as every write above does. */
void refadamw_stochastic_round(const float *src, int64_t n, int dt, int32_t key, void *dst) {
    for (int64_t at = 0; at < n; at += SEG) store(dst, dt, at, (int)(n - at < SEG ? n - at : SEG), src + at,
                                                  (uint32_t)key);
}
