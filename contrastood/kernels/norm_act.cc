// BatchNorm's elementwise passes (normalise, residual add, ReLU; and their gradient), as XLA FFI handlers for
// the CPU.
//
// Why: XLA:CPU's loop fusions for these passes ran at half the memory bandwidth or less on the 2-core Xeon of
// results/cpu_speed: the bfloat16 converts are not vectorised well, and a 16-channel minor dimension made a
// plain bfloat16 multiply 4x slower than the same bytes in a flat array. These handlers make each pass one
// vectorised sweep over [rows, c], with the per-channel vectors in float32:
//   ContrastoodNormActForward(x, mean, a, bias[, r]) -> y
//       y = act(bf((x - mean) * a + bias) [+ r]), the sum rounded again, act = ReLU or identity
//   ContrastoodNormActBackward(x, g, y, mean, inv, k, p, q) -> dx[, dz]
//       dz = ReLU ? (y > 0 ? g : 0) : g;  dx = k * (dz - (p + ((x - mean) * inv) * q))
// The arithmetic is the jnp expression's as XLA:CPU compiles it, operation for operation in float32: XLA contracts
// a * b + c into one fused multiply-add, so the kernel does (std::fma) and nothing else (the file is built with
// -ffp-contract=off), and each bfloat16 result is rounded to nearest even. So the results are the jnp fallback's
// (contrastood/norm_act.py) bit for bit.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace {
namespace ffi = xla::ffi;

constexpr int64_t kMinRowsPerThread = 64;
const int kDefaultTeam = omp_get_max_threads();  // threads = 0: OpenMP's default team (see channel_sums.cc)

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float Round(float v, float) { return v; }
inline float Round(float v, uint16_t) {  // to bfloat16 and back, nearest even; a NaN stays a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  r &= 0xffff0000u;
  float f;
  std::memcpy(&f, &r, sizeof f);
  return f;
}

inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) {  // v is already rounded (Round)
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  p[i] = static_cast<uint16_t>(u >> 16);
}

template <typename T, bool kResidual, bool kRelu>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void ForwardRows(
    const T* __restrict x, const T* __restrict res, const float* __restrict mean, const float* __restrict a,
    const float* __restrict bias, T* __restrict y, int64_t lo, int64_t hi, int64_t c) {
  for (int64_t r = lo; r < hi; ++r) {
    const T* __restrict xr = x + r * c;
    T* __restrict yr = y + r * c;
    const T* __restrict rr = kResidual ? res + r * c : nullptr;
    for (int64_t j = 0; j < c; ++j) {
      float v = Round(std::fma(Load(xr, j) - mean[j], a[j], bias[j]), T{});
      if (kResidual) v = Round(Load(rr, j) + v, T{});
      if (kRelu) v = v < 0.0f ? 0.0f : v;  // jnp.maximum(v, 0): a NaN stays NaN
      Store(yr, j, v);
    }
  }
}

template <typename T, bool kRelu, bool kWantDz>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void BackwardRows(
    const T* __restrict x, const T* __restrict g, const T* __restrict y, const float* __restrict mean,
    const float* __restrict inv, const float* __restrict k, const float* __restrict p, const float* __restrict q,
    T* __restrict dx, T* __restrict dz, int64_t lo, int64_t hi, int64_t c) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * c;
    for (int64_t j = 0; j < c; ++j) {
      const float gv = Load(g + o, j);
      const float d = kRelu ? (Load(y + o, j) > 0.0f ? gv : 0.0f) : gv;
      const float xh = (Load(x + o, j) - mean[j]) * inv[j];
      Store(dx + o, j, Round(k[j] * (d - std::fma(xh, q[j], p[j])), T{}));
      if (kWantDz) Store(dz + o, j, d);
    }
  }
}

int Team(int64_t threads, int64_t rows) {
  const int team = threads > 0 ? static_cast<int>(threads) : kDefaultTeam;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(team, rows / kMinRowsPerThread)));
}

template <typename T, bool kResidual, bool kRelu>
void Forward(const void* x, const void* res, const float* mean, const float* a, const float* bias, void* y,
             int64_t rows, int64_t c, int64_t threads) {
#pragma omp parallel num_threads(Team(threads, rows))
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    ForwardRows<T, kResidual, kRelu>(static_cast<const T*>(x), static_cast<const T*>(res), mean, a, bias,
                                     static_cast<T*>(y), rows * t / n, rows * (t + 1) / n, c);
  }
}

template <typename T, bool kRelu, bool kWantDz>
void Backward(const void* x, const void* g, const void* y, const float* const* v, void* dx, void* dz, int64_t rows,
              int64_t c, int64_t threads) {
#pragma omp parallel num_threads(Team(threads, rows))
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    BackwardRows<T, kRelu, kWantDz>(static_cast<const T*>(x), static_cast<const T*>(g), static_cast<const T*>(y),
                                    v[0], v[1], v[2], v[3], v[4], static_cast<T*>(dx), static_cast<T*>(dz),
                                    rows * t / n, rows * (t + 1) / n, c);
  }
}

ffi::Error Shape(const ffi::AnyBuffer& x, int64_t* rows, int64_t* c) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("norm_act: the input needs a channel axis");
  *c = dims.back();
  *rows = *c ? static_cast<int64_t>(x.element_count()) / *c : 0;
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("norm_act: float32 or bfloat16 activations only");
  return ffi::Error::Success();
}

