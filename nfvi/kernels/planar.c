/* The K planar layers of nfvi.transforms.planar_chain_ladj (Rezende & Mohamed 2015, Eq. 10-12 and Appendix A.1)
 * as one loop per sample, forward and backward: nfvi.kernels loads this file, compiled once per machine, through
 * ctypes; where it cannot, nfvi runs the same maths as torch operations (docs/performance.md).
 *
 * One layer, with u_hat = u + (softplus(-w.u) - 1) w / |w|^2 (so w.u_hat = softplus(w.u) - 1):
 *     a = w.z + b,  h = tanh a,  z' = z + u_hat h,
 *     log|det| = log f,  f = 1 + sech^2(a) w.u_hat = tanh^2(a) + sech^2(a) softplus(w.u)
 * tanh a and sech^2 a come to a few ulps in double from one exp (or expm1 near 0); log f is log1p(x) with
 * x = sech^2(a) (softplus(w.u) - 1) where x >= -1/2, else the log of the sum of the two non-negative terms (no
 * cancellation either way), so log f is exact to rounding. Where f underflows double (|a| < 1e-145 and
 * w.u < -660), the same log f in log space.
 *
 * Layouts: element (n, s, d) of a (N, S, D) array at n * sn + s * ss + d; (n, k, d) of a (N, K, D) parameter at
 * n * pn + k * pk + d (u's: n * qn + k * qk + d); b (n, k) at n * bn + k * bk. The saved layer inputs zs are
 * (N, S, K, D), contiguous.
 * Every product and sum inside a layer is taken in double; z, gradients and outputs are stored in T.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

/* log(1 + x) to a few ulps from one log (Goldberg 1991, Theorem 4: the rounding of 1 + x cancels in
 * log(u) x / (u - 1)); glibc's log1p is several times slower than its log. */
static inline double log1p_(double x) {
    double u = 1.0 + x;
    return u == 1.0 ? x : log(u) * x / (u - 1.0);
}

/* Per-layer constants of Appendix A.1 from w.u and |w|^2, nine doubles each (the layout nfvi.kernels allocates):
 * w.u, |w|^2, softplus(w.u), softplus(-w.u), r = (softplus(-w.u) - 1) / |w|^2, log softplus(w.u), sigmoid(w.u),
 * sigmoid(-w.u), and d w_1 / d w_1' of the w floor (1 without one). One exp and one log for the first eight (the
 * log of softplus only where the slow path of terms_of needs it). */
typedef struct {
    double wu, q, sp, spn, r, log_sp, sig, sig_neg, d_floor;
} layer_consts;

static layer_consts consts_of(double wu, double q) {
    layer_consts c;
    double e = exp(-fabs(wu)), tail = log1p_(e);
    c.wu = wu;
    c.q = q;
    c.sp = fmax(wu, 0.0) + tail;
    c.spn = fmax(-wu, 0.0) + tail;
    c.r = (c.spn - 1.0) / q;
    c.log_sp = wu < -20.0 ? wu - 0.5 * exp(wu) : NAN; /* log(sp) taken in terms_of when needed */
    c.sig = wu >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    c.sig_neg = wu >= 0 ? e / (1.0 + e) : 1.0 / (1.0 + e);
    c.d_floor = 1.0;
    return c;
}

/* tanh a, sech^2 a and log f (log_f) for one layer; with grads, d log f / d a and d log f / d(w.u) (d_a, d_wu).
 * One exp (or expm1 for |a| < 0.35) and, for log f, one log. */
typedef struct {
    double h, s, log_f, d_a, d_wu;
} layer_terms;

