// oneDNN convolutions (forward, backward-data, backward-weights) as XLA FFI handlers for the CPU.
//
// Why: XLA:CPU runs convolutions through Eigen and inserts transposes for the weight gradients; on the
// CPUs measured (results/cpu_speed) that made the ResNet step about half as fast as PyTorch, whose
// oneDNN kernels work on NHWC activations directly. These handlers take XLA's row-major NHWC/HWIO
// buffers as they are, let oneDNN choose its blocked weight layout (one small reorder per call), and
// give each calling thread its own stream and scratchpad, so concurrent devices never share state.
//
// The few oneDNN C API declarations used are written out below (ABI of oneDNN 3.x), so building
// needs only a C++ compiler and jaxlib's FFI headers; the library is loaded from the onednn-cpu-gomp
// wheel at run time (contrastood/onednn.py builds and loads this file).
#include <omp.h>

#include <algorithm>
#include <initializer_list>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

extern "C" {
typedef int dnnl_status_t;  // dnnl_success == 0
typedef int64_t dnnl_dim_t;
typedef dnnl_dim_t dnnl_dims_t[12];
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;
typedef struct {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
} dnnl_version_t;

dnnl_status_t dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t);
dnnl_status_t dnnl_memory_desc_create_with_strides(dnnl_memory_desc_t*, int ndims, const dnnl_dims_t dims,
                                                   int data_type, const dnnl_dims_t strides);
dnnl_status_t dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t*, int ndims, const dnnl_dims_t dims,
                                               int data_type, int tag);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t, const_dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t);
dnnl_status_t dnnl_memory_create(dnnl_memory_t*, const_dnnl_memory_desc_t, dnnl_engine_t, void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t);
dnnl_status_t dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
dnnl_status_t dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
dnnl_status_t dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
dnnl_status_t dnnl_convolution_forward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l,
    const dnnl_dims_t padding_r, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_data_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t diff_src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_weights_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t diff_weights, const_dnnl_memory_desc_t diff_bias,
    const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides, const dnnl_dims_t dilates,
    const dnnl_dims_t padding_l, const dnnl_dims_t padding_r, const_dnnl_primitive_desc_t hint,
    const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t*, const_dnnl_memory_desc_t src,
                                                 dnnl_engine_t, const_dnnl_memory_desc_t dst, dnnl_engine_t,
                                                 const_dnnl_primitive_attr_t);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t, int what, int index);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t*, const_dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_execute(dnnl_primitive_t, dnnl_stream_t, int nargs, const dnnl_exec_arg_t* args);
const dnnl_version_t* dnnl_version(void);
typedef struct dnnl_post_ops* dnnl_post_ops_t;
typedef const struct dnnl_post_ops* const_dnnl_post_ops_t;
dnnl_status_t dnnl_matmul_primitive_desc_create(dnnl_primitive_desc_t*, dnnl_engine_t, const_dnnl_memory_desc_t src,
                                                const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t bias,
                                                const_dnnl_memory_desc_t dst, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_post_ops_create(dnnl_post_ops_t*);
dnnl_status_t dnnl_post_ops_destroy(dnnl_post_ops_t);
dnnl_status_t dnnl_post_ops_append_sum(dnnl_post_ops_t, float scale, int32_t zero_point, int data_type);
dnnl_status_t dnnl_primitive_attr_set_post_ops(dnnl_primitive_attr_t, const_dnnl_post_ops_t);
}

namespace {
namespace ffi = xla::ffi;

constexpr int kF16 = 1, kBF16 = 2, kF32 = 3, kFormatAny = 1, kCpu = 1, kInOrder = 1;
constexpr int kForwardTraining = 64, kBackwardData = 160, kBackwardWeights = 192, kConvDirect = 1;
constexpr int kQueryWeights = 131, kQueryDiffWeights = 132, kQueryScratchpad = 136;
constexpr int kScratchpadUser = 1;
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80, kArgDiffSrc = 129,
              kArgDiffDst = 145, kArgDiffWeights = 161;

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// One convolution problem: NHWC input [n,h,w,c], HWIO weights [kh,kw,c,o], NHWC output [n,ho,wo,o], run with
// `threads` OpenMP threads (part of the problem because oneDNN fixes a primitive's work split at creation).
struct Problem {
  int kind, dtype, threads;
  int64_t n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr;
  auto tie() const {
    return std::tie(kind, dtype, threads, n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr);
  }
  bool operator<(const Problem& other) const { return tie() < other.tie(); }
};

// What one problem needs at run time; built once per process and kept (primitives are immutable).
struct Plan {
  dnnl_primitive_t conv = nullptr;
  dnnl_memory_desc_t src = nullptr, dst = nullptr, weights_plain = nullptr;  // the XLA buffers' layouts
  const_dnnl_memory_desc_t weights_opt = nullptr;  // oneDNN's chosen weight layout (owned by conv_pd)
  dnnl_primitive_desc_t conv_pd = nullptr;
  dnnl_primitive_t reorder = nullptr;  // plain->opt (fwd, bwd-data) or opt->plain (bwd-weights); null if equal
  size_t weights_opt_bytes = 0, scratch_bytes = 0;
  std::string error;
};

std::string Status(const char* what, dnnl_status_t s) {
  return std::string("oneDNN ") + what + " failed with status " + std::to_string(s);
}

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    dnnl_engine_create(&e, kCpu, 0);
    return e;
  }();
  return engine;
}

// A thread's stream and scratch buffers: oneDNN streams are not thread-safe and XLA may run several
// devices' convolutions at once, so nothing mutable is shared between threads.
struct ThreadState {
  dnnl_stream_t stream = nullptr;
  std::vector<char> scratch, weights;
  ThreadState() { dnnl_stream_create(&stream, Engine(), kInOrder); }
};
ThreadState& Local() {
  thread_local ThreadState state;
  return state;
}

dnnl_memory_desc_t Plain(int dtype, std::initializer_list<int64_t> logical, std::initializer_list<int64_t> strides) {
  dnnl_dims_t d = {0}, s = {0};
  int i = 0;
  for (int64_t v : logical) d[i++] = v;
  i = 0;
  for (int64_t v : strides) s[i++] = v;
  dnnl_memory_desc_t md = nullptr;
  dnnl_memory_desc_create_with_strides(&md, 4, d, dtype, s);
  return md;
}

