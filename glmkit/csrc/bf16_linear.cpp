// bfloat16 linears on AVX-512 CPUs, in float32 arithmetic, straight from oneDNN's packed weight.
//
// glmkit.packed holds a bfloat16 weight once, reordered for oneDNN; on CPUs with AVX512-BF16 that layout is
// `AB16b64a2b`: blocks of 64 output features, each a (K/2, 64) table of int32 words, word (p, j) holding the
// weights of inputs 2p (low half) and 2p+1 (high half) for output j. A bfloat16 is the high half of a float32,
// so a word gives two float32 weights by one shift and one mask; from there the products are float32 FMAs,
// which this CPU runs faster than its bfloat16 dot products (`vdpbf16ps`) and which sum exactly the products
// that bfloat16 inputs make. Measured with 2 threads against oneDNN's kernel on the same packed weight
// (benchmarks/bench_matmul.py): 1.2-1.3x at one input row (the memory bandwidth), 1.4-1.8x at 4-64 rows, and
// above MKL's float32 product from 128 rows on.
//
// A block of 64 outputs is computed for up to ROWS inputs at once (4 x ROWS float32 accumulators and the
// block's 8 float32 weight vectors fill the 32 registers); more inputs take more passes over the same block,
// which by then is in L2. With several passes, each pass also asks for its share of the next block's weight
// (every passes-th pair, into L2), so that reading the next block from memory overlaps this block's
// multiply-adds instead of following them: at 16 rows, with the weights coming from memory as in a decode
// step, 11-20% faster at the serving benchmark's shapes. Each output is a float32 sum over p in order, so a
// row's result does not depend on the other rows of the call. Threads share the blocks (parallel.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t BLOCK_N = 64;  // outputs per block of the packed layout
constexpr int ROWS = 6;          // inputs per pass over a block
// How far ahead the weight is asked for: the first pass over a block reads it from memory in one stream.
constexpr int64_t PREFETCH_BYTES = 4096;

// out (MR, 64) = x rows (MR, K) float32 times one block (K/2, 64) of int32 bfloat16 pairs; with `next`, pass
// `pass` of `passes` also asks for the next block's pairs p = pass (mod passes).
template <int MR>
void block_product(const int32_t* block, int64_t pairs, const float* x, int64_t K, float* out, const int32_t* next,
                   int pass, int passes) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t* w = block + p * BLOCK_N;
    if (next != nullptr && p % passes == pass)
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + p * BLOCK_N + 16 * j), _MM_HINT_T1);
    __m512 even[4], odd[4];
    for (int j = 0; j < 4; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + 16 * j) + PREFETCH_BYTES, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + 16 * j);
      even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));  // input 2p's weights
      odd[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));   // input 2p+1's
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 x0 = _mm512_set1_ps(x[m * K + 2 * p]), x1 = _mm512_set1_ps(x[m * K + 2 * p + 1]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(odd[j], x1, _mm512_fmadd_ps(even[j], x0, acc[m][j]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + m * BLOCK_N + 16 * j, acc[m][j]);
}

void block_rows(int mr, const int32_t* block, int64_t pairs, const float* x, int64_t K, float* out,
                const int32_t* next, int pass, int passes) {
  switch (mr) {
    case 6: block_product<6>(block, pairs, x, K, out, next, pass, passes); break;
    case 5: block_product<5>(block, pairs, x, K, out, next, pass, passes); break;
    case 4: block_product<4>(block, pairs, x, K, out, next, pass, passes); break;
    case 3: block_product<3>(block, pairs, x, K, out, next, pass, passes); break;
    case 2: block_product<2>(block, pairs, x, K, out, next, pass, passes); break;
    default: block_product<1>(block, pairs, x, K, out, next, pass, passes);
  }
}

// x (M, K) bfloat16 or float32, pairs (N/64, K/2, 64) int32: x @ W.T as (M, N) bfloat16.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& pairs) {
  TORCH_CHECK(x.dim() == 2, "expected input rows (M, K), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "inputs must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(pairs.dim() == 3 && pairs.scalar_type() == at::kInt && pairs.size(2) == BLOCK_N,
              "the packed weight must be int32 pairs (N/64, K/2, 64)");
  const int64_t M = x.size(0), K = x.size(1), blocks = pairs.size(0), P = pairs.size(1), N = blocks * BLOCK_N;
  TORCH_CHECK(K == 2 * P, "input has ", K, " features, the weight ", 2 * P);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = pairs.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kBFloat16));
  const float* xp = xf.data_ptr<float>();
  const int32_t* wp = w.data_ptr<int32_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  glmkit_csrc::parallel_chunks(blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float out[ROWS * BLOCK_N];
    const int passes = int((M + ROWS - 1) / ROWS);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
        const int mr = int(std::min<int64_t>(ROWS, M - m0));
        const bool ahead = passes > 1 && b + 1 < blocks;
        block_rows(mr, wp + b * P * BLOCK_N, P, xp + m0 * K, K, out, ahead ? wp + (b + 1) * P * BLOCK_N : nullptr,
                   int(m0 / ROWS), passes);
        for (int m = 0; m < mr; ++m) glmkit_csrc::store_bf16(out + m * BLOCK_N, yp + (m0 + m) * N + b * BLOCK_N, BLOCK_N);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glmkit_cpu, m) { m.def("bf16_linear(Tensor x, Tensor pairs) -> Tensor"); }

TORCH_LIBRARY_IMPL(glmkit_cpu, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
