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
int omp_get_max_threads(void);  // libgomp, which libdnnl (the gomp build) links
void omp_set_num_threads(int);
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
// per calling thread, and XLA's threads run other computations too, so every call sets it.
ffi::Error MakeProblem(int kind, ffi::DataType type, ffi::Span<const int64_t> in_dims, ffi::Span<const int64_t> w_dims,
                       ffi::Span<const int64_t> out_dims, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding, int64_t threads, Problem* p) {
  if (in_dims.size() != 4 || w_dims.size() != 4 || out_dims.size() != 4 || strides.size() != 2 ||
      padding.size() != 4)
    return ffi::Error::InvalidArgument("onednn conv: expected NHWC/HWIO rank-4 operands, 2 strides, 4 paddings");
  int dtype = type == ffi::DataType::F32 ? kF32 : type == ffi::DataType::BF16 ? kBF16 : 0;
  if (!dtype) return ffi::Error::InvalidArgument("onednn conv: float32 or bfloat16 operands only");
  const int team = threads > 0 ? static_cast<int>(threads) : DefaultThreads();
  if (omp_get_max_threads() != team) omp_set_num_threads(team);
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

extern "C" int contrastood_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