Plan* Build(const Problem& p) {
  auto* plan = new Plan();
  // oneDNN's logical order is N,C,H,W for activations and O,I,H,W for weights; strides give XLA's layouts.
  dnnl_memory_desc_t src = Plain(p.dtype, {p.n, p.c, p.h, p.w}, {p.h * p.w * p.c, 1, p.w * p.c, p.c});
  dnnl_memory_desc_t dst = Plain(p.dtype, {p.n, p.o, p.ho, p.wo}, {p.ho * p.wo * p.o, 1, p.wo * p.o, p.o});
  dnnl_memory_desc_t wplain = Plain(p.dtype, {p.o, p.c, p.kh, p.kw}, {1, p.o, p.kw * p.c * p.o, p.c * p.o});
  dnnl_dims_t wdims = {p.o, p.c, p.kh, p.kw};
  dnnl_memory_desc_t wany = nullptr;
  dnnl_memory_desc_create_with_tag(&wany, 4, wdims, p.dtype, kFormatAny);
  dnnl_dims_t strides = {p.sh, p.sw}, dil = {0, 0}, pad_l = {p.pt, p.pl}, pad_r = {p.pb, p.pr};
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_primitive_attr_create(&attr);
  dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser);
  dnnl_primitive_desc_t fwd = nullptr;
  dnnl_status_t s = dnnl_convolution_forward_primitive_desc_create(
      &fwd, Engine(), kForwardTraining, kConvDirect, src, wany, nullptr, dst, strides, dil, pad_l, pad_r, attr);
  if (s != 0) {
    plan->error = Status("convolution forward descriptor", s);
  } else if (p.kind == kFwd) {
    plan->conv_pd = fwd;
    fwd = nullptr;
  } else if (p.kind == kBwdData) {
    s = dnnl_convolution_backward_data_primitive_desc_create(&plan->conv_pd, Engine(), kConvDirect, src, wany, dst,
                                                             strides, dil, pad_l, pad_r, fwd, attr);
    if (s != 0) plan->error = Status("convolution backward-data descriptor", s);
  } else {
    s = dnnl_convolution_backward_weights_primitive_desc_create(&plan->conv_pd, Engine(), kConvDirect, src, wany,
                                                                nullptr, dst, strides, dil, pad_l, pad_r, fwd, attr);
    if (s != 0) plan->error = Status("convolution backward-weights descriptor", s);
  }
  if (fwd) dnnl_primitive_desc_destroy(fwd);
  dnnl_primitive_attr_destroy(attr);
  dnnl_memory_desc_destroy(wany);
  plan->src = src;
  plan->dst = dst;
  plan->weights_plain = wplain;
  if (!plan->error.empty()) return plan;
  if ((s = dnnl_primitive_create(&plan->conv, plan->conv_pd)) != 0) {
    plan->error = Status("convolution primitive", s);
    return plan;
  }
  plan->weights_opt = dnnl_primitive_desc_query_md(plan->conv_pd, p.kind == kBwdWeights ? kQueryDiffWeights
                                                                                          : kQueryWeights, 0);
  plan->weights_opt_bytes = dnnl_memory_desc_get_size(plan->weights_opt);
  const_dnnl_memory_desc_t scratch = dnnl_primitive_desc_query_md(plan->conv_pd, kQueryScratchpad, 0);
  plan->scratch_bytes = scratch ? dnnl_memory_desc_get_size(scratch) : 0;
  if (!dnnl_memory_desc_equal(plan->weights_opt, wplain)) {
    dnnl_primitive_desc_t rpd = nullptr;
    const bool to_opt = p.kind != kBwdWeights;
    s = dnnl_reorder_primitive_desc_create(&rpd, to_opt ? wplain : plan->weights_opt, Engine(),
                                           to_opt ? plan->weights_opt : wplain, Engine(), nullptr);
    if (s == 0) s = dnnl_primitive_create(&plan->reorder, rpd);
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    if (s != 0) plan->error = Status("weights reorder", s);
  }
  return plan;
}

const Plan* GetPlan(const Problem& p) {
  static std::mutex mu;
  static std::map<Problem, Plan*> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(p);
  if (it != plans.end()) return it->second;
  Plan* plan = Build(p);
  plans.emplace(p, plan);
  return plan;
}

struct Memory {  // a dnnl_memory_t over an existing buffer, destroyed at scope exit
  dnnl_memory_t m = nullptr;
  Memory(const_dnnl_memory_desc_t md, void* data) { dnnl_memory_create(&m, md, Engine(), data); }
  ~Memory() {
    if (m) dnnl_memory_destroy(m);
  }
};

ffi::Error Run(const Problem& p, void* src, void* weights, void* dst) {
  const Plan* plan = GetPlan(p);
  if (!plan->error.empty()) return ffi::Error(ffi::ErrorCode::kInternal, plan->error);
  ThreadState& local = Local();
  if (local.scratch.size() < plan->scratch_bytes) local.scratch.resize(plan->scratch_bytes);
  if (plan->reorder && local.weights.size() < plan->weights_opt_bytes) local.weights.resize(plan->weights_opt_bytes);
  const_dnnl_memory_desc_t scratch_md = dnnl_primitive_desc_query_md(plan->conv_pd, kQueryScratchpad, 0);
  Memory m_src(plan->src, src), m_dst(plan->dst, dst), m_wplain(plan->weights_plain, weights);
  Memory m_wopt(plan->weights_opt, plan->reorder ? local.weights.data() : weights);
  Memory m_scratch(scratch_md, plan->scratch_bytes ? local.scratch.data() : nullptr);
  dnnl_status_t s = 0;
  if (plan->reorder && p.kind != kBwdWeights) {
    dnnl_exec_arg_t args[] = {{kArgSrc, m_wplain.m}, {kArgDst, m_wopt.m}};
    s = dnnl_primitive_execute(plan->reorder, local.stream, 2, args);
  }
  dnnl_memory_t w = plan->reorder ? m_wopt.m : m_wplain.m;
  std::vector<dnnl_exec_arg_t> args;
  if (p.kind == kFwd) {
    args = {{kArgSrc, m_src.m}, {kArgWeights, w}, {kArgDst, m_dst.m}};
  } else if (p.kind == kBwdData) {
    args = {{kArgDiffSrc, m_src.m}, {kArgWeights, w}, {kArgDiffDst, m_dst.m}};
  } else {
    args = {{kArgSrc, m_src.m}, {kArgDiffWeights, w}, {kArgDiffDst, m_dst.m}};
  }
  if (plan->scratch_bytes) args.push_back({kArgScratchpad, m_scratch.m});
  if (s == 0) s = dnnl_primitive_execute(plan->conv, local.stream, static_cast<int>(args.size()), args.data());
  if (s == 0 && plan->reorder && p.kind == kBwdWeights) {
    dnnl_exec_arg_t rargs[] = {{kArgSrc, m_wopt.m}, {kArgDst, m_wplain.m}};
    s = dnnl_primitive_execute(plan->reorder, local.stream, 2, rargs);
  }
  if (s == 0) s = dnnl_stream_wait(local.stream);
  if (s != 0) return ffi::Error(ffi::ErrorCode::kInternal, Status("convolution execution", s));
  return ffi::Error::Success();
}

// OpenMP's default team size, read before any call changed a thread's setting.
int DefaultThreads() {
  static const int threads = omp_get_max_threads();
  return threads;
}

// `threads` > 0: this call's share of the cores (XLA runs the devices of one process at the same time, each on
// its own thread, and each call would otherwise open a team of all cores); 0: OpenMP's default. The setting is
// per calling thread, and XLA's threads run other computations too, so every call sets it. Returns the team.
int SetTeam(int64_t threads) {
  const int team = threads > 0 ? static_cast<int>(threads) : DefaultThreads();
  if (omp_get_max_threads() != team) omp_set_num_threads(team);
  return team;
}

