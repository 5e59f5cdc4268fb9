// A small number of rows times a weight matrix on the CPU as one XLA FFI custom call: out [M, N] float32 =
// x [M, K] @ w [K, N], x and w float32 or bfloat16 (alike), N a multiple of 32, accumulated in float32.
//
// A TiDAR step's projections are such products (M = K + K*K query rows at batch 1: 20 at K = 4). Unlike an AR
// step's (gemv.cc) they are bound by arithmetic, not by reading the weights, and XLA:CPU runs them well below the
// FMA peak. Here the columns are split into panels of 64 (the work items: every output element is summed by one
// thread, in k order, so results do not depend on scheduling). A panel walks k in blocks whose weight tile
// [kBlock, 64] stays in L1 while blocks of up to kRows rows of x use it, their partial sums held in registers.
// bfloat16 uses AVX-512 BF16 (`vdpbf16ps`: two products per float32 lane, twice float32's FMA rate) where the
// compiler targets it; elsewhere bfloat16 is widened to float32 and takes the float32 path.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "product.h"
#include "vector.h"
#include "work.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;



namespace {

using tidar::F16;
using tidar::load16;

constexpr int kRows = 6;          // rows of x per register block: kRows x 4 accumulators of 16 floats
constexpr int64_t kPanel = 64;    // columns per work item
constexpr int64_t kBlock = 32;    // k per weight tile: [32, 64] floats (8 KB) or bfloat16 (4 KB), in L1
constexpr int kPrefetchLocality = 2;  // next tile into L2: ~20% faster than into L1 for bfloat16 (one run)

// A panel's partial sums, [M, kPanel] floats, live in the work item's stack frame.
constexpr int64_t kMaxRows = 128;

// acc[R, 16 * NV] (row stride kPanel) += x[:R, k0:k1] @ w[k0:k1, :16 * NV]; x's rows at stride K, w's at stride N.
template <typename T, int R, int NV>
void fma_block(const T* x, int64_t K, const T* w, int64_t N, int64_t k0, int64_t k1, float* acc) {
  F16 sum[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) sum[r][j] = load16(acc + r * kPanel + 16 * j);
  for (int64_t k = k0; k < k1; ++k) {
    F16 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load16(w + k * N + 16 * j);
    for (int r = 0; r < R; ++r) {
      const float xs = tidar::to_float(x[r * K + k]);
      for (int j = 0; j < NV; ++j) sum[r][j] += xs * wv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) tidar::store16(acc + r * kPanel + 16 * j, sum[r][j]);
}

#if defined(__AVX512BF16__)
// bfloat16 through `vdpbf16ps`, which multiplies pairs of adjacent bfloat16 values: rows k and k + 1 of w are
// interleaved per column (unpacklo / unpackhi, which work within 128-bit lanes) once per weight tile, by `pack`,
// and x's pair (x[r, k], x[r, k + 1]) is broadcast as one 32-bit value. The accumulators therefore hold each
// 32-column group's columns in the lane order of the unpack: `acc` stays in that order across k blocks and
// `unshuffle` restores column order at the end. An odd last k pairs with zeros.
// packed[p, 0:2 * width] = w[k0 + 2p, :width] and w[k0 + 2p + 1, :width] interleaved (as bfloat16 pairs), for
// the (k1 - k0 + 1) / 2 pairs of the tile; width 32 or 64.
void pack(const uint16_t* w, int64_t N, int64_t k0, int64_t k1, int64_t width, __m512i* packed) {
  for (int64_t k = k0; k < k1; k += 2)
    for (int64_t g = 0; g < width; g += 32) {
      const __m512i a = _mm512_loadu_si512(w + k * N + g);
      const __m512i b = k + 1 < k1 ? _mm512_loadu_si512(w + (k + 1) * N + g) : _mm512_setzero_si512();
      *packed++ = _mm512_unpacklo_epi16(a, b);
      *packed++ = _mm512_unpackhi_epi16(a, b);
    }
}

// acc[R rows, 32 * NP] (row stride kPanel) += x[:R, k0:k1] @ w[k0:k1, :32 * NP], w as `pack` lays it out; x's
// rows at stride K.
template <int R, int NP>
void dot_block(const uint16_t* x, int64_t K, const __m512i* packed, int64_t k0, int64_t k1, float* acc) {
  __m512 sum[R][2 * NP];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2 * NP; ++j) sum[r][j] = _mm512_loadu_ps(acc + r * kPanel + 16 * j);
  auto step = [&](const __m512i* pairs, auto x_pair) {
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x_pair(x + r * K));
      for (int j = 0; j < 2 * NP; ++j) sum[r][j] = _mm512_dpbf16_ps(sum[r][j], (__m512bh)pairs[j], xv);
    }
  };
  int64_t k = k0;
  for (; k + 1 < k1; k += 2, packed += 2 * NP)
    step(packed, [k](const uint16_t* row) {
      int32_t pair;
      std::memcpy(&pair, row + k, sizeof pair);
      return pair;
    });
  if (k < k1) step(packed, [k](const uint16_t* row) { return static_cast<int32_t>(row[k]); });
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2 * NP; ++j) _mm512_storeu_ps(acc + r * kPanel + 16 * j, sum[r][j]);
}

