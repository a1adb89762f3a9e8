// Fused robust weights, written straight into the adjoint's input planes:
//   out[0] = U(w·y), out[1] = U(w·ŷ),  w = ψ(z)/z · m / σ²  (0 where y is NaN)
// One element per native pixel of (P, h, w); U replicates it over an r×r
// block at offset po of the fine grid. ŷ is read at offset p.
#include "mfnumba_math.cuh"

extern "C" MF_GLOBAL void mf_robust_weights(
    mf_i64 n, const float* y, mf_i64 y_sp, mf_i64 y_sr,
    const float* yhat, mf_i64 e_sp, mf_i64 e_sr, mf_i64 p,
    mf_i64 vmode, const float* var, mf_i64 v_sp, mf_i64 v_sr, double floor,
    const double* sigma, const double* delta, mf_i64 huber,
    const float* mask, mf_i64 m_sp, mf_i64 m_sr, mf_i64 has_mask,
    const float* prot, mf_i64 r_sp, mf_i64 r_sr, mf_i64 has_prot,
    float* out, mf_i64 o_sk, mf_i64 o_sp, mf_i64 o_sr, mf_i64 po, mf_i64 r,
    mf_i64 h, mf_i64 w)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, w), j = idx - row * w;
        mf_i64 k = mf_div(row, h), i = row - k * h;
        float inv, ds;
        mf_plane_params(sigma[k], delta[k], &inv, &ds);
        float v = y[k * y_sp + i * y_sr + j];
        float e = yhat[k * e_sp + (i + p) * e_sr + j + p];
        float varv = vmode == MF_V_MAP ? var[k * v_sp + i * v_sr + j] : 1.0f;
        float pr = has_prot ? prot[k * r_sp + i * r_sr + j] : 0.0f;
        float m = has_mask ? mask[k * m_sp + i * m_sr + j] : 1.0f;
        float a0, a1;
        mf_weight(v, e, inv, ds, (int)vmode, (float)floor, varv, huber != 0, has_prot != 0,
                  pr, has_mask != 0, m, &a0, &a1);
        float* o = out + k * o_sp + (po + r * i) * o_sr + po + r * j;
        for (mf_i64 u = 0; u < r; ++u)
            for (mf_i64 t = 0; t < r; ++t) {
                o[u * o_sr + t] = a0;
                o[o_sk + u * o_sr + t] = a1;
            }
    }
}
