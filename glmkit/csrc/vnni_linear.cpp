// Weight-only int4 / int8 linears on AVX-512 VNNI CPUs: the decode step (one or a few input rows) at the
// memory bandwidth, and prompts (many rows) as integer matrix products.
//
// Decoding reads every weight once per token, so it should run at the memory bandwidth; torch's int4 CPU
// kernel is compute-bound here (it converts every weight to bfloat16). These kernels keep the arithmetic in
// integers instead: each input row is quantized to int8 in blocks of 32 (dx = max|x| / 127, xq = round(x / dx)),
// then weights and xq meet in `vpdpbusd` (u8 x s8, four products summed into an int32 lane), and the float
// scales are applied once per 32 inputs (dx) and once per weight group (s, z).
//
// int4, read in the checkpoint layout (glmkit/quant/layout.py), no copy: weight (B, K, 32) uint8, byte
// [b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4, and scales_and_zeros (G, 64B, 2) bfloat16. Four inputs
// of a block are 128 contiguous bytes; one `vpermt2b` gathers them into (row j: k, k+1, k+2, k+3) dwords, so
// a register holds 16 rows x 4 inputs: the lane layout `vpdpbusd` sums, against xq[k..k+3] broadcast. q is
// 0..15 (unsigned), so with W = (q - 8) s + z per group:
//     W . x = sum_groups  s * sum(q * x) + (z - 8 s) * sum(x),    x ~ dx * xq per block of 32.
// int8, row-major weight (N, K), scales (N, G) and zeros: `vpdpbusd` wants one unsigned operand, so the weight
// is read as q + 128 (xor 0x80) and 128 * sum(x) is taken off again:
//     W . x = sum_groups  s * (sum((q + 128) * x) - 128 sum(x)) + z * sum(x).
// For few rows, a zmm holds 64 inputs of one weight row (two activation blocks: their dx fill lanes 0-7 and
// 8-15 of a multiplier vector); for many rows, tiles of 16 weight rows are unpacked once into the int4 lane
// layout and shared by all inputs (see "many input rows" below). On CPUs with AMX, prompts of 64 rows or more
// skip the int8 rounding of the inputs and multiply bfloat16 inputs by the weight dequantized to bfloat16 on
// the tiles instead (see "AMX" below).
//
// Threads share the output rows (parallel.h): each streams its own contiguous part of the weight, then helps
// with the others'.
// Compiled with -mavx512f/bw/vl/vnni/vbmi; the Python side checks the CPU before loading this library.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "amx.h"
#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // inputs per activation scale
constexpr int64_t ROWS4 = 64;  // output rows per int4 block (layout.BLOCK_N)

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

using glmkit_csrc::load16;
using glmkit_csrc::mask16;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The input rows, quantized: q (M, Kp) int8 with Kp = K rounded up to 64 (zeros past K), and per block of 32
// the scale dx and dx * sum(q) (the block's sum of x, as the kernels see x).
struct Activations {
  int64_t M, K, Kp, blocks;
  int64_t Mp;  // rows held: M rounded up for the tiled kernels, the extra rows all zero
  std::vector<int8_t> q;
  std::vector<float> dx, xsum;
  std::vector<float> lanes;  // (M, Kp / 64, 16): dx of inputs 0-31 of each 64 in lanes 0-7, of 32-63 in 8-15

  const int8_t* row(int64_t m) const { return q.data() + m * Kp; }
};

template <typename T>
void quantize_row(const T* x, int64_t K, int64_t Kp, int8_t* q, float* dx, float* xsum) {
  for (int64_t b = 0; b < Kp / BLOCK; ++b) {
    const int64_t k = b * BLOCK;
    __m512 v0 = load16(x + k, mask16(K - k)), v1 = load16(x + k + 16, mask16(K - k - 16));
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));  // round half to even
    __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k + 16), _mm512_cvtsepi32_epi8(i1));
    dx[b] = amax / 127.0f;
    xsum[b] = dx[b] * float(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
  }
}

Activations quantize_activations(const at::Tensor& x, bool lanes, int64_t row_multiple = 1) {
  TORCH_CHECK(x.dim() == 2, "expected input rows (M, K), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "inputs must be float32 or bfloat16, got ", x.scalar_type());
  at::Tensor xc = x.contiguous();
  Activations a;
  a.M = x.size(0), a.K = x.size(1), a.Kp = round_up(a.K, 64), a.blocks = a.Kp / BLOCK;
  a.Mp = round_up(a.M, row_multiple);
  a.q.resize(a.Mp * a.Kp);
  a.dx.resize(a.Mp * a.blocks);
  a.xsum.resize(a.Mp * a.blocks);
  if (lanes) a.lanes.resize(a.M * a.Kp / 4);
  at::parallel_for(0, a.M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int8_t* q = a.q.data() + m * a.Kp;
      float* dx = a.dx.data() + m * a.blocks;
      float* xs = a.xsum.data() + m * a.blocks;
      if (xc.scalar_type() == at::kFloat)
        quantize_row(xc.data_ptr<float>() + m * a.K, a.K, a.Kp, q, dx, xs);
      else
        quantize_row(xc.data_ptr<c10::BFloat16>() + m * a.K, a.K, a.Kp, q, dx, xs);
      if (lanes)
        for (int64_t b = 0; b < a.blocks; ++b)
          for (int l = 0; l < 8; ++l) a.lanes[m * a.Kp / 4 + b * 8 + l] = dx[b];
    }
  });
  return a;
}