ffi::Error MakeProblem(int kind, ffi::DataType type, ffi::Span<const int64_t> in_dims, ffi::Span<const int64_t> w_dims,
                       ffi::Span<const int64_t> out_dims, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding, int64_t threads, Problem* p) {
  if (in_dims.size() != 4 || w_dims.size() != 4 || out_dims.size() != 4 || strides.size() != 2 ||
      padding.size() != 4)
    return ffi::Error::InvalidArgument("onednn conv: expected NHWC/HWIO rank-4 operands, 2 strides, 4 paddings");
  int dtype = type == ffi::DataType::F32 ? kF32 : type == ffi::DataType::BF16 ? kBF16 : 0;
  if (!dtype) return ffi::Error::InvalidArgument("onednn conv: float32 or bfloat16 operands only");
  const int team = SetTeam(threads);
  *p = Problem{kind, dtype, team, in_dims[0], in_dims[1], in_dims[2], in_dims[3], w_dims[0], w_dims[1], w_dims[3],
               out_dims[1], out_dims[2], strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
  if (w_dims[2] != in_dims[3] || out_dims[0] != in_dims[0] || out_dims[3] != w_dims[3])
    return ffi::Error::InvalidArgument("onednn conv: operand shapes do not match");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  Problem p;
  ffi::Error e = MakeProblem(kFwd, x.element_type(), x.dimensions(), w.dimensions(), y->dimensions(), strides,
                             padding, threads, &p);
  if (e.failure()) return e;
  return Run(p, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  Problem p;
  ffi::Error e = MakeProblem(kBwdData, dy.element_type(), dx->dimensions(), w.dimensions(), dy.dimensions(),
                             strides, padding, threads, &p);
  if (e.failure()) return e;
  return Run(p, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  Problem p;
  ffi::Error e = MakeProblem(kBwdWeights, x.element_type(), x.dimensions(), dw->dimensions(), dy.dimensions(),
                             strides, padding, threads, &p);
  if (e.failure()) return e;
  return Run(p, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

// --- Winograd F(4x4, 3x3): 3x3, stride-1, pad-1 float32 convolutions with 4x fewer multiplications. ---
//
// Why: every oneDNN 3.x x64 convolution is direct (its Winograd kernels were removed), and on the CPUs of
// results/cpu_speed the direct kernels already run near the measured matmul peak, level with PyTorch's. The
// 3x3 stride-1 layers carry about 90% of a CIFAR ResNet's convolution FLOPs; Winograd's F(4x4, 3x3) computes
// each 4x4 output tile from a 6x6 input tile with 36 instead of 144 multiply-adds per channel pair
// (Lavin & Gray 2016). Per chunk of tiles: the input transform (B^T d B, here, vectorised over channels),
// 36 matrix products [tiles, c] x [c, o] (one batched oneDNN matmul), and the output transform (A^T m A).
// The weight transform G g G^T (and G^T du G for the gradient) is tiny and stays in XLA. The backward-data
// pass is the forward pass of the flipped, transposed weights; the weight gradient is the transpose of the
// forward: du = sum over tiles of (B^T d B)^T (A dy A^T), accumulated over chunks by a sum post-op.

constexpr int kChannelBlock = 16;  // channels per vector: one 512-bit register, or two 256-bit ones

// 16 float32 lanes; the compiler emits zmm, ymm or xmm code per target_clones variant. Aligned to 4 so that
// loads and stores at any channel offset are plain unaligned vector moves.
typedef float Lanes __attribute__((vector_size(64), aligned(4)));

inline Lanes Load(const float* p) { return *reinterpret_cast<const Lanes*>(p); }
inline void Store(float* p, Lanes v) { *reinterpret_cast<Lanes*>(p) = v; }

// Chunks of tiles small enough for the transformed tiles [36, tiles, c] to stay in the cache next to the
// matmul; 2048 tiles of 64 channels ran the [tiles, 64] x [64, 64] products 2.1x faster than all 16384 at once.
// Tiles per chunk for chunks of at most `want` tiles, as even as they can be.
int64_t EvenChunks(int64_t tiles, int64_t want) {
  const int64_t chunks = (tiles + want - 1) / want;
  return (tiles + chunks - 1) / chunks;
}

// The same, but an odd number of tiles: for chunks that stay in a core's cache (the F(2x2) kernels' per-thread
// chunks). A chunk's buffers hold its 16 points' rows [points][tiles][channels] one after another, and a
// transform writes (or reads) a tile's points together; with a power-of-two number of tiles those rows lie a
// multiple of 4 KiB apart, in the same cache sets. With chunks of 512 tiles instead of 513, the output transform
// of a 32x32x64 layer ran 3.2x slower (benchmarks/winograd_transforms.py). Padding the rows
// instead made oneDNN give up its brgemm matmul for a 28% slower one. The float32 F(4x4) chunks (36 points,
// about 18 MB at 64 channels) are far larger than the cache; odd ones ran 0.94x there at 32x32x64.
int64_t OddChunks(int64_t tiles, int64_t want) { return EvenChunks(tiles, want) | 1; }

int64_t ChunkTiles(int64_t tiles, int64_t channels) {
  const int64_t budget = int64_t{1} << 17;  // tiles x channels per chunk
  return EvenChunks(tiles, std::max<int64_t>(64, budget / std::max<int64_t>(channels, 1)));
}

// The 6-point transforms, each one matrix's rows written out (its zeros skipped).
inline void InputPoints(const Lanes d[6], Lanes r[6]) {  // B^T d
  r[0] = 4 * d[0] - 5 * d[2] + d[4];
  r[1] = d[3] + d[4] - 4 * (d[1] + d[2]);
  r[2] = 4 * (d[1] - d[2]) - d[3] + d[4];
  r[3] = 2 * (d[3] - d[1]) - d[2] + d[4];
  r[4] = 2 * (d[1] - d[3]) - d[2] + d[4];
  r[5] = 4 * d[1] - 5 * d[3] + d[5];
}
inline void OutputPoints(const Lanes m[6], Lanes r[4]) {  // A^T m
  r[0] = m[0] + m[1] + m[2] + m[3] + m[4];
  r[1] = m[1] - m[2] + 2 * (m[3] - m[4]);
  r[2] = m[1] + m[2] + 4 * (m[3] + m[4]);
  r[3] = m[1] - m[2] + 8 * (m[3] - m[4]) + m[5];
}
inline void GradPoints(const Lanes g[4], Lanes r[6]) {  // A g: the transpose of OutputPoints
  r[0] = g[0];
  r[1] = g[0] + g[1] + g[2] + g[3];
  r[2] = g[0] - g[1] + g[2] - g[3];
  r[3] = g[0] + 2 * g[1] + 4 * g[2] + 8 * g[3];
  r[4] = g[0] - 2 * g[1] + 4 * g[2] - 8 * g[3];
  r[5] = g[3];
}

// bfloat16 buffers of the F(2x2) kernel (its section below says why F(2x2) in bfloat16): 16 lanes as uint16_t.
typedef uint16_t Bf16Lanes __attribute__((vector_size(32), aligned(2)));
typedef uint32_t Bits __attribute__((vector_size(64)));
typedef int32_t Mask __attribute__((vector_size(64)));

inline Lanes LoadBf16(const uint16_t* p) {
  return (Lanes)(__builtin_convertvector(*reinterpret_cast<const Bf16Lanes*>(p), Bits) << 16);
}
// Round to nearest even, as XLA's float32 -> bfloat16 convert does; NaNs stay (quiet) NaNs.
inline void StoreBf16(uint16_t* p, Lanes v) {
  const Bits u = (Bits)v;
  const Bits rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const Mask nan = (Mask)((u & 0x7FFFFFFFu) > 0x7F800000u);
  *reinterpret_cast<Bf16Lanes*>(p) = __builtin_convertvector(nan ? ((u >> 16) | 0x40u) : rounded, Bf16Lanes);
}

inline void InputPoints2(const Lanes d[4], Lanes r[4]) {  // B^T d
  r[0] = d[0] - d[2];
  r[1] = d[1] + d[2];
  r[2] = d[2] - d[1];
  r[3] = d[1] - d[3];
}
inline void OutputPoints2(const Lanes m[4], Lanes r[2]) {  // A^T m
  r[0] = m[0] + m[1] + m[2];
  r[1] = m[1] - m[2] - m[3];
}
inline void GradPoints2(const Lanes g[2], Lanes r[4]) {  // A g: the transpose of OutputPoints2
  r[0] = g[0];
  r[1] = g[0] + g[1];
  r[2] = g[0] - g[1];
  r[3] = -g[1];
}

// The two tile sizes' point transforms, for the transforms below.
template <int kOut>
struct Points;
template <>
struct Points<4> {  // F(4x4, 3x3): 6x6 input tiles
  static void Input(const Lanes d[6], Lanes r[6]) { InputPoints(d, r); }
  static void Output(const Lanes m[6], Lanes r[4]) { OutputPoints(m, r); }
  static void Grad(const Lanes g[4], Lanes r[6]) { GradPoints(g, r); }
};
template <>
struct Points<2> {  // F(2x2, 3x3): 4x4 input tiles
  static void Input(const Lanes d[4], Lanes r[4]) { InputPoints2(d, r); }
  static void Output(const Lanes m[4], Lanes r[2]) { OutputPoints2(m, r); }
  static void Grad(const Lanes g[2], Lanes r[4]) { GradPoints2(g, r); }
};

// Buffers are float32 or bfloat16 (uint16_t); the arithmetic is float32 either way.
inline Lanes LoadAny(const float* p) { return Load(p); }
inline Lanes LoadAny(const uint16_t* p) { return LoadBf16(p); }
inline void StoreAny(float* p, Lanes v) { Store(p, v); }
inline void StoreAny(uint16_t* p, Lanes v) { StoreBf16(p, v); }

// How a transform writes its values. ExactStore: float32 as is, bfloat16 rounded as XLA's convert rounds.
// Bf16DotStore, for bfloat16 tiles that only the bfloat16 matmul reads, on CPUs with AVX512_BF16: the one
// instruction VCVTNEPS2BF16 instead of ExactStore's seven or so. It rounds to nearest even as well, but flushes
// denormals to zero, which the matmul's bfloat16 dot products (VDPBF16PS, AMX) do to their inputs anyway, so
// the products do not change. Inline assembly because the intrinsic would need every caller compiled for
// AVX512_BF16; it may only be inlined into functions that are (the *Bf16Dot transforms below).
struct ExactStore {
  static void Put(float* p, Lanes v) { Store(p, v); }
  static void Put(uint16_t* p, Lanes v) { StoreBf16(p, v); }
};
struct Bf16DotStore {
  __attribute__((always_inline)) static void Put(uint16_t* p, Lanes v) {
    Bf16Lanes r;
    asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(v));
    *reinterpret_cast<Bf16Lanes*>(p) = r;
  }
};

// V[p][t - t0][c] = B^T d B for the (M+2)x(M+2) input tile d of the MxM output tile t of x [n, h, w, c] (zero
// padding 1), for a chunk of tc tiles from t0.
template <int M, class Put, class In, class Out>
__attribute__((always_inline)) inline void InputTile(const In* __restrict x, int64_t h, int64_t w, int64_t c,
                                                     int64_t t, int64_t t0, int64_t tc, Out* __restrict v) {
  constexpr int A = M + 2;
  const int64_t th = h / M, tw = w / M, stride = tc * c;
  const int64_t n = t / (th * tw), i = t / tw % th, j = t % tw;
  for (int64_t c0 = 0; c0 < c; c0 += kChannelBlock) {
    Lanes cols[A][A];  // cols[b][a] = (B^T d)[a][b]
    for (int b = 0; b < A; ++b) {
      const int64_t xx = M * j - 1 + b;
      Lanes d[A];
      for (int a = 0; a < A; ++a) {
        const int64_t y = M * i - 1 + a;
        d[a] = (y >= 0 && y < h && xx >= 0 && xx < w) ? LoadAny(x + ((n * h + y) * w + xx) * c + c0) : Lanes{};
      }
      Points<M>::Input(d, cols[b]);
    }
    for (int a = 0; a < A; ++a) {
      Lanes row[A], out[A];
      for (int b = 0; b < A; ++b) row[b] = cols[b][a];
      Points<M>::Input(row, out);
      for (int b = 0; b < A; ++b) Put::Put(v + (a * A + b) * stride + (t - t0) * c + c0, out[b]);
    }
  }
}

// dM[p][t - t0][o] = A g A^T of dy's MxM tile g, t: the transpose of the output transform.
template <int M, class Put, class In, class Out>
__attribute__((always_inline)) inline void GradTile(const In* __restrict dy, int64_t h, int64_t w, int64_t o,
                                                    int64_t t, int64_t t0, int64_t tc, Out* __restrict dm) {
  constexpr int A = M + 2;
  const int64_t th = h / M, tw = w / M, stride = tc * o;
  const int64_t n = t / (th * tw), i = t / tw % th, j = t % tw;
  for (int64_t c0 = 0; c0 < o; c0 += kChannelBlock) {
    Lanes rows[M][A];  // rows[r][b] = (g A^T)[r][b]
    for (int r = 0; r < M; ++r) {
      Lanes g[M];
      for (int s = 0; s < M; ++s) g[s] = LoadAny(dy + ((n * h + M * i + r) * w + M * j + s) * o + c0);
      Points<M>::Grad(g, rows[r]);
    }
    for (int b = 0; b < A; ++b) {
      Lanes col[M], out[A];
      for (int r = 0; r < M; ++r) col[r] = rows[r][b];
      Points<M>::Grad(col, out);
      for (int a = 0; a < A; ++a) Put::Put(dm + (a * A + b) * stride + (t - t0) * o + c0, out[a]);
    }
  }
}

// The tiles t in [t0, t1) of InputTile and GradTile. `team`: share the tiles among the calling thread's team
// (false: inside a parallel region that already split the work).
template <int M, class In, class Out>
__attribute__((target_clones("avx512f", "avx2", "default"))) void InputTransform(
    const In* __restrict x, int64_t h, int64_t w, int64_t c, int64_t t0, int64_t t1, Out* __restrict v,
    bool team = true) {
#pragma omp parallel for schedule(static) if (team)
  for (int64_t t = t0; t < t1; ++t) InputTile<M, ExactStore>(x, h, w, c, t, t0, t1 - t0, v);
}
template <int M, class In, class Out>
__attribute__((target_clones("avx512f", "avx2", "default"))) void GradTransform(
    const In* __restrict dy, int64_t h, int64_t w, int64_t o, int64_t t0, int64_t t1, Out* __restrict dm,
    bool team = true) {
#pragma omp parallel for schedule(static) if (team)
  for (int64_t t = t0; t < t1; ++t) GradTile<M, ExactStore>(dy, h, w, o, t, t0, t1 - t0, dm);
}
#define CONTRASTOOD_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
CONTRASTOOD_BF16_DOT void InputTransformBf16Dot(const uint16_t* __restrict x, int64_t h, int64_t w, int64_t c,
                                                int64_t t0, int64_t t1, uint16_t* __restrict v, bool team) {
#pragma omp parallel for schedule(static) if (team)
  for (int64_t t = t0; t < t1; ++t) InputTile<2, Bf16DotStore>(x, h, w, c, t, t0, t1 - t0, v);
}
CONTRASTOOD_BF16_DOT void GradTransformBf16Dot(const uint16_t* __restrict dy, int64_t h, int64_t w, int64_t o,
                                               int64_t t0, int64_t t1, uint16_t* __restrict dm, bool team) {
#pragma omp parallel for schedule(static) if (team)
  for (int64_t t = t0; t < t1; ++t) GradTile<2, Bf16DotStore>(dy, h, w, o, t, t0, t1 - t0, dm);
}

// The F(2x2) bfloat16 kernels' transforms into tiles for the matmul: Bf16DotStore's where the CPU has it, unless
// switched off (contrastood_bf16_dot_stores, for the test that both give the same products).
std::atomic<bool> bf16_dot_stores{true};
bool CpuHasBf16Dot() {  // every ISA extension the *Bf16Dot transforms are compiled for
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}
bool HasBf16Dot() { return CpuHasBf16Dot() && bf16_dot_stores.load(std::memory_order_relaxed); }
void InputTransformBf16(const uint16_t* x, int64_t h, int64_t w, int64_t c, int64_t t0, int64_t t1, uint16_t* v,
                        bool team) {
  if (HasBf16Dot()) return InputTransformBf16Dot(x, h, w, c, t0, t1, v, team);
  InputTransform<2>(x, h, w, c, t0, t1, v, team);
}
void GradTransformBf16(const uint16_t* dy, int64_t h, int64_t w, int64_t o, int64_t t0, int64_t t1, uint16_t* dm,
                       bool team) {
  if (HasBf16Dot()) return GradTransformBf16Dot(dy, h, w, o, t0, t1, dm, team);
  GradTransform<2>(dy, h, w, o, t0, t1, dm, team);
}

// y's MxM tiles t in [t0, t1) = A^T m A of M[p][t - t0][o] (float32).
template <int M, class Out>
__attribute__((target_clones("avx512f", "avx2", "default"))) void OutputTransform(
    const float* __restrict m, int64_t h, int64_t w, int64_t o, int64_t t0, int64_t t1, Out* __restrict y,
    bool team = true) {
  constexpr int A = M + 2;
  const int64_t th = h / M, tw = w / M, tc = t1 - t0, stride = tc * o;
#pragma omp parallel for schedule(static) if (team)
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (th * tw), i = t / tw % th, j = t % tw;
    for (int64_t c0 = 0; c0 < o; c0 += kChannelBlock) {
      Lanes rows[A][M];  // rows[a][s] = (m A)[a][s]
      for (int a = 0; a < A; ++a) {
        Lanes q[A];
        for (int b = 0; b < A; ++b) q[b] = Load(m + (a * A + b) * stride + (t - t0) * o + c0);
        Points<M>::Output(q, rows[a]);
      }
      for (int s = 0; s < M; ++s) {
        Lanes col[A], out[M];
        for (int a = 0; a < A; ++a) col[a] = rows[a][s];
        Points<M>::Output(col, out);
        for (int r = 0; r < M; ++r) StoreAny(y + ((n * h + M * i + r) * w + M * j + s) * o + c0, out[r]);
      }
    }
  }
}

// A batched matmul over the tile positions (36 for F(4x4), 16 for F(2x2)): [points, rows, inner] x
// [points, inner, cols] -> [points, rows, cols], with the left operand stored [points, inner, rows] when
// `transpose_a` (the weight gradient's V^T), optionally adding into the result (`accumulate`: a sum post-op).
// The operands are float32 or bfloat16 (`dtype`); the result is always float32.
struct MatmulProblem {
  int64_t rows, inner, cols;
  int transpose_a, accumulate, threads, points = 36, dtype = kF32, transpose_b = 0;  // b stored [cols, inner]
  auto tie() const {
    return std::tie(rows, inner, cols, transpose_a, accumulate, threads, points, dtype, transpose_b);
  }
  bool operator<(const MatmulProblem& other) const { return tie() < other.tie(); }
};

struct MatmulPlan {
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t prim = nullptr;
  dnnl_memory_desc_t a = nullptr, b = nullptr, c = nullptr;
  size_t scratch_bytes = 0;
  std::string error;
};

dnnl_memory_desc_t Plain3(int64_t d0, int64_t d1, int64_t d2, int64_t s0, int64_t s1, int64_t s2, int dtype = kF32) {
  dnnl_dims_t d = {d0, d1, d2}, s = {s0, s1, s2};
  dnnl_memory_desc_t md = nullptr;
  dnnl_memory_desc_create_with_strides(&md, 3, d, dtype, s);
  return md;
}

const MatmulPlan* GetMatmul(const MatmulProblem& p) {
  static std::mutex mu;
  static std::map<MatmulProblem, MatmulPlan*> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(p);
  if (it != plans.end()) return it->second;
  auto* plan = new MatmulPlan();
  plan->a = p.transpose_a ? Plain3(p.points, p.rows, p.inner, p.rows * p.inner, 1, p.rows, p.dtype)
                          : Plain3(p.points, p.rows, p.inner, p.rows * p.inner, p.inner, 1, p.dtype);
  plan->b = p.transpose_b ? Plain3(p.points, p.inner, p.cols, p.inner * p.cols, 1, p.inner, p.dtype)
                          : Plain3(p.points, p.inner, p.cols, p.inner * p.cols, p.cols, 1, p.dtype);
  plan->c = Plain3(p.points, p.rows, p.cols, p.rows * p.cols, p.cols, 1);
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_primitive_attr_create(&attr);
  dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser);
  dnnl_post_ops_t post = nullptr;
  if (p.accumulate) {
    dnnl_post_ops_create(&post);
    dnnl_post_ops_append_sum(post, 1.f, 0, 0);
    dnnl_primitive_attr_set_post_ops(attr, post);
  }
  dnnl_status_t s = dnnl_matmul_primitive_desc_create(&plan->pd, Engine(), plan->a, plan->b, nullptr, plan->c, attr);
  if (post) dnnl_post_ops_destroy(post);
  dnnl_primitive_attr_destroy(attr);
  if (s != 0) {
    plan->error = Status("matmul descriptor", s);
  } else if ((s = dnnl_primitive_create(&plan->prim, plan->pd)) != 0) {
    plan->error = Status("matmul primitive", s);
  } else {
    const_dnnl_memory_desc_t scratch = dnnl_primitive_desc_query_md(plan->pd, kQueryScratchpad, 0);
    plan->scratch_bytes = scratch ? dnnl_memory_desc_get_size(scratch) : 0;
  }
  plans.emplace(p, plan);
  return plan;
}

dnnl_status_t Matmul(const MatmulProblem& p, const void* a, const void* b, float* c, std::string* error) {
  const MatmulPlan* plan = GetMatmul(p);
  if (!plan->error.empty()) {
    *error = plan->error;
    return -1;
  }
  ThreadState& local = Local();
  if (local.scratch.size() < plan->scratch_bytes) local.scratch.resize(plan->scratch_bytes);
  const_dnnl_memory_desc_t scratch_md = dnnl_primitive_desc_query_md(plan->pd, kQueryScratchpad, 0);
  Memory ma(plan->a, const_cast<void*>(a)), mb(plan->b, const_cast<void*>(b)), mc(plan->c, c);
  Memory ms(scratch_md, plan->scratch_bytes ? local.scratch.data() : nullptr);
  std::vector<dnnl_exec_arg_t> args = {{kArgSrc, ma.m}, {kArgWeights, mb.m}, {kArgDst, mc.m}};
  if (plan->scratch_bytes) args.push_back({kArgScratchpad, ms.m});
  dnnl_status_t s = dnnl_primitive_execute(plan->prim, local.stream, static_cast<int>(args.size()), args.data());
  if (s == 0) s = dnnl_stream_wait(local.stream);
  if (s != 0) *error = Status("matmul execution", s);
  return s;
}

// A thread's transformed-tile buffers (reused across calls, like its oneDNN scratchpad).
struct WinoBuffers {
  std::vector<float> v, m;
};
WinoBuffers& LocalWino() {
  thread_local WinoBuffers buffers;
  return buffers;
}

// One Winograd call's shape, OpenMP team, chunking and the calling thread's tile buffers (sized for a chunk).
struct WinoCall {
  int64_t n, h, w, c, o, tiles, chunk;
  int team;
  WinoBuffers* buf;
};

// Checks x [n, h, w, c] and the output channels `o`, sets the team and sizes the buffers.
ffi::Error StartWino(ffi::AnyBuffer x, int64_t o, int64_t threads, WinoCall* call) {
  auto d = x.dimensions();
  if (x.element_type() != ffi::DataType::F32) return ffi::Error::InvalidArgument("winograd conv: float32 only");
  if (d.size() != 4 || d[1] % 4 || d[2] % 4 || d[3] % kChannelBlock || o % kChannelBlock)
    return ffi::Error::InvalidArgument("winograd conv: NHWC input, height and width multiples of 4, channels of 16");
  const int64_t tiles = d[0] * (d[1] / 4) * (d[2] / 4);
  *call = {d[0], d[1], d[2], d[3], o, tiles, ChunkTiles(tiles, std::max(d[3], o)), SetTeam(threads), &LocalWino()};
  call->buf->v.resize(36 * call->chunk * call->c);
  call->buf->m.resize(36 * call->chunk * call->o);
  return ffi::Error::Success();
}

// y [n, h, w, o] = the 3x3 stride-1 pad-1 convolution of x [n, h, w, c] whose transformed weights are u [36, c, o].
ffi::Error WinoForward(ffi::AnyBuffer x, ffi::AnyBuffer u, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  auto ud = u.dimensions();
  if (ud.size() != 3 || ud[0] != 36 || x.dimensions().size() != 4 || ud[1] != x.dimensions()[3])
    return ffi::Error::InvalidArgument("winograd conv: transformed weights must be [36, c, o]");
  WinoCall k;
  ffi::Error e = StartWino(x, ud[2], threads, &k);
  if (e.failure()) return e;
  const float* xp = static_cast<const float*>(x.untyped_data());
  float* v = k.buf->v.data();
  float* m = k.buf->m.data();
  std::string error;
  for (int64_t t0 = 0; t0 < k.tiles; t0 += k.chunk) {
    const int64_t t1 = std::min(k.tiles, t0 + k.chunk);
    InputTransform<4>(xp, k.h, k.w, k.c, t0, t1, v);
    if (Matmul({t1 - t0, k.c, k.o, 0, 0, k.team}, v, static_cast<const float*>(u.untyped_data()), m, &error) != 0)
      return ffi::Error(ffi::ErrorCode::kInternal, error);
    OutputTransform<4>(m, k.h, k.w, k.o, t0, t1, static_cast<float*>(y->untyped_data()));
  }
  return ffi::Error::Success();
}

// du [36, c, o] = sum over tiles of (B^T d B)^T (A dy A^T): the gradient of u in WinoForward.
ffi::Error WinoBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> du,
                               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  auto xd = x.dimensions(), gd = dy.dimensions();
  if (dy.element_type() != ffi::DataType::F32 || xd.size() != 4 || gd.size() != 4 || gd[0] != xd[0] ||
      gd[1] != xd[1] || gd[2] != xd[2])
    return ffi::Error::InvalidArgument("winograd conv: dy must be float32 [n, h, w, o] like x");
  WinoCall k;
  ffi::Error e = StartWino(x, gd[3], threads, &k);
  if (e.failure()) return e;
  float* v = k.buf->v.data();
  float* m = k.buf->m.data();
  std::string error;
  for (int64_t t0 = 0; t0 < k.tiles; t0 += k.chunk) {
    const int64_t t1 = std::min(k.tiles, t0 + k.chunk);
    InputTransform<4>(static_cast<const float*>(x.untyped_data()), k.h, k.w, k.c, t0, t1, v);
    GradTransform<4>(static_cast<const float*>(dy.untyped_data()), k.h, k.w, k.o, t0, t1, m);
    if (Matmul({k.c, t1 - t0, k.o, 1, t0 > 0, k.team}, v, m, static_cast<float*>(du->untyped_data()), &error) != 0)
      return ffi::Error(ffi::ErrorCode::kInternal, error);
  }
  return ffi::Error::Success();
}

// --- Winograd F(2x2, 3x3) in bfloat16: the same scheme with 2x2 output tiles from 4x4 input tiles. ---
//
// Why: on CPUs with bfloat16 dot-product units (AVX512_BF16, AMX) a bfloat16 model's direct convolutions run
// at up to twice the float32 rate, faster than float32 Winograd. Winograd's products can run in bfloat16 too,
// but only with F(2x2): its transforms have coefficients 0, +-1 (and 1/2 for the weights), so rounding the
// transformed tiles to bfloat16 costs about what rounding the activations does (max error 3.6e-3 of the
// output's scale against 2.8e-3 for the direct kernel's bfloat16 output; F(4x4)'s larger coefficients gave
// 5.7e-2). 16 products instead of 36 per 2x2 tile: 2.25x fewer multiplications. The transforms compute in
// float32; the transformed tiles and dy's are bfloat16, the products accumulate in float32.

struct Wino2Buffers {
  std::vector<uint16_t> v, dm;
  std::vector<float> m;
};
Wino2Buffers& LocalWino2() {
  thread_local Wino2Buffers buffers;
  return buffers;
}

// Checks x [n, h, w, c] (bfloat16) and the output channels `o`, and sets the team.
ffi::Error StartWino2(ffi::AnyBuffer x, int64_t o, int64_t threads, WinoCall* call) {
  auto d = x.dimensions();
  if (x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("winograd F(2x2) conv: bfloat16 only");
  if (d.size() != 4 || d[1] % 2 || d[2] % 2 || d[3] % kChannelBlock || o % kChannelBlock)
    return ffi::Error::InvalidArgument(
        "winograd F(2x2) conv: NHWC input, height and width multiples of 2, channels of 16");
  const int64_t tiles = d[0] * (d[1] / 2) * (d[2] / 2);
  *call = {d[0], d[1], d[2], d[3], o, tiles, 0, SetTeam(threads), nullptr};
  return ffi::Error::Success();
}

// Why each thread runs whole chunks (transform, a single-threaded matmul, transform) in one parallel region,
// instead of the team sharing each step of a larger chunk: one fork and join per call instead of three per
// chunk, and a chunk's transformed tiles and products stay in its core's cache. With chunks of 2^15 tiles x
// channels the forward ran 1.14-1.32x as fast as the team's 2^17 at 64 and 128 channels, 1.02-1.26x at 256 and
// level at 512, and the bfloat16 ResNet-18 step about 6% faster (results/README.md). The matmul inside the region is oneDNN's on the
// calling thread alone (oneDNN runs single-threaded inside a parallel region), and the transforms are told not
// to open a team of their own.
constexpr int64_t kThreadChunkBudget = int64_t{1} << 15;  // tiles x channels per chunk of one thread

Wino2Buffers& SizedWino2(int64_t v, int64_t m, int64_t dm) {  // the calling thread's buffers, at least this large
  Wino2Buffers& buf = LocalWino2();
  if (buf.v.size() < static_cast<size_t>(v)) buf.v.resize(v);
  if (buf.m.size() < static_cast<size_t>(m)) buf.m.resize(m);
  if (buf.dm.size() < static_cast<size_t>(dm)) buf.dm.resize(dm);
  return buf;
}

// y [n, h, w, o] (bfloat16) = the 3x3 stride-1 pad-1 convolution of x [n, h, w, c] with transformed weights
// u [16, c, o] (bfloat16). Each output tile comes from one chunk, whichever thread runs it, so the threads take
// chunks as they come free (dynamic) and the result stays deterministic.
ffi::Error Wino2Forward(ffi::AnyBuffer x, ffi::AnyBuffer u, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  auto ud = u.dimensions();
  if (u.element_type() != ffi::DataType::BF16 || ud.size() != 3 || ud[0] != 16 || x.dimensions().size() != 4 ||
      ud[1] != x.dimensions()[3])
    return ffi::Error::InvalidArgument("winograd F(2x2) conv: transformed weights must be bfloat16 [16, c, o]");
  WinoCall k;
  ffi::Error e = StartWino2(x, ud[2], threads, &k);
  if (e.failure()) return e;
  const int64_t chunk = OddChunks(k.tiles, std::max<int64_t>(16, kThreadChunkBudget / std::max(k.c, k.o)));
  const int64_t chunks = (k.tiles + chunk - 1) / chunk;
  const auto* xp = static_cast<const uint16_t*>(x.untyped_data());
  auto* yp = static_cast<uint16_t*>(y->untyped_data());
  std::string error;
#pragma omp parallel num_threads(k.team)
  {
    Wino2Buffers& buf = SizedWino2(16 * chunk * k.c, 16 * chunk * k.o, 0);
    std::string local;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < chunks; ++i) {
      if (!local.empty()) continue;
      const int64_t t0 = i * chunk, t1 = std::min(k.tiles, t0 + chunk);
      InputTransformBf16(xp, k.h, k.w, k.c, t0, t1, buf.v.data(), false);
      if (Matmul({t1 - t0, k.c, k.o, 0, 0, 1, 16, kBF16}, buf.v.data(), u.untyped_data(), buf.m.data(), &local) != 0)
        continue;
      OutputTransform<2>(buf.m.data(), k.h, k.w, k.o, t0, t1, yp, false);
    }
    if (!local.empty()) {
#pragma omp critical
      error = local;
    }
  }
  if (!error.empty()) return ffi::Error(ffi::ErrorCode::kInternal, error);
  return ffi::Error::Success();
}

// du [16, c, o] (float32) = sum over tiles of (B^T d B)^T (A dy A^T): the gradient of u in Wino2Forward.
// Up to 256 x 256 channels each thread sums its chunks (every team-th, in order, so the sum is deterministic)
// into its own du, thread 0's being the result, and the sums are added at the end. Wider, the per-thread sums
// (16 MB each at 512 x 512) cost more than they save (0.91-0.97x), so the team shares each chunk's matmul.
ffi::Error Wino2BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> du,
                                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  auto xd = x.dimensions(), gd = dy.dimensions();
  if (dy.element_type() != ffi::DataType::BF16 || du->element_type() != ffi::DataType::F32 || xd.size() != 4 ||
      gd.size() != 4 || gd[0] != xd[0] || gd[1] != xd[1] || gd[2] != xd[2])
    return ffi::Error::InvalidArgument(
        "winograd F(2x2) conv: dy must be bfloat16 [n, h, w, o] like x, and du float32 [16, c, o]");
  WinoCall k;
  ffi::Error e = StartWino2(x, gd[3], threads, &k);
  if (e.failure()) return e;
  const auto* xp = static_cast<const uint16_t*>(x.untyped_data());
  const auto* gp = static_cast<const uint16_t*>(dy.untyped_data());
  auto* dup = static_cast<float*>(du->untyped_data());
  std::string error;
  if (k.c * k.o > 256 * 256) {
    const int64_t chunk = ChunkTiles(k.tiles, std::max(k.c, k.o));
    Wino2Buffers& buf = SizedWino2(16 * chunk * k.c, 0, 16 * chunk * k.o);
    for (int64_t t0 = 0; t0 < k.tiles; t0 += chunk) {
      const int64_t t1 = std::min(k.tiles, t0 + chunk);
      InputTransformBf16(xp, k.h, k.w, k.c, t0, t1, buf.v.data(), true);
      GradTransformBf16(gp, k.h, k.w, k.o, t0, t1, buf.dm.data(), true);
      if (Matmul({k.c, t1 - t0, k.o, 1, t0 > 0, k.team, 16, kBF16}, buf.v.data(), buf.dm.data(), dup, &error) != 0)
        return ffi::Error(ffi::ErrorCode::kInternal, error);
    }
    return ffi::Error::Success();
  }
  // 2^16 tile-channels and at least 256 tiles per matmul (twice the forward's chunk): its inner dimension is the
  // tiles, and each matmul reads and writes the thread's whole sum.
  const int64_t chunk = OddChunks(k.tiles, std::max<int64_t>(256, 2 * kThreadChunkBudget / std::max(k.c, k.o)));
  const int64_t chunks = (k.tiles + chunk - 1) / chunk, size = 16 * k.c * k.o;
  const int team = static_cast<int>(std::min<int64_t>(k.team, chunks));
  thread_local std::vector<float> partials;  // threads 1.. of the calling thread's team sum here
  if (partials.size() < static_cast<size_t>((team - 1) * size)) partials.resize((team - 1) * size);
  float* others = partials.data();
#pragma omp parallel num_threads(team)
  {
    const int t = omp_get_thread_num();
    Wino2Buffers& buf = SizedWino2(16 * chunk * k.c, 0, 16 * chunk * k.o);
    float* sum = t == 0 ? dup : others + (t - 1) * size;
    std::string local;
    bool first = true;
    for (int64_t i = t; i < chunks && local.empty(); i += team) {
      const int64_t t0 = i * chunk, t1 = std::min(k.tiles, t0 + chunk);
      InputTransformBf16(xp, k.h, k.w, k.c, t0, t1, buf.v.data(), false);
      GradTransformBf16(gp, k.h, k.w, k.o, t0, t1, buf.dm.data(), false);
      if (Matmul({k.c, t1 - t0, k.o, 1, !first, 1, 16, kBF16}, buf.v.data(), buf.dm.data(), sum, &local) == 0)
        first = false;
    }
    if (first) std::fill(sum, sum + size, 0.0f);  // no chunk done: this thread adds nothing
    if (!local.empty()) {
#pragma omp critical
      error = local;
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t j = 0; j < size; ++j)
      for (int r = 0; r < team - 1; ++r) dup[j] += others[r * size + j];
  }
  if (!error.empty()) return ffi::Error(ffi::ErrorCode::kInternal, error);
  return ffi::Error::Success();
}

