// The clip-and-relax update over a region, with the early-stop samples.
//   x = b + (1-α) s + α s · clip(num/den, 1/κ, κ),  s = x - b
// b: the sky floor (has_b; 0 without one); factor 1 where den <= den_floor.
// Samples |u-1|, |x'-x|, |x| of (C, ni, nj) at the pixels of the global grid
// ((g0 + i) % step == 0 and (g1 + j) % step == 0); every slot is written.
#include "mfnumba_math.cuh"

extern "C" MF_GLOBAL void mf_update(
    mf_i64 n, float* x, mf_i64 x_sc, mf_i64 x_sr,
    const float* num, mf_i64 n_sc, mf_i64 n_sr, const float* den, mf_i64 d_sc, mf_i64 d_sr,
    const float* b, mf_i64 b_sc, mf_i64 b_sr, mf_i64 has_b,
    double kappa, double alpha, const double* den_floor,
    mf_i64 y0, mf_i64 x0, mf_i64 rows, mf_i64 cols, mf_i64 step, mf_i64 g0, mf_i64 g1,
    mf_i64 fi, mf_i64 fj, mf_i64 ni, mf_i64 nj, double* su, double* sd, double* sx)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, cols), c = mf_div(row, rows);
        mf_i64 i = y0 + row - c * rows, j = x0 + idx - row * cols;
        float* px = x + c * x_sc + i * x_sr + j;
        float old = *px;
        double base = has_b ? (double)b[c * b_sc + i * b_sr + j] : 0.0;
        double u;
        double nw = mf_update(old, num[c * n_sc + i * n_sr + j], den[c * d_sc + i * d_sr + j],
                              kappa, alpha, den_floor[c], base, &u);
        *px = (float)nw;
        if (mf_mod(g0 + i, step) == 0 && mf_mod(g1 + j, step) == 0) {
            mf_i64 s = (c * ni + mf_div(i - fi, step)) * nj + mf_div(j - fj, step);
            su[s] = fabs(u - 1.0);
            sd[s] = fabs(nw - (double)old);
            sx[s] = fabs((double)old);
        }
    }
}
