// The engine's scatter and gather as autograd functions: the forward's scatter of inputs that
// require grad and the gather of every output, whose backward the other op is.
//
// C++ nodes rather than torch.autograd.Function subclasses: a Python function's node costs the
// step a Python call and the GIL in each direction (the gather's is in every training step; on CPU
// replicas, after the replicas' compute, 0.1-0.2 ms of the step's fixed cost), where these run in
// the engine's thread without Python.
//
// Backward runs on the devices' current streams (autograd's stream semantics), as the
// engine's ops with stream id -1 (NOTE [Stream ordering] in comm.h).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

#include "comm.h"

namespace dpfast {

// scatter(), recorded by autograd where `tensor` requires grad and grad mode is on: the pieces'
// gradients are gathered back onto the tensor's device.
std::vector<at::Tensor> scatter_differentiable(const at::Tensor& tensor, const std::vector<Lane>& lanes,
                                               const std::vector<int64_t>& chunk_sizes, int64_t dim);

// gather(), recorded by autograd where a tensor requires grad and grad mode is on: the gradient
// is scattered back onto the tensors' devices, in their sizes along `dim`.
at::Tensor gather_differentiable(const std::vector<at::Tensor>& tensors, const std::vector<Lane>& lanes,
                                 const Lane& destination, int64_t dim);

// NOTE [Parallel backward] (dpfast/backward.py): stand-ins for `tensors` (detached: their data, not
// their graphs) whose one node calls `on_backward` with the stand-ins' gradients (undefined where
// none came) and gives its only input, `anchor`, none. `keep_alive` is saved by the node: freed
// when a backward that does not keep the graph has run it, and with the node otherwise.
using RouteCallback = std::function<void(const std::vector<at::Tensor>& grads)>;
std::vector<at::Tensor> route(const std::vector<at::Tensor>& tensors, const at::Tensor& anchor,
                              const at::Tensor& keep_alive, RouteCallback on_backward);

}  // namespace dpfast
