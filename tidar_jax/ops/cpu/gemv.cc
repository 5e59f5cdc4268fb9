// A few rows times a weight matrix on the CPU as one XLA FFI custom call: out [M, N] float32 = x [M, K] @ w [K, N],
// x and w float32 or bfloat16 (alike), M <= 4, N a multiple of 16, accumulated in float32.
//
// A decode step's projections are such products (M = 1 for an AR step at batch 1): they only stream the weights, and
// XLA:CPU's matrix-vector kernels read small weight matrices well below the memory bandwidth a plain read reaches.
// Here K is split into a fixed number of row chunks (set by the shape alone, never by the thread count, so results
// do not depend on scheduling); each chunk streams its contiguous rows of w once, in tiles of columns held in L1,
// into its own partial sums, and the partial sums are added in chunk order.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "product.h"
#include "vector.h"
#include "work.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tidar::F16;
using tidar::load16;

constexpr int64_t kChunkBytes = 256 << 10;  // weight bytes one work item streams (at least)
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kTileFloats = 4096;  // partial sums per tile (16 KB, in L1): whole weight rows when they fit

// part[M, N] = x[:, k0:k1] @ w[k0:k1, :] (N a multiple of 16). One weight row at a time, front to back: a single
// sequential stream (measured: 21 GB/s on one core against 13-17 GB/s when 2-8 rows are read side by side).
template <typename T, int M>
void chunk(const T* x, const T* w, int64_t K, int64_t N, int64_t k0, int64_t k1, float* part) {
  const int64_t tile = kTileFloats / M / 16 * 16;
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    for (int m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; n += 16) tidar::store16(part + m * N + n, F16{});
    for (int64_t k = k0; k < k1; ++k) {
      float xs[M];
      for (int m = 0; m < M; ++m) xs[m] = tidar::to_float(x[m * K + k]);
      const T* row = w + k * N;
      for (int64_t n = n0; n < n1; n += 16) {
        const F16 wv = load16(row + n);
        for (int m = 0; m < M; ++m) tidar::store16(part + m * N + n, load16(part + m * N + n) + xs[m] * wv);
      }
    }
  }
}

template <typename T, int M>
void run(ffi::ThreadPool& pool, const T* x, const T* w, int64_t K, int64_t N, float* out) {
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(T));
  const int64_t chunks = std::clamp<int64_t>(K * row_bytes / kChunkBytes, 1, std::min(kMaxChunks, K));
  std::vector<float> parts(chunks * M * N);
  tidar::parallel_for(pool, chunks, [&](int64_t c) {
    chunk<T, M>(x, w, K, N, K * c / chunks, K * (c + 1) / chunks, parts.data() + c * M * N);
  });
  for (int64_t i = 0; i < M * N; i += 16) {
    F16 sum = load16(parts.data() + i);
    for (int64_t c = 1; c < chunks; ++c) sum += load16(parts.data() + c * M * N + i);
    tidar::store16(out + i, sum);
  }
}

template <typename T>
ffi::Error dispatch(ffi::ThreadPool& pool, const void* x, const void* w, int64_t M, int64_t K, int64_t N, float* out) {
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  switch (M) {
    case 1: run<T, 1>(pool, xt, wt, K, N, out); break;
    case 2: run<T, 2>(pool, xt, wt, K, N, out); break;
    case 3: run<T, 3>(pool, xt, wt, K, N, out); break;
    case 4: run<T, 4>(pool, xt, wt, K, N, out); break;
    default: return ffi::Error::InvalidArgument("gemv: x must have 1 to 4 rows");
  }
  return ffi::Error::Success();
}

ffi::Error Gemv(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || wd[1] % 16)
    return ffi::Error::InvalidArgument("gemv: x [M, K] and w [K, N] with N a multiple of 16");
  return tidar::by_dtype("gemv", x, w, [&](auto type) {
    return dispatch<decltype(type)>(pool, x.untyped_data(), w.untyped_data(), xd[0], xd[1], wd[1],
                                    out->typed_data());
  });
}

}  // namespace

TIDAR_PRODUCT_HANDLER(TidarGemv, Gemv);
