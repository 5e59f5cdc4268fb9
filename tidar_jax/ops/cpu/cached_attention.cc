// Cached attention on the CPU as one XLA FFI custom call: the current block's queries over a read-only KV cache
// plus the block itself, reading each cache row once in place (XLA's dots transpose or copy the cache per layer).
//
// Operands (row-major): q [b, t, h, d]; k, v [b, t, kv, d]; cache_k, cache_v [b, S, kv, d]; mask [mb, t, S + t]
// bool (mb = 1 or b; cache columns first; true = may attend); attribute `scale`. Result [b, t, h, d] in q's dtype.
// Every array operand is float32 or bfloat16 (all alike); d is 16, 32, 64 or 128; h % kv == 0.
//
// The function is ops/attention.py's `_attention` (plain XLA), the reference the tests compare against: float32
// logits (q.k) * scale, masked columns at -0.7 * FLT_MAX, softmax with the row max, probabilities rounded to the
// value dtype before the value products (as the XLA path casts them), float32 sums, out = sum(p v) / sum(p). A
// column no row of a work item may see is skipped: it would add exactly 0 to each softmax, unless some row sees no
// column at all, in which case every column is kept and that row averages all values (the reference's convention).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vector.h"
#include "work.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tidar::F16;
using tidar::load16;

typedef float F8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));

constexpr float kMaskedLogit = -0.7f * std::numeric_limits<float>::max();
constexpr int64_t kMaxAccumulators = 16;  // float32 vectors one row block of the value pass keeps in registers

inline float hsum(F16 x) {  // a tree of halvings: a few shuffles, no 16-step dependency chain
  F8 halves[2];
  std::memcpy(halves, &x, sizeof halves);
  const F8 y = halves[0] + halves[1];
  F4 quarters[2];
  std::memcpy(quarters, &y, sizeof quarters);
  const F4 z = quarters[0] + quarters[1];
  return (z[0] + z[2]) + (z[1] + z[3]);
}

inline float bf16_round(float x) { return tidar::to_float(tidar::bf16_bits(x)); }
inline void store(float x, float* out) { *out = x; }
inline void store(float x, uint16_t* out) { *out = tidar::bf16_bits(x); }
inline float in_value_dtype(float p, const float*) { return p; }
inline float in_value_dtype(float p, const uint16_t*) { return bf16_round(p); }

// exp(x) for x <= 0 (Cephes' single-precision polynomial, ~1 ulp); 0 below the float32 normal range, where the
// reference's exp is at most 1e-38 (each softmax sum here is >= 1).
inline float exp_nonpositive(float x) {
  x = std::max(x, -88.f);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x <= -88.f ? 0.f : y * scale;
}

struct Shapes {
  int64_t b, t, h, kv, d, s, mask_b;
  float scale;
};

template <typename T>
struct Operands {
  const T *q, *k, *v, *cache_k, *cache_v;
  const bool* mask;
  T* out;
};

// Query tokens [r0, r1) of batch row `bi`, every head of kv group `j`, over every live column. D = d / 16.
template <typename T, int D>
void attend(const Shapes& sh, const Operands<T>& op, int64_t bi, int64_t j, int64_t r0, int64_t r1) {
  const int64_t g = sh.h / sh.kv, t = sh.t, s = sh.s, cols = s + t, rows = (r1 - r0) * g, d = sh.d;
  const bool* mask = op.mask + ((sh.mask_b == 1 ? 0 : bi) * t + r0) * cols;
  auto key = [&](int64_t c) {
    return c < s ? op.cache_k + ((bi * s + c) * sh.kv + j) * d : op.k + ((bi * t + c - s) * sh.kv + j) * d;
  };
  auto value = [&](int64_t c) {
    return c < s ? op.cache_v + ((bi * s + c) * sh.kv + j) * d : op.v + ((bi * t + c - s) * sh.kv + j) * d;
  };

  bool any_dead = false;
  for (int64_t r = 0; r < r1 - r0 && !any_dead; ++r)
    any_dead = std::none_of(mask + r * cols, mask + (r + 1) * cols, [](bool m) { return m; });
  std::vector<int64_t> live;  // the columns read
  live.reserve(cols);
  for (int64_t c = 0; c < cols; ++c) {
    bool seen = any_dead;
    for (int64_t r = 0; r < r1 - r0 && !seen; ++r) seen = mask[r * cols + c];
    if (seen) live.push_back(c);
  }
  const int64_t n = static_cast<int64_t>(live.size());

  std::vector<F16> q(rows * D);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t gi = 0; gi < g; ++gi)
      for (int k = 0; k < D; ++k)
        q[((r - r0) * g + gi) * D + k] = load16(op.q + ((bi * t + r) * sh.h + j * g + gi) * d + 16 * k);

  // Scores of the live columns, [rows, n]; then probabilities in place.
  std::vector<float> prob(rows * n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = live[i];
    F16 kr[D];
    for (int k = 0; k < D; ++k) kr[k] = load16(key(c) + 16 * k);
    for (int64_t qi = 0; qi < rows; ++qi) {
      F16 acc = q[qi * D] * kr[0];
      for (int k = 1; k < D; ++k) acc += q[qi * D + k] * kr[k];
      prob[qi * n + i] = mask[(qi / g) * cols + c] ? hsum(acc) * sh.scale : kMaskedLogit;
    }
  }
  std::vector<float> denom(rows);
  for (int64_t qi = 0; qi < rows; ++qi) {
    float* row = &prob[qi * n];
    float top = kMaskedLogit;
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < n; ++i) top = top > row[i] ? top : row[i];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const float p = exp_nonpositive(row[i] - top);
      sum += p;
      row[i] = p;
    }
    denom[qi] = sum;
    for (int64_t i = 0; i < n; ++i) row[i] = in_value_dtype(row[i], op.v);
  }

  // Values, in row blocks whose accumulators fit in registers.
  constexpr int64_t kBlock = std::max<int64_t>(1, kMaxAccumulators / D);
  for (int64_t q0 = 0; q0 < rows; q0 += kBlock) {
    const int64_t nb = std::min(kBlock, rows - q0);
    F16 acc[kBlock][D];
    for (int64_t a = 0; a < kBlock; ++a)
      for (int k = 0; k < D; ++k) acc[a][k] = F16{};
    for (int64_t i = 0; i < n; ++i) {
      F16 vr[D];
      for (int k = 0; k < D; ++k) vr[k] = load16(value(live[i]) + 16 * k);
      for (int64_t a = 0; a < kBlock; ++a) {
        if (a >= nb) break;
        const float p = prob[(q0 + a) * n + i];
        for (int k = 0; k < D; ++k) acc[a][k] += p * vr[k];
      }
    }
    for (int64_t a = 0; a < nb; ++a) {
      const int64_t qi = q0 + a, r = r0 + qi / g, gi = qi % g;
      T* o = op.out + ((bi * t + r) * sh.h + j * g + gi) * d;
      float lanes[16 * D];
      std::memcpy(lanes, acc[a], sizeof lanes);
      for (int64_t e = 0; e < d; ++e) store(lanes[e] / denom[qi], o + e);
    }
  }
}