// Per activation row and weight group: sum over the group's blocks of dx * sum(q), i.e. sum(x) of the group.
std::vector<float> group_sums(const Activations& a, int64_t groups) {
  const int64_t per_group = a.K / groups / BLOCK;  // the int4 and grouped int8 callers have K = groups * size
  std::vector<float> out(a.Mp * groups, 0.0f);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t b = 0; b < a.blocks; ++b) {
      const int64_t g = groups == 1 ? 0 : b / per_group;
      if (g < groups) out[m * groups + g] += a.xsum[m * a.blocks + b];
    }
  return out;
}

// Results go straight into the output tensor, float32 or bfloat16 (rounded to nearest even, as torch does).
inline void store(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void store(const float* src, c10::BFloat16* dst, int64_t n) { glmkit_csrc::store_bf16(src, dst, n); }

inline void store(float v, float* dst) { *dst = v; }
inline void store(float v, c10::BFloat16* dst) { *dst = c10::BFloat16(v); }

// ---- many input rows: tiles of 16 weight rows, unpacked once ------------------------------------------------
//
// For a prompt, each weight is used by every input row, so the unpacking is worth doing once: a tile of 16
// output rows is laid out as one zmm per 4 inputs (row r's 4 weights, as u8, in dword r), with per group the
// rows' scales S and offset terms C (W . x = S * sum(u * x) + C * sum(x); u = q for int4 with C = z - 8 s,
// u = q + 128 for int8 with C = z - 128 s). TILE_M input rows then share each weight load.

constexpr int64_t TILE_M = 8;  // input rows per pass (registers: 3 x 8 accumulators)
constexpr int64_t TILED_MIN_ROWS = 8;  // fewer rows stream the weight (int4_block, int8_rows); measured: even at 8
constexpr int64_t TILED_CHUNK = 4;  // blocks (int4) or tiles (int8) a thread takes at once: one set of tiles each

struct Tile {
  std::vector<__m512i> w;  // (Kp / 4): 16 rows x 4 inputs each
  std::vector<float> s, c, z;  // (groups, 16): scales, offset terms, zero points
  explicit Tile(int64_t Kp, int64_t groups) : w(Kp / 4), s(groups * 16), c(groups * 16), z(groups * 16) {}
};

// out (TILE_M, 16) float32: the tile's 16 outputs for input rows m0 .. m0 + TILE_M.
void tile_product(const Tile& t, int64_t groups, int64_t blocks_per_group, const Activations& a, int64_t m0,
                  const float* gsum, float* out) {
  __m512 total[TILE_M];
  for (int m = 0; m < TILE_M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc_f[TILE_M];
    for (int m = 0; m < TILE_M; ++m) acc_f[m] = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      __m512i acc[TILE_M];
      for (int m = 0; m < TILE_M; ++m) acc[m] = _mm512_setzero_si512();
      for (int st = 0; st < 8; ++st) {
        const __m512i w = _mm512_load_si512(&t.w[b * 8 + st]);
        for (int m = 0; m < TILE_M; ++m) {
          int32_t four;
          std::memcpy(&four, a.row(m0 + m) + b * BLOCK + 4 * st, 4);
          acc[m] = _mm512_dpbusd_epi32(acc[m], w, _mm512_set1_epi32(four));
        }
      }
      for (int m = 0; m < TILE_M; ++m)
        acc_f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(a.dx[(m0 + m) * a.blocks + b]), acc_f[m]);
    }
    const __m512 sv = _mm512_loadu_ps(&t.s[g * 16]), cv = _mm512_loadu_ps(&t.c[g * 16]);
    for (int m = 0; m < TILE_M; ++m)
      total[m] = _mm512_fmadd_ps(acc_f[m], sv, _mm512_fmadd_ps(cv, _mm512_set1_ps(gsum[(m0 + m) * groups + g]), total[m]));
  }
  for (int m = 0; m < TILE_M; ++m) _mm512_storeu_ps(out + m * 16, total[m]);
}

// Every input row through one tile; its outputs are columns n0 .. n0 + rows of y.
template <typename Out>
void tile_all_inputs(const Tile& t, int64_t groups, int64_t blocks_per_group, const Activations& a, const float* gsum,
                     Out* y, int64_t N, int64_t n0, int64_t rows) {
  alignas(64) float out[TILE_M * 16];
  for (int64_t m0 = 0; m0 < a.M; m0 += TILE_M) {
    tile_product(t, groups, blocks_per_group, a, m0, gsum, out);
    for (int64_t m = 0; m < std::min(TILE_M, a.M - m0); ++m) store(out + m * 16, y + (m0 + m) * N + n0, rows);
  }
}

// How far ahead the decode kernels ask for their weight bytes. A thread reads one sequential stream (int8:
// four rows side by side), which the hardware prefetcher alone keeps too few lines ahead of. So each load is
// preceded by two requests: a few KB ahead into L1 (the next loads) and tens of KB ahead into L2 (enough
// requests in flight to cover the memory latency). Measured with 2 threads on a decode step's products at
// ChatGLM3-6B shapes, against a streaming `sum` of as many bytes in the same run: int4 87% with the L1
// request alone (4 KB), 100% with both; int8 90% with neither, 105% with both.
constexpr int64_t INT4_NEAR_BYTES = 4096, INT4_FAR_BYTES = 32768;
constexpr int64_t INT8_NEAR_BYTES = 2048, INT8_FAR_BYTES = 16384;

inline void prefetch_ahead(const void* p, int64_t near, int64_t far) {
  const char* c = static_cast<const char*>(p);
  _mm_prefetch(c + near, _MM_HINT_T0);
  _mm_prefetch(c + far, _MM_HINT_T2);
}

