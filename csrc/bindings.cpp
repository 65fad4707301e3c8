// The one file that binds the engine to Python as dpfast._C. The GIL is
// released for every op that moves data.
#include <pybind11/functional.h>
#include <torch/extension.h>

#include <ATen/SavedTensorHooks.h>
#include <ATen/ThreadLocalState.h>

#include <array>
#include <optional>
#include <tuple>

#include "autograd_ops.h"
#include "comm.h"
#include "grad_ready.h"
#include "handoff.h"
#include "plan.h"

namespace py = pybind11;

namespace {

std::vector<dpfast::Lane> make_lanes(const char* op, const std::vector<c10::Device>& devices,
                                     const std::vector<int64_t>& stream_ids) {
  TORCH_CHECK(stream_ids.empty() || stream_ids.size() == devices.size(), "dpfast.", op,
              ": expected one stream id per device (", devices.size(), " devices), but got ", stream_ids.size());
  std::vector<dpfast::Lane> lanes;
  for (size_t i = 0; i < devices.size(); ++i) {
    lanes.push_back(dpfast::Lane{devices[i], stream_ids.empty() ? -1 : stream_ids[i]});
  }
  return lanes;
}

// Each buffer's device (an undefined one's: the CPU, for the op's own check to name it).
std::vector<c10::Device> devices_of(const std::vector<at::Tensor>& buffers) {
  std::vector<c10::Device> devices;
  for (const auto& b : buffers) devices.push_back(b.defined() ? b.device() : c10::Device(c10::kCPU));
  return devices;
}

dpfast::TreeOptions make_options(const std::string& shape, int64_t chunk_bytes, bool allow_p2p,
                                 double bandwidth_GBps, double hop_latency_us) {
  dpfast::TreeOptions options;
  options.shape = shape;
  options.chunk_bytes = chunk_bytes;
  options.allow_p2p = allow_p2p;
  options.link.bandwidth_GBps = bandwidth_GBps;
  options.link.hop_latency_us = hop_latency_us;
  return options;
}

// NOTE [Replica dictionaries]: the two per-call walks over every module of the model that
// ReplicaSet.sync makes (dpfast/replicas.py), in C++: about 2 us a module from Python, which for a
// ResNet-50 (151 modules) and 4 replicas came to 1 ms before every forward. The only code here that
// knows Python objects; each has its Python twin in replicas.py for what it leaves alone.

// Interned names, never freed: a static py::object would be released after the interpreter is.
PyObject* name(const char* text) {
  PyObject* interned = PyUnicode_InternFromString(text);
  if (interned == nullptr) throw py::error_already_set();
  return interned;
}

const std::array<PyObject*, 3>& entry_dict_names() {
  static const std::array<PyObject*, 3> names{name("_parameters"), name("_buffers"), name("_modules")};
  return names;
}

// module.__dict__[key], held (a key's __eq__ below is Python code, and may replace it); null
// where it is missing.
py::object dict_item(PyObject* module_dict, PyObject* key) {
  PyObject* value = PyDict_GetItemWithError(module_dict, key);
  if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return py::reinterpret_borrow<py::object>(value);
}

// Same names in the same order, naming the same objects (identity; never ==). The order is the
// mapping's own: an OrderedDict (modules unpickled from torch < 2.0 have them) keeps its
// move_to_end() order apart from its storage, which PyDict_Next walks.
bool same_entries(const py::object& current, PyObject* snapshot) {
  if (!current) return false;
  const Py_ssize_t size = PyObject_Size(current.ptr());
  if (size < 0) throw py::error_already_set();
  if (size != PyDict_Size(snapshot)) return false;
  Py_ssize_t pos = 0;
  PyObject *snapshot_key, *snapshot_value;
  auto same_as_next = [&](PyObject* key, PyObject* value) {
    if (!PyDict_Next(snapshot, &pos, &snapshot_key, &snapshot_value) || value != snapshot_value) return false;
    if (key == snapshot_key) return true;
    const int equal = PyObject_RichCompareBool(key, snapshot_key, Py_EQ);
    if (equal < 0) throw py::error_already_set();
    return equal == 1;
  };
  if (PyDict_CheckExact(current.ptr())) {
    Py_ssize_t current_pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(current.ptr(), &current_pos, &key, &value)) {
      // key and value are borrowed from a dict the comparison's Python code may change: held.
      py::object held_key = py::reinterpret_borrow<py::object>(key);
      py::object held_value = py::reinterpret_borrow<py::object>(value);
      if (!same_as_next(key, value)) return false;
      if (PyDict_Size(current.ptr()) != size) return false;  // changed under the walk
    }
    return true;
  }
  py::object items = py::reinterpret_steal<py::object>(PyMapping_Items(current.ptr()));
  if (!items) throw py::error_already_set();
  for (py::handle item : items) {
    py::tuple pair = py::reinterpret_borrow<py::tuple>(item);
    if (pair.size() != 2 || !same_as_next(pair[0].ptr(), pair[1].ptr())) return false;
  }
  return true;
}

