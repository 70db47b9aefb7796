// The small operations of a transformer layer around its linears, for inference on AVX-512 CPUs: RMSNorm and
// the attention of one new token per sequence (decoding). torch runs RMSNorm as several kernels and decode
// attention through a flash-attention kernel made for long queries. Measured with 2 threads at ChatGLM3-6B
// shapes: RMSNorm over 4096 values 18 -> 6 us per call; attention of 32 heads in 2 groups over 300 keys
// 100-137 -> 40-74 us (it is compute: 4 x keys x heads x head dims FLOPs). Both compute in float32 and round
// once, as the model's torch code does, and neither mixes rows: a row's result does not depend on the batch,
// its padding, or where in the cache its keys lie.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using glmkit_csrc::load16;
using glmkit_csrc::mask16;

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  glmkit_csrc::store_bf16(tmp, p, __builtin_popcount(m));
}

// n values of p as float32 into out.
template <typename T>
void to_float(const T* p, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) _mm512_mask_storeu_ps(out + i, mask16(n - i), load16(p + i, mask16(n - i)));
}

// e^x for x <= 0, to 1-2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below this e^x is 0 in float32 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// ---- RMSNorm -------------------------------------------------------------------------------------------------

// y = w * (x * rsqrt(mean(x^2) + eps)), in float32, rounded once to x's type (the official formula's rounding).
template <typename T>
void rms_norm_row(const T* x, const float* w, int64_t n, float eps, T* y) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(x + i, mask16(n - i));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / float(n) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    store16(y + i, _mm512_mul_ps(load16(w + i, m), _mm512_mul_ps(load16(x + i, m), rv)), m);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rms_norm takes float32 or bfloat16 inputs, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && weight.size(0) == x.size(-1), "rms_norm weight has ",
              weight.numel(), " values for ", x.size(-1), " features");
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(xc);  // contiguous, as xc
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* wp = w.data_ptr<float>();
  const float e = float(eps);
  auto run = [&](auto* xp, auto* yp) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * n, wp, n, e, yp + r * n);
    });
  };
  if (x.scalar_type() == at::kFloat)
    run(xc.data_ptr<float>(), y.data_ptr<float>());
  else
    run(xc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
  return y;
}

// ---- attention of one query per sequence -----------------------------------------------------------------
//
// The heads that share a key/value group are the 16 lanes of a vector (queries transposed, (D, 16)), so each
// key is read once for all of them and no sum crosses lanes: a key's scores are 16 lanes of D multiply-adds
// (four chains, summed in a fixed order). With fewer heads per group than lanes (1, 2, 4 or 8) most lanes
// would idle, so the lanes are then (key, head) pairs instead and each sum is taken across lanes: at 4 heads
// per group the scores cost 2.5x less (see `few_head_scores`). Softmax and the weighted sum of values run over
// the keys in order, masked keys skipped, so padding and cache position change nothing.

constexpr int LANES = 16;
constexpr int64_t MAX_DIMS = 256;  // head dims held in registers (16 vectors)

constexpr int64_t VALUE_CHUNK = 256;  // keys whose values are converted to float32 at a time (128 KB at D = 128)

// acc[h][:] += sum_i p[i][h] * v_i[:] over `count` keys, v_i float32 rows of D dims, for the heads (lanes) of p;
// two heads at a time share each load of a value row.
template <int ND>
void weighted_values(const float* p, int64_t count, const float* vf, int64_t D, int heads, float* acc_rows) {
  __mmask16 masks[ND];
  for (int d = 0; d < ND; ++d) masks[d] = mask16(D - 16 * d);
  for (int h = 0; h < heads; h += 2) {
    const bool pair = h + 1 < heads;
    float* row0 = acc_rows + h * ND * 16;
    float* row1 = row0 + ND * 16;
    __m512 a0[ND], a1[ND];
    for (int d = 0; d < ND; ++d) a0[d] = _mm512_load_ps(row0 + 16 * d), a1[d] = _mm512_load_ps(row1 + 16 * d);
    for (int64_t i = 0; i < count; ++i) {
      const __m512 w0 = _mm512_set1_ps(p[i * LANES + h]), w1 = _mm512_set1_ps(pair ? p[i * LANES + h + 1] : 0.0f);
      const float* v = vf + i * D;
      for (int d = 0; d < ND; ++d) {
        const __m512 x = _mm512_maskz_loadu_ps(masks[d], v + 16 * d);
        a0[d] = _mm512_fmadd_ps(w0, x, a0[d]);
        a1[d] = _mm512_fmadd_ps(w1, x, a1[d]);
      }
    }
    for (int d = 0; d < ND; ++d) _mm512_store_ps(row0 + 16 * d, a0[d]), _mm512_store_ps(row1 + 16 * d, a1[d]);
  }
}

