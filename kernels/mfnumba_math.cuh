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
#else
#  define MF_GLOBAL __global__
#  define MF_FOR_EACH(i, n)                                                     \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;       \
         i < (n); i += (long long)blockDim.x * gridDim.x)
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

// Multiplicative update of one pixel: u = clip(num/den, 1/κ, κ) (1 where
// den <= floor: no data), x' = (1-α) x + α x u. Returns x' in double (the
// early-stop samples use it before rounding), *u the factor.
MF_HD double mf_update(float x, float num, float den, double kappa, double alpha,
                       double den_floor, double* u) {
    double uu = 1.0;
    if ((double)den > den_floor) {
        uu = (double)(num / den);
        double lo = 1.0 / kappa;
        if (uu < lo) uu = lo;
        else if (uu > kappa) uu = kappa;
    }
    *u = uu;
    double old = (double)x;
    return (1.0 - alpha) * old + alpha * old * uu;
}