// Whether every module's _parameters, _buffers and _modules still hold what snapshots[j] (a tuple
// of copies of the three, then the module's class) held, and its class is the same.
bool entries_unchanged(const py::list& modules, const py::list& snapshots) {
  const auto& keys = entry_dict_names();
  if (modules.size() != snapshots.size()) return false;
  for (size_t j = 0; j < modules.size(); ++j) {
    py::object module_dict = py::reinterpret_steal<py::object>(PyObject_GenericGetDict(modules[j].ptr(), nullptr));
    if (!module_dict) throw py::error_already_set();
    py::tuple snapshot = snapshots[j].cast<py::tuple>();
    const auto* module_class = reinterpret_cast<PyObject*>(Py_TYPE(modules[j].ptr()));
    if (snapshot.size() != keys.size() + 1 || module_class != snapshot[keys.size()].ptr()) return false;
    for (size_t d = 0; d < keys.size(); ++d) {
      if (!same_entries(dict_item(module_dict.ptr(), keys[d]), snapshot[d].ptr())) return false;
    }
  }
  return true;
}

// A replica's _parameters, _buffers and _modules made to hold what they were built with again
// (templates: a tuple of three dicts), where a forward on the replica assigned or added an entry
// (`self.seen = self.seen + 1` on a buffer, a submodule swapped): nn.DataParallel's replicas are
// new each call, so such writes are lost at the next one, and a kept replica must not read them.
void restore_entries(const py::tuple& own, const py::tuple& templates) {
  for (size_t d = 0; d < 3; ++d) {
    PyObject* dict = own[d].ptr();
    PyObject* built = templates[d].ptr();
    if (same_entries(py::reinterpret_borrow<py::object>(dict), built)) continue;
    PyDict_Clear(dict);
    if (PyDict_Update(dict, built) != 0) throw py::error_already_set();
  }
}