// ---- int4 --------------------------------------------------------------------------------------------------

// vpermt2b indices: dword j of the result is (k0, k1, k2, k3) of row j (idx1) or row 16 + j (idx2), from the
// 128 bytes [k0: rows 0-31][k1][k2][k3] of four consecutive inputs of a block.
inline void int4_gather_indices(__m512i& idx1, __m512i& idx2) {
  alignas(64) uint8_t i1[64], i2[64];
  for (int j = 0; j < 16; ++j)
    for (int t = 0; t < 4; ++t) i1[4 * j + t] = uint8_t(32 * t + j), i2[4 * j + t] = uint8_t(32 * t + 16 + j);
  idx1 = _mm512_load_si512(i1), idx2 = _mm512_load_si512(i2);
}

// A block of 64 rows as four tiles (rows 0-15, 16-31, 32-47, 48-63), with their scales and offset terms.
void int4_tiles(const uint8_t* wb, const uint32_t* sz, int64_t n_pad, int64_t block, int64_t K, int64_t groups,
                Tile* tiles) {
  __m512i idx1, idx2;
  int4_gather_indices(idx1, idx2);
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t st = 0; st < K / 4; ++st) {
    const __m512i lo = _mm512_loadu_si512(wb + st * 128), hi = _mm512_loadu_si512(wb + st * 128 + 64);
    const __m512i z1 = _mm512_permutex2var_epi8(lo, idx1, hi), z2 = _mm512_permutex2var_epi8(lo, idx2, hi);
    _mm512_store_si512(&tiles[0].w[st], _mm512_and_si512(z1, low));
    _mm512_store_si512(&tiles[1].w[st], _mm512_and_si512(z2, low));
    _mm512_store_si512(&tiles[2].w[st], _mm512_and_si512(_mm512_srli_epi16(z1, 4), low));
    _mm512_store_si512(&tiles[3].w[st], _mm512_and_si512(_mm512_srli_epi16(z2, 4), low));
  }
  const __m512i high_half = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int64_t g = 0; g < groups; ++g)
    for (int r = 0; r < 4; ++r) {
      const __m512i v = _mm512_loadu_si512(sz + g * n_pad + block * ROWS4 + 16 * r);
      const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 zv = _mm512_castsi512_ps(_mm512_and_si512(v, high_half));
      _mm512_storeu_ps(&tiles[r].s[g * 16], sv);
      _mm512_storeu_ps(&tiles[r].c[g * 16], _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sv, zv));
      _mm512_storeu_ps(&tiles[r].z[g * 16], zv);
    }
}

// One block of 64 output rows for MR input rows: out (MR, 64) float32.
template <int MR>
void int4_block(const uint8_t* wb, const uint32_t* sz, int64_t n_pad, int64_t block, int64_t groups,
                int64_t blocks_per_group, const Activations& a, int64_t m0, const float* gsum, float* out) {
  __m512i idx1, idx2;
  int4_gather_indices(idx1, idx2);
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i high_half = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 64; ++r) out[m * 64 + r] = 0.0f;

  for (int64_t g = 0; g < groups; ++g) {
    if (g + 2 < groups) {  // the scales of a later group: a strided read the hardware would not foresee
      const char* next = reinterpret_cast<const char*>(sz + (g + 2) * n_pad + block * ROWS4);
      for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
    }
    __m512 acc_f[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < 4; ++r) acc_f[m][r] = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      const uint8_t* p = wb + b * BLOCK * 32;  // 32 inputs x 32 bytes
      __m512i acc[MR][4];
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_si512();
      for (int s = 0; s < 8; ++s) {
        prefetch_ahead(p + s * 128, INT4_NEAR_BYTES, INT4_FAR_BYTES);
        prefetch_ahead(p + s * 128 + 64, INT4_NEAR_BYTES, INT4_FAR_BYTES);
        __m512i lo = _mm512_loadu_si512(p + s * 128), hi = _mm512_loadu_si512(p + s * 128 + 64);
        __m512i z1 = _mm512_permutex2var_epi8(lo, idx1, hi), z2 = _mm512_permutex2var_epi8(lo, idx2, hi);
        __m512i w0 = _mm512_and_si512(z1, low);                          // rows 0-15
        __m512i w1 = _mm512_and_si512(z2, low);                          // rows 16-31
        __m512i w2 = _mm512_and_si512(_mm512_srli_epi16(z1, 4), low);   // rows 32-47
        __m512i w3 = _mm512_and_si512(_mm512_srli_epi16(z2, 4), low);   // rows 48-63
        for (int m = 0; m < MR; ++m) {
          int32_t four;
          std::memcpy(&four, a.row(m0 + m) + b * BLOCK + 4 * s, 4);
          const __m512i xb = _mm512_set1_epi32(four);
          acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xb);
          acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xb);
          acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], w2, xb);
          acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], w3, xb);
        }
      }
      for (int m = 0; m < MR; ++m) {
        const __m512 d = _mm512_set1_ps(a.dx[(m0 + m) * a.blocks + b]);
        for (int r = 0; r < 4; ++r) acc_f[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][r]), d, acc_f[m][r]);
      }
    }
    const uint32_t* pairs = sz + g * n_pad + block * ROWS4;  // (scale, zero) of 64 rows
    for (int r = 0; r < 4; ++r) {
      const __m512i v = _mm512_loadu_si512(pairs + 16 * r);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(v, high_half));
      const __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);  // z - 8 s
      for (int m = 0; m < MR; ++m) {
        float* o = out + m * 64 + 16 * r;
        __m512 y = _mm512_fmadd_ps(c, _mm512_set1_ps(gsum[(m0 + m) * groups + g]), _mm512_loadu_ps(o));
        _mm512_storeu_ps(o, _mm512_fmadd_ps(acc_f[m][r], s, y));
      }
    }
  }
}