// --- Strided weight gradients as one matmul over im2col patches. ---
//
// Why: oneDNN 3.2's backward-weights kernel for stride-2 3x3 layers (jit_bf16 here) ran at about half its forward's
// rate (results/README.md: ResNet-18's three stride-2 layers took 51-55 ms each, their forwards 27-29). The same
// gradient is dw[(i, j, c), o] = sum over output positions r of patch[r, (i, j, c)] * dy[r, o]: a [K, R] x [R, o]
// product (K = kh kw c) whose left operand is the im2col patches of x. Each thread builds the patches of a chunk of
// output positions in its cache (x's rows at the taps, zeros in the padding) and adds P^T dy into its own float32
// sum with a single-threaded oneDNN matmul; every team-th chunk, in order, so the sum is deterministic.
// The shapes of an im2col or col2im call, the same convolution seen from either side: x [n, h, w, c], dy
// [n, ho, wo, o] and w [kh, kw, c, o] of one float dtype (`types`: the three buffers'), strides of at least 1 (checked
// before anything divides by them), and ho, wo the convolution's output size.
ffi::Error CheckPatchProblem(const std::string& what, std::initializer_list<ffi::DataType> types,
                             ffi::Span<const int64_t> xd, ffi::Span<const int64_t> gd, ffi::Span<const int64_t> wd,
                             ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  const ffi::DataType type = *types.begin();
  const bool one_float = (type == ffi::DataType::F32 || type == ffi::DataType::BF16) &&
                         std::all_of(types.begin(), types.end(), [&](ffi::DataType t) { return t == type; });
  if (!one_float || xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || gd[0] != xd[0] || wd[2] != xd[3] ||
      wd[3] != gd[3] || strides.size() != 2 || padding.size() != 4 || strides[0] < 1 || strides[1] < 1)
    return ffi::Error::InvalidArgument(
        what + ": x [n, h, w, c], dy [n, ho, wo, o], w [kh, kw, c, o], one float dtype, strides of at least 1");
  if ((xd[1] + padding[0] + padding[1] - wd[0]) / strides[0] + 1 != gd[1] ||
      (xd[2] + padding[2] + padding[3] - wd[1]) / strides[1] + 1 != gd[2])
    return ffi::Error::InvalidArgument(what + ": dy's height and width do not match x, strides, padding");
  return ffi::Error::Success();
}