// Each replica module's __dict__ becomes a shallow copy of its root module's, with the replica's
// own (_parameters, _buffers, _modules) and forward-hook dictionaries (owns[j]: a tuple of those
// three, a dict of the hook dictionaries and the templates of the three; restore_entries). Done
// here for the common case only: where slow[j]
// (attributes that hold the module's own tensors, an RNN, torch.compile's OptimizedModule), where
// a forward hook is registered on the root or installed on the replica, or where module.compile()
// was called, module j is left to the caller's Python path, and its index returned.
// NOTE [Attribute tensors]: given a root_device, the (j, name) of every plain attribute of a module
// (left ones included) that holds a tensor on that device are also returned, for the caller to
// give the replica one on its own device.
std::tuple<std::vector<int64_t>, std::vector<std::tuple<int64_t, py::object>>> refresh_replica_dicts(
    const py::list& modules, const py::list& replicas, const py::list& owns, const std::vector<bool>& slow,
    std::optional<c10::Device> root_device) {
  const auto& keys = entry_dict_names();
  static PyObject* const forward_hooks = name("_forward_hooks");
  static PyObject* const forward_pre_hooks = name("_forward_pre_hooks");
  static PyObject* const compiled_call_impl = name("_compiled_call_impl");
  TORCH_CHECK(replicas.size() == modules.size() && owns.size() == modules.size() && slow.size() == modules.size(),
              "dpfast.refresh_replica_dicts: expected as many replicas, owns and slow flags as modules (",
              modules.size(), "), but got ", replicas.size(), ", ", owns.size(), " and ", slow.size());
  std::vector<int64_t> left;
  std::vector<std::tuple<int64_t, py::object>> on_root_device;
  auto has_hooks = [](PyObject* dict, PyObject* key) {
    py::object hooks = dict_item(dict, key);
    if (!hooks || !PyDict_Check(hooks.ptr())) return true;  // missing, or not a dict: the Python path decides
    return PyDict_Size(hooks.ptr()) != 0;
  };
  for (size_t j = 0; j < modules.size(); ++j) {
    py::tuple own = owns[j].cast<py::tuple>();
    TORCH_CHECK(own.size() == 5, "dpfast.refresh_replica_dicts: owns[", j, "]: expected 5 items, but got ", own.size());
    restore_entries(own, own[4].cast<py::tuple>());
    py::object module_dict = py::reinterpret_steal<py::object>(PyObject_GenericGetDict(modules[j].ptr(), nullptr));
    if (!module_dict) throw py::error_already_set();
    if (root_device) {
      PyObject* key = nullptr;
      PyObject* value = nullptr;
      Py_ssize_t position = 0;
      while (PyDict_Next(module_dict.ptr(), &position, &key, &value)) {
        if (THPVariable_Check(value) && THPVariable_Unpack(value).device() == *root_device) {
          on_root_device.emplace_back(static_cast<int64_t>(j), py::reinterpret_borrow<py::object>(key));
        }
      }
    }
    if (slow[j]) {
      left.push_back(static_cast<int64_t>(j));
      continue;
    }
    PyObject* hooks = own[3].ptr();
    // module.compile()'s callable is bound to the root module: Python makes the replica's own
    // (NOTE [Compiled modules] in replicas.py).
    py::object compiled = dict_item(module_dict.ptr(), compiled_call_impl);
    if (has_hooks(module_dict.ptr(), forward_hooks) || has_hooks(module_dict.ptr(), forward_pre_hooks) ||
        has_hooks(hooks, forward_hooks) || has_hooks(hooks, forward_pre_hooks) ||
        (compiled && compiled.ptr() != Py_None)) {
      left.push_back(static_cast<int64_t>(j));
      continue;
    }
    py::object copy = py::reinterpret_steal<py::object>(PyDict_Copy(module_dict.ptr()));
    if (!copy) throw py::error_already_set();
    for (size_t d = 0; d < keys.size(); ++d) {
      if (PyDict_SetItem(copy.ptr(), keys[d], own[d].ptr()) != 0) throw py::error_already_set();
    }
    if (PyDict_Update(copy.ptr(), hooks) != 0) throw py::error_already_set();
    // object.__setattr__(replica, "__dict__", copy): past nn.Module.__setattr__.
    if (PyObject_GenericSetDict(replicas[j].ptr(), copy.ptr(), nullptr) != 0) throw py::error_already_set();
  }
  return {left, on_root_device};
}

// NOTE [Thread-local state of replicas]: a replica's forward or backward part on a worker runs
// under the caller's at::ThreadLocalState, the state PyTorch's own autograd engine carries into its
// worker threads: grad and inference mode, autocast, dispatch keys, Python dispatch and function
// modes (FlopCounterMode, a torch.device context), the profiler's thread-local callbacks. Captured
// on the caller's thread, entered on a worker's for one job, the worker's own put back after it.
// All but the saved-tensor hooks: the worker keeps its own (none), as under nn.DataParallel.
// Hooks may pair what they pack by order: torch.utils.checkpoint's non-reentrant recomputation
// matches the n-th tensor saved by the recomputation with the n-th saved by the forward, and
// replicas packing from several threads at once interleave in another order each time (wrong
// gradients, in one run of two).
struct CapturedThreadState {
  at::ThreadLocalState state;  // the constructing thread's
};

class ThreadStateScope {
 public:
  explicit ThreadStateScope(const CapturedThreadState& captured) : state_(captured.state) {}
  void enter() {
    TORCH_CHECK(!guard_, "dpfast.ThreadStateScope: entered twice");
    const at::impl::SavedTensorDefaultHooksTLS own_hooks = at::SavedTensorDefaultHooks::get_tls_state();
    guard_.emplace(state_);
    at::SavedTensorDefaultHooks::set_tls_state(own_hooks);
  }
  void exit() { guard_.reset(); }

