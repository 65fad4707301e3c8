#include "autograd_ops.h"

#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <string>

namespace dpfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Devices kept in a node's context (whose saved data are IValues): type and index, in turn.
std::vector<int64_t> device_codes(const std::vector<c10::Device>& devices) {
  std::vector<int64_t> codes;
  codes.reserve(2 * devices.size());
  for (const auto& d : devices) {
    codes.push_back(static_cast<int64_t>(d.type()));
    codes.push_back(d.index());
  }
  return codes;
}

std::vector<c10::Device> devices_from(const std::vector<int64_t>& codes) {
  std::vector<c10::Device> devices;
  devices.reserve(codes.size() / 2);
  for (size_t i = 0; i + 1 < codes.size(); i += 2) {
    devices.emplace_back(static_cast<c10::DeviceType>(codes[i]), static_cast<c10::DeviceIndex>(codes[i + 1]));
  }
  return devices;
}

std::vector<c10::Device> devices_of(const std::vector<Lane>& lanes) {
  std::vector<c10::Device> devices;
  devices.reserve(lanes.size());
  for (const auto& lane : lanes) devices.push_back(lane.device);
  return devices;
}

// The devices' current streams: where autograd runs a backward's work.
std::vector<Lane> current_streams(const std::vector<c10::Device>& devices) {
  std::vector<Lane> lanes;
  lanes.reserve(devices.size());
  for (const auto& d : devices) lanes.push_back(Lane{d, -1});
  return lanes;
}

// The CUDA devices among `devices` other than `excluded`, each once.
std::vector<c10::Device> other_cuda_devices(const std::vector<c10::Device>& devices, const c10::Device& excluded) {
  std::vector<c10::Device> others;
  for (const auto& d : devices) {
    if (d.is_cuda() && d != excluded && std::find(others.begin(), others.end(), d) == others.end()) {
      others.push_back(d);
    }
  }
  return others;
}

// Forward-mode AD has no rule through these nodes (nor through nn.DataParallel's Python functions,
// whose missing jvp raises NotImplementedError too): raised before the op, not a tangent dropped.
void check_no_tangent(const char* op, const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK_NOT_IMPLEMENTED(!(t.defined() && t._fw_grad(/*level=*/0).defined()), "dpfast.", op,
                                ": forward-mode AD (a dual tensor) has no rule through the replicas' scatter and "
                                "gather (nor through nn.DataParallel's)");
  }
}

bool any_requires_grad(const std::vector<at::Tensor>& tensors) {
  return std::any_of(tensors.begin(), tensors.end(),
                     [](const at::Tensor& t) { return t.defined() && t.requires_grad(); });
}

// The callback of a Route node, in its context's saved data (a capsule holds any object).
struct RouteCallbackHolder : public torch::CustomClassHolder {
  explicit RouteCallbackHolder(RouteCallback fn) : fn(std::move(fn)) {}
  RouteCallback fn;
};

struct RouteArgs {  // one argument, so that autograd takes none of it for an input
  const std::vector<at::Tensor>& tensors;
  const at::Tensor& keep_alive;
  RouteCallback on_backward;
};

}  // namespace

// Outside the anonymous namespace for their names in autograd's messages: CppNode<dpfast::Scatter>.
struct Scatter : public torch::autograd::Function<Scatter> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tensor, const std::vector<Lane>& lanes,
                               const std::vector<int64_t>& chunk_sizes, int64_t dim) {
    ctx->saved_data["source"] = device_codes({tensor.device()});
    ctx->saved_data["devices"] = device_codes(devices_of(lanes));
    ctx->saved_data["dim"] = dim;
    return scatter(tensor, lanes, chunk_sizes, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Pieces without a gradient arrive as zeros (the context materializes them).
    const auto devices = devices_from(ctx->saved_data["devices"].toIntVector());
    const auto source = devices_from(ctx->saved_data["source"].toIntVector()).at(0);
    // The gather reads each gradient on its device's current stream: order those after the stream
    // this backward runs on.
    const c10::Device producer = grads.at(0).device();
    if (producer.is_cuda()) {
      for (const auto& d : other_cuda_devices(devices, producer)) wait_lane(Lane{d, -1}, Lane{producer, -1});
    }
    at::Tensor gathered =
        gather_differentiable(grads, current_streams(devices), Lane{source, -1}, ctx->saved_data["dim"].toInt());
    return {gathered, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct Gather : public torch::autograd::Function<Gather> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList tensors, const std::vector<Lane>& lanes,
                            const Lane& destination, int64_t dim) {
    std::vector<int64_t> sizes;
    sizes.reserve(tensors.size());
    for (const auto& t : tensors) sizes.push_back(t.size(dim));
    ctx->saved_data["devices"] = device_codes(devices_of(lanes));
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["dim"] = dim;
    return gather(tensors.vec(), lanes, destination, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads.at(0);
    const auto devices = devices_from(ctx->saved_data["devices"].toIntVector());
    variable_list pieces = scatter_differentiable(grad, current_streams(devices),
                                                  ctx->saved_data["sizes"].toIntVector(),
                                                  ctx->saved_data["dim"].toInt());
    // The pieces for other devices are copied on those devices' current streams, but autograd
    // orders their consumers after this node's stream only: it waits for the copies.
    if (grad.is_cuda()) {
      for (const auto& d : other_cuda_devices(devices, grad.device())) wait_lane(Lane{grad.device(), -1}, Lane{d, -1});
    }
    pieces.resize(pieces.size() + 3);  // lanes, destination, dim: no gradient
    return pieces;
  }
};

struct Route : public torch::autograd::Function<Route> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& anchor, const RouteArgs& args) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({args.keep_alive});
    ctx->saved_data["on_backward"] =
        c10::IValue::make_capsule(c10::make_intrusive<RouteCallbackHolder>(args.on_backward));
    variable_list stand_ins;
    stand_ins.reserve(args.tensors.size());
    for (const auto& t : args.tensors) stand_ins.push_back(t.detach());
    return stand_ins;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto holder = c10::static_intrusive_pointer_cast<RouteCallbackHolder>(
        ctx->saved_data["on_backward"].toCapsule());
    holder->fn(grads);
    return {at::Tensor(), at::Tensor()};  // the anchor, the arguments
  }
};

std::vector<at::Tensor> route(const std::vector<at::Tensor>& tensors, const at::Tensor& anchor,
                              const at::Tensor& keep_alive, RouteCallback on_backward) {
  TORCH_CHECK(anchor.requires_grad(), "dpfast.route: anchor: expected a tensor that requires grad");
  return Route::apply(anchor, RouteArgs{tensors, keep_alive, std::move(on_backward)});
}

std::vector<at::Tensor> scatter_differentiable(const at::Tensor& tensor, const std::vector<Lane>& lanes,
                                               const std::vector<int64_t>& chunk_sizes, int64_t dim) {
  check_no_tangent("scatter", {tensor});
  if (!(at::GradMode::is_enabled() && tensor.defined() && tensor.requires_grad())) {
    return scatter(tensor, lanes, chunk_sizes, dim);
  }
  return Scatter::apply(tensor, lanes, chunk_sizes, dim);
}

at::Tensor gather_differentiable(const std::vector<at::Tensor>& tensors, const std::vector<Lane>& lanes,
                                 const Lane& destination, int64_t dim) {
  check_no_tangent("gather", tensors);
  if (!(at::GradMode::is_enabled() && any_requires_grad(tensors))) {
    return gather(tensors, lanes, destination, dim);
  }
  return Gather::apply(at::TensorList(tensors), lanes, destination, dim);
}

}  // namespace dpfast