// Scores of R keys for the 16 heads (lanes): s_r = sum_d qt[d] * k_r[d], in four chains by d mod 4 summed as
// (c0 + c1) + (c2 + c3), the same arithmetic for a key whatever R it is computed with.
template <int R>
void key_scores(const float* qt, const float* kf, int64_t D, float* out) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 4 <= D; d += 4)
    for (int c = 0; c < 4; ++c) {
      const __m512 qv = _mm512_load_ps(qt + (d + c) * LANES);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(qv, _mm512_set1_ps(kf[r * MAX_DIMS + d + c]), acc[r][c]);
    }
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r)
      acc[r][d % 4] = _mm512_fmadd_ps(_mm512_load_ps(qt + d * LANES), _mm512_set1_ps(kf[r * MAX_DIMS + d]), acc[r][d % 4]);
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(out + r * LANES, _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
}

// The scores of `count` keys for up to 16 heads (any number): the heads are the lanes (queries transposed,
// (D, 16)), four keys at a time.
template <typename T>
void many_head_attention_scores(const T* q, int64_t q_head_stride, int heads, const T* k, int64_t k_stride,
                                const std::vector<int64_t>& keys, int64_t D, float scale, float* p) {
  alignas(64) float qt[MAX_DIMS * LANES];  // the queries, scaled, as (D, 16)
  for (int64_t d = 0; d < D; ++d)
    for (int h = 0; h < LANES; ++h) qt[d * LANES + h] = h < heads ? float(q[h * q_head_stride + d]) * scale : 0.0f;
  const int64_t count = int64_t(keys.size());
  constexpr int KEYS = 4;
  alignas(64) float kf[KEYS * MAX_DIMS];
  for (int64_t i = 0; i < count; i += KEYS) {
    const int n = int(std::min<int64_t>(KEYS, count - i));
    for (int r = 0; r < n; ++r) to_float(k + keys[i + r] * k_stride, D, kf + r * MAX_DIMS);
    if (n == KEYS)
      key_scores<KEYS>(qt, kf, D, p + i * LANES);
    else
      for (int r = 0; r < n; ++r) key_scores<1>(qt, kf + r * MAX_DIMS, D, p + (i + r) * LANES);
  }
}

// 16 float32 sums in one vector: lane i of the result is the sum of the 16 lanes of v[i], by a fixed tree
// (halves, quarters, pairs, lanes) whatever the values.
inline __m512 sum_lanes16(__m512 v[16]) {
  __m512 y[8], z[4], w[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[i]'s halves added; lanes 8-15: v[i + 8]'s
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // quarters: v[i], v[i + 8], v[i + 4], v[i + 12]
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[i], y[i + 4], 0x88), _mm512_shuffle_f32x4(y[i], y[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(z[i], z[i + 2], 0x44), _mm512_shuffle_ps(z[i], z[i + 2], 0xEE));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
  // r holds the sums in the order 0 2 1 3, 8 10 9 11, 4 6 5 7, 12 14 13 15; the same order puts them back
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), r);
}

// Scores for a few heads (HEADS of 1, 2, 4, 8): the lanes are (key, head) pairs, 16 / HEADS keys at a time,
// so no lane idles. Lane r * HEADS + h: sum_d qf[h][d] * k_r[d], one multiply-add chain over 16-dim chunks of
// d, its lanes then summed by `sum_lanes16`: the same arithmetic for a key wherever it lies.
template <int HEADS, typename T>
void few_head_scores(const float* qf, const T* const* keys, int64_t D, float* out) {
  constexpr int R = LANES / HEADS;
  __m512 acc[LANES];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __mmask16 m = mask16(D - c);
    for (int r = 0; r < R; ++r) {
      const __m512 kv = load16(keys[r] + c, m);
      for (int h = 0; h < HEADS; ++h)
        acc[r * HEADS + h] = _mm512_fmadd_ps(_mm512_load_ps(qf + h * MAX_DIMS + c), kv, acc[r * HEADS + h]);
    }
  }
  _mm512_storeu_ps(out, sum_lanes16(acc));
}