template <typename T>
void PatchRows(const T* __restrict x, int64_t h, int64_t w, int64_t c, int64_t ho, int64_t wo, int64_t kh,
               int64_t kw, const int64_t* s, const int64_t* pad, int64_t r0, int64_t r1, T* __restrict patches) {
  const int64_t k = kh * kw * c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / (ho * wo), p = r / wo % ho, q = r % wo;
    T* row = patches + (r - r0) * k;
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t y = p * s[0] + i - pad[0];
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t xx = q * s[1] + j - pad[2];
        T* dst = row + (i * kw + j) * c;
        if (y < 0 || y >= h || xx < 0 || xx >= w)
          std::memset(dst, 0, c * sizeof(T));
        else
          std::memcpy(dst, x + ((n * h + y) * w + xx) * c, c * sizeof(T));
      }
    }
  }
}

ffi::Error Im2colBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                                 ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  const auto type = x.element_type();
  ffi::Error bad = CheckPatchProblem("im2col weight gradient", {type, dy.element_type(), dw->element_type()}, xd, gd,
                                     wd, strides, padding);
  if (bad.failure()) return bad;
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], ho = gd[1], wo = gd[2], o = gd[3], kh = wd[0], kw = wd[1];
  if (o % kChannelBlock) return ffi::Error::InvalidArgument("im2col weight gradient: output channels of 16");
  const int dtype = type == ffi::DataType::F32 ? kF32 : kBF16;
  const size_t bytes = type == ffi::DataType::F32 ? 4 : 2;
  const int64_t k = kh * kw * c, rows = n * ho * wo, size = k * o;
  // Chunks of about 2^20 patch values (2 MB in bfloat16), at least 256 rows: the matmul's inner dimension.
  const int64_t chunk = OddChunks(rows, std::max<int64_t>(256, (int64_t{1} << 20) / k));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const int team = static_cast<int>(std::min<int64_t>(SetTeam(threads), chunks));
  thread_local std::vector<float> sums;  // [team, K, o]: every thread's float32 sum
  if (sums.size() < static_cast<size_t>(team * size)) sums.resize(team * size);
  float* all = sums.data();
  const char* xp = static_cast<const char*>(x.untyped_data());
  const char* gp = static_cast<const char*>(dy.untyped_data());
  const int64_t s[2] = {strides[0], strides[1]}, pad[4] = {padding[0], padding[1], padding[2], padding[3]};
  std::string error;