// ---- AMX: prompts on tile registers ---------------------------------------------------------------------------
//
// On CPUs with AMX (amx.h), prompts multiply on tiles: `tdpbf16ps` adds the products of 16 input rows x 32
// inputs by 32 inputs x 16 outputs, all bfloat16, into 16 x 16 float32 sums that stay in the tile along the
// row. So a tile of 16 weight rows is dequantized into bfloat16 (W = w s + z per group, rounded once, as a
// bfloat16 model holds its weights), and the inputs are x rounded to bfloat16 (as a bfloat16 model's activations
// are): a bfloat16 product with float32 sums, instead of the int8 rounding of the inputs of the paths above.
// (Int8 tiles that keep that rounding gain only 1.1-1.35x: each block of 32 inputs has its own scale, so every
// block's sums must leave the tile to be scaled.) Each tile pass takes two weight tiles (32 outputs) and two
// input tiles (32 rows), each operand load serving two products. A row's results depend on that row alone.
// Measured in benchmarks/RESULTS.md.

constexpr int64_t AMX_MIN_ROWS = 64;  // fewer rows: dequantizing the weight costs about what the tiles gain
constexpr int64_t AMX_M = 16;         // input rows per tile
constexpr int64_t AMX_K = 32;         // inputs per tile product

bool takes_amx(const at::Tensor& x, bool amx) {
  return amx && x.size(0) >= AMX_MIN_ROWS && glmkit_csrc::amx_bf16_usable();
}

// The inputs as the tiles read them: (Mp, Kp) bfloat16, zero past M rows and K inputs, rows `ld` apart: 64
// bytes more than Kp, so that a tile's 16 rows do not all fall in the same cache sets (Kp is often a power of 2).
struct AmxInputs {
  int64_t M, Mp, Kp, ld;
  std::vector<c10::BFloat16> x;
};

AmxInputs amx_inputs(const at::Tensor& x) {
  AmxInputs in;
  const int64_t K = x.size(1);
  in.M = x.size(0), in.Mp = round_up(in.M, AMX_M), in.Kp = round_up(K, AMX_K), in.ld = in.Kp + AMX_K;
  const at::Tensor xb = x.to(at::kBFloat16).contiguous();
  in.x.resize(in.Mp * in.ld);  // zeros
  for (int64_t m = 0; m < in.M; ++m)
    std::memcpy(in.x.data() + m * in.ld, xb.data_ptr<c10::BFloat16>() + m * K, K * sizeof(c10::BFloat16));
  return in;
}

#if GLMKIT_AMX
// 16 float32 pairs (even[n], odd[n]) as bfloat16 pairs, rounded to nearest even.
GLMKIT_AMX_TARGET inline __m512i bf16_pair_row(__m512 even, __m512 odd) {
  // words 0, 16, 1, 17, ...: the two inputs of a pair side by side, output by output
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i both = _mm512_castps_si512((__m512)_mm512_cvtne2ps_pbh(odd, even));  // even's 16, then odd's
  return _mm512_permutexvar_epi16(interleave, both);
}

// Inputs k0 .. k0 + count of a tile's weights, dequantized as `tdpbf16ps` reads them: (count / 2, 16) dwords,
// dword (p, n) the bfloat16 pair (W[n][k0 + 2p], W[n][k0 + 2p + 1]), W = (u - offset) s + z per group of `group`
// inputs (u: the tile's unsigned bytes, offset 8 for int4, 128 for int8), rounded to nearest even.
GLMKIT_AMX_TARGET void bf16_weights(const Tile& t, int offset, int64_t group, int64_t k0, int64_t count,
                                    uint32_t* pairs) {
  const __m512i byte = _mm512_set1_epi32(0xFF), off = _mm512_set1_epi32(offset);
  auto weights = [&](__m512i v, int shift, __m512 s, __m512 z) {  // byte `shift / 8` of each dword, dequantized
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(v, shift), byte), off)),
                           s, z);
  };
  for (int64_t k = k0; k < k0 + count;) {  // k0 and count are multiples of 32, and so is `group`
    const int64_t g = k / group, end = std::min(k0 + count, (g + 1) * group);
    const __m512 s = _mm512_loadu_ps(&t.s[g * 16]), z = _mm512_loadu_ps(&t.z[g * 16]);
    for (; k < end; k += 4) {  // inputs k .. k + 3: two rows of pairs
      const __m512i v = _mm512_load_si512(&t.w[k / 4]);
      uint32_t* out = pairs + (k - k0) / 2 * 16;
      _mm512_storeu_si512(out, bf16_pair_row(weights(v, 0, s, z), weights(v, 8, s, z)));
      _mm512_storeu_si512(out + 16, bf16_pair_row(weights(v, 16, s, z), weights(v, 24, s, z)));
    }
  }
}
#endif

constexpr int AMX_TILES = 8;      // weight tiles (of 16 outputs) a thread takes at once: 128 outputs
constexpr int64_t AMX_KB = 512;   // inputs per pass: the inputs' slice (rows x 1 KB) stays in L2 for the 8 tiles