ffi::Error Same(const ffi::AnyBuffer& x, const ffi::AnyBuffer& other, const char* what) {
  if (other.element_type() != x.element_type() || other.element_count() != x.element_count())
    return ffi::Error::InvalidArgument(std::string("norm_act: ") + what + " must have x's shape and dtype");
  return ffi::Error::Success();
}

ffi::Error Vectors(std::initializer_list<const ffi::Buffer<ffi::F32>*> vs, int64_t c) {
  for (auto* v : vs)
    if (v->element_count() != static_cast<size_t>(c))
      return ffi::Error::InvalidArgument("norm_act: per-channel vectors must have one value per channel");
  return ffi::Error::Success();
}

template <bool kResidual>
ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> a,
                       ffi::Buffer<ffi::F32> bias, const ffi::AnyBuffer* res, ffi::Result<ffi::AnyBuffer> y,
                       bool relu, int64_t threads) {
  int64_t rows, c;
  ffi::Error e = Shape(x, &rows, &c);
  if (e.failure()) return e;
  if ((e = Same(x, *y, "the output")).failure()) return e;
  if (kResidual && (e = Same(x, *res, "the residual")).failure()) return e;
  if ((e = Vectors({&mean, &a, &bias}, c)).failure()) return e;
  const void* r = kResidual ? res->untyped_data() : nullptr;
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  auto run = [&](auto tag, auto relu_tag) {
    using T = decltype(tag);
    Forward<T, kResidual, decltype(relu_tag)::value>(x.untyped_data(), r, mean.typed_data(), a.typed_data(),
                                                     bias.typed_data(), y->untyped_data(), rows, c, threads);
  };
  if (bf16)
    relu ? run(uint16_t{}, std::true_type{}) : run(uint16_t{}, std::false_type{});
  else
    relu ? run(float{}, std::true_type{}) : run(float{}, std::false_type{});
  return ffi::Error::Success();
}

ffi::Error NormActForward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> a,
                          ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y, bool relu, int64_t threads) {
  return ForwardImpl<false>(x, mean, a, bias, nullptr, y, relu, threads);
}

ffi::Error NormAddActForward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> a,
                             ffi::Buffer<ffi::F32> bias, ffi::AnyBuffer res, ffi::Result<ffi::AnyBuffer> y, bool relu,
                             int64_t threads) {
  return ForwardImpl<true>(x, mean, a, bias, &res, y, relu, threads);
}

template <bool kWantDz>
ffi::Error BackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer y, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> p,
                        ffi::Buffer<ffi::F32> q, ffi::Result<ffi::AnyBuffer> dx, ffi::AnyBuffer* dz, bool relu,
                        int64_t threads) {
  int64_t rows, c;
  ffi::Error e = Shape(x, &rows, &c);
  if (e.failure()) return e;
  if ((e = Same(x, g, "the cotangent")).failure() || (relu && (e = Same(x, y, "the output")).failure()) ||
      (e = Same(x, *dx, "dx")).failure() || (kWantDz && (e = Same(x, *dz, "dz")).failure()))
    return e;
  if ((e = Vectors({&mean, &inv, &k, &p, &q}, c)).failure()) return e;
  const float* v[5] = {mean.typed_data(), inv.typed_data(), k.typed_data(), p.typed_data(), q.typed_data()};
  void* dz_data = kWantDz ? dz->untyped_data() : nullptr;
  auto run = [&](auto tag, auto relu_tag) {
    using T = decltype(tag);
    Backward<T, decltype(relu_tag)::value, kWantDz>(x.untyped_data(), g.untyped_data(), y.untyped_data(), v,
                                                    dx->untyped_data(), dz_data, rows, c, threads);
  };
  if (x.element_type() == ffi::DataType::BF16)
    relu ? run(uint16_t{}, std::true_type{}) : run(uint16_t{}, std::false_type{});
  else
    relu ? run(float{}, std::true_type{}) : run(float{}, std::false_type{});
  return ffi::Error::Success();
}

ffi::Error NormActBackward(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer y, ffi::Buffer<ffi::F32> mean,
                           ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> p,
                           ffi::Buffer<ffi::F32> q, ffi::Result<ffi::AnyBuffer> dx, bool relu, int64_t threads) {
  return BackwardImpl<false>(x, g, y, mean, inv, k, p, q, dx, nullptr, relu, threads);
}

ffi::Error NormAddActBackward(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer y, ffi::Buffer<ffi::F32> mean,
                              ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> p,
                              ffi::Buffer<ffi::F32> q, ffi::Result<ffi::AnyBuffer> dx,
                              ffi::Result<ffi::AnyBuffer> dz, bool relu, int64_t threads) {
  ffi::AnyBuffer dz_buffer = *dz;
  return BackwardImpl<true>(x, g, y, mean, inv, k, p, q, dx, &dz_buffer, relu, threads);
}
}  // namespace

using F32 = ffi::Buffer<ffi::F32>;
// (x, mean, a, bias) -> y, and (x, mean, a, bias, residual) -> y.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodNormActForward, NormActForward,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<ffi::AnyBuffer>().Attr<bool>("relu").Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodNormAddActForward, NormAddActForward,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Attr<bool>("relu")
                                  .Attr<int64_t>("threads"));
// (x, g, y, mean, inv, k, p, q) -> dx, and -> (dx, dz) where the residual needs its gradient dz.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodNormActBackward, NormActBackward,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("relu").Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodNormAddActBackward, NormAddActBackward,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>().Attr<bool>("relu").Attr<int64_t>("threads"));