#pragma omp parallel num_threads(team)
  {
    const int t = omp_get_thread_num();
    thread_local std::vector<char> patches;
    if (patches.size() < static_cast<size_t>(chunk * k) * bytes) patches.resize(chunk * k * bytes);
    float* sum = all + t * size;
    std::string local;
    bool first = true;
    for (int64_t i = t; i < chunks && local.empty(); i += team) {
      const int64_t r0 = i * chunk, r1 = std::min(rows, r0 + chunk);
      if (dtype == kF32)
        PatchRows(reinterpret_cast<const float*>(xp), h, w, c, ho, wo, kh, kw, s, pad, r0, r1,
                  reinterpret_cast<float*>(patches.data()));
      else
        PatchRows(reinterpret_cast<const uint16_t*>(xp), h, w, c, ho, wo, kh, kw, s, pad, r0, r1,
                  reinterpret_cast<uint16_t*>(patches.data()));
      if (Matmul({k, r1 - r0, o, 1, !first, 1, 1, dtype}, patches.data(), gp + r0 * o * bytes, sum, &local) == 0)
        first = false;
    }
    if (first) std::fill(sum, sum + size, 0.0f);
    if (!local.empty()) {
#pragma omp critical
      error = local;
    }
#pragma omp barrier
    float* out32 = static_cast<float*>(dw->untyped_data());
    uint16_t* out16 = static_cast<uint16_t*>(dw->untyped_data());
#pragma omp for schedule(static)
    for (int64_t j = 0; j < size; j += kChannelBlock) {  // size = K o, o a multiple of 16 (checked above)
      Lanes v = Load(all + j);
      for (int r = 1; r < team; ++r) v += Load(all + r * size + j);
      if (dtype == kF32)
        Store(out32 + j, v);
      else
        StoreBf16(out16 + j, v);
    }
  }
  if (!error.empty()) return ffi::Error(ffi::ErrorCode::kInternal, error);
  return ffi::Error::Success();
}