#if GLMKIT_AMX
// Tiles: 0-3 the sums (input tile i, weight tile j in tile 2 i + j), 4-5 the inputs, 6-7 the weights.
GLMKIT_AMX_TARGET void amx_configure() {
  glmkit_csrc::TileConfig config;
  for (int t = 0; t < 8; ++t) config.tile(t, 16, 64);
  asm volatile("" : : "r"(&config) : "memory");  // GCC's intrinsic declares it reads 8 bytes: keep every store
  _tile_loadconfig(&config);
}

GLMKIT_AMX_TARGET void amx_release() { _tile_release(); }

// Adds the products of MI input tiles (x, rows `stride` bytes apart) by two weight tiles (w0, w1) over
// `steps` x 32 inputs to the float32 sums s0 (weight tile 0) and s1 (weight tile 1), 16 rows x 16 outputs per
// input tile, rows 64 bytes apart (zero first when `fresh`).
template <int MI>
GLMKIT_AMX_TARGET void amx_sums(const c10::BFloat16* x, int64_t stride, const uint32_t* w0, const uint32_t* w1,
                                int64_t steps, float* s0, float* s1, bool fresh) {
  if (fresh) {
    _tile_zero(0);
    _tile_zero(1);
    if (MI == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, s0, 64);
    _tile_loadd(1, s1, 64);
    if (MI == 2) {
      _tile_loadd(2, s0 + 256, 64);
      _tile_loadd(3, s1 + 256, 64);
    }
  }
  for (int64_t i = 0; i < steps; ++i) {  // each load as late as its first use (tiles are not renamed)
    _tile_loadd(4, x + i * AMX_K, stride);
    _tile_loadd(6, w0 + i * AMX_K / 2 * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, w1 + i * AMX_K / 2 * 16, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (MI == 2) {
      _tile_loadd(5, x + AMX_M * stride / 2 + i * AMX_K, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, s0, 64);
  _tile_stored(1, s1, 64);
  if (MI == 2) {
    _tile_stored(2, s0 + 256, 64);
    _tile_stored(3, s1 + 256, 64);
  }
}

// The sums of every input row through `count` (even) weight tiles, for inputs k0 .. k0 + kb: w[t] holds tile
// t's dequantized slice, sums[t] its (Mp, 16) float32 sums.
GLMKIT_AMX_TARGET void amx_slice(const AmxInputs& in, int64_t k0, int64_t kb, const uint32_t* const* w, int count,
                                 float* const* sums) {
  const int64_t stride = in.ld * int64_t(sizeof(c10::BFloat16));
  for (int t = 0; t < count; t += 2)
    for (int64_t m0 = 0; m0 < in.M; m0 += 2 * AMX_M) {
      const c10::BFloat16* x = in.x.data() + m0 * in.ld + k0;
      if (m0 + 2 * AMX_M <= in.Mp)
        amx_sums<2>(x, stride, w[t], w[t + 1], kb / AMX_K, sums[t] + m0 * 16, sums[t + 1] + m0 * 16, k0 == 0);
      else
        amx_sums<1>(x, stride, w[t], w[t + 1], kb / AMX_K, sums[t] + m0 * 16, sums[t + 1] + m0 * 16, k0 == 0);
    }
}
#endif

// y (M, N) through every weight tile: chunk c's AMX_TILES tiles are filled by fill(c, tiles), which returns
// the chunk's first output (tile t holds outputs first + 16 t ..); `offset` is the tiles' byte offset (8 for
// int4, 128 for int8). Chunks are shared between threads; within one, the inputs are taken AMX_KB at a time
// through all its tiles, so that their slice is read from L2 by every tile.
template <typename Out, typename Fill>
void amx_linear(const AmxInputs& in, int64_t groups, int64_t chunks, int offset, Out* y, int64_t N, const Fill& fill) {
#if GLMKIT_AMX
  // A thread's tiles, and each tile's weights and sums 64 bytes past a power of 2 from the previous one's (no
  // cache-set aliasing).
  struct Scratch {
    std::vector<Tile> tiles;
    std::vector<uint32_t> weights;
    std::vector<float> sums;
  };
  const int64_t w_stride = AMX_KB / 2 * 16 + 16, s_stride = in.Mp * 16 + 16;
  glmkit_csrc::ThreadScratch<Scratch> scratch;
  glmkit_csrc::parallel_chunks(chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch& mine = scratch.get([&] {
      return Scratch{std::vector<Tile>(AMX_TILES, Tile(in.Kp, groups)), std::vector<uint32_t>(AMX_TILES * w_stride),
                     std::vector<float>(AMX_TILES * s_stride)};
    });
    std::vector<Tile>& tiles = mine.tiles;
    uint32_t* w[AMX_TILES];
    float* s[AMX_TILES];
    for (int t = 0; t < AMX_TILES; ++t) w[t] = mine.weights.data() + t * w_stride, s[t] = mine.sums.data() + t * s_stride;
    amx_configure();
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = fill(c, tiles.data());
      const int count = int(std::min<int64_t>(AMX_TILES, (N - first + 31) / 32 * 2));  // whole pairs with outputs
      for (int64_t k0 = 0; k0 < in.Kp; k0 += AMX_KB) {
        const int64_t kb = std::min(AMX_KB, in.Kp - k0);
        for (int t = 0; t < count; ++t) bf16_weights(tiles[t], offset, in.Kp / groups, k0, kb, w[t]);
        amx_slice(in, k0, kb, w, count, s);
      }
      for (int t = 0; t < count; ++t) {
        const int64_t n0 = first + 16 * t, rows = std::min<int64_t>(16, N - n0);
        for (int64_t m = 0; m < in.M && rows > 0; ++m) store(s[t] + m * 16, y + m * N + n0, rows);
      }
    }
    amx_release();
  });
#else
  TORCH_CHECK(false, "glmkit was built without AMX support");
#endif
}

// A new (M, N) output of x's dtype, filled by run(its float32 or bfloat16 data).
template <typename Run>
at::Tensor output_rows(const at::Tensor& x, int64_t M, int64_t N, const Run& run) {
  at::Tensor y = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat)
    run(y.data_ptr<float>());
  else
    run(y.data_ptr<c10::BFloat16>());
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales_and_zeros,
                       int64_t group_size, int64_t out_features, bool amx) {
  TORCH_CHECK(x.dim() == 2, "expected input rows (M, K), got ", x.dim(), " dimensions");
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == 32 && weight.scalar_type() == at::kByte,
              "int4 weight must be uint8 (blocks, K, 32)");
  const int64_t blocks = weight.size(0), K = weight.size(1), n_pad = blocks * ROWS4;
  TORCH_CHECK(x.size(1) == K, "input has ", x.size(1), " features, the weight ", K);
  TORCH_CHECK(group_size % BLOCK == 0 && group_size > 0 && K % group_size == 0,
              "int4 group size ", group_size, " must be a multiple of 32 dividing ", K);
  const int64_t groups = K / group_size;
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.dim() == 3 &&
                  scales_and_zeros.size(0) == groups && scales_and_zeros.size(1) == n_pad &&
                  scales_and_zeros.size(2) == 2,
              "scales_and_zeros must be bfloat16 (", groups, ", ", n_pad, ", 2)");
  TORCH_CHECK(out_features > n_pad - ROWS4 && out_features <= n_pad, "out_features ", out_features,
              " does not match ", blocks, " blocks of 64 rows");
  const at::Tensor w = weight.contiguous(), sz = scales_and_zeros.contiguous();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint32_t* szp = reinterpret_cast<const uint32_t*>(sz.data_ptr<c10::BFloat16>());
  if (takes_amx(x, amx)) {
    const AmxInputs in = amx_inputs(x);
    return output_rows(x, in.M, out_features, [&](auto* yp) {
      amx_linear(in, groups, (blocks + 1) / 2, 8, yp, out_features, [&](int64_t c, Tile* tiles) {
        for (int64_t b = 2 * c; b < std::min(blocks, 2 * c + 2); ++b)  // rows 0-15, 16-31, 32-47, 48-63 of each
          int4_tiles(wp + b * K * 32, szp, n_pad, b, K, groups, tiles + 4 * (b - 2 * c));
        return 2 * c * ROWS4;
      });
    });
  }
  const bool tiled = x.size(0) >= TILED_MIN_ROWS;
  const Activations a = quantize_activations(x, false, tiled ? TILE_M : 1);
  const std::vector<float> gsum = group_sums(a, groups);
  const int64_t M = a.M, per_group = group_size / BLOCK;
  return output_rows(x, M, out_features, [&](auto* yp) {
    if (tiled) {
      glmkit_csrc::ThreadScratch<std::vector<Tile>> scratch;
      glmkit_csrc::parallel_chunks(blocks, TILED_CHUNK, [&](int64_t begin, int64_t end) {
        std::vector<Tile>& tiles = scratch.get([&] { return std::vector<Tile>(4, Tile(a.Kp, groups)); });
        for (int64_t b = begin; b < end; ++b) {
          int4_tiles(wp + b * K * 32, szp, n_pad, b, K, groups, tiles.data());
          for (int r = 0; r < 4; ++r) {
            const int64_t n0 = b * ROWS4 + 16 * r, rows = std::min<int64_t>(16, out_features - n0);
            if (rows > 0) tile_all_inputs(tiles[r], groups, per_group, a, gsum.data(), yp, out_features, n0, rows);
          }
        }
      });
      return;
    }
    glmkit_csrc::parallel_chunks(blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float out[2 * 64];
      for (int64_t b = begin; b < end; ++b) {
        const uint8_t* wb = wp + b * K * 32;
        const int64_t rows = std::min<int64_t>(ROWS4, out_features - b * ROWS4);
        for (int64_t m0 = 0; m0 < M; m0 += 2) {
          const int mr = int(std::min<int64_t>(2, M - m0));
          if (mr == 2)
            int4_block<2>(wb, szp, n_pad, b, groups, per_group, a, m0, gsum.data(), out);
          else
            int4_block<1>(wb, szp, n_pad, b, groups, per_group, a, m0, gsum.data(), out);
          for (int m = 0; m < mr; ++m) store(out + m * 64, yp + (m0 + m) * out_features + b * ROWS4, rows);
        }
      }
    });
  });
}