 private:
  at::ThreadLocalState state_;
  std::optional<at::ThreadLocalStateGuard> guard_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpfast's engine: scatter, gather, tree reduce-add and broadcast, coalescing (see csrc/comm.h)";
  // TORCH_CHECK_NOT_IMPLEMENTED's error as Python's NotImplementedError, as torch's own bindings give it
  // (pybind11 would make it a RuntimeError).
  py::register_local_exception_translator([](std::exception_ptr raised) {
    try {
      if (raised) std::rethrow_exception(raised);
    } catch (const c10::NotImplementedError& error) {
      PyErr_SetString(PyExc_NotImplementedError, error.what_without_backtrace());
    }
  });
  using namespace pybind11::literals;
  using dpfast::plan::TreeShape;

  m.def("cuda_built", &dpfast::cuda_built, "Whether this build carries the CUDA implementation");
  m.def("can_access_peer", &dpfast::can_access_peer, "device"_a, "peer"_a,
        "Whether `device` can read `peer`'s memory directly (enables it once through PyTorch's cache)");

  m.def(
      "scatter",
      [](const at::Tensor& tensor, const std::vector<c10::Device>& devices, const std::vector<int64_t>& chunk_sizes,
         int64_t dim, const std::vector<int64_t>& stream_ids) {
        return dpfast::scatter_differentiable(tensor, make_lanes("scatter", devices, stream_ids), chunk_sizes, dim);
      },
      "tensor"_a, "devices"_a, "chunk_sizes"_a, "dim"_a = 0, "stream_ids"_a = std::vector<int64_t>{},
      "Splits tensor along dim onto the lanes (csrc/comm.h); recorded by autograd (csrc/autograd_ops.h)",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "gather",
      [](const std::vector<at::Tensor>& tensors, const std::vector<c10::Device>& devices,
         const c10::Device& destination, int64_t dim, const std::vector<int64_t>& stream_ids,
         int64_t destination_stream_id) {
        return dpfast::gather_differentiable(tensors, make_lanes("gather", devices, stream_ids),
                                             dpfast::Lane{destination, destination_stream_id}, dim);
      },
      "tensors"_a, "devices"_a, "destination"_a, "dim"_a = 0, "stream_ids"_a = std::vector<int64_t>{},
      "destination_stream_id"_a = -1,
      "Concatenates tensors along dim onto destination (csrc/comm.h); recorded by autograd (csrc/autograd_ops.h)",
      py::call_guard<py::gil_scoped_release>());
  // reduce_add_ and broadcast_ take the same arguments: buffers (one per lane, each on its
  // lane's device), the root, the lanes' stream ids and the tree options.
  using TreeOp = void (*)(const std::vector<at::Tensor>&, const std::vector<dpfast::Lane>&, int64_t,
                          const dpfast::TreeOptions&);
  auto bind_tree_op = [&m](const char* name, TreeOp op, const char* doc) {
    m.def(
        name,
        [name, op](const std::vector<at::Tensor>& buffers, int64_t root, const std::vector<int64_t>& stream_ids,
                   const std::string& shape, int64_t chunk_bytes, bool allow_p2p, double bandwidth_GBps,
                   double hop_latency_us) {
          op(buffers, make_lanes(name, devices_of(buffers), stream_ids), root,
             make_options(shape, chunk_bytes, allow_p2p, bandwidth_GBps, hop_latency_us));
        },
        "buffers"_a, "root"_a = 0, "stream_ids"_a = std::vector<int64_t>{}, "shape"_a = "auto", "chunk_bytes"_a = 0,
        "allow_p2p"_a = true, "bandwidth_GBps"_a = 25.0, "hop_latency_us"_a = 5.0, doc,
        py::call_guard<py::gil_scoped_release>());
  };
  bind_tree_op("reduce_add_", &dpfast::reduce_add_,
               "In place: buffers[root] becomes the sum of all buffers (the others hold partial sums)");
  bind_tree_op("broadcast_", &dpfast::broadcast_, "In place: every buffer becomes a copy of buffers[root]");
  m.def(
      "wait_lane",
      [](const c10::Device& consumer, int64_t consumer_stream_id, const c10::Device& producer,
         int64_t producer_stream_id) {
        dpfast::wait_lane(dpfast::Lane{consumer, consumer_stream_id}, dpfast::Lane{producer, producer_stream_id});
      },
      "consumer"_a, "consumer_stream_id"_a, "producer"_a, "producer_stream_id"_a,
      "Work on the consumer's stream from now on runs after the work already on the producer's (csrc/comm.h)",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "zero_",
      [](const std::vector<at::Tensor>& buffers, const std::vector<int64_t>& stream_ids) {
        dpfast::zero_(buffers, make_lanes("zero_", devices_of(buffers), stream_ids));
      },
      "buffers"_a, "stream_ids"_a = std::vector<int64_t>{},
      "Zeroes each buffer on its lane's stream, after the work already there (csrc/comm.h)",
      py::call_guard<py::gil_scoped_release>());
  m.def("coalesce_into", &dpfast::coalesce_into, "tensors"_a, "flat"_a, py::call_guard<py::gil_scoped_release>());
  m.def("uncoalesce_from", &dpfast::uncoalesce_from, "flat"_a, "tensors"_a,
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "point_into",
      [](const at::Tensor& tensor, const at::Tensor& flat, int64_t offset, std::optional<std::vector<int64_t>> shape,
         bool exact) {
        std::optional<at::IntArrayRef> sizes;
        if (shape.has_value()) sizes = at::IntArrayRef(*shape);
        dpfast::point_into(tensor, flat, offset, sizes, exact);
      },
      "tensor"_a, "flat"_a, "offset"_a, "shape"_a = py::none(), "exact"_a = false,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "route",
      [](const std::vector<at::Tensor>& tensors, const at::Tensor& anchor, const at::Tensor& keep_alive,
         py::object on_backward) {
        // The callable lives as long as the node, which may die on any thread: released under the GIL.
        std::shared_ptr<py::object> callback(new py::object(std::move(on_backward)), [](py::object* fn) {
          if (!Py_IsInitialized()) return;  // at exit: left to the interpreter's teardown
          py::gil_scoped_acquire gil;
          delete fn;
        });
        py::gil_scoped_release no_gil;
        return dpfast::route(tensors, anchor, keep_alive, [callback](const std::vector<at::Tensor>& grads) {
          py::gil_scoped_acquire gil;
          py::list args;
          for (const auto& g : grads) args.append(g.defined() ? py::cast(g) : py::none());
          (*callback)(args);
        });
      },
      "tensors"_a, "anchor"_a, "keep_alive"_a, "on_backward"_a,
      "Stand-ins for tensors whose backward calls on_backward(grads) (NOTE [Parallel backward], csrc/autograd_ops.h)");
  m.def("exact_alias", &dpfast::exact_alias, "flat"_a, "offset"_a, "shape"_a,
        "A tensor at offset in flat's memory, on a storage of exactly its bytes (NOTE [Exact storages])");