static layer_terms terms_of(double a, const layer_consts *c, int want_log, int grads) {
    layer_terms t;
    double aa = fabs(a), th;
    if (aa > 0.35) { /* e = exp(-2|a|) <= 1/2: no cancellation in 1 - e */
        double e = exp(-2.0 * aa), inv = 1.0 / (1.0 + e);
        th = (1.0 - e) * inv;
        t.s = 4.0 * e * inv * inv;
    } else { /* m = expm1(-2|a|) in [-1/2, 0]: tanh|a| = -m / (2 + m), 1 + m >= 1/2 */
        double m = expm1(-2.0 * aa), inv = 1.0 / (2.0 + m);
        th = -m * inv;
        t.s = 4.0 * (1.0 + m) * inv * inv;
    }
    t.h = a < 0 ? -th : th;
    /* f = 1 + x, x = sech^2(a) (softplus(w.u) - 1) = u_hat^T psi: log1p(x) where x >= -1/2 (exact for f near 1,
     * where tanh^2 a rounds to 1), else the sum of the two non-negative terms (no cancellation) */
    double x = t.s * (c->sp - 1.0), f = x >= -0.5 ? 1.0 + x : th * th + t.s * c->sp;
    if (f > 1e-290) {
        if (want_log) t.log_f = x >= -0.5 ? log1p_(x) : log(f);
        if (grads) {
            t.d_a = 2.0 * t.h * t.s * (1.0 - c->sp) / f;
            t.d_wu = t.s * c->sig / f;
        }
        return t;
    }
    /* log space (f underflows double: |a| < 1e-145 and w.u < -660): log|tanh a| (log|a| - a^2/3 near 0),
     * log sech^2 a and log softplus(w.u) = w.u - exp(w.u) / 2 */
    double log_t = aa < 1e-3 ? log(aa) - a * a / 3.0 : log(th);
    double log_s = 2.0 * (M_LN2 - aa - log1p(exp(-2.0 * aa)));
    double log_sp = isnan(c->log_sp) ? log(c->sp) : c->log_sp;
    double p = 2.0 * log_t, q = log_s + log_sp, m = fmax(p, q);
    t.log_f = m == -INFINITY ? m : m + log1p(exp(-fabs(p - q)));
    if (grads) {
        t.d_a = a == 0.0 ? 0.0 : 2.0 * (a < 0 ? -1.0 : 1.0) * (1.0 - c->sp) * exp(log_t + log_s - t.log_f);
        t.d_wu = exp(log_s - c->spn - t.log_f);
    }
    return t;
}