// ---- int8 --------------------------------------------------------------------------------------------------

// Sum over groups of (z - 128 s) * (group sum of x): the zero points and the +128 offset, per output row.
inline float offset_terms(const uint16_t* s, const uint16_t* z, const float* gsum, int64_t groups) {
  float total = 0.0f;
  for (int64_t g = 0; g < groups; ++g)
    total += ((z ? bf16_to_float(z[g]) : 0.0f) - 128.0f * bf16_to_float(s[g])) * gsum[g];
  return total;
}

// R output rows starting at n0 for MR input rows. GROUPED 0: one scale per row (applied at the end);
// 1: groups of 64 inputs or more (a zmm lies in one group); 2: groups of 32 (its halves in two groups).
template <int MR, int R, int GROUPED>
void int8_rows(const int8_t* w, int64_t K, const uint16_t* scales, const uint16_t* zeros, int64_t groups,
               int64_t group_size, int64_t n0, const Activations& a, int64_t m0, const float* gsum, float* res) {
  const int64_t steps = a.Kp / 64;
  const __mmask64 tail = K % 64 ? (__mmask64)((1ull << (K % 64)) - 1) : ~(__mmask64)0;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int64_t steps_per_group = GROUPED == 1 ? group_size / 64 : 1;
  __m512 acc[MR][R], tot[MR][R];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = tot[m][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < steps; ++j) {
    __m512i xv[MR];
    __m512 dv[MR];
    for (int m = 0; m < MR; ++m) {
      xv[m] = _mm512_loadu_si512(a.row(m0 + m) + 64 * j);
      dv[m] = _mm512_loadu_ps(a.lanes.data() + (m0 + m) * (a.Kp / 4) + 16 * j);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = w + (n0 + r) * K + 64 * j;
      prefetch_ahead(wr, INT8_NEAR_BYTES, INT8_FAR_BYTES);
      __m512i wv = j + 1 < steps ? _mm512_loadu_si512(wr) : _mm512_maskz_loadu_epi8(tail, wr);
      wv = _mm512_xor_si512(wv, flip);  // q + 128, unsigned
      for (int m = 0; m < MR; ++m) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[m]);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dv[m], acc[m][r]);
      }
    }
    if (GROUPED == 1 && (j + 1) % steps_per_group == 0) {
      const int64_t g = j / steps_per_group;
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(bf16_to_float(scales[(n0 + r) * groups + g]));
        for (int m = 0; m < MR; ++m) tot[m][r] = _mm512_fmadd_ps(acc[m][r], s, tot[m][r]), acc[m][r] = _mm512_setzero_ps();
      }
    } else if (GROUPED == 2) {
      for (int r = 0; r < R; ++r) {
        const uint16_t* sr = scales + (n0 + r) * groups;
        const float s0 = bf16_to_float(sr[2 * j]), s1 = 2 * j + 1 < groups ? bf16_to_float(sr[2 * j + 1]) : 0.0f;
        const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(s0), 0xFF00, _mm512_set1_ps(s1));
        for (int m = 0; m < MR; ++m) tot[m][r] = _mm512_fmadd_ps(acc[m][r], s, tot[m][r]), acc[m][r] = _mm512_setzero_ps();
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    const uint16_t* s = scales + n * groups;
    const uint16_t* z = zeros ? zeros + n * groups : nullptr;
    for (int m = 0; m < MR; ++m) {
      const float* gs = gsum + (m0 + m) * groups;
      const float dot = GROUPED == 0 ? bf16_to_float(s[0]) * _mm512_reduce_add_ps(acc[m][r])
                                     : _mm512_reduce_add_ps(tot[m][r]);
      res[m * R + r] = dot + offset_terms(s, z, gs, groups);
    }
  }
}