// Columns of one 32-column group from the unpack's lane order: lane l of `lo` holds column 8 * (l / 4) + l % 4,
// lane l of `hi` column 8 * (l / 4) + 4 + l % 4.
void unshuffle(float* group) {
  typedef int32_t I16 __attribute__((vector_size(64)));
  const F16 lo = load16(group), hi = load16(group + 16);
  constexpr I16 first = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  constexpr I16 second = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  tidar::store16(group, __builtin_shuffle(lo, hi, first));
  tidar::store16(group + 16, __builtin_shuffle(lo, hi, second));
}

template <int R>
void bf16_block(const uint16_t* x, int64_t K, const __m512i* packed, int64_t k0, int64_t k1, int64_t width,
                float* acc) {
  width == 64 ? dot_block<R, 2>(x, K, packed, k0, k1, acc) : dot_block<R, 1>(x, K, packed, k0, k1, acc);
}
#endif

// acc[R rows, width] += x[:R, k0:k1] @ w[k0:k1, :width], width 32 or 64 (`packed`: the tile as `pack` lays it out,
// for the paired bfloat16 path).
template <typename T, int R>
void block(const T* x, int64_t K, const T* w, const void* packed, int64_t N, int64_t k0, int64_t k1,
           int64_t width, float* acc) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    bf16_block<R>(x, K, static_cast<const __m512i*>(packed), k0, k1, width, acc);
    return;
  }
#endif
  width == 64 ? fma_block<T, R, 4>(x, K, w, N, k0, k1, acc) : fma_block<T, R, 2>(x, K, w, N, k0, k1, acc);
}

template <typename T>
void rows_block(const T* x, int64_t K, const T* w, const void* packed, int64_t N, int64_t k0, int64_t k1,
                int64_t width, int rows, float* acc) {
  switch (rows) {
    case 1: block<T, 1>(x, K, w, packed, N, k0, k1, width, acc); break;
    case 2: block<T, 2>(x, K, w, packed, N, k0, k1, width, acc); break;
    case 3: block<T, 3>(x, K, w, packed, N, k0, k1, width, acc); break;
    case 4: block<T, 4>(x, K, w, packed, N, k0, k1, width, acc); break;
    case 5: block<T, 5>(x, K, w, packed, N, k0, k1, width, acc); break;
    default: block<T, kRows>(x, K, w, packed, N, k0, k1, width, acc); break;
  }
}

// out[:, n0:n0 + width] for all M rows.
template <typename T>
void panel(const T* x, const T* w, int64_t M, int64_t K, int64_t N, int64_t n0, float* out) {
  const int64_t width = std::min(kPanel, N - n0);
  float acc[kMaxRows * kPanel];
  std::fill(acc, acc + M * kPanel, 0.0f);
  // Row blocks of equal size (20 rows: 4 x 5), so that no block is a short, latency-bound remainder.
  const int64_t blocks = (M + kRows - 1) / kRows;
#if defined(__AVX512BF16__)
  __m512i packed[2 * kBlock];  // a [kBlock, 64] bfloat16 tile, interleaved (`pack`): kBlock / 2 pairs x 4
#else
  const void* packed = nullptr;
#endif
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = std::min(K, k0 + kBlock);
    // The panel's rows are kPanel columns of w at a stride of N: no pattern the hardware prefetchers follow far
    // enough ahead, so the next tile is requested while this one is multiplied.
    for (int64_t k = k1; k < std::min(K, k1 + kBlock); ++k)
      for (int64_t byte = 0; byte < width * static_cast<int64_t>(sizeof(T)); byte += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(w + k * N + n0) + byte, 0, kPrefetchLocality);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, uint16_t>) pack(w + n0, N, k0, k1, width, packed);
#endif
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t m0 = M * b / blocks, m1 = M * (b + 1) / blocks;
      rows_block<T>(x + m0 * K, K, w + n0, packed, N, k0, k1, width, static_cast<int>(m1 - m0), acc + m0 * kPanel);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    float* row = acc + m * kPanel;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, uint16_t>)
      for (int64_t g = 0; g < width; g += 32) unshuffle(row + g);
#endif
    std::memcpy(out + m * N + n0, row, width * sizeof(float));
  }
}

template <typename T>
void run(ffi::ThreadPool& pool, const void* x, const void* w, int64_t M, int64_t K, int64_t N, float* out) {
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  tidar::parallel_for(pool, (N + kPanel - 1) / kPanel,
                      [&](int64_t i) { panel<T>(xt, wt, M, K, N, i * kPanel, out); });
}

ffi::Error Gemm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || wd[1] % 32)
    return ffi::Error::InvalidArgument("gemm: x [M, K] and w [K, N] with N a multiple of 32");
  if (xd[0] < 1 || xd[0] > kMaxRows) return ffi::Error::InvalidArgument("gemm: x must have 1 to 128 rows");
  return tidar::by_dtype("gemm", x, w, [&](auto type) {
    run<decltype(type)>(pool, x.untyped_data(), w.untyped_data(), xd[0], xd[1], wd[1], out->typed_data());
    return ffi::Error::Success();
  });
}

}  // namespace

TIDAR_PRODUCT_HANDLER(TidarGemm, Gemm);
