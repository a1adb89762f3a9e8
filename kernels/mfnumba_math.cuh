// Per-element math of mfnumba's CUDA kernels, shared by device and host.
//
// Everything here is __host__ __device__ so that the same code compiles with
// NVRTC (CuPy RawModule), with nvcc, and with a plain C++ compiler
// (tests/test_cuda_kernels.py builds the kernels for the host and checks
// them against tests/reference.py and the Numba kernels). No CUDA or C++
// library headers: NVRTC has none, and the host build needs only <math.h>.
//
// Layouts (backends/base.py): plane stacks (P, H, W) float32 whose rows are
// contiguous; strides are passed in elements. Spectra are half spectra
// (…, n0, n1) complex64 with contiguous planes.
#pragma once

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#  include <math.h>
#  ifndef __host__
#    define __host__
#  endif
#  ifndef __device__
#    define __device__
#  endif
#  define MF_GLOBAL
// host build: the grid-stride loop becomes a plain loop over all elements
#  define MF_FOR_EACH(i, n) for (long long i = 0; i < (n); ++i)
#  define MF_FOR_EACH_WARP(i, n) for (long long i = 0; i < (n); ++i)
#else
#  define MF_GLOBAL __global__
#  define MF_FOR_EACH(i, n)                                                     \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;       \
         i < (n); i += (long long)blockDim.x * gridDim.x)
// the same loop with a trip count shared by the 32 lanes of a warp (its
// first lane's), for kernels that use warp intrinsics: lanes past the end
// run along with i >= n and must not touch memory. blockDim.x: a multiple of 32.
#  define MF_FOR_EACH_WARP(i, n)                                                \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;       \
         i - (long long)(threadIdx.x & 31u) < (n); i += (long long)blockDim.x * gridDim.x)
#endif

#define MF_HD __host__ __device__ inline

typedef long long mf_i64;

// complex64 as CuPy and NumPy lay it out: (re, im), 8-byte aligned
struct alignas(8) mf_cf {
    float re, im;
};

// finite: neither NaN (comparison false) nor ±Inf (|v| > FLT_MAX)
MF_HD bool mf_isfinite(float v) { return fabsf(v) <= 3.402823466e+38f; }

// max as Numba's builtin: a unless b is larger (so max(NaN, b) = NaN)
MF_HD float mf_maxf(float a, float b) { return b > a ? b : a; }
MF_HD double mf_maxd(double a, double b) { return b > a ? b : a; }

// a · b
MF_HD mf_cf mf_cmul(mf_cf a, mf_cf b) {
    mf_cf o;
    o.re = a.re * b.re - a.im * b.im;
    o.im = a.re * b.im + a.im * b.re;
    return o;
}

// conj(a) · b
MF_HD mf_cf mf_cmulconj(mf_cf a, mf_cf b) {
    mf_cf o;
    o.re = a.re * b.re + a.im * b.im;
    o.im = a.re * b.im - a.im * b.re;
    return o;
}

// Index arithmetic on non-negative values. 64-bit division is emulated on
// the GPU (tens of instructions, more than a memory-bound kernel's budget),
// so operands that fit in 32 bits divide in 32 bits: same quotient.
MF_HD mf_i64 mf_div(mf_i64 a, mf_i64 b) {
    return ((unsigned long long)(a | b) >> 32) == 0 ? (mf_i64)((unsigned)a / (unsigned)b) : a / b;
}
MF_HD mf_i64 mf_mod(mf_i64 a, mf_i64 b) { return a - mf_div(a, b) * b; }

// Packed flag rows (np.packbits' order): column j is bit 7 - (j & 7) of byte j >> 3.
MF_HD unsigned char mf_flag_bit(unsigned char byte, mf_i64 j) {
    return (unsigned char)((byte >> (7 - (j & 7))) & 1);
}
// the byte of the eight (or, at a row's end, cnt < 8) flags f[0..cnt): f != 0 is set
MF_HD unsigned char mf_flag_byte(const unsigned char* f, mf_i64 cnt) {
    unsigned v = 0;
    for (mf_i64 t = 0; t < cnt; ++t) v |= (f[t] != 0 ? 1u : 0u) << (7 - t);
    return (unsigned char)v;
}

