// Products of half spectra (planes of m = n0 (n1/2 + 1) complex64 each).
//   multiply:   out[b, c] = X[c] · otf[b]
//   accumulate: acc[k, c] += Σ_b conj(otf[b]) · S[k, b, c]
#include "mfnumba_math.cuh"

// one element per output bin of (B, C, m)
extern "C" MF_GLOBAL void mf_spectral_multiply(
    mf_i64 n, const mf_cf* X, mf_i64 x_sc, const mf_cf* otf, mf_i64 t_sb,
    mf_cf* out, mf_i64 o_sb, mf_i64 o_sc, mf_i64 C, mf_i64 m)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 pl = mf_div(idx, m), e = idx - pl * m;
        mf_i64 b = mf_div(pl, C), c = pl - b * C;
        out[b * o_sb + c * o_sc + e] = mf_cmul(X[c * x_sc + e], otf[b * t_sb + e]);
    }
}

// one element per accumulator bin of (K, C, m); frames added in order b = 0..B-1
extern "C" MF_GLOBAL void mf_spectral_accumulate(
    mf_i64 n, mf_cf* acc, mf_i64 a_sk, mf_i64 a_sc, const mf_cf* otf, mf_i64 t_sb,
    const mf_cf* S, mf_i64 s_sk, mf_i64 s_sb, mf_i64 s_sc, mf_i64 B, mf_i64 C, mf_i64 m)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 pl = mf_div(idx, m), e = idx - pl * m;
        mf_i64 k = mf_div(pl, C), c = pl - k * C;
        mf_cf* dst = acc + k * a_sk + c * a_sc + e;
        mf_cf s = *dst;
        for (mf_i64 b = 0; b < B; ++b) {
            mf_cf t = mf_cmulconj(otf[b * t_sb + e], S[k * s_sk + b * s_sb + c * s_sc + e]);
            s.re += t.re;
            s.im += t.im;
        }
        *dst = s;
    }
}
