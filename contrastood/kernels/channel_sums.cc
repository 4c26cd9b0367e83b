// Per-channel sums of an activation for BatchNorm, as XLA FFI handlers for the CPU.
//
// Why: XLA:CPU's YNNPACK reductions cannot fuse a bfloat16 -> float32 convert, so every BatchNorm
// statistic first wrote a float32 copy of its activation and then read it back, once per sum (about
// 4 ms for a [256, 32, 32, 64] bfloat16 activation on a 2-core AMD EPYC, against under 1 ms to read
// it once). These handlers read the activation once, in its own dtype, and return both sums:
//   ContrastoodChannelMoments(x)       -> (sum x, sum x^2)   the forward's statistics
//   ContrastoodChannelDots(x, dy)      -> (sum dy, sum dy*x) the backward's
//   ContrastoodChannelMaskedDots(x, g, y) -> the same with dy = (y > 0 ? g : 0): a ReLU's output y masks the
//                                         cotangent g in the same pass (contrastood/norm_act.py), unwritten
// over every axis but the last. Each thread sums its rows in blocks of float32 (vectorised) and adds the
// blocks into float64 totals, so the result does not depend on how long the batch is.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace {
namespace ffi = xla::ffi;

constexpr int64_t kBlockRows = 64;

// OpenMP's default team, read when the library loads. threads = 0 means this, not the calling thread's current
// setting: the oneDNN convolutions set that per call (a device's share of the cores) on the same XLA threads.
const int kDefaultTeam = omp_get_max_threads();

inline float Value(const float* p, int64_t i) { return p[i]; }
inline float Value(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Rows [lo, hi) of x (and dy) [rows, c]: first[j] += sum dy (or x), second[j] += sum dy*x (or x^2).
template <typename T, bool kDots, bool kMasked = false>
__attribute__((target_clones("avx512f", "avx2", "default"))) void SumRows(
    const T* __restrict x, const T* __restrict dy, const T* __restrict y, int64_t lo, int64_t hi, int64_t c,
    float* __restrict a, float* __restrict b, double* __restrict first, double* __restrict second) {
  for (int64_t r0 = lo; r0 < hi; r0 += kBlockRows) {
    const int64_t r1 = std::min(hi, r0 + kBlockRows);
    std::fill(a, a + c, 0.0f);
    std::fill(b, b + c, 0.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * c;
      if (kDots) {
        const T* __restrict dr = dy + r * c;
        const T* __restrict yr = kMasked ? y + r * c : nullptr;
        for (int64_t j = 0; j < c; ++j) {
          const float gj = Value(dr, j);  // both loaded unconditionally: a select, which vectorises
          const float g = kMasked ? (Value(yr, j) > 0.0f ? gj : 0.0f) : gj;
          a[j] += g;
          b[j] += g * Value(xr, j);
        }
      } else {
        for (int64_t j = 0; j < c; ++j) {
          const float v = Value(xr, j);
          a[j] += v;
          b[j] += v * v;
        }
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      first[j] += a[j];
      second[j] += b[j];
    }
  }
}

template <typename T, bool kDots, bool kMasked = false>
void Sums(const void* x, const void* dy, const void* y, int64_t rows, int64_t c, int64_t threads, float* first,
          float* second) {
  const int team = threads > 0 ? static_cast<int>(threads) : kDefaultTeam;
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(team, rows / kBlockRows)));
  std::vector<double> totals(2 * c * used, 0.0);
#pragma omp parallel num_threads(used)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    std::vector<float> a(c), b(c);
    SumRows<T, kDots, kMasked>(static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<const T*>(y),
                               rows * t / n, rows * (t + 1) / n, c,
                      a.data(), b.data(), &totals[2 * c * t], &totals[2 * c * t + c]);
  }
  for (int64_t j = 0; j < c; ++j) {
    double s = 0, q = 0;
    for (int t = 0; t < used; ++t) {
      s += totals[2 * c * t + j];
      q += totals[2 * c * t + c + j];
    }
    first[j] = static_cast<float>(s);
    second[j] = static_cast<float>(q);
  }
}

ffi::Error Check(const ffi::AnyBuffer& x, ffi::Result<ffi::Buffer<ffi::F32>>& first, int64_t* rows, int64_t* c) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("channel sums: the input needs a channel axis");
  *c = dims.back();
  *rows = *c ? static_cast<int64_t>(x.element_count()) / *c : 0;
  if (first->element_count() != static_cast<size_t>(*c))
    return ffi::Error::InvalidArgument("channel sums: outputs must have one value per channel");
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("channel sums: float32 or bfloat16 inputs only");
  return ffi::Error::Success();
}

ffi::Error Moments(ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::F32>> sum, ffi::Result<ffi::Buffer<ffi::F32>> sum_sq,
                   int64_t threads) {
  int64_t rows, c;
  ffi::Error e = Check(x, sum, &rows, &c);
  if (e.failure()) return e;
  if (x.element_type() == ffi::DataType::F32)
    Sums<float, false>(x.untyped_data(), nullptr, nullptr, rows, c, threads, sum->typed_data(), sum_sq->typed_data());
  else
    Sums<uint16_t, false>(x.untyped_data(), nullptr, nullptr, rows, c, threads, sum->typed_data(),
                          sum_sq->typed_data());
  return ffi::Error::Success();
}

ffi::Error Dots(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::Buffer<ffi::F32>> sum_dy,
                ffi::Result<ffi::Buffer<ffi::F32>> sum_dy_x, int64_t threads) {
  int64_t rows, c;
  ffi::Error e = Check(x, sum_dy, &rows, &c);
  if (e.failure()) return e;
  if (dy.element_type() != x.element_type() || dy.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("channel sums: x and dy must have the same shape and dtype");
  if (x.element_type() == ffi::DataType::F32)
    Sums<float, true>(x.untyped_data(), dy.untyped_data(), nullptr, rows, c, threads, sum_dy->typed_data(),
                      sum_dy_x->typed_data());
  else
    Sums<uint16_t, true>(x.untyped_data(), dy.untyped_data(), nullptr, rows, c, threads, sum_dy->typed_data(),
                         sum_dy_x->typed_data());
  return ffi::Error::Success();
}

ffi::Error MaskedDots(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer y, ffi::Result<ffi::Buffer<ffi::F32>> sum_dy,
                      ffi::Result<ffi::Buffer<ffi::F32>> sum_dy_x, int64_t threads) {
  int64_t rows, c;
  ffi::Error e = Check(x, sum_dy, &rows, &c);
  if (e.failure()) return e;
  for (const ffi::AnyBuffer* other : {&g, &y})
    if (other->element_type() != x.element_type() || other->element_count() != x.element_count())
      return ffi::Error::InvalidArgument("channel sums: x, g and y must have the same shape and dtype");
  if (x.element_type() == ffi::DataType::F32)
    Sums<float, true, true>(x.untyped_data(), g.untyped_data(), y.untyped_data(), rows, c, threads,
                            sum_dy->typed_data(), sum_dy_x->typed_data());
  else
    Sums<uint16_t, true, true>(x.untyped_data(), g.untyped_data(), y.untyped_data(), rows, c, threads,
                               sum_dy->typed_data(), sum_dy_x->typed_data());
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodChannelMoments, Moments,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodChannelDots, Dots,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodChannelMaskedDots, MaskedDots,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