// byte b of row i of a plane's flags grown by a square of side 2 r + 1 (r <= 7 px): the rows
// within r of i or-ed, the bits of that column of bytes spread by up to r each way, carrying
// between neighbouring bytes; a row of w px in nb bytes, its bits past w neither grown from
// nor set. hits: the plane's packed rows, row stride sr.
MF_HD unsigned mf_grow_col(const unsigned char* hits, mf_i64 sr, mf_i64 i, mf_i64 b, mf_i64 h,
                           mf_i64 nb, mf_i64 w, int r) {
    if (b < 0 || b >= nb) return 0u;
    unsigned v = 0;
    mf_i64 t0 = i - r < 0 ? 0 : i - r, t1 = i + r + 1 > h ? h : i + r + 1;
    for (mf_i64 t = t0; t < t1; ++t) v |= hits[t * sr + b];
    int tail = (int)(w & 7);
    if (tail && b == nb - 1) v &= (0xFFu << (8 - tail)) & 0xFFu;
    return v;
}
MF_HD unsigned char mf_grow_byte(const unsigned char* hits, mf_i64 sr, mf_i64 i, mf_i64 b,
                                 mf_i64 h, mf_i64 nb, mf_i64 w, int r) {
    unsigned c = mf_grow_col(hits, sr, i, b, h, nb, w, r);
    unsigned prev = mf_grow_col(hits, sr, i, b - 1, h, nb, w, r);
    unsigned nxt = mf_grow_col(hits, sr, i, b + 1, h, nb, w, r);
    unsigned v = c;
    for (int s = 1; s <= r; ++s) {
        v |= ((c >> s) | (prev << (8 - s))) & 0xFFu;  // towards higher columns
        v |= ((c << s) | (nxt >> (8 - s))) & 0xFFu;   // towards lower columns
    }
    int tail = (int)(w & 7);
    if (tail && b == nb - 1) v &= (0xFFu << (8 - tail)) & 0xFFu;
    return (unsigned char)v;
}

// Python's (a % m) for m > 0 (non-negative result)
MF_HD mf_i64 mf_pymod(mf_i64 a, mf_i64 m) {
    mf_i64 r = a % m;
    return r < 0 ? r + m : r;
}

// Variance model V of a pixel: 0 constant (1), 1 Poisson max(ŷ, floor), 2 map.
enum { MF_V_CONST = 0, MF_V_POISSON = 1, MF_V_MAP = 2 };

// Per-plane constants of the weights, from σ and δ in double as the CPU does:
// inv = 1/σ², ds = δσ (both rounded to float once).
MF_HD void mf_plane_params(double sigma, double delta, float* inv, float* ds) {
    *inv = (float)(1.0 / (sigma * sigma));
    *ds = (float)(delta * sigma);
}

// Robust weight of one native pixel: w = ψ(z)/z · m / σ², z = (y - ŷ)/σ,
// Huber ψ(z)/z = 1 for |z| <= δ, δ/|z| beyond (as δσ√V / |y - ŷ|), bounded
// below by `prot`; w = 0 where y is not finite. Writes a0 = w·y, a1 = w·ŷ.
MF_HD void mf_weight(float v, float e, float inv, float ds, int vmode, float floor,
                     float varv, bool huber, bool has_prot, float prot, bool has_mask,
                     float m, float* a0, float* a1) {
    *a0 = 0.0f;
    *a1 = 0.0f;
    if (!mf_isfinite(v)) return;
    float wt = inv;
    float thr = ds;
    if (vmode != MF_V_CONST) {
        float ve = vmode == MF_V_POISSON ? mf_maxf(e, floor) : varv;
        wt = inv / ve;
        thr = ds * sqrtf(ve);
    }
    if (huber) {
        float a = fabsf(v - e);
        if (a > thr) {
            float f = thr / a;
            if (has_prot && prot > f) f = prot;
            wt = wt * f;
        }
    }
    if (has_mask) wt = wt * m;
    *a0 = wt * v;
    *a1 = wt * e;
}

