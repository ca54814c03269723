/* torch.optim.RMSprop's step for one parameter tensor (not centered, not maximize), and the sum of the squared
 * gradients, in one pass: the step streams every gradient anyway, so the gradient norm that the trainer reports
 * (and checks) costs no second pass over them. Loaded by nfvi.kernels; nfvi.training.step_with_norm calls it.
 *
 * The same arithmetic as torch's single-tensor step, element by element, in T:
 *     g' = g + weight_decay p;  v = alpha v + (1 - alpha) g'^2;  d = sqrt(v) + eps;
 *     momentum > 0:  buf = momentum buf + g' / d;  p = p - lr buf;   else:  p = p - lr g' / d
 * Returns sum g^2 (the raw gradient, before weight decay) in double, summed in 8 lanes (vectorised).
 */
#include <math.h>
#include <stdint.h>

typedef int64_t i64;

#define DEFINE_RMSPROP(T, SQRT, SUFFIX)                                                                              \
    static inline double update_##SUFFIX(i64 k, T *p, const T *g, T *v, T *buf, T a, T c, T e, T wd, T m, T step) {  \
        T gk = g[k];                                                                                                 \
        double sq = (double)gk * (double)gk;                                                                         \
        if (wd != (T)0) gk = gk + wd * p[k]; /* as torch: only with weight decay (0 * inf is NaN) */                 \
        T vk = v[k] * a;                                                                                             \
        vk = vk + c * gk * gk;                                                                                       \
        v[k] = vk;                                                                                                   \
        T d = gk / (SQRT(vk) + e);                                                                                   \
        if (buf) {                                                                                                   \
            d = buf[k] * m + d;                                                                                      \
            buf[k] = d;                                                                                              \
        }                                                                                                            \
        p[k] = p[k] + step * d;                                                                                      \
        return sq;                                                                                                   \
    }                                                                                                                \
                                                                                                                     \
    double rmsprop_step_##SUFFIX(i64 n, T *p, const T *g, T *v, T *buf, double lr, double alpha, double eps,         \
                                 double weight_decay, double momentum) {                                             \
        const T a = (T)alpha, c = (T)(1.0 - alpha), e = (T)eps, wd = (T)weight_decay, m = (T)momentum;               \
        const T step = (T)(-lr);                                                                                     \
        double acc[8] = {0.0}, tail = 0.0;                                                                           \
        i64 i = 0;                                                                                                   \
        if (buf)                                                                                                     \
            for (; i + 8 <= n; i += 8)                                                                               \
                for (int j = 0; j < 8; j++) acc[j] += update_##SUFFIX(i + j, p, g, v, buf, a, c, e, wd, m, step);    \
        else                                                                                                         \
            for (; i + 8 <= n; i += 8)                                                                               \
                for (int j = 0; j < 8; j++) acc[j] += update_##SUFFIX(i + j, p, g, v, 0, a, c, e, wd, m, step);      \
        for (; i < n; i++) tail += update_##SUFFIX(i, p, g, v, buf, a, c, e, wd, m, step);                           \
        return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;             \
    }

DEFINE_RMSPROP(float, sqrtf, f32)
DEFINE_RMSPROP(double, sqrt, f64)
