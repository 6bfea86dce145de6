// 2-D convolutions through oneDNN as XLA FFI handlers, for the CPU backend.
//
// XLA:CPU lowers a convolution to an im2col copy and a GEMM (Eigen); oneDNN's direct
// convolutions skip the copy and run faster on the U-Net's shapes on this project's
// CPU (benchmarks/README.md). Three handlers, called from diffusion_jax/models/onednn.py under a
// custom VJP: the forward convolution y = x * w, its input gradient dx (backward data) and its
// weight gradient dw (backward weights). Layouts are the U-Net's: activations NHWC, weights
// HWIO, float32; oneDNN reorders the weights (small) into its blocked layout each call and
// reads and writes the activations in place. Primitives are made once per shape and kept.
//
// XLA may run two convolutions at once, on threads other than the one that made their
// primitives (independent branches, a backward's two gradients). oneDNN's own scratchpad is
// shared by the primitives made on one thread (scratchpad_mode::library, as the PyPI builds
// are configured: DNNL_ENABLE_CONCURRENT_EXEC=OFF), so every primitive here takes its
// scratchpad from the thread that runs it (scratchpad_mode::user).
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

using Tensor = ffi::Buffer<ffi::F32, 4>;
using Result = ffi::ResultBuffer<ffi::F32, 4>;

// The FFI call's attributes: strides and the padding before (lo) and after (hi) each side.
struct Geometry {
  int64_t stride_h, stride_w, pad_lo_h, pad_lo_w, pad_hi_h, pad_hi_w;
};

// The primitives of one convolution shape: forward, backward data, backward weights.
struct Convolution {
  memory::desc src, weights_hwio, dst;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Every primitive's attributes: the caller provides the scratchpad.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A scratchpad of `desc`'s size, owned by the calling thread and reused by its later calls.
memory Scratchpad(const memory::desc& desc) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  const size_t size = desc.get_size();
  if (size > buffer.size) {
    std::free(buffer.data);
    buffer.size = 0;
    buffer.data = std::aligned_alloc(64, (size + 63) / 64 * 64);
    if (buffer.data == nullptr) throw std::bad_alloc();
    buffer.size = size;
  }
  return memory(desc, Engine(), buffer.data);
}

const Convolution& Get(const Tensor& x, const Tensor& w, const Geometry& g) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t>,
                  std::unique_ptr<Convolution>>
      cache;
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  const int64_t n = xd[0], h = xd[1], wi = xd[2], c = xd[3], kh = wd[0], kw = wd[1], o = wd[3];
  auto key = std::make_tuple(n, h, wi, c, kh, kw, o, g.stride_h, g.stride_w, g.pad_lo_h, g.pad_lo_w,
                             g.pad_hi_h, g.pad_hi_w);
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[key];
  if (entry) return *entry;
  const int64_t oh = (h + g.pad_lo_h + g.pad_hi_h - kh) / g.stride_h + 1;
  const int64_t ow = (wi + g.pad_lo_w + g.pad_hi_w - kw) / g.stride_w + 1;
  auto conv = std::make_unique<Convolution>();
  const auto f32 = memory::data_type::f32;
  conv->src = memory::desc({n, c, h, wi}, f32, Tag::nhwc);
  conv->weights_hwio = memory::desc({o, c, kh, kw}, f32, Tag::hwio);
  conv->dst = memory::desc({n, o, oh, ow}, f32, Tag::nhwc);
  memory::desc weights_any({o, c, kh, kw}, f32, Tag::any);
  memory::dims strides{g.stride_h, g.stride_w}, pad_lo{g.pad_lo_h, g.pad_lo_w}, pad_hi{g.pad_hi_h, g.pad_hi_w};
  const auto algo = dnnl::algorithm::convolution_direct;
  const auto attr = UserScratchpad();
  conv->fwd_pd = dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training, algo,
                                                           conv->src, weights_any, conv->dst, strides, pad_lo,
                                                           pad_hi, attr);
  conv->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), algo, conv->src, weights_any, conv->dst, strides, pad_lo, pad_hi, conv->fwd_pd, attr);
  conv->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), algo, conv->src, weights_any, conv->dst, strides, pad_lo, pad_hi, conv->fwd_pd, attr);
  conv->fwd = dnnl::convolution_forward(conv->fwd_pd);
  conv->bwd_data = dnnl::convolution_backward_data(conv->bwd_data_pd);
  conv->bwd_weights = dnnl::convolution_backward_weights(conv->bwd_weights_pd);
  entry = std::move(conv);
  return *entry;
}

