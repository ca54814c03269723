/* The max of maxout units (Goodfellow et al. 2013, the paper's hidden units) over consecutive windows of a
 * pre-activation row, and its backward, as nfvi.vae.model.Maxout takes them: one pass each, where torch's amax
 * over an inner axis of 4 and its backward (a mask, a count, a division) take several. Loaded by nfvi.kernels.
 *
 * x: rows of units * window values, row r at r * xr (unit stride); out, g_out: (rows, units) contiguous.
 * The backward is torch.amax's: the gradient is shared equally among the entries equal to the max (ties), and
 * a window holding NaN (whose max is NaN) passes NaN, as torch's does. Branch-free selects throughout (the
 * comparisons of random values would mispredict); windows of 4, the paper's, get a loop the compiler unrolls.
 */
#include <math.h>
#include <stdint.h>

typedef int64_t i64;

#define DEFINE_MAXOUT(T, SUFFIX)                                                                                     \
    static inline void forward_rows_##SUFFIX(i64 rows, i64 units, const i64 window, const T *x, i64 xr, T *out) {    \
        for (i64 r = 0; r < rows; r++)                                                                               \
            for (i64 j = 0; j < units; j++) {                                                                        \
                const T *v = x + r * xr + j * window;                                                                \
                T m = v[0];                                                                                          \
                int nan = v[0] != v[0];                                                                              \
                for (i64 i = 1; i < window; i++) {                                                                   \
                    m = v[i] > m ? v[i] : m;                                                                         \
                    nan |= v[i] != v[i];                                                                             \
                }                                                                                                    \
                out[r * units + j] = nan ? (T)NAN : m;                                                               \
            }                                                                                                        \
    }                                                                                                                \
                                                                                                                     \
    void maxout_forward_##SUFFIX(i64 rows, i64 units, i64 window, const T *x, i64 xr, T *out) {                      \
        if (window == 4)                                                                                             \
            forward_rows_##SUFFIX(rows, units, 4, x, xr, out);                                                       \
        else                                                                                                         \
            forward_rows_##SUFFIX(rows, units, window, x, xr, out);                                                  \
    }                                                                                                                \
                                                                                                                     \
    static inline void backward_rows_##SUFFIX(i64 rows, i64 units, const i64 window, const T *x, i64 xr,            \
                                              const T *out, const T *g_out, T *g_x) {                                \
        for (i64 r = 0; r < rows; r++)                                                                               \
            for (i64 j = 0; j < units; j++) {                                                                        \
                const T *v = x + r * xr + j * window;                                                                \
                T m = out[r * units + j], count = 0;                                                                 \
                for (i64 i = 0; i < window; i++) count += v[i] == m ? (T)1 : (T)0;                                   \
                T share = g_out[r * units + j] / count, none = share * (T)0; /* count 0 (a NaN max): NaN */          \
                T *g = g_x + (r * units + j) * window;                                                               \
                for (i64 i = 0; i < window; i++) g[i] = v[i] == m ? share : none;                                    \
            }                                                                                                        \
    }                                                                                                                \
                                                                                                                     \
    void maxout_backward_##SUFFIX(i64 rows, i64 units, i64 window, const T *x, i64 xr, const T *out,                \
                                  const T *g_out, T *g_x) {                                                          \
        if (window == 4)                                                                                             \
            backward_rows_##SUFFIX(rows, units, 4, x, xr, out, g_out, g_x);                                          \
        else                                                                                                         \
            backward_rows_##SUFFIX(rows, units, window, x, xr, out, g_out, g_x);                                     \
    }

DEFINE_MAXOUT(float, f32)
DEFINE_MAXOUT(double, f64)