// Residual sample for the MAD scale: z0 = (y - ŷ)/√V, q = ŷ/V (double, as
// the CPU kernel); false (no sample) where y is not finite.
MF_HD bool mf_residual(float v, float e, int vmode, double floor, float varv, double* z,
                       double* q) {
    if (!mf_isfinite(v)) return false;
    double vv = 1.0;
    if (vmode == MF_V_POISSON) vv = mf_maxd((double)e, floor);
    else if (vmode == MF_V_MAP) vv = (double)varv;
    *z = (double)(v - e) / sqrt(vv);
    *q = (double)e / vv;
    return true;
}

// Multiplicative update of one pixel above the sky floor b (0 without one):
// u = clip(num/den, 1/κ, κ) (1 where den <= den_floor: no data), s = x - b,
// x' = b + (1-α) s + α s u. Returns x' in double (the early-stop samples use
// it before rounding), *u the factor.
MF_HD double mf_update(float x, float num, float den, double kappa, double alpha,
                       double den_floor, double b, double* u) {
    double uu = 1.0;
    if ((double)den > den_floor) {
        uu = (double)(num / den);
        double lo = 1.0 / kappa;
        if (uu < lo) uu = lo;
        else if (uu > kappa) uu = kappa;
    }
    *u = uu;
    double s = (double)x - b;
    return b + (1.0 - alpha) * s + alpha * s * uu;
}

// Consensus rejection ---------------------------------------------------------
// z² = (y - ŷ)²/(σ² V unit²), the standardised residual in units of the real
// scatter, against the limit L² = zt² · max(1, m²) that the frames' consensus
// of the last pass (cons[0] = m²) sets; a plane's own outlier of the last
// pass nearby (its `near` flag, bit 0) lowers its limit to lo² L².

enum { MF_C_NAN = 0, MF_C_KEPT = 1, MF_C_REJECTED = 2 };  // a pixel's state

// The limit L² of one pixel from its consensus m² (zt² alone without a
// consensus: the caller skips this; a NaN m² gives zt², as on the CPU).
MF_HD float mf_consensus_limit(float zt2, float m2) {
    return m2 > 1.0f ? zt2 * m2 : zt2;
}

// Weight of one native pixel with consensus rejection: w = ψ(z)/z · m / σ²
// as mf_weight (no `protect`), but 0 where z² > lim2, or z² > lo2 · lim2
// where `near` (the plane's own outlier nearby); lim2 · neg2 where y < ŷ. Writes a0 = w·y, a1 = w·ŷ
// and *z2, *hit = z² > lim2 (all 0 where y is not finite: NaN and ±Inf are
// no data, not outliers), and returns the pixel's state. In the CPU kernel's
// float32 order.
MF_HD int mf_consensus_weight(float v, float e, float inv, float ds, float u2, int vmode,
                              float floor, float varv, bool huber, float lim2, float lo2,
                              bool near, bool has_mask, float m, float* a0, float* a1,
                              float* z2, bool* hit, float neg2 = 1.0f) {
    float wt = inv;
    float ve = 1.0f;
    if (vmode != MF_V_CONST) {
        ve = vmode == MF_V_POISSON ? mf_maxf(e, floor) : varv;
        wt = inv / ve;
    }
    float a = v - e;
    float zz = a * a * wt * u2;  // wt = 1/(σ² V) here
    if (a < 0.0f) lim2 = lim2 * neg2;  // below the model: neg times the limit
    *hit = false;  // only a finite pixel is an outlier (NaN and ±Inf are no data)
    *a0 = 0.0f;
    *a1 = 0.0f;
    *z2 = 0.0f;
    if (!mf_isfinite(v)) return MF_C_NAN;
    *hit = zz > lim2;
    float f = 1.0f;
    if (huber) {
        float thr = ds * sqrtf(ve);
        if (fabsf(a) > thr) f = thr / fabsf(a);
    }
    int state = MF_C_KEPT;
    if (*hit || (near && zz > lo2 * lim2)) {
        f = 0.0f;
        state = MF_C_REJECTED;
    }
    wt = wt * f;
    if (has_mask) wt = wt * m;
    *a0 = wt * v;
    *a1 = wt * e;
    *z2 = zz;
    return state;
}