// The scores of `count` keys (rows keys[i] of k) for heads of q, into p[i * LANES + h], 16 / HEADS keys at a time.
template <int HEADS, typename T>
void few_head_attention_scores(const T* q, int64_t q_head_stride, const T* k, int64_t k_stride,
                               const std::vector<int64_t>& keys, int64_t D, float scale, float* p) {
  constexpr int R = LANES / HEADS;
  alignas(64) float qf[HEADS * MAX_DIMS] = {};  // the queries, scaled, one row per head, zeros past D
  for (int h = 0; h < HEADS; ++h)
    for (int64_t d = 0; d < D; ++d) qf[h * MAX_DIMS + d] = float(q[h * q_head_stride + d]) * scale;
  const int64_t count = int64_t(keys.size());
  alignas(64) float s[LANES];
  for (int64_t i = 0; i < count; i += R) {
    const int n = int(std::min<int64_t>(R, count - i));
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = k + keys[i + std::min(r, n - 1)] * k_stride;  // a short group repeats its last key
    few_head_scores<HEADS>(qf, rows, D, s);
    for (int r = 0; r < n; ++r)
      for (int h = 0; h < HEADS; ++h) p[(i + r) * LANES + h] = s[r * HEADS + h];
  }
}

template <typename T>
void attention_task(const T* q, int64_t q_head_stride, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                    const bool* mask, int64_t mask_stride, const int64_t* slots, int64_t S, int64_t D, int heads,
                    float scale, T* out) {
  std::vector<int64_t> keys;  // where the keys seen lie in k and v (rows of k_stride / v_stride), in order
  keys.reserve(S);
  for (int64_t j = 0; j < S; ++j)
    if (mask == nullptr || mask[j * mask_stride]) keys.push_back(slots == nullptr ? j : slots[j]);
  const int64_t count = int64_t(keys.size());
  std::vector<float> p(count * LANES);  // the scores, then the softmax weights: 16 lanes (heads) per key
  switch (heads) {
    case 1: few_head_attention_scores<1>(q, q_head_stride, k, k_stride, keys, D, scale, p.data()); break;
    case 2: few_head_attention_scores<2>(q, q_head_stride, k, k_stride, keys, D, scale, p.data()); break;
    case 4: few_head_attention_scores<4>(q, q_head_stride, k, k_stride, keys, D, scale, p.data()); break;
    case 8: few_head_attention_scores<8>(q, q_head_stride, k, k_stride, keys, D, scale, p.data()); break;
    default: many_head_attention_scores(q, q_head_stride, heads, k, k_stride, keys, D, scale, p.data());
  }
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < count; ++i) mx = _mm512_max_ps(mx, _mm512_loadu_ps(p.data() + i * LANES));
  // softmax weights and their sum, key by key
  __m512 l = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p.data() + i * LANES), mx));
    _mm512_storeu_ps(p.data() + i * LANES, e);
    l = _mm512_add_ps(l, e);
  }
  alignas(64) float l_inv[LANES];
  _mm512_store_ps(l_inv, _mm512_div_ps(_mm512_set1_ps(1.0f), l));  // no key seen: 1 / 0, NaN out, as torch
  // the weighted sum of values, a chunk of keys at a time
  const int nd = int((D + 15) / 16);
  std::vector<float> vf(std::min(count, VALUE_CHUNK) * D);
  alignas(64) float acc_rows[LANES * MAX_DIMS] = {};
  for (int64_t c0 = 0; c0 < count; c0 += VALUE_CHUNK) {
    const int64_t n = std::min(VALUE_CHUNK, count - c0);
    for (int64_t i = 0; i < n; ++i) to_float(v + keys[c0 + i] * v_stride, D, vf.data() + i * D);
    switch (nd) {
#define CASE(ND) \
  case ND: weighted_values<ND>(p.data() + c0 * LANES, n, vf.data(), D, heads, acc_rows); break;
      CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
      CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
    }
  }
  for (int h = 0; h < heads; ++h)
    for (int d = 0; d < nd; ++d)
      store16(out + h * D + 16 * d, _mm512_mul_ps(_mm512_load_ps(acc_rows + (h * nd + d) * 16), _mm512_set1_ps(l_inv[h])),
              mask16(D - 16 * d));
}

