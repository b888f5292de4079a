// The pybind11 module pycomm._C; the only file that includes
// torch/extension.h.
#include <torch/extension.h>

#include <chrono>
#include <exception>

#include "comm_pool.h"
#include "errors.h"
#include "layout.h"
#include "pooled_backend.h"

namespace py = pybind11;

namespace {

// Raises the pycomm.errors class named `name` with `what`.
void raise(const char* name, const char* what) {
  py::object cls = py::module_::import("pycomm.errors").attr(name);
  PyErr_SetString(cls.ptr(), what);
}

void translate(std::exception_ptr error) {
  if (!error) {
    return;
  }
  // Most derived first: every class below derives from PycommError.
  try {
    std::rethrow_exception(error);
  } catch (const pycomm::UnknownRoleError& e) {
    raise("UnknownRoleError", e.what());
  } catch (const pycomm::NotAMemberError& e) {
    raise("NotAMemberError", e.what());
  } catch (const pycomm::PoolClosedError& e) {
    raise("PoolClosedError", e.what());
  } catch (const pycomm::TensorMismatchError& e) {
    raise("TensorMismatchError", e.what());
  } catch (const pycomm::UnsupportedOpError& e) {
    raise("UnsupportedOpError", e.what());
  } catch (const pycomm::LayoutError& e) {
    raise("LayoutError", e.what());
  } catch (const pycomm::ConfigError& e) {
    raise("ConfigError", e.what());
  } catch (const pycomm::CollectiveTimeoutError& e) {
    raise("CollectiveTimeoutError", e.what());
  } catch (const pycomm::CollectiveError& e) {
    raise("CollectiveError", e.what());
  } catch (const pycomm::OrderMismatchError& e) {
    raise("OrderMismatchError", e.what());
  } catch (const pycomm::PycommError& e) {
    raise("PycommError", e.what());
  }
}

py::dict statsToDict(const pycomm::StatsSnapshot& s) {
  py::dict byKind;
  for (size_t k = 0; k < s.opsByKind.size(); ++k) {
    byKind[pycomm::kindName(static_cast<pycomm::CollectiveKind>(k))] =
        s.opsByKind[k];
  }
  py::dict d;
  d["ops"] = s.ops;
  d["bytes"] = s.bytes;
  d["errors"] = s.errors;
  d["busy_seconds"] = s.busySeconds;
  d["ops_by_kind"] = byKind;
  return d;
}

py::list traceToList(const std::vector<pycomm::OpRecord>& records) {
  py::list out;
  for (const auto& r : records) {
    out.append(py::make_tuple(
        pycomm::kindName(r.kind), r.bytes, r.startUs, r.endUs, r.ok));
  }
  return out;
}

} // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycomm's compiled core: rank layouts, lanes, pooled backends";
  py::register_exception_translator(&translate);

  m.attr("cuda_built") = false;

  py::class_<pycomm::RankLayout>(m, "RankLayout")
      .def(
          py::init<std::vector<int64_t>, std::vector<std::string>, int64_t>(),
          py::arg("shape"),
          py::arg("dim_names"),
          py::arg("rank_offset") = 0)
      .def_property_readonly("world_size", &pycomm::RankLayout::worldSize)
      .def_property_readonly("rank_offset", &pycomm::RankLayout::rankOffset)
      .def_property_readonly("shape", &pycomm::RankLayout::shape)
      .def_property_readonly("dim_names", &pycomm::RankLayout::dimNames)
      .def("group_of", &pycomm::RankLayout::groupOf, py::arg("rank"), py::arg("dims"))
      .def("all_groups", &pycomm::RankLayout::allGroups, py::arg("dims"))
      .def("group_count", &pycomm::RankLayout::groupCount, py::arg("dims"));

  py::class_<pycomm::PooledGroupSpec>(m, "PooledGroupSpec")
      .def(py::init<>())
      .def_readwrite("name", &pycomm::PooledGroupSpec::name)
      .def_readwrite("base_group_name", &pycomm::PooledGroupSpec::baseGroupName)
      .def_readwrite("role", &pycomm::PooledGroupSpec::role)
      .def_readwrite("global_ranks", &pycomm::PooledGroupSpec::globalRanks)
      .def_readwrite("rank", &pycomm::PooledGroupSpec::rank)
      .def_property(
          "timeout_seconds",
          [](const pycomm::PooledGroupSpec& s) {
            return static_cast<double>(s.timeout.count()) / 1000.0;
          },
          [](pycomm::PooledGroupSpec& s, double seconds) {
            if (!(seconds > 0)) {
              throw pycomm::ConfigError(
                  "timeout must be > 0 seconds, got " + std::to_string(seconds));
            }
            s.timeout = std::chrono::milliseconds(
                static_cast<int64_t>(seconds * 1000.0));
          })
      .def_readwrite("check_order", &pycomm::PooledGroupSpec::checkOrder)
      .def("label", &pycomm::PooledGroupSpec::label);

  py::object torchBackend =
      py::module_::import("torch._C._distributed_c10d").attr("Backend");
  py::class_<pycomm::PooledBackend, c10::intrusive_ptr<pycomm::PooledBackend>>(
      m, "PooledBackend", torchBackend)
      .def(
          py::init([](pycomm::PooledGroupSpec spec,
                      c10::intrusive_ptr<c10d::Backend> cpuComm) {
            return c10::make_intrusive<pycomm::PooledBackend>(
                std::move(spec), std::move(cpuComm));
          }),
          py::arg("spec"),
          py::arg("cpu_comm"))
      .def_property_readonly(
          "spec", &pycomm::PooledBackend::spec, py::return_value_policy::copy)
      .def("is_open", &pycomm::PooledBackend::isOpen)
      .def("stats", [](const pycomm::PooledBackend& b) {
        return statsToDict(b.stats());
      })
      .def("trace", [](const pycomm::PooledBackend& b) {
        return traceToList(b.trace());
      })
      .def("pending", &pycomm::PooledBackend::pending)
      .def("close", &pycomm::PooledBackend::close,
           py::call_guard<py::gil_scoped_release>())
      .def("abort", &pycomm::PooledBackend::abort,
           py::call_guard<py::gil_scoped_release>());

  py::class_<pycomm::CommPool>(m, "CommPool")
      .def(py::init<>())
      .def_static("roles", &pycomm::CommPool::roles)
      .def_static("check_role", &pycomm::CommPool::checkRole, py::arg("role"))
      .def("add", &pycomm::CommPool::add, py::arg("backend"))
      .def("find", &pycomm::CommPool::find, py::arg("base_group_name"), py::arg("role"))
      .def("remove", &pycomm::CommPool::remove,
           py::arg("base_group_name"), py::arg("role"),
           py::call_guard<py::gil_scoped_release>())
      .def("entries", &pycomm::CommPool::entries)
      .def("destroy", &pycomm::CommPool::destroy,
           py::call_guard<py::gil_scoped_release>())
      .def("abort", &pycomm::CommPool::abort,
           py::call_guard<py::gil_scoped_release>())
      .def("is_open", &pycomm::CommPool::isOpen)
      .def("closed_reason", &pycomm::CommPool::closedReason)
      .def("throw_if_closed", &pycomm::CommPool::throwIfClosed);
}
