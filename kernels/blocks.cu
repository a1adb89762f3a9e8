// The super-resolution pair: D (r×r block sum, sum-preserving) and its
// adjoint U (replicate).
//   D: out[k, i, j] = Σ_{u,t<r} a[k, off + r i + u, off + r j + t]
//   U: out[k, off + r i + a, off + r j + b] = u[k, i, j]
#include "mfnumba_math.cuh"

// one element per output (native) pixel of (P, h, w); sums in the CPU's order
extern "C" MF_GLOBAL void mf_block_sum(
    mf_i64 n, const float* a, mf_i64 a_sp, mf_i64 a_sr, mf_i64 r, mf_i64 off,
    float* out, mf_i64 o_sp, mf_i64 o_sr, mf_i64 h, mf_i64 w)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, w), j = idx - row * w;
        mf_i64 k = mf_div(row, h), i = row - k * h;
        const float* s = a + k * a_sp + (off + r * i) * a_sr + off + r * j;
        float acc = 0.0f;
        for (mf_i64 u = 0; u < r; ++u)
            for (mf_i64 t = 0; t < r; ++t) acc += s[u * a_sr + t];
        out[k * o_sp + i * o_sr + j] = acc;
    }
}

// one element per output (fine) pixel of (P, r h, r w): coalesced writes
extern "C" MF_GLOBAL void mf_replicate(
    mf_i64 n, const float* u, mf_i64 u_sp, mf_i64 u_sr, mf_i64 r, mf_i64 off,
    float* out, mf_i64 o_sp, mf_i64 o_sr, mf_i64 h, mf_i64 w)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 H = h * r, W = w * r;
        mf_i64 row = mf_div(idx, W), fj = idx - row * W;
        mf_i64 k = mf_div(row, H), fi = row - k * H;
        out[k * o_sp + (off + fi) * o_sr + off + fj] =
            u[k * u_sp + mf_div(fi, r) * u_sr + mf_div(fj, r)];
    }
}
