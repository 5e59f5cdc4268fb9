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
//
// A work item is up to 16 query rows of one kv group (one float32 lane each), so the softmax runs on whole vectors.
// Items of 8 or more rows (a TiDAR step: K + K*K tokens times the group's heads) score 8 columns at a time against
// q transposed, one broadcast key element per FMA; smaller items (an AR step) take one dot per row and column.
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
using tidar::hsum;
using tidar::load16;
using tidar::U16;


constexpr float kMaskedLogit = -0.7f * std::numeric_limits<float>::max();
constexpr int64_t kMaxAccumulators = 16;  // float32 vectors one row block of the value pass keeps in registers


typedef int32_t I16 __attribute__((vector_size(64)));
constexpr I16 kLaneBits = {1 << 0, 1 << 1, 1 << 2,  1 << 3,  1 << 4,  1 << 5,  1 << 6,  1 << 7,
                           1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15};

template <typename To, typename From>
inline To bitcast(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

inline void store(float x, float* out) { *out = x; }
inline void store(float x, uint16_t* out) { *out = tidar::bf16_bits(x); }
inline F16 in_value_dtype(F16 p, const float*) { return p; }
inline F16 in_value_dtype(F16 p, const uint16_t*) {  // round to nearest even bfloat16 (p in [0, 1]: no NaN)
  U16 w = bitcast<U16>(p);
  w += 0x7fffu + ((w >> 16) & 1u);
  return bitcast<F16>(w & 0xffff0000u);
}

// exp(x) for x <= 0, 16 at a time (Cephes' single-precision polynomial, ~1 ulp); 0 below the float32 normal range,
// where the reference's exp is at most 1e-38 (each softmax sum here is >= 1).
inline F16 exp_nonpositive(F16 x) {
  const F16 lowest = F16{} - 88.f;
  x = x < lowest ? lowest : x;
  const F16 half_up = x * 1.44269504088896341f + 0.5f;
  F16 n = __builtin_convertvector(__builtin_convertvector(half_up, I16), F16);  // truncates: floor after the fix
  n = n > half_up ? n - 1.f : n;
  const F16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F16 p = F16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F16 y = p * r * r + r + 1.f;
  const F16 scale = bitcast<F16>((__builtin_convertvector(n, I16) + 127) << 23);
  return x <= lowest ? F16{} : y * scale;
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

constexpr int kLanes = 16;          // query rows per work item: one float32 lane each
constexpr int kWideFrom = 8;        // items of this many rows score 8 columns at a time against q transposed
constexpr int64_t kColumnBlock = 8;

// Query rows [row0, row0 + lanes) of batch row `bi` and kv group `j`, over every live column; query row r is token
// r / g with head j * g + r % g (g = h / kv). Scores, probabilities and their sums are laid out one lane per row,
// [live column][kLanes], so the softmax runs on whole vectors. D = d / 16.
template <typename T, int D>
void attend(const Shapes& sh, const Operands<T>& op, int64_t bi, int64_t j, int64_t row0, int lanes) {
  const int64_t g = sh.h / sh.kv, t = sh.t, s = sh.s, cols = s + t, d = sh.d;
  const bool* mask = op.mask + (sh.mask_b == 1 ? 0 : bi) * t * cols;  // [t, cols]
  auto key = [&](int64_t c) {
    return c < s ? op.cache_k + ((bi * s + c) * sh.kv + j) * d : op.k + ((bi * t + c - s) * sh.kv + j) * d;
  };
  auto value = [&](int64_t c) {
    return c < s ? op.cache_v + ((bi * s + c) * sh.kv + j) * d : op.v + ((bi * t + c - s) * sh.kv + j) * d;
  };
  auto query = [&](int lane) { return op.q + ((bi * t + (row0 + lane) / g) * sh.h + j * g + (row0 + lane) % g) * d; };

  // seen[c]: the lanes whose row may attend to column c.
  std::vector<int32_t> seen(cols, 0);
  bool any_dead = false;
  for (int64_t token = row0 / g; token <= (row0 + lanes - 1) / g; ++token) {
    int32_t bits = 0;
    for (int lane = 0; lane < lanes; ++lane) bits |= (row0 + lane) / g == token ? 1 << lane : 0;
    const bool* row = mask + token * cols;
    bool any = false;
    for (int64_t c = 0; c < cols; ++c) {
      seen[c] |= row[c] ? bits : 0;
      any |= row[c];
    }
    any_dead |= !any;
  }
  std::vector<int64_t> live;  // the columns read
  live.reserve(cols);
  for (int64_t c = 0; c < cols; ++c)
    if (any_dead || seen[c]) live.push_back(c);
  const int64_t n = static_cast<int64_t>(live.size());
  auto masked = [&](int64_t c, F16 score) {
    const I16 visible = (kLaneBits & seen[c]) != 0;
    return visible ? score * sh.scale : F16{} + kMaskedLogit;
  };

  std::vector<F16> prob(n);
  if (lanes >= kWideFrom) {
    // q transposed, [d][kLanes]: each key element is broadcast against the lanes' query elements.
    alignas(64) float qt[128 * kLanes] = {};
    for (int lane = 0; lane < lanes; ++lane)
      for (int64_t e = 0; e < d; ++e) qt[e * kLanes + lane] = tidar::to_float(query(lane)[e]);
    alignas(64) float keys[kColumnBlock][128];
    for (int64_t i0 = 0; i0 < n; i0 += kColumnBlock) {
      for (int64_t b = 0; b < kColumnBlock; ++b) {  // past the last live column: its key again, not stored
        const T* kr = key(live[std::min(n - 1, i0 + b)]);
        for (int k = 0; k < D; ++k) tidar::store16(keys[b] + 16 * k, load16(kr + 16 * k));
      }
      F16 acc[kColumnBlock] = {};
      for (int64_t e = 0; e < d; ++e) {
        const F16 qe = load16(qt + e * kLanes);
        for (int64_t b = 0; b < kColumnBlock; ++b) acc[b] += qe * keys[b][e];
      }
      for (int64_t b = 0; b < std::min(kColumnBlock, n - i0); ++b) prob[i0 + b] = masked(live[i0 + b], acc[b]);
    }
  } else {
    F16 q[kWideFrom][D];
    for (int lane = 0; lane < lanes; ++lane)
      for (int k = 0; k < D; ++k) q[lane][k] = load16(query(lane) + 16 * k);
    for (int64_t i = 0; i < n; ++i) {
      F16 kr[D];
      for (int k = 0; k < D; ++k) kr[k] = load16(key(live[i]) + 16 * k);
      F16 score{};
      for (int lane = 0; lane < lanes; ++lane) {
        F16 acc = q[lane][0] * kr[0];
        for (int k = 1; k < D; ++k) acc += q[lane][k] * kr[k];
        score[lane] = hsum(acc);
      }
      prob[i] = masked(live[i], score);
    }
  }

  F16 top = F16{} + kMaskedLogit;
  for (int64_t i = 0; i < n; ++i) top = top > prob[i] ? top : prob[i];
  F16 denom{};
  for (int64_t i = 0; i < n; ++i) {
    const F16 p = exp_nonpositive(prob[i] - top);
    denom += p;
    prob[i] = in_value_dtype(p, op.v);
  }

  // Values, in row blocks whose accumulators fit in registers.
  constexpr int kBlock = std::max(1, static_cast<int>(kMaxAccumulators / D));
  for (int q0 = 0; q0 < lanes; q0 += kBlock) {
    const int nb = std::min(kBlock, lanes - q0);
    F16 acc[kBlock][D];
    for (int a = 0; a < kBlock; ++a)
      for (int k = 0; k < D; ++k) acc[a][k] = F16{};
    for (int64_t i = 0; i < n; ++i) {
      F16 vr[D];
      for (int k = 0; k < D; ++k) vr[k] = load16(value(live[i]) + 16 * k);
      for (int a = 0; a < kBlock; ++a) {
        if (a >= nb) break;
        const float p = prob[i][q0 + a];
        for (int k = 0; k < D; ++k) acc[a][k] += p * vr[k];
      }
    }
    for (int a = 0; a < nb; ++a) {
      const int lane = q0 + a;
      T* o = op.out + (query(lane) - op.q);
      float lanes_out[16 * D];
      std::memcpy(lanes_out, acc[a], sizeof lanes_out);
      for (int64_t e = 0; e < d; ++e) store(lanes_out[e] / denom[lane], o + e);
    }
  }
}

// Work items: (batch row, kv group, block of kLanes query rows), the rows of a group ordered token-major.
template <typename T, int D>
void run(ffi::ThreadPool& pool, const Shapes& sh, const Operands<T>& op) {
  const int64_t rows = sh.t * (sh.h / sh.kv), blocks = (rows + kLanes - 1) / kLanes;
  tidar::parallel_for(pool, sh.b * sh.kv * blocks, [&](int64_t i) {
    const int64_t row0 = (i % blocks) * kLanes, group = i / blocks;
    attend<T, D>(sh, op, group / sh.kv, group % sh.kv, row0, static_cast<int>(std::min<int64_t>(kLanes, rows - row0)));
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
