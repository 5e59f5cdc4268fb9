// 16-lane float32 vectors (GCC vector extensions: one AVX-512 register, or two AVX2 ones) and bfloat16 conversions
// shared by the CPU kernels.
#ifndef TIDAR_JAX_OPS_CPU_VECTOR_H_
#define TIDAR_JAX_OPS_CPU_VECTOR_H_

#include <cstdint>
#include <cstring>

namespace tidar {

typedef float F16 __attribute__((vector_size(64)));     // 16 float32 lanes
typedef uint16_t H16 __attribute__((vector_size(32)));  // 16 bfloat16 bit patterns
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));

inline F16 load16(const float* p) {
  F16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline F16 load16(const uint16_t* p) {  // bfloat16 -> float32 is exact: the bits go to the high half
  H16 h;
  std::memcpy(&h, p, sizeof h);
  const U16 w = __builtin_convertvector(h, U16) << 16;
  F16 x;
  std::memcpy(&x, &w, sizeof x);
  return x;
}

inline void store16(float* p, F16 x) { std::memcpy(p, &x, sizeof x); }

// The sum of the lanes: a tree of halvings, a few shuffles and no 16-step dependency chain.
inline float hsum(F16 x) {
  F8 halves[2];
  std::memcpy(halves, &x, sizeof halves);
  const F8 y = halves[0] + halves[1];
  F4 quarters[2];
  std::memcpy(quarters, &y, sizeof quarters);
  const F4 z = quarters[0] + quarters[1];
  return (z[0] + z[2]) + (z[1] + z[3]);
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bits) {
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

inline uint16_t bf16_bits(float x) {  // round to nearest even, as XLA converts
  uint32_t w;
  std::memcpy(&w, &x, sizeof w);
  if ((w & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((w >> 16) | 0x40);  // NaN stays NaN
  w += 0x7fffu + ((w >> 16) & 1u);
  return static_cast<uint16_t>(w >> 16);
}

}  // namespace tidar

#endif  // TIDAR_JAX_OPS_CPU_VECTOR_H_
