// Robust weights with cross-frame consensus rejection, and the statistics of
// the next pass's consensus (planes k = frame · C + c):
//   out[0, k] = U(w·y), out[1, k] = U(w·ŷ),
//     w = 0 where z² > L² or (near[k] & 1 and z² > lo²L²): the plane's own outlier nearby,
//     or (sharp2 > 0, with a consensus) where a kept z² > zt²·max(1, sharp2·m²) above the
//     model is sharper than the PSF (mf_sharp_reject, over the 8 neighbours inside the
//     window that have data, at least 3); below the model (y < ŷ) the limits are neg times higher
//   hits[k] = rejected so (0 without a consensus), for the next pass's near
//   acc[0, c] += Σ_k z²,  acc[1, c] = max(acc[1, c], max_k z²),  acc[2, c] += #(y NaN),
//   acc[3, c] = the second largest of acc[1, c], acc[3, c] and the planes' z²
//     (z² = 0 where y is not finite; ties count twice)
//   counts[0, k] += rejected, counts[1, k] += finite pixels
// One thread per pixel (c, i, j) of acc, looping over its planes k = c, c + C,
// … in order: acc needs no atomics and its float sums are the CPU's. The
// counts are summed per warp and added with integer atomics (exact); each
// thread reads and writes only its own pixel of near and hits. ŷ is
// read at offset p, out written over r×r blocks at offset po (as
// mf_robust_weights); prm (3, P) holds each plane's 1/σ², δσ, 1/unit².
#include "mfnumba_math.cuh"