// The sharpness test of a kept pixel with z² > zt² above the model (the
// consensus kernel's candidates, CPU: _sharp_row): rejected where the
// residual a stands out of its cnt neighbours' residual sum nb (the 8 around
// it that lie in the window and have data) by d = a − nb/cnt, d > 0 and
// d²·wt·unit⁻² > zt² · max(1, sharp2 · m²). A model error is smooth over the
// PSF, a cosmic ray is not. Fewer than MF_SHARP_MIN_NB neighbours, or m² NaN:
// kept. In the CPU kernel's float32 order.
#define MF_SHARP_MIN_NB 3
MF_HD bool mf_sharp_reject(float a, float nb, int cnt, float wt, float u2, float zt2,
                           float sharp2, float m2) {
    if (cnt < MF_SHARP_MIN_NB) return false;
    float d = a - nb / (float)cnt;
    float s2 = d * d * wt * u2;
    float ms = sharp2 * m2;
    float lim = zt2 * (ms > 1.0f ? ms : 1.0f);
    return d > 0.0f && s2 > lim;
}

// One frame's share of a pixel's statistics for the next pass: Σz² over the
// frames with data, the count of frames without, and the largest and second
// largest z² with a frame without data as z² = 0 (so it too goes through the
// max step; ties count twice). In the CPU kernel's float32 order and selects.
MF_HD void mf_consensus_stat(int state, float z2, float* sum, float* top, float* second,
                             float* gaps) {
    float zz = state == MF_C_NAN ? 0.0f : z2;
    float t = *top;
    *top = zz > t ? zz : t;
    float lo = zz > t ? t : zz;  // the smaller of the two: the new second largest?
    *second = lo > *second ? lo : *second;
    if (state == MF_C_NAN) {
        *gaps += 1.0f;
        return;
    }
    *sum += z2;
}

// The consensus level m² of a pixel for the next pass, from its statistics
// (Σz², largest, frames without data, second largest over n_frames frames):
// the mean z² with the largest left out, and the second largest too where it
// stands zt2 times above the rest and trim2 frames have data; big under
// min_frames frames. mfnumba.consensus._maps' float32 steps and selects
// (a NaN sum stays NaN).
MF_HD float mf_consensus_level(float sr, float tr, float gr, float t2, float n_frames,
                               float min_frames, float trim2, float zt2, float big) {
    float n = n_frames - gr;
    float m2 = sr - tr;
    m2 = m2 < 0.0f ? 0.0f : m2;
    float d = n - 1.0f;
    m2 = m2 / (d < 1.0f ? 1.0f : d);
    float m2b = sr - tr - t2;
    m2b = m2b < 0.0f ? 0.0f : m2b;
    float d2 = n - 1.0f - 1.0f;
    m2b = m2b / (d2 < 1.0f ? 1.0f : d2);
    bool second = (n >= trim2) && (t2 > (m2b < 1.0f ? 1.0f : m2b) * zt2);
    m2 = second ? m2b : m2;
    return n < min_frames ? big : m2;
}

// ca[key] += a, cb[key] += b for each live caller. On the GPU every lane of
// the warp calls it together (MF_FOR_EACH_WARP): lanes sharing a key are
// counted with ballots, then their lowest lane adds with one integer atomic
// per key, so the totals are exact whatever the order.
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
inline void mf_count2(unsigned long long* ca, unsigned long long* cb, mf_i64 key, bool live,
                      bool a, bool b) {
    if (!live) return;
    ca[key] += a ? 1u : 0u;
    cb[key] += b ? 1u : 0u;
}
#else
__device__ inline void mf_count2(unsigned long long* ca, unsigned long long* cb, mf_i64 key,
                                 bool live, bool a, bool b) {
    const unsigned all = 0xffffffffu;
    unsigned todo = __ballot_sync(all, live);
    unsigned ma = __ballot_sync(all, live && a), mb = __ballot_sync(all, live && b);
    int lane = (int)(threadIdx.x & 31u);
    while (todo) {  // the same value in every lane: a uniform loop
        int lead = __ffs(todo) - 1;
        mf_i64 kl = __shfl_sync(all, key, lead);
        unsigned grp = __ballot_sync(all, live && key == kl);
        if (lane == lead) {
            unsigned na = __popc(ma & grp), nb = __popc(mb & grp);
            if (na) atomicAdd(ca + kl, (unsigned long long)na);
            if (nb) atomicAdd(cb + kl, (unsigned long long)nb);
        }
        todo &= ~grp;
    }
}
#endif