template <int MR, int R, int GROUPED, typename Out>
void int8_tile(const int8_t* w, int64_t K, const uint16_t* s, const uint16_t* z, int64_t groups, int64_t group_size,
               int64_t n, const Activations& a, int64_t m0, const float* gsum, Out* y, int64_t N) {
  float res[MR * R];
  int8_rows<MR, R, GROUPED>(w, K, s, z, groups, group_size, n, a, m0, gsum, res);
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) store(res[m * R + r], y + (m0 + m) * N + n + r);
}

template <int R, int GROUPED, typename Out>
void int8_rows_all_inputs(const int8_t* w, int64_t K, const uint16_t* s, const uint16_t* z, int64_t groups,
                          int64_t group_size, int64_t n, const Activations& a, const float* gsum, Out* y, int64_t N) {
  // The R weight rows stay in L1/L2 while every input row passes, four at a time.
  for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
    switch (std::min<int64_t>(4, a.M - m0)) {
      case 4: int8_tile<4, R, GROUPED>(w, K, s, z, groups, group_size, n, a, m0, gsum, y, N); break;
      case 3: int8_tile<3, R, GROUPED>(w, K, s, z, groups, group_size, n, a, m0, gsum, y, N); break;
      case 2: int8_tile<2, R, GROUPED>(w, K, s, z, groups, group_size, n, a, m0, gsum, y, N); break;
      default: int8_tile<1, R, GROUPED>(w, K, s, z, groups, group_size, n, a, m0, gsum, y, N);
    }
  }
}

template <int GROUPED, typename Out>
void int8_all_rows(const int8_t* w, int64_t K, const uint16_t* s, const uint16_t* z, int64_t groups,
                   int64_t group_size, int64_t begin, int64_t end, const Activations& a, const float* gsum, Out* y,
                   int64_t N) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) int8_rows_all_inputs<4, GROUPED>(w, K, s, z, groups, group_size, n, a, gsum, y, N);
  for (; n < end; ++n) int8_rows_all_inputs<1, GROUPED>(w, K, s, z, groups, group_size, n, a, gsum, y, N);
}