extern "C" MF_GLOBAL void mf_consensus_weights(
    mf_i64 n, const float* y, mf_i64 y_sp, mf_i64 y_sr,
    const float* yhat, mf_i64 e_sp, mf_i64 e_sr, mf_i64 p,
    mf_i64 vmode, const float* var, mf_i64 v_sp, mf_i64 v_sr, double floor,
    const float* prm, mf_i64 huber,
    const float* mask, mf_i64 m_sp, mf_i64 m_sr, mf_i64 has_mask,
    const float* cons, mf_i64 c_sc, mf_i64 c_sr, mf_i64 has_cons,
    const unsigned char* near, mf_i64 n_sp, mf_i64 n_sr, mf_i64 has_near,
    unsigned char* hits, mf_i64 h_sp, mf_i64 h_sr, mf_i64 has_hits,
    double zt, double lo_frac, double sharp, double neg,
    float* out, mf_i64 o_sk, mf_i64 o_sp, mf_i64 o_sr, mf_i64 po, mf_i64 r,
    float* acc, mf_i64 a_sk, mf_i64 a_sc, mf_i64 a_sr, unsigned long long* counts,
    mf_i64 P, mf_i64 C, mf_i64 h, mf_i64 w)
{
    const float zt2 = (float)(zt * zt), lo2 = (float)(lo_frac * lo_frac);
    const float sharp2 = (float)(sharp * sharp), neg2 = (float)(neg * neg);
    const bool sharp_on = has_cons && sharp > 0.0;
    const mf_i64 nt = mf_div(P + C - 1, C);  // planes of the most populous channel
    MF_FOR_EACH_WARP(idx, n) {
        bool live = idx < n;
        mf_i64 q = live ? idx : 0;
        mf_i64 row = mf_div(q, w), j = q - row * w;
        mf_i64 c = mf_div(row, h), i = row - c * h;
        float lim2 = zt2, m2 = 0.0f, sum = 0.0f, top = 0.0f, gaps = 0.0f, second = 0.0f;
        float* st = acc + c * a_sc + i * a_sr + j;
        if (live) {
            if (has_cons) {
                m2 = cons[c * c_sc + i * c_sr + j];  // cons[0]
                lim2 = mf_consensus_limit(zt2, m2);
            }
            sum = st[0];
            top = st[a_sk];
            gaps = st[2 * a_sk];
            second = st[3 * a_sk];
        }
        for (mf_i64 t = 0; t < nt; ++t) {
            mf_i64 k = c + t * C;
            bool ok = live && k < P;
            int state = MF_C_NAN;
            if (ok) {
                float v = y[k * y_sp + i * y_sr + j];
                float e = yhat[k * e_sp + (i + p) * e_sr + j + p];
                float varv = vmode == MF_V_MAP ? var[k * v_sp + i * v_sr + j] : 1.0f;
                float m = has_mask ? mask[k * m_sp + i * m_sr + j] : 1.0f;
                bool own = has_cons && has_near && (near[k * n_sp + i * n_sr + j] & 1u) != 0;
                float a0, a1, z2;
                bool hit;
                state = mf_consensus_weight(v, e, prm[k], prm[P + k], prm[2 * P + k], (int)vmode,
                                            (float)floor, varv, huber != 0, lim2, lo2, own,
                                            has_mask != 0, m, &a0, &a1, &z2, &hit, neg2);
                float ms = sharp2 * m2;  // a candidate: above the model, past the test's limit
                float lims = zt2 * (ms > 1.0f ? ms : 1.0f);
                if (sharp_on && state == MF_C_KEPT && v - e > 0.0f && z2 > lims) {
                    float nb = 0.0f;  // the neighbours with data in the window, CPU order
                    int cnt = 0;
                    for (mf_i64 di = -1; di <= 1; ++di)
                        for (mf_i64 dj = -1; dj <= 1; ++dj) {
                            mf_i64 ii = i + di, jj = j + dj;
                            if ((di != 0 || dj != 0) && ii >= 0 && ii < h && jj >= 0 && jj < w) {
                                float a = y[k * y_sp + ii * y_sr + jj] -
                                          yhat[k * e_sp + (ii + p) * e_sr + jj + p];
                                if (mf_isfinite(a)) {
                                    nb = nb + a;
                                    cnt += 1;
                                }
                            }
                        }
                    float ve = vmode == MF_V_CONST ? 1.0f
                             : (vmode == MF_V_POISSON ? mf_maxf(e, (float)floor) : varv);
                    float wt = vmode == MF_V_CONST ? prm[k] : prm[k] / ve;
                    if (mf_sharp_reject(v - e, nb, cnt, wt, prm[2 * P + k], zt2, sharp2, m2)) {
                        a0 = 0.0f;
                        a1 = 0.0f;
                        hit = true;
                        state = MF_C_REJECTED;
                    }
                }
                if (has_hits) hits[k * h_sp + i * h_sr + j] = (has_cons && hit) ? 1 : 0;
                mf_consensus_stat(state, z2, &sum, &top, &second, &gaps);
                float* o = out + k * o_sp + (po + r * i) * o_sr + po + r * j;
                for (mf_i64 u = 0; u < r; ++u)
                    for (mf_i64 s = 0; s < r; ++s) {
                        o[u * o_sr + s] = a0;
                        o[o_sk + u * o_sr + s] = a1;
                    }
            }
            mf_count2(counts, counts + P, k, ok, state == MF_C_REJECTED, state != MF_C_NAN);
        }
        if (live) {
            st[0] = sum;
            st[a_sk] = top;
            st[2 * a_sk] = gaps;
            st[3 * a_sk] = second;
        }
    }
}

// The consensus level m² (1, C, h, w) for the next pass from the statistics
// (4, C, h, w) the weights gathered, both contiguous: one element per pixel.
extern "C" MF_GLOBAL void mf_consensus_maps(
    mf_i64 n, const float* stat, float* out, double n_frames, double min_frames,
    double trim2, double zt2, double big)
{
    MF_FOR_EACH(idx, n) {
        out[idx] = mf_consensus_level(stat[idx], stat[n + idx], stat[2 * n + idx],
                                      stat[3 * n + idx], (float)n_frames, (float)min_frames,
                                      (float)trim2, (float)zt2, (float)big);
    }
}