// --- Strided data gradients as one matmul and a col2im scatter. ---
//
// Why: oneDNN 3.2's strided backward-data kernel (brgconv_strided on AMX) ran ResNet-18's stride-2 layers 2.3-5.6x
// slower than their forwards per call (results/README.md). The data gradient is the transpose of im2col: the patches'
// gradient dP = dy W^T ([R, o] x [o, K], K = kh kw c) adds each value back into the x position it was copied from.
// Each thread takes whole images, so no two threads write one pixel: it multiplies its chunk's rows by W^T with a
// single-threaded oneDNN matmul into a float32 buffer in its cache, then adds them up image by image in a float32
// image that is rounded once, as oneDNN rounds its float32 accumulators.
template <class T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void Col2imImages(
    const float* __restrict dp, int64_t n0, int64_t n1, int64_t h, int64_t w, int64_t c, int64_t ho, int64_t wo,
    int64_t kh, int64_t kw, const int64_t* s, const int64_t* pad, float* __restrict image, T* __restrict dx) {
  const int64_t k = kh * kw * c, pixels = h * w * c;
  for (int64_t n = n0; n < n1; ++n) {
    std::memset(image, 0, pixels * sizeof(float));
    const float* rows = dp + (n - n0) * ho * wo * k;
    for (int64_t p = 0; p < ho; ++p)
      for (int64_t q = 0; q < wo; ++q) {
        const float* row = rows + (p * wo + q) * k;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t y = p * s[0] + i - pad[0];
          if (y < 0 || y >= h) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t xx = q * s[1] + j - pad[2];
            if (xx < 0 || xx >= w) continue;
            float* sum = image + (y * w + xx) * c;
            const float* add = row + (i * kw + j) * c;
            for (int64_t ch = 0; ch < c; ch += kChannelBlock) Store(sum + ch, Load(sum + ch) + Load(add + ch));
          }
        }
      }
    T* out = dx + n * pixels;
    for (int64_t e = 0; e < pixels; e += kChannelBlock) StoreAny(out + e, Load(image + e));
  }
}