  // The planner, for tests, the benchmark's cost model and dpfast.info.
  m.def(
      "make_tree",
      [](int num_devices, int root, const std::string& shape) {
        std::vector<std::vector<std::tuple<int, int>>> rounds;
        for (const auto& round : dpfast::plan::make_tree(num_devices, root, dpfast::plan::tree_shape_from_string(shape)).rounds) {
          std::vector<std::tuple<int, int>> edges;
          for (const auto& e : round) edges.emplace_back(e.child, e.parent);
          rounds.push_back(std::move(edges));
        }
        return rounds;
      },
      "num_devices"_a, "root"_a, "shape"_a, "Rounds of (child, parent) edges of a reduction tree");
  m.def(
      "plan_for",
      [](int64_t bytes, int num_devices, const std::string& shape, int64_t chunk_bytes, double bandwidth_GBps,
         double hop_latency_us) {
        auto options = make_options(shape, chunk_bytes, true, bandwidth_GBps, hop_latency_us);
        const TreeShape resolved = dpfast::resolve_shape(options, bytes, num_devices);
        const int64_t chunk = dpfast::resolve_chunk_bytes(options, resolved, bytes, num_devices);
        const int64_t num_chunks = bytes <= 0 ? 0 : (bytes + chunk - 1) / chunk;
        return std::make_tuple(dpfast::plan::to_string(resolved), chunk,
                               dpfast::plan::predict_time_us(resolved, bytes, num_devices, num_chunks, options.link));
      },
      "bytes"_a, "num_devices"_a, "shape"_a = "auto", "chunk_bytes"_a = 0, "bandwidth_GBps"_a = 25.0,
      "hop_latency_us"_a = 5.0, "(shape, chunk_bytes, predicted_time_us) the engine would use");
  m.def(
      "predict_time_us",
      [](const std::string& shape, int64_t bytes, int num_devices, int64_t num_chunks, double bandwidth_GBps,
         double hop_latency_us) {
        return dpfast::plan::predict_time_us(dpfast::plan::tree_shape_from_string(shape), bytes, num_devices,
                                             num_chunks, dpfast::plan::LinkModel{bandwidth_GBps, hop_latency_us});
      },
      "shape"_a, "bytes"_a, "num_devices"_a, "num_chunks"_a, "bandwidth_GBps"_a = 25.0, "hop_latency_us"_a = 5.0);
  m.def("assign_buckets", &dpfast::plan::assign_buckets, "tensor_bytes"_a, "group"_a, "cap_bytes"_a,
        "first_cap_bytes"_a, "Indices of the tensors in each bucket (csrc/plan.h)");

