// A few rows times a transposed weight on the CPU as one XLA FFI custom call: out [M, V] float32 = x [M, D] @ w^T
// for w [V, D], x and w float32 or bfloat16 (alike), D a multiple of 32, accumulated in float32.
//
// A tied LM head is such a product: the embedding [vocab, d_model] used as it lies, for the few rows a decode step
// reads (1 for AR, 2K for a TiDAR step). It is bound by reading w (113 MB for SmolLM2-135M in float32), and XLA's
// dot reads the transposed operand at about half the bandwidth a plain read reaches. Here each work item streams a
// run of whole rows of w front to back and dots each row with every row of x (held in L1); every output is one dot
// product summed in a fixed order, so results do not depend on scheduling. bfloat16 uses AVX-512 BF16
// (`vdpbf16ps`, pairs of adjacent d elements of both operands) where the compiler targets it.
#include <algorithm>
#include <cstdint>
#include <cstring>

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
using tidar::hsum;
using tidar::load16;

constexpr int64_t kItemRows = 256;  // rows of w per work item
constexpr int64_t kMaxRows = 32;    // rows of x (cpu_kernels.py uses up to 16)

// out[r * V] = dot(x row r, w[:D]) for the R rows of x (rows D long, D a multiple of 32), in float32: R rows
// against one row of w at once, two accumulators per row, so 2R independent FMA chains hide the FMA latency. (Four
// rows of w at once, fewer loads per FMA, was slower in every case measured: 1.5-3x at 1 row of x.)
template <typename T, int R>
inline void widened_dots(const T* x, const T* w, int64_t D, int64_t V, float* out) {
  F16 acc[R][2] = {};
  for (int64_t e = 0; e < D; e += 32) {
    const F16 w0 = load16(w + e), w1 = load16(w + e + 16);
    for (int r = 0; r < R; ++r) {
      acc[r][0] += load16(x + r * D + e) * w0;
      acc[r][1] += load16(x + r * D + e + 16) * w1;
    }
  }
  for (int r = 0; r < R; ++r) out[r * V] = hsum(acc[r][0] + acc[r][1]);
}

template <int R>
inline void dots(const float* x, const float* w, int64_t D, int64_t V, float* out) {
  widened_dots<float, R>(x, w, D, V, out);
}

template <int R>
inline void dots(const uint16_t* x, const uint16_t* w, int64_t D, int64_t V, float* out) {
#if defined(__AVX512BF16__)
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 64 <= D; e += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + e), w1 = (__m512bh)_mm512_loadu_si512(w + e + 32);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_loadu_si512(x + r * D + e), w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_loadu_si512(x + r * D + e + 32), w1);
    }
  }
  if (e < D) {  // D % 64 == 32
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + e);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_loadu_si512(x + r * D + e), w0);
  }
  for (int r = 0; r < R; ++r) {
    F16 a, b;
    std::memcpy(&a, &acc[r][0], sizeof a);
    std::memcpy(&b, &acc[r][1], sizeof b);
    out[r * V] = hsum(a + b);
  }
#else
  widened_dots<uint16_t, R>(x, w, D, V, out);
#endif
}

template <typename T>
void run(ffi::ThreadPool& pool, const void* x, const void* w, int64_t M, int64_t D, int64_t V, float* out) {
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  tidar::parallel_for(pool, (V + kItemRows - 1) / kItemRows, [&](int64_t item) {
    const int64_t v1 = std::min(V, (item + 1) * kItemRows);
    for (int64_t v = item * kItemRows; v < v1; ++v) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) dots<4>(xt + m * D, wt + v * D, D, V, out + m * V + v);
      switch (M - m) {
        case 3: dots<3>(xt + m * D, wt + v * D, D, V, out + m * V + v); break;
        case 2: dots<2>(xt + m * D, wt + v * D, D, V, out + m * V + v); break;
        case 1: dots<1>(xt + m * D, wt + v * D, D, V, out + m * V + v); break;
      }
    }
  });
}

ffi::Error MatmulNt(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || wd[1] % 32)
    return ffi::Error::InvalidArgument("matmul_nt: x [M, D] and w [V, D] with D a multiple of 32");
  if (xd[0] < 1 || xd[0] > kMaxRows) return ffi::Error::InvalidArgument("matmul_nt: x must have 1 to 32 rows");
  return tidar::by_dtype("matmul_nt", x, w, [&](auto type) {
    run<decltype(type)>(pool, x.untyped_data(), w.untyped_data(), xd[0], xd[1], wd[0], out->typed_data());
    return ffi::Error::Success();
  });
}

}  // namespace

TIDAR_PRODUCT_HANDLER(TidarMatmulNt, MatmulNt);