// Rows n0 .. n0 + rows of a row-major int8 weight as a tile (q + 128), by masked dword gathers down the rows.
void int8_tile(const int8_t* w, int64_t K, const uint16_t* s, const uint16_t* z, int64_t groups, int64_t n0,
               int64_t rows, Tile& t) {
  const __mmask16 valid = mask16(rows);
  const __m512i row_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(int32_t(K)));
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int8_t* base = w + n0 * K;
  for (int64_t st = 0; st < int64_t(t.w.size()); ++st) {
    __m512i v = _mm512_setzero_si512();
    if (4 * st < K)
      v = _mm512_mask_i32gather_epi32(v, valid, _mm512_add_epi32(row_offsets, _mm512_set1_epi32(int32_t(4 * st))),
                                      base, 1);
    _mm512_store_si512(&t.w[st], _mm512_xor_si512(v, flip));
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int r = 0; r < 16; ++r) {
      const float sc = r < rows ? bf16_to_float(s[(n0 + r) * groups + g]) : 0.0f;
      const float zc = r < rows && z ? bf16_to_float(z[(n0 + r) * groups + g]) : 0.0f;
      t.s[g * 16 + r] = sc, t.c[g * 16 + r] = zc - 128.0f * sc, t.z[g * 16 + r] = zc;
    }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t group_size, bool amx) {
  TORCH_CHECK(x.dim() == 2, "expected input rows (M, K), got ", x.dim(), " dimensions");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "int8 weight must be int8 (N, K)");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(1) == K, "input has ", x.size(1), " features, the weight ", K);
  TORCH_CHECK(group_size == 0 || (group_size % BLOCK == 0 && K % group_size == 0),
              "int8 group size ", group_size, " must be 0 or a multiple of 32 dividing ", K);
  const int64_t groups = group_size == 0 ? 1 : K / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == N * groups, "scales must be bfloat16 (",
              N, ", ", groups, ")");
  const at::Tensor w = weight.contiguous(), s = scales.contiguous();
  at::Tensor z;
  if (zeros.has_value()) {
    z = zeros->contiguous();
    TORCH_CHECK(z.scalar_type() == at::kBFloat16 && z.numel() == N * groups, "zeros must be bfloat16 like scales");
  }
  const int8_t* wp = w.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<c10::BFloat16>());
  const uint16_t* zp = z.defined() ? reinterpret_cast<const uint16_t*>(z.data_ptr<c10::BFloat16>()) : nullptr;
  if (K % 4 == 0 && takes_amx(x, amx)) {  // the tiles gather whole dwords of a row
    const AmxInputs in = amx_inputs(x);
    return output_rows(x, in.M, N, [&](auto* yp) {
      amx_linear(in, groups, (N + 16 * AMX_TILES - 1) / (16 * AMX_TILES), 128, yp, N, [&](int64_t c, Tile* tiles) {
        const int64_t first = 16 * AMX_TILES * c;
        for (int t = 0; t < AMX_TILES; ++t)  // tiles past N: rows 0, all zero
          int8_tile(wp, K, sp, zp, groups, first + 16 * t, std::clamp<int64_t>(N - first - 16 * t, 0, 16), tiles[t]);
        return first;
      });
    });
  }
  const bool tiled = x.size(0) >= TILED_MIN_ROWS && K % 4 == 0;  // the tile gathers whole dwords of a row
  const Activations a = quantize_activations(x, !tiled, tiled ? TILE_M : 1);
  const std::vector<float> gsum = group_sums(a, groups);
  const int mode = group_size == 0 ? 0 : group_size == 32 ? 2 : 1;
  return output_rows(x, a.M, N, [&](auto* yp) {
    if (tiled) {
      const int64_t per_group = group_size == 0 ? a.blocks : group_size / BLOCK;
      glmkit_csrc::ThreadScratch<Tile> scratch;
      glmkit_csrc::parallel_chunks((N + 15) / 16, TILED_CHUNK, [&](int64_t begin, int64_t end) {
        Tile& t = scratch.get([&] { return Tile(a.Kp, groups); });
        for (int64_t i = begin; i < end; ++i) {
          const int64_t n0 = 16 * i, rows = std::min<int64_t>(16, N - n0);
          int8_tile(wp, K, sp, zp, groups, n0, rows, t);
          tile_all_inputs(t, groups, per_group, a, gsum.data(), yp, N, n0, rows);
        }
      });
      return;
    }
    // Chunks of 4 x 16 rows: whole 4-row steps in every chunk but the last.
    glmkit_csrc::parallel_chunks((N + 15) / 16, 4, [&](int64_t begin, int64_t end) {
      const int64_t lo = begin * 16, hi = std::min(N, end * 16);
      if (mode == 0)
        int8_all_rows<0>(wp, K, sp, zp, groups, group_size, lo, hi, a, gsum.data(), yp, N);
      else if (mode == 1)
        int8_all_rows<1>(wp, K, sp, zp, groups, group_size, lo, hi, a, gsum.data(), yp, N);
      else
        int8_all_rows<2>(wp, K, sp, zp, groups, group_size, lo, hi, a, gsum.data(), yp, N);
    });
  });
}

// The activation quantization alone, for tests: (q (M, Kp) int8, dx (M, Kp / 32) float32).
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  const Activations a = quantize_activations(x, false);
  at::Tensor q = at::empty({a.M, a.Kp}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({a.M, a.blocks}, x.options().dtype(at::kFloat));
  std::memcpy(q.data_ptr<int8_t>(), a.q.data(), a.q.size());
  std::memcpy(dx.data_ptr<float>(), a.dx.data(), a.dx.size() * 4);
  return {q, dx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glmkit_cpu, m) {
  // amx=False keeps prompts off the AMX tiles (tests and benchmarks compare both)
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scales_and_zeros, int group_size, int out_features, "
        "bool amx=True) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? zeros, int group_size, bool amx=True) -> Tensor");
  m.def("amx_usable() -> bool", [] { return glmkit_csrc::amx_bf16_usable(); });  // no tensors: every backend
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(glmkit_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("quantize_rows", &quantize_rows);
}
