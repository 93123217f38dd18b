// Where the staged decode kernel (decode_staged.cuh) puts the 16-byte pieces of a 16-key K or V
// tile in shared memory, for host and device code (tests/kvcache/decode_choice_test.cpp checks
// on the CPU that the copies and the fragment reads are bank-conflict-free and that the copies'
// destinations are what the reads expect).
//
// A key row is P 16-byte pieces (P = 4, 8, 16, 32: 64- to 512-byte rows); piece `piece` of key
// `key` lies at key * 16 P + ((piece ^ piece_swizzle<P>(key)) << 4). A warp's 16-byte
// shared-memory accesses go in 4 phases of 8 lanes, conflict-free when the 8 pieces of a phase
// lie in distinct 16-byte bank groups (byte address / 16 mod 8). With rows of 128 or 256 bytes
// the group is (swizzled piece) mod 8; b0-b2 below are its bits, k0-k2 the key's. The fragment
// maps (MmaTileFrags, decode_mma_tile.cuh), lane (r, c) = (lane / 4, lane % 4):
//   K reads, pieces 4 u + c of key 8 h + r: a phase is r = 2 j, 2 j + 1 (keys differing in k0)
//     x c = 0..3 (b0, b1 of the piece): b2 must take k0: swizzle bit 2 = k0 ^ k2 (every P).
//   V reads, key 2 c + e0 + 8 e1: a phase is c = 0..3 (keys differing in k1, k2) x r = 2 j,
//     2 j + 1. P = 8: piece r, the pair differs in b0, so k1 and k2 go to b1 and b2; P = 16:
//     pieces 2 r + i, one load per i, the pair differs in b1, so k1 goes to b0 (k2 to b2);
//     P = 32 (16-bit at D = 256): pieces 4 r + i, the pair differs in b2, so k1 goes to b0 and
//     k2 to b1 (b2 keeps k0 ^ k2 for the K reads, whose phases fix k1 and k2).
//   Copies: 8 consecutive lanes copy pieces 8 m .. 8 m + 7 of one key: any XOR keeps them apart.
// P = 4 (64-byte rows, 8-bit at D = 64): two keys per 128 bytes, the formula of P = 8.
#pragma once
#include <cstdint>
#include "longctx/config.h"

namespace longctx {
namespace kvcache {

// XOR swizzle of the pieces of key row `key`: a permutation of [0, P), linear in the key's bits
// (swizzle(a | b) = swizzle(a) ^ swizzle(b) for keys a, b with disjoint bits).
template <int P>
LONGCTX_HOST_DEVICE constexpr int piece_swizzle(int key) {
  static_assert(P == 4 || P == 8 || P == 16 || P == 32,
                "staged decode: 64-, 128-, 256- or 512-byte key rows");
  if constexpr (P == 32) {
    return ((key >> 1) & 1) | (((key >> 2) & 1) << 1) | ((((key >> 2) ^ key) & 1) << 2);
  } else if constexpr (P == 16) {
    return ((key >> 1) & 1) | ((((key >> 2) ^ key) & 1) << 2);
  } else {
    return ((((key >> 1) & 3) << 1) ^ ((key & 1) << 2)) & (P - 1);
  }
}

// Byte offset of piece `piece` of key `key` in a K or V tile.
template <int P>
LONGCTX_HOST_DEVICE constexpr uint32_t staged_piece_offset(int key, int piece) {
  return uint32_t(key * 16 * P + ((piece ^ piece_swizzle<P>(key)) << 4));
}

// The copies of a tile: lane copies pieces lane + 32 u (u < 16 P / 32), i.e. piece lane % P of
// key lane / P + (32 / P) u. Since lane / P and (32 / P) u have disjoint bits and the swizzle is
// linear, copy u's destination is the lane's dbase = staged_piece_offset(lane / P, lane % P)
// XOR a constant plus a constant: one register per lane instead of one per copy.
template <int P>
LONGCTX_HOST_DEVICE constexpr uint32_t staged_copy_dest(uint32_t dbase, int u) {
  constexpr int kKeyStep = 32 / P;
  return (dbase ^ uint32_t(piece_swizzle<P>(kKeyStep * u) << 4)) +
         uint32_t(kKeyStep * u * 16 * P);
}

}  // namespace kvcache
}  // namespace longctx