// Work items: (batch row, kv group, block of query tokens of about 16 query rows).
template <typename T, int D>
void run(ffi::ThreadPool& pool, const Shapes& sh, const Operands<T>& op) {
  const int64_t tokens_per_item = std::max<int64_t>(1, 16 / (sh.h / sh.kv));
  const int64_t blocks = (sh.t + tokens_per_item - 1) / tokens_per_item;
  tidar::parallel_for(pool, sh.b * sh.kv * blocks, [&](int64_t i) {
    const int64_t r0 = (i % blocks) * tokens_per_item, group = i / blocks;
    attend<T, D>(sh, op, group / sh.kv, group % sh.kv, r0, std::min(sh.t, r0 + tokens_per_item));
  });
}

template <typename T>
ffi::Error dispatch(ffi::ThreadPool& pool, const Shapes& sh, const Operands<T>& op) {
  switch (sh.d) {
    case 16: run<T, 1>(pool, sh, op); break;
    case 32: run<T, 2>(pool, sh, op); break;
    case 64: run<T, 4>(pool, sh, op); break;
    case 128: run<T, 8>(pool, sh, op); break;
    default: return ffi::Error::InvalidArgument("cached_attention: head_dim must be 16, 32, 64 or 128");
  }
  return ffi::Error::Success();
}

template <typename T>
Operands<T> typed(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer ck, ffi::AnyBuffer cv,
                  const bool* mask, ffi::Result<ffi::AnyBuffer>& out) {
  return {static_cast<const T*>(q.untyped_data()),  static_cast<const T*>(k.untyped_data()),
          static_cast<const T*>(v.untyped_data()),  static_cast<const T*>(ck.untyped_data()),
          static_cast<const T*>(cv.untyped_data()), mask, static_cast<T*>(out->untyped_data())};
}

ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::AnyBuffer ck, ffi::AnyBuffer cv, ffi::Buffer<ffi::PRED> mask, float scale,
                           ffi::Result<ffi::AnyBuffer> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), cd = ck.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || cd.size() != 4 || md.size() != 3)
    return ffi::Error::InvalidArgument("cached_attention: q, k, cache_k must be rank 4 and mask rank 3");
  const Shapes sh{qd[0], qd[1], qd[2], kd[2], qd[3], cd[1], md[0], scale};
  if (sh.kv == 0 || sh.h % sh.kv || (sh.mask_b != 1 && sh.mask_b != sh.b) || md[1] != sh.t || md[2] != sh.s + sh.t)
    return ffi::Error::InvalidArgument("cached_attention: inconsistent shapes");
  const auto dt = q.element_type();
  for (const auto& x : {k, v, ck, cv})
    if (x.element_type() != dt) return ffi::Error::InvalidArgument("cached_attention: operand dtypes differ");
  if (dt == ffi::DataType::F32) return dispatch<float>(pool, sh, typed<float>(q, k, v, ck, cv, mask.typed_data(), out));
  if (dt == ffi::DataType::BF16)
    return dispatch<uint16_t>(pool, sh, typed<uint16_t>(q, k, v, ck, cv, mask.typed_data(), out));
  return ffi::Error::InvalidArgument("cached_attention: dtype must be float32 or bfloat16");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TidarCachedAttention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // cache_k
                                  .Arg<ffi::AnyBuffer>()  // cache_v
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>());
