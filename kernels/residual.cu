// Residual samples on the global sample grid, for the per-frame MAD scale.
//   z0 = (y - ŷ)/√V,  q = ŷ/V   at rows fi + a·step, cols fj + b·step
// worked out in double and stored as float32, as the CPU kernel does.
// One element per sample slot of (P, ni·nj); `valid` marks finite y (the
// launcher compacts the slots in row-major order, as the CPU appends them).
#include "mfnumba_math.cuh"

extern "C" MF_GLOBAL void mf_residual_samples(
    mf_i64 n, const float* y, mf_i64 y_sp, mf_i64 y_sr,
    const float* yhat, mf_i64 e_sp, mf_i64 e_sr, mf_i64 p,
    mf_i64 vmode, const float* var, mf_i64 v_sp, mf_i64 v_sr, double floor,
    mf_i64 fi, mf_i64 fj, mf_i64 step, mf_i64 nj, mf_i64 nper,
    float* z, float* q, unsigned char* valid)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 k = mf_div(idx, nper), s = idx - k * nper;
        mf_i64 a = mf_div(s, nj);
        mf_i64 i = fi + a * step, j = fj + (s - a * nj) * step;
        float v = y[k * y_sp + i * y_sr + j];
        float e = yhat[k * e_sp + (i + p) * e_sr + j + p];
        float varv = vmode == MF_V_MAP ? var[k * v_sp + i * v_sr + j] : 1.0f;
        double zz = 0.0, qq = 0.0;
        bool ok = mf_residual(v, e, (int)vmode, floor, varv, &zz, &qq);
        z[idx] = (float)zz;
        q[idx] = (float)qq;
        valid[idx] = ok ? 1 : 0;
    }
}
