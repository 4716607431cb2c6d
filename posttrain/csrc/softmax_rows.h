// Row kernels shared by the CPU ops in this directory (fused_logprobs.cpp, linear_cross_entropy.cpp): the
// elementwise softmax work on one row of an fp32 logits tile, as plain loops the compiler vectorises.
// Internal to each translation unit (anonymous namespace): every .cpp that includes it gets its own copy.

#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace posttrain {
namespace {

// Log-sum-exp statistics of a set of logits, all relative to their max: (max, Z = sum e^(z - max),
// D = sum (z - max) e^(z - max)). Z == 0 marks the empty set.
struct LogSumExpStats {
  float max;
  float sum_exp;
  float shifted_dot;
};

// ---- Row kernels: the elementwise work on one row of a logits tile, in single passes. -------------------------
// Plain loops over a branch-free exp, so the compiler vectorises them (`omp simd`); on x86-64 an AVX2+FMA copy
// is compiled next to the baseline (SSE2) one and picked at run time. Measured on the dev machine: ~0.5 ns per
// element per pass, ~4% of a 256 x 1024 x 512 tile GEMM, where ATen's exp alone (MKL VML) took 1.5-2 ns.

// e^x for x <= 88: Cephes expf, x = n ln2 + r with |r| <= ln2/2, a degree-5 polynomial for e^r (relative error
// < 1e-7 on [-87, 0]), times 2^n assembled from exponent bits. Below x ~ -87.3 (n < -126) the result is flushed
// to 0, where std::exp gives denormals; x is clamped at -104 first so r and n stay finite for any input (NaN
// still propagates). Branch-free, so the loops below vectorise (with -fno-trapping-math, see build.py).
__attribute__((always_inline)) inline float exp_for_softmax(float x) {
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  x = std::max(x, -104.0f);
  const float shifted = x * 1.44269504088896341f + kRoundingShift;
  const float n = shifted - kRoundingShift;
  const int32_t exponent =
      std::max(std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRoundingShift), int32_t{-127});
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, ln2 split so n ln2 is exact
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r * r + r + 1.0f;
  return exp_r * std::bit_cast<float>((exponent + 127) << 23);  // exponent == -127 gives 2^n = +0
}

// Statistics of one row of logits: its max, sum e^(z - max) and sum (z - max) e^(z - max).
inline __attribute__((always_inline)) LogSumExpStats row_stats_loop(const float* row, int64_t width) {
  float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t i = 0; i < width; ++i) row_max = row[i] > row_max ? row[i] : row_max;
  float sum_exp = 0.0f, shifted_dot = 0.0f;
#pragma omp simd reduction(+ : sum_exp, shifted_dot)
  for (int64_t i = 0; i < width; ++i) {
    const float shifted = row[i] - row_max;
    const float exp_shifted = exp_for_softmax(shifted);
    sum_exp += exp_shifted;
    shifted_dot += shifted * exp_shifted;
  }
  return {row_max, sum_exp, shifted_dot};
}

// In place: z_v -> e^(z_v - lse) (slope z_v + offset), the non-target part of one row's logits gradient.
inline __attribute__((always_inline)) void row_grad_loop(float* row, int64_t width, float lse, float slope,
                                                         float offset) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float z = row[i];
    row[i] = exp_for_softmax(z - lse) * (slope * z + offset);
  }
}

LogSumExpStats row_stats_baseline(const float* row, int64_t width) { return row_stats_loop(row, width); }
void row_grad_baseline(float* row, int64_t width, float lse, float slope, float offset) {
  row_grad_loop(row, width, lse, slope, offset);
}

struct RowKernels {
  LogSumExpStats (*stats)(const float*, int64_t);
  void (*grad)(float*, int64_t, float, float, float);
};

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) LogSumExpStats row_stats_avx2(const float* row, int64_t width) {
  return row_stats_loop(row, width);
}
__attribute__((target("avx2,fma"))) void row_grad_avx2(float* row, int64_t width, float lse, float slope,
                                                       float offset) {
  row_grad_loop(row, width, lse, slope, offset);
}
#endif

const RowKernels& row_kernels() {
  static const RowKernels kernels = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return RowKernels{row_stats_avx2, row_grad_avx2};
    }
#endif
    return RowKernels{row_stats_baseline, row_grad_baseline};
  }();
  return kernels;
}

}  // namespace
}  // namespace posttrain
