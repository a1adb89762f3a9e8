// Direct (spatial) convolution for small PSFs: the forward model and its
// adjoint, batched over frames b and channels c. Sums in float32 (the
// CPU kernel sums in float64; K² <= ~250 terms keep them within 1e-6).
//   forward: out[b, c, p+i, p+j] = Σ_uv psf_b[u, v] x_c[i + 2p - u, j + 2p - v]
//   adjoint: acc[k, c, m, n] += Σ_b Σ_uv psf_b[u, v] a[k, b, c, m - p + u, n - p + v]
#include "mfnumba_math.cuh"

// one element per output pixel of (B, C, h, w); psfs (B, K, K) contiguous
extern "C" MF_GLOBAL void mf_conv_forward(
    mf_i64 n, const float* x, mf_i64 x_sc, mf_i64 x_sr, const float* psfs, mf_i64 K,
    float* out, mf_i64 o_sb, mf_i64 o_sc, mf_i64 o_sr, mf_i64 p, mf_i64 C, mf_i64 h, mf_i64 w)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, w), j = idx - row * w;
        mf_i64 pl = mf_div(row, h), i = row - pl * h;
        mf_i64 b = mf_div(pl, C), c = pl - b * C;
        const float* ps = psfs + b * K * K;
        const float* xc = x + c * x_sc;
        float acc = 0.0f;
        for (mf_i64 u = 0; u < K; ++u) {
            const float* row = xc + (i + 2 * p - u) * x_sr + j + 2 * p;
            for (mf_i64 v = 0; v < K; ++v) acc += ps[u * K + v] * row[-v];
        }
        out[b * o_sb + c * o_sc + (i + p) * o_sr + j + p] = acc;
    }
}

// one element per model pixel of (K2, C, e0, e1); a (K2, B, C, g0, g1) holds
// the frames embedded at offset p, zero elsewhere
extern "C" MF_GLOBAL void mf_conv_adjoint(
    mf_i64 n, const float* a, mf_i64 a_sk, mf_i64 a_sb, mf_i64 a_sc, mf_i64 a_sr,
    const float* psfs, mf_i64 K, float* acc, mf_i64 c_sk, mf_i64 c_sc, mf_i64 c_sr,
    mf_i64 p, mf_i64 B, mf_i64 C, mf_i64 g0, mf_i64 g1, mf_i64 e0, mf_i64 e1)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, e1), q = idx - row * e1;
        mf_i64 pl = mf_div(row, e0), m = row - pl * e0;
        mf_i64 k = mf_div(pl, C), c = pl - k * C;
        // taps whose source row / column lies on the grid
        mf_i64 u0 = p - m > 0 ? p - m : 0, u1 = g0 + p - m < K ? g0 + p - m : K;
        mf_i64 v0 = p - q > 0 ? p - q : 0, v1 = g1 + p - q < K ? g1 + p - q : K;
        float s = 0.0f;
        for (mf_i64 b = 0; b < B; ++b) {
            const float* ps = psfs + b * K * K;
            const float* ab = a + k * a_sk + b * a_sb + c * a_sc;
            for (mf_i64 u = u0; u < u1; ++u) {
                const float* row = ab + (m - p + u) * a_sr + q - p;
                for (mf_i64 v = v0; v < v1; ++v) s += ps[u * K + v] * row[v];
            }
        }
        acc[k * c_sk + c * c_sc + m * c_sr + q] += s;
    }
}