// Copies `from` into `to`'s layout.
void Reorder(const memory& from, const memory& to, dnnl::stream& stream) {
  dnnl::reorder::primitive_desc pd(from, to, UserScratchpad());
  dnnl::reorder(pd).execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                     {DNNL_ARG_SCRATCHPAD, Scratchpad(pd.scratchpad_desc())}});
}

// The HWIO weights at `data` in the layout `want`, reordered if it differs.
memory WeightsAs(const memory::desc& want, const memory::desc& hwio, void* data, dnnl::stream& stream) {
  memory user(hwio, Engine(), data);
  if (want == hwio) return user;
  memory blocked(want, Engine());
  Reorder(user, blocked, stream);
  return blocked;
}

// Runs `body`, turning a oneDNN exception into an FFI error (an exception must not cross into XLA).
template <typename F>
ffi::Error Guard(F body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN convolution: out of memory");
  }
}

ffi::Error Forward(Tensor x, Tensor w, Result y, Geometry g) {
  return Guard([&] {
    const auto& conv = Get(x, w, g);
    dnnl::stream stream(Engine());
    memory src(conv.src, Engine(), x.untyped_data());
    memory weights = WeightsAs(conv.fwd_pd.weights_desc(), conv.weights_hwio, w.untyped_data(), stream);
    memory dst(conv.dst, Engine(), y->untyped_data());
    conv.fwd.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst},
                              {DNNL_ARG_SCRATCHPAD, Scratchpad(conv.fwd_pd.scratchpad_desc())}});
    stream.wait();
  });
}

// dx = dy convolved with the transposed w; x gives only its shape.
ffi::Error BackwardData(Tensor x, Tensor w, Tensor dy, Result dx, Geometry g) {
  return Guard([&] {
    const auto& conv = Get(x, w, g);
    dnnl::stream stream(Engine());
    memory weights = WeightsAs(conv.bwd_data_pd.weights_desc(), conv.weights_hwio, w.untyped_data(), stream);
    memory diff_dst(conv.dst, Engine(), dy.untyped_data());
    memory diff_src(conv.src, Engine(), dx->untyped_data());
    conv.bwd_data.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights},
                                   {DNNL_ARG_DIFF_SRC, diff_src},
                                   {DNNL_ARG_SCRATCHPAD, Scratchpad(conv.bwd_data_pd.scratchpad_desc())}});
    stream.wait();
  });
}

// dw = sum over the batch and positions of x patches times dy; w gives only its shape.
ffi::Error BackwardWeights(Tensor x, Tensor w, Tensor dy, Result dw, Geometry g) {
  return Guard([&] {
    const auto& conv = Get(x, w, g);
    dnnl::stream stream(Engine());
    memory src(conv.src, Engine(), x.untyped_data());
    memory diff_dst(conv.dst, Engine(), dy.untyped_data());
    memory hwio(conv.weights_hwio, Engine(), dw->untyped_data());
    const auto want = conv.bwd_weights_pd.diff_weights_desc();
    memory diff_weights = want == conv.weights_hwio ? hwio : memory(want, Engine());
    conv.bwd_weights.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                      {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                                      {DNNL_ARG_SCRATCHPAD, Scratchpad(conv.bwd_weights_pd.scratchpad_desc())}});
    if (want != conv.weights_hwio) Reorder(diff_weights, hwio, stream);
    stream.wait();
  });
}

}  // namespace

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(Geometry, StructMember<int64_t>("stride_h"),
                                      StructMember<int64_t>("stride_w"), StructMember<int64_t>("pad_lo_h"),
                                      StructMember<int64_t>("pad_lo_w"), StructMember<int64_t>("pad_hi_h"),
                                      StructMember<int64_t>("pad_hi_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<Tensor>().Arg<Tensor>().Ret<Tensor>().Attrs<Geometry>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<Tensor>().Arg<Tensor>().Arg<Tensor>().Ret<Tensor>().Attrs<Geometry>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<Tensor>().Arg<Tensor>().Arg<Tensor>().Ret<Tensor>().Attrs<Geometry>());