/* x.y in double, in 8 partial sums (vectorised) */
static inline double dot8(const double *acc, double tail) {
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

#define DEFINE_CHAIN(T, SUFFIX)                                                                                       \
    static inline double dot_##SUFFIX(const T *x, const T *y, i64 d) {                                                \
        double acc[8] = {0.0}, tail = 0.0;                                                                            \
        i64 i = 0;                                                                                                    \
        for (; i + 8 <= d; i += 8)                                                                                    \
            for (int j = 0; j < 8; j++) acc[j] += (double)x[i + j] * (double)y[i + j];                                \
        for (; i < d; i++) tail += (double)x[i] * (double)y[i];                                                       \
        return dot8(acc, tail);                                                                                       \
    }                                                                                                                 \
    static inline double dotd_##SUFFIX(const T *x, const double *y, i64 d) {                                          \
        double acc[8] = {0.0}, tail = 0.0;                                                                            \
        i64 i = 0;                                                                                                    \
        for (; i + 8 <= d; i += 8)                                                                                    \
            for (int j = 0; j < 8; j++) acc[j] += (double)x[i + j] * y[i + j];                                        \
        for (; i < d; i++) tail += (double)x[i] * y[i];                                                               \
        return dot8(acc, tail);                                                                                       \
    }                                                                                                                 \
                                                                                                                      \
    /* Appendix A.1 for every layer: w (w_eff), u_hat (both (N, K, D)) and the constants (N, K), all contiguous.      \
     * With floored (PlanarFlow's w floor), w_1 = floor + softplus(w_1') from the raw w' (the rest as it is). */      \
    void planar_reparam_##SUFFIX(i64 N, i64 K, i64 D, const T *w, i64 pn, i64 pk, const T *u, i64 qn, i64 qk,         \
                                 int floored, double floor, T *w_eff, T *u_hat, layer_consts *c) {                    \
        for (i64 n = 0; n < N; n++)                                                                                   \
            for (i64 k = 0; k < K; k++) {                                                                             \
                const T *wk = w + n * pn + k * pk, *uk = u + n * qn + k * qk;                                         \
                T *we = w_eff + (n * K + k) * D;                                                                      \
                memcpy(we, wk, sizeof(T) * D);                                                                        \
                double d_floor = 1.0;                                                                                 \
                if (floored) {                                                                                        \
                    double x = (double)wk[0], e = exp(-fabs(x));                                                      \
                    we[0] = (T)(floor + (fmax(x, 0.0) + log1p_(e)));                                                  \
                    d_floor = x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e); /* sigmoid(w_1') */                           \
                }                                                                                                     \
                layer_consts ck = consts_of(dot_##SUFFIX(we, uk, D), dot_##SUFFIX(we, we, D));                        \
                ck.d_floor = d_floor;                                                                                 \
                c[n * K + k] = ck;                                                                                    \
                T *uh = u_hat + (n * K + k) * D;                                                                      \
                for (i64 i = 0; i < D; i++) uh[i] = (T)((double)uk[i] + ck.r * (double)we[i]);                        \
            }                                                                                                         \
    }                                                                                                                 \
                                                                                                                      \
    /* z_K and ladj = sum_k log f_k per (n, s). For the backward (where zs is not NULL): every layer's input z_k      \
     * (zs, (N, S, K, D)) and its tanh a, sech^2 a, d log f / d a and d log f / d(w.u) (terms, (N, S, K, 4)).         \
     * z: scratch, D values. */                                                                                       \
    void planar_forward_##SUFFIX(i64 N, i64 S, i64 K, i64 D, const T *z0, i64 z0n, i64 z0s, const T *w, i64 pn,       \
                                 i64 pk, const T *b, i64 bn, i64 bk, const T *u_hat, const layer_consts *c, T *zk,    \
                                 i64 zkn, i64 zks, T *ladj, i64 ln, i64 ls, T *zs, double *terms, T *z) {             \
        for (i64 n = 0; n < N; n++) {                                                                                 \
            const T *wn = w + n * pn, *uhn = u_hat + n * K * D;                                                       \
            const layer_consts *cn = c + n * K;                                                                       \
            for (i64 s = 0; s < S; s++) {                                                                             \
                memcpy(z, z0 + n * z0n + s * z0s, sizeof(T) * D);                                                     \
                double total = 0.0;                                                                                   \
                for (i64 k = 0; k < K; k++) {                                                                         \
                    double a = (double)b[n * bn + k * bk] + dot_##SUFFIX(wn + k * pk, z, D);                          \
                    layer_terms t = terms_of(a, cn + k, 1, zs != 0);                                                  \
                    if (zs) {                                                                                         \
                        i64 at = (n * S + s) * K + k;                                                                 \
                        memcpy(zs + at * D, z, sizeof(T) * D);                                                        \
                        double *saved = terms + 4 * at;                                                               \
                        saved[0] = t.h, saved[1] = t.s, saved[2] = t.d_a, saved[3] = t.d_wu;                          \
                    }                                                                                                 \
                    const T *uh = uhn + k * D;                                                                        \
                    for (i64 i = 0; i < D; i++) z[i] = (T)((double)z[i] + (double)uh[i] * t.h);                       \
                    total += t.log_f;                                                                                 \
                }                                                                                                     \
                memcpy(zk + n * zkn + s * zks, z, sizeof(T) * D);                                                     \
                ladj[n * ln + s * ls] = (T)total;                                                                     \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
                                                                                                                      \
    /* Gradients of sum(g_zk z_K) + sum(g_ladj ladj) (either NULL: zero) with respect to z0 (g_z0 at gzn, gzs),       \
     * w', u (g_w, g_u: (n, k, d) at n * gn + k * gk + d) and b (g_b: (n, k) at n * gbn + k * gbk), from the          \
     * forward's zs and terms; w is reparam's w_eff (contiguous), the gradient is the raw w''s (through the floor).   \
     * gz: scratch, D + 2 K (D + 1) doubles. */                                                                       \
    void planar_backward_##SUFFIX(i64 N, i64 S, i64 K, i64 D, const T *w, const T *u, i64 qn, i64 qk,                 \
                                  const T *u_hat, const layer_consts *c, const T *zs, const double *terms,            \
                                  const T *g_zk, i64 gkn, i64 gks, const T *g_ladj, i64 gln, i64 gls, T *g_z0,        \
                                  i64 gzn, i64 gzs, T *g_w, T *g_u, i64 gn, i64 gk, T *g_b, i64 gbn, i64 gbk,         \
                                  double *gz) {                                                                       \
        double *gw = gz + D, *guh = gw + K * D, *gwu = guh + K * D, *gb = gwu + K;                                    \
        for (i64 n = 0; n < N; n++) {                                                                                 \
            const T *wn = w + n * K * D, *u_n = u + n * qn, *uhn = u_hat + n * K * D;                                 \
            const layer_consts *cn = c + n * K;                                                                       \
            memset(gw, 0, sizeof(double) * (2 * K * D + 2 * K));                                                      \
            for (i64 s = 0; s < S; s++) {                                                                             \
                for (i64 i = 0; i < D; i++) gz[i] = g_zk ? (double)g_zk[n * gkn + s * gks + i] : 0.0;                 \
                double g_l = g_ladj ? (double)g_ladj[n * gln + s * gls] : 0.0;                                        \
                for (i64 k = K - 1; k >= 0; k--) {                                                                    \
                    i64 at = (n * S + s) * K + k;                                                                     \
                    const T *z = zs + at * D, *wk = wn + k * D;                                                       \
                    const double *t = terms + 4 * at; /* tanh a, sech^2 a, d log f / d a, d log f / d(w.u) */         \
                    double g_a = t[1] * dotd_##SUFFIX(uhn + k * D, gz, D);                                            \
                    if (g_l != 0.0) {                                                                                 \
                        g_a += g_l * t[2];                                                                            \
                        gwu[k] += g_l * t[3];                                                                         \
                    }                                                                                                 \
                    gb[k] += g_a;                                                                                     \
                    double *gwk = gw + k * D, *guhk = guh + k * D;                                                    \
                    for (i64 i = 0; i < D; i++) {                                                                     \
                        gwk[i] += g_a * (double)z[i];                                                                 \
                        guhk[i] += t[0] * gz[i];                                                                      \
                        gz[i] += g_a * (double)wk[i];                                                                 \
                    }                                                                                                 \
                }                                                                                                     \
                for (i64 i = 0; i < D; i++) g_z0[n * gzn + s * gzs + i] = (T)gz[i];                                   \
            }                                                                                                         \
            /* back through u_hat = u + r w, r = (softplus(-w.u) - 1) / |w|^2, and the log-det's own w.u */           \
            for (i64 k = 0; k < K; k++) {                                                                             \
                const T *wk = wn + k * D, *u_k = u_n + k * qk;                                                        \
                const double *guhk = guh + k * D;                                                                     \
                double t = dotd_##SUFFIX(wk, guhk, D), q = cn[k].q, r = cn[k].r;                                      \
                double alpha = gwu[k] - t * cn[k].sig_neg / q, beta = -2.0 * t * (cn[k].spn - 1.0) / (q * q);         \
                T *gwo = g_w + n * gn + k * gk, *guo = g_u + n * gn + k * gk;                                         \
                for (i64 i = 0; i < D; i++) {                                                                         \
                    gwo[i] = (T)(gw[k * D + i] + r * guhk[i] + alpha * (double)u_k[i] + beta * (double)wk[i]);        \
                    guo[i] = (T)(guhk[i] + alpha * (double)wk[i]);                                                    \
                }                                                                                                     \
                gwo[0] = (T)((double)gwo[0] * cn[k].d_floor);                                                         \
                g_b[n * gbn + k * gbk] = (T)gb[k];                                                                    \
            }                                                                                                         \
        }                                                                                                             \
    }

DEFINE_CHAIN(float, f32)
DEFINE_CHAIN(double, f64)