  py::class_<dpfast::PointerWatch>(m, "PointerWatch", "Which tensors left the memory they had (csrc/comm.h)")
      .def(py::init<std::vector<at::Tensor>>(), "tensors"_a)
      .def("moved", &dpfast::PointerWatch::moved, "Indices of the tensors whose data_ptr() changed");
  py::class_<dpfast::MetaWatch>(m, "MetaWatch",
                                "Whether tensors' dtype, sizes or device changed, or where watched their requires_grad "
                                "or contiguity (csrc/comm.h)")
      .def(py::init<const std::vector<at::Tensor>&, std::vector<bool>, std::vector<bool>>(), "tensors"_a,
           "watch_requires_grad"_a, "watch_contiguity"_a)
      .def("changed", &dpfast::MetaWatch::changed, "tensors"_a);
  m.def("entries_unchanged", &entries_unchanged, "modules"_a, "snapshots"_a,
        "Whether every module's parameter, buffer and child dictionaries hold what the snapshots held "
        "(NOTE [Replica dictionaries])");
  m.def("refresh_replica_dicts", &refresh_replica_dicts, "modules"_a, "replicas"_a, "owns"_a, "slow"_a,
        "root_device"_a = py::none(),
        "Replica modules' __dict__ made from their roots'; the indices left to Python (NOTE [Replica dictionaries]), "
        "and (index, name) of the plain attributes holding a tensor on root_device (NOTE [Attribute tensors])");
  // The callbacks are Python functions: pybind11 takes the GIL to call them and to drop them.
  m.def("graph_reaches_only", &dpfast::graph_reaches_only, "roots"_a, "allowed"_a,
        "Whether autograd's walk back from roots meets no leaf but those in allowed",
        py::call_guard<py::gil_scoped_release>());
  m.def("graph_reaches_any", &dpfast::graph_reaches_any, "roots"_a, "leaves"_a,
        "Whether autograd's walk back from roots meets one of leaves", py::call_guard<py::gil_scoped_release>());
  // NOTE [Spinning hand-offs] (csrc/handoff.h): the waits release the GIL; set and release do
  // not need to (they never block for long).
  py::class_<dpfast::SpinEvent>(m, "SpinEvent", "Set once, waited for by any number of threads (csrc/handoff.h)")
      .def(py::init<>())
      .def("set", &dpfast::SpinEvent::set)
      .def("is_set", &dpfast::SpinEvent::is_set)
      .def("wait", &dpfast::SpinEvent::wait, "spin_us"_a, "timeout_s"_a = -1.0,
           "Spins up to spin_us, then sleeps; True once set, False after timeout_s (< 0: none)",
           py::call_guard<py::gil_scoped_release>());
  py::class_<dpfast::SpinSemaphore>(m, "SpinSemaphore", "A counting semaphore whose waits spin first (csrc/handoff.h)")
      .def(py::init<>())
      .def("release", &dpfast::SpinSemaphore::release)
      .def("acquire", &dpfast::SpinSemaphore::acquire, "spin_us"_a, "timeout_s"_a = -1.0,
           "Spins up to spin_us, then sleeps; True once one was taken, False after timeout_s (< 0: none)",
           py::call_guard<py::gil_scoped_release>())
      // A worker's "this job is done, wait for the next": the event is set after the GIL is
      // released, so the thread it wakes finds the GIL free instead of sleeping on it.
      .def(
          "set_then_acquire",
          [](dpfast::SpinSemaphore& self, dpfast::SpinEvent* done, int64_t spin_us) {
            if (done != nullptr) done->set();
            self.acquire(spin_us, -1.0);
          },
          "done"_a, "spin_us"_a, "Sets done (None: nothing), then acquire(spin_us)",
          py::call_guard<py::gil_scoped_release>());
  py::class_<CapturedThreadState>(m, "CapturedThreadState",
                                  "The calling thread's ATen thread-local state (NOTE [Thread-local state of replicas])")
      .def(py::init<>());
  py::class_<ThreadStateScope>(m, "ThreadStateScope",
                               "A block of another thread under a CapturedThreadState (NOTE [Thread-local state of "
                               "replicas])")
      .def(py::init<const CapturedThreadState&>(), "captured"_a)
      .def("__enter__", [](ThreadStateScope& self) { self.enter(); })
      .def("__exit__", [](ThreadStateScope& self, const py::args&) { self.exit(); });
  using dpfast::GradReadiness;
  py::class_<GradReadiness, std::shared_ptr<GradReadiness>>(m, "GradReadiness",
                                                            "Counts completed gradient buckets (csrc/grad_ready.h)")
      .def(py::init<std::vector<int64_t>, std::vector<int64_t>, bool>(), "bucket_of"_a, "bucket_len"_a,
           "count_root"_a)
      .def("set_callbacks", &GradReadiness::set_callbacks, "on_first_mark"_a, "on_bucket_complete"_a)
      .def("clear_callbacks", [](GradReadiness& self) { self.set_callbacks(nullptr, nullptr); })
      .def("attach", &GradReadiness::attach, "param"_a, "index"_a, "replica"_a, "view"_a)
      .def_static("detach", &GradReadiness::detach, "param"_a)
      .def("attach_root", &GradReadiness::attach_root, "param"_a, "index"_a, "view"_a, "held"_a)
      .def("ensure_root_hooks", &GradReadiness::ensure_root_hooks)
      .def("detach_roots", &GradReadiness::detach_roots)
      .def("root_states", &GradReadiness::root_states)
      .def("held_roots", &GradReadiness::held_roots)
      .def("set_lane_stream", &GradReadiness::set_lane_stream, "replica"_a, "stream_id"_a, "device_index"_a)
      .def("wait_for_current", &GradReadiness::wait_for_current, "view"_a, "replica"_a)
      .def_static("is_root_hooked", &GradReadiness::is_root_hooked, "param"_a)
      .def_static("keeps_in_grad", &GradReadiness::keeps_in_grad, "grad"_a, "view"_a)
      .def("set_bucket_len", &GradReadiness::set_bucket_len, "bucket_len"_a)
      .def("mark", &GradReadiness::mark, "index"_a, "replica"_a, py::call_guard<py::gil_scoped_release>())
      .def("note_replicas", &GradReadiness::note_replicas, "used"_a)
      .def("reset_window", &GradReadiness::reset_window)
      .def("start_over", &GradReadiness::start_over)
      .def("marked_after_complete", &GradReadiness::marked_after_complete)
      .def("got_grad", &GradReadiness::got_grad)
      .def("any_grad", &GradReadiness::any_grad)
      .def("take_graph_grads", &GradReadiness::take_graph_grads)
      .def("replicas_used", &GradReadiness::replicas_used)
      .def("first_mark_seen", &GradReadiness::first_mark_seen);
}