ffi::Error Col2imBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                              ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t threads) {
  auto gd = dy.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  const auto type = dy.element_type();
  ffi::Error bad = CheckPatchProblem("col2im data gradient", {type, w.element_type(), dx->element_type()}, xd, gd,
                                     wd, strides, padding);
  if (bad.failure()) return bad;
  const int64_t n = xd[0], h = xd[1], width = xd[2], c = xd[3], ho = gd[1], wo = gd[2], o = gd[3], kh = wd[0],
                kw = wd[1];
  if (c % kChannelBlock) return ffi::Error::InvalidArgument("col2im data gradient: input channels of 16");
  const int dtype = type == ffi::DataType::F32 ? kF32 : kBF16;
  const size_t bytes = type == ffi::DataType::F32 ? 4 : 2;
  const int64_t k = kh * kw * c, per_image = ho * wo;
  // Whole images per chunk, about 2^19 float32 patch-gradient values (2 MB), at least 256 rows where they fit.
  const int64_t budget = int64_t{1} << 19;
  const int64_t rows_256 = (256 + per_image - 1) / per_image;
  const int64_t images = std::min(n, std::max<int64_t>({1, budget / (per_image * k), rows_256}));
  const int64_t chunks = (n + images - 1) / images;
  const int team = static_cast<int>(std::min<int64_t>(SetTeam(threads), chunks));
  const char* gp = static_cast<const char*>(dy.untyped_data());
  const void* wp = w.untyped_data();
  const int64_t s[2] = {strides[0], strides[1]}, pad[4] = {padding[0], padding[1], padding[2], padding[3]};
  std::string error;
#pragma omp parallel num_threads(team)
  {
    const int t = omp_get_thread_num();
    thread_local std::vector<float> dp, image;
    if (dp.size() < static_cast<size_t>(images * per_image * k)) dp.resize(images * per_image * k);
    if (image.size() < static_cast<size_t>(h * width * c)) image.resize(h * width * c);
    std::string local;
    for (int64_t i = t; i < chunks && local.empty(); i += team) {
      const int64_t n0 = i * images, n1 = std::min(n, n0 + images);
      if (Matmul({(n1 - n0) * per_image, o, k, 0, 0, 1, 1, dtype, 1}, gp + n0 * per_image * o * bytes, wp,
                 dp.data(), &local) != 0)
        break;
      if (dtype == kF32)
        Col2imImages(dp.data(), n0, n1, h, width, c, ho, wo, kh, kw, s, pad, image.data(),
                     static_cast<float*>(dx->untyped_data()));
      else
        Col2imImages(dp.data(), n0, n1, h, width, c, ho, wo, kh, kw, s, pad, image.data(),
                     static_cast<uint16_t*>(dx->untyped_data()));
    }
    if (!local.empty()) {
#pragma omp critical
      error = local;
    }
  }
  if (!error.empty()) return ffi::Error(ffi::ErrorCode::kInternal, error);
  return ffi::Error::Success();
}
}  // namespace

// All three take two NHWC/HWIO buffers, return one, and carry the strides, (top, bottom, left, right) padding and
// OpenMP threads (0: OpenMP's default).
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding")
      .Attr<int64_t>("threads");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvForward, Forward, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvBackwardData, BackwardData, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvBackwardWeights, BackwardWeights, ConvBinding());
// Winograd F(4x4, 3x3), float32, stride 1, padding 1 (the attributes are carried for a uniform call only):
// (x, u [36, c, o]) -> y, and (x, dy) -> du [36, c, o].
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvWinoForward, WinoForward, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvWinoBackwardWeights, WinoBackwardWeights, ConvBinding());
// Winograd F(2x2, 3x3), bfloat16: (x, u [16, c, o] bfloat16) -> y, and (x, dy) -> du [16, c, o] float32.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvWino2Forward, Wino2Forward, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvWino2BackwardWeights, Wino2BackwardWeights, ConvBinding());

// Strided weight gradients by im2col + matmul: (x, dy) -> dw [kh, kw, c, o], float32 or bfloat16, o % 16 == 0.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvIm2colBackwardWeights, Im2colBackwardWeights, ConvBinding());
// Strided data gradients by matmul + col2im: (dy, w) -> dx [n, h, w, c], float32 or bfloat16, c % 16 == 0.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ContrastoodConvCol2imBackwardData, Col2imBackwardData, ConvBinding());

// Switches the F(2x2) transforms' one-instruction bfloat16 stores on (1) or off (0); returns whether this CPU has
// them (AVX512_BF16).
extern "C" int contrastood_bf16_dot_stores(int on) {
  bf16_dot_stores.store(on != 0);
  return CpuHasBf16Dot() ? 1 : 0;
}

extern "C" int contrastood_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
