// What the product kernels (gemv.cc, gemm.cc, matmul_nt.cc) share: the dispatch on the operands' dtype and the FFI
// signature (thread pool, x, w) -> out float32.
#ifndef TIDAR_JAX_OPS_CPU_PRODUCT_H_
#define TIDAR_JAX_OPS_CPU_PRODUCT_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace tidar {

// run(T{}) for T = float or uint16_t (bfloat16 bit patterns), x and w of one dtype; otherwise an error that names
// `kernel`.
template <typename Run>
xla::ffi::Error by_dtype(const char* kernel, const xla::ffi::AnyBuffer& x, const xla::ffi::AnyBuffer& w, Run&& run) {
  using xla::ffi::DataType;
  if (x.element_type() != w.element_type())
    return xla::ffi::Error::InvalidArgument(std::string(kernel) + ": x and w dtypes differ");
  if (x.element_type() == DataType::F32) return run(float{});
  if (x.element_type() == DataType::BF16) return run(uint16_t{});
  return xla::ffi::Error::InvalidArgument(std::string(kernel) + ": dtype must be float32 or bfloat16");
}

}  // namespace tidar

// The FFI handler `symbol` of `fn(ffi::ThreadPool, ffi::AnyBuffer x, ffi::AnyBuffer w,
// ffi::Result<ffi::Buffer<ffi::F32>> out)`.
#define TIDAR_PRODUCT_HANDLER(symbol, fn)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                                 \
                                xla::ffi::Ffi::Bind()                       \
                                    .Ctx<xla::ffi::ThreadPool>()            \
                                    .Arg<xla::ffi::AnyBuffer>()             \
                                    .Arg<xla::ffi::AnyBuffer>()             \
                                    .Ret<xla::ffi::Buffer<xla::ffi::F32>>())

#endif  // TIDAR_JAX_OPS_CPU_PRODUCT_H_