// q (B, H, 1, D), k and v (B, G, S, D) with G dividing H, mask None or bool broadcastable to (B, 1, 1, S):
// softmax(q k^T / sqrt(D)) v for each head over its group's keys, returned as (B, 1, H * D).
// With `slots` (B, S) int64, k and v are instead pools (N, G, D) shared by the rows, and key j of row b is
// k[slots[b, j]]: a paged cache is read where it lies, with no gathered copy.
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& slots) {
  const bool paged = slots.has_value();
  TORCH_CHECK(q.dim() == 4 && k.dim() == (paged ? 3 : 4) && v.dim() == k.dim() && q.size(2) == 1,
              paged ? "attention_decode takes q (B, H, 1, D), pools k, v (N, G, D) and slots (B, S)"
                    : "attention_decode takes q (B, H, 1, D) and k, v (B, G, S, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t G = k.size(1), S = paged ? slots->size(-1) : k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && (paged || k.size(0) == B) && k.size(-1) == D && G > 0 && H % G == 0,
              "attention_decode: keys ", k.sizes(), " and values ", v.sizes(), " do not fit queries ", q.sizes());
  at::Tensor sl;
  if (paged) {
    sl = slots->contiguous();
    TORCH_CHECK(sl.scalar_type() == at::kLong && sl.dim() == 2 && sl.size(0) == B,
                "attention_decode slots must be int64 (B, S) = (", B, ", S), got ", sl.scalar_type(), " ", sl.sizes());
    const int64_t* sp = sl.data_ptr<int64_t>();
    for (int64_t i = 0; i < sl.numel(); ++i)
      TORCH_CHECK(sp[i] >= 0 && sp[i] < k.size(0), "attention_decode slot ", sp[i], " is outside the pool of ",
                  k.size(0), " slots");
  }
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "attention_decode takes float32 or bfloat16 q, k, v of one type");
  TORCH_CHECK(D <= MAX_DIMS, "attention_decode takes head dims up to ", MAX_DIMS, ", got ", D);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1, "attention_decode needs unit-stride head dims");
  at::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) &&
                    m.size(1) == 1 && m.size(2) == 1 && m.size(3) == S,
                "attention_decode mask must be bool (B, 1, 1, ", S, "), got ", m.sizes());
  }
  const int64_t per_group = H / G, chunks = (per_group + LANES - 1) / LANES;
  at::Tensor out = at::empty({B, 1, H * D}, q.options());
  const float scale = 1.0f / std::sqrt(float(D));
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    glmkit_csrc::parallel_chunks(B * G * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (G * chunks), g = task / chunks % G, c = task % chunks;
        const int64_t h0 = g * per_group + c * LANES;
        const int heads = int(std::min<int64_t>(LANES, per_group - c * LANES));
        const bool* mp = m.defined() ? m.data_ptr<bool>() + (m.size(0) == 1 ? 0 : b * m.stride(0)) : nullptr;
        const int64_t* sp = paged ? sl.data_ptr<int64_t>() + b * S : nullptr;
        const int64_t row = paged ? 0 : b, key_dim = paged ? 0 : 2;  // pools: every row reads the whole pool
        attention_task(qp + b * q.stride(0) + h0 * q.stride(1), q.stride(1), kp + row * k.stride(0) + g * k.stride(1),
                       k.stride(key_dim), vp + row * v.stride(0) + g * v.stride(1), v.stride(key_dim), mp,
                       m.defined() ? m.stride(3) : 0, sp, S, D, heads, scale, op + b * H * D + h0 * D);
      }
    });
  };
  if (q.scalar_type() == at::kFloat)
    run(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>());
  else
    run(q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(),
        out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(glmkit_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("attention_decode(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? slots=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(glmkit_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("attention_decode", &attention_decode);
}
