// The planes' own-outlier flags, packed eight pixels to a byte along the rows
// (mf_flag_bit), to and from one uint8 per pixel, and grown into the next pass's
// "near" flags where the pass left them (mf_grow_byte): a pass over one tile on the
// device keeps them there, and only the grown flags come back, packed.
#include "mfnumba_math.cuh"

// one element per pixel of out (P, h, w): its bit of the packed row
extern "C" MF_GLOBAL void mf_unpack_flags(
    mf_i64 n, const unsigned char* packed, mf_i64 p_sp, mf_i64 p_sr,
    unsigned char* out, mf_i64 o_sp, mf_i64 o_sr, mf_i64 h, mf_i64 w)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, w), j = idx - row * w;
        mf_i64 k = mf_div(row, h), i = row - k * h;
        out[k * o_sp + i * o_sr + j] = mf_flag_bit(packed[k * p_sp + i * p_sr + (j >> 3)], j);
    }
}

// one element per byte of the packed rows (P, h, nb = ceil(w / 8)): its eight pixels'
// flags, the bits past w zero
extern "C" MF_GLOBAL void mf_pack_flags(
    mf_i64 n, const unsigned char* flags, mf_i64 f_sp, mf_i64 f_sr,
    unsigned char* packed, mf_i64 p_sp, mf_i64 p_sr, mf_i64 h, mf_i64 w, mf_i64 nb)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, nb), b = idx - row * nb;
        mf_i64 k = mf_div(row, h), i = row - k * h;
        mf_i64 j0 = b << 3, cnt = w - j0 < 8 ? w - j0 : 8;
        packed[k * p_sp + i * p_sr + b] = mf_flag_byte(flags + k * f_sp + i * f_sr + j0, cnt);
    }
}

// one element per byte of near (P, h, nb): hits (P, h, nb) grown by r px (mf_grow_byte)
extern "C" MF_GLOBAL void mf_grow_flags(
    mf_i64 n, const unsigned char* hits, mf_i64 h_sp, mf_i64 h_sr,
    unsigned char* near, mf_i64 n_sp, mf_i64 n_sr, mf_i64 h, mf_i64 w, mf_i64 nb, mf_i64 r)
{
    MF_FOR_EACH(idx, n) {
        mf_i64 row = mf_div(idx, nb), b = idx - row * nb;
        mf_i64 k = mf_div(row, h), i = row - k * h;
        near[k * n_sp + i * n_sr + b] = mf_grow_byte(hits + k * h_sp, h_sr, i, b, h, nb, w, (int)r);
    }
}
