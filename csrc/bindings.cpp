// The pybind11 module pycomm._C; the only file that includes
// torch/extension.h.
#include <torch/extension.h>

#include <chrono>
#include <exception>

#include "comm_pool.h"
#include "errors.h"
#include "flight_recorder_dump.h"
#include "layout.h"
#include "nccl_fields.h"
#include "pooled_backend.h"
#ifdef PYCOMM_CUDA
#include "cuda/gpu_apis.h"
#include "cuda/nccl_calls.h"
#include "cuda/nccl_lane.h"
#include "cuda/mem_pool_hooks.h"
#include "cuda/torch_comm_memory.h"
#endif

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
  } catch (const pycomm::NcclVersionError& e) {
    raise("NcclVersionError", e.what());
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

// RoleConfig's ncclConfig_t fields, as pycomm.nccl passes them.
pycomm::NcclSettings settingsFromDict(const py::dict& values) {
  pycomm::NcclSettings s;
  for (const auto& [key, value] : values) {
    const auto name = py::cast<std::string>(key);
    if (value.is_none()) {
      continue;
    }
    if (name == "cga_cluster_size") {
      s.cgaClusterSize = py::cast<int>(value);
    } else if (name == "min_ctas") {
      s.minCtas = py::cast<int>(value);
    } else if (name == "max_ctas") {
      s.maxCtas = py::cast<int>(value);
    } else if (name == "net_name") {
      s.netName = py::cast<std::string>(value);
    } else if (name == "traffic_class") {
      s.trafficClass = py::cast<int>(value);
    } else if (name == "cta_policy") {
      s.ctaPolicy = py::cast<int>(value);
    } else if (name == "launch_order_implicit") {
      s.launchOrderImplicit = py::cast<bool>(value) ? 1 : 0;
    } else if (name == "nvls_ctas") {
      s.nvlsCtas = py::cast<int>(value);
    } else if (name == "collnet_enable") {
      s.collnetEnable = py::cast<bool>(value) ? 1 : 0;
    } else if (name == "max_p2p_peers") {
      s.maxP2pPeers = py::cast<int>(value);
    } else if (name == "comm_name") {
      s.commName = py::cast<std::string>(value);
    } else if (name == "split_share") {
      s.splitShare = py::cast<bool>(value) ? 1 : 0;
    } else if (name == "n_channels_per_net_peer") {
      s.nChannelsPerNetPeer = py::cast<int>(value);
    } else if (name == "nvlink_centric_sched") {
      s.nvlinkCentricSched = py::cast<bool>(value) ? 1 : 0;
    } else if (name == "graph_usage_mode") {
      s.graphUsageMode = py::cast<int>(value);
    } else if (name == "num_rma_ctx") {
      s.numRmaCtx = py::cast<int>(value);
    } else if (name == "graph_stream_ordering") {
      s.graphStreamOrdering = py::cast<bool>(value) ? 1 : 0;
    } else {
      throw pycomm::ConfigError("unknown ncclConfig_t setting '" + name + "'");
    }
  }
  return s;
}

// (address, bytes) of each segment a torch.cuda.MemPool holds on `device`.
pycomm::PooledBackend::Segments poolSegments(const py::object& pool, int device) {
  pycomm::PooledBackend::Segments segments;
  for (const auto& segment : pool.attr("snapshot")()) {
    const auto s = py::reinterpret_borrow<py::dict>(segment);
    if (py::cast<int>(s["device"]) == device) {
      segments.emplace_back(py::cast<uintptr_t>(s["address"]), py::cast<size_t>(s["total_size"]));
    }
  }
  return segments;
}

#ifdef PYCOMM_CUDA
// torch.cuda.MemPool.id: the (graph id, pool id) pair the caching allocator
// names the pool by.
c10::MempoolId_t poolId(const py::object& pool) {
  const auto id = py::cast<std::pair<uint64_t, uint64_t>>(pool.attr("id"));
  return {id.first, id.second};
}
#endif

py::dict planToDict(const pycomm::NcclFieldPlan& plan) {
  py::list applied;
  for (auto field : plan.applied) {
    applied.append(pycomm::ncclFieldName(field));
  }
  py::list tooNew;
  for (auto field : plan.tooNew) {
    tooNew.append(py::make_tuple(
        pycomm::ncclFieldName(field),
        pycomm::ncclVersionText(pycomm::ncclFieldMinVersion(field))));
  }
  py::dict d;
  d["applied"] = applied;
  d["too_new"] = tooNew;
  return d;
}

#ifdef PYCOMM_CUDA
void bindCuda(py::module_& m) {
  m.def("nccl_built_version", &pycomm::nccl::builtVersion);
  m.attr("FP8_REDUCE_MIN_COMPUTE_MAJOR") = pycomm::nccl::kFp8ReduceMinComputeMajor;
  m.def("nccl_loaded_version", [] {
    return pycomm::nccl::loadedVersion(*pycomm::libraryNcclApi());
  });
  m.def("nccl_usable_version", [] {
    return pycomm::nccl::usableVersion(*pycomm::libraryNcclApi());
  });
  m.def("nccl_unique_id", [] {
    return py::bytes(pycomm::nccl::newUniqueId(*pycomm::libraryNcclApi()));
  });
  m.def("live_nccl_comms", &pycomm::NcclComm::liveCount);
  m.def(
      "stream_priority_range",
      [](int device) {
        auto range = pycomm::streamPriorityRange(*pycomm::runtimeCudaApi(), device);
        return py::make_tuple(range.least, range.greatest);
      },
      py::arg("device"),
      "(least, greatest) stream priority of a device; greatest is the most "
      "urgent (numerically lowest)");

  py::class_<pycomm::NcclLane, pycomm::DeviceLane, std::shared_ptr<pycomm::NcclLane>>(
      m, "NcclLane")
      .def(
          py::init([](int device,
                      int rank,
                      int size,
                      const std::string& role,
                      const py::dict& settings,
                      std::optional<int> streamPriority,
                      double timeoutSeconds,
                      const std::string& label,
                      const py::bytes& uniqueId,
                      const std::shared_ptr<pycomm::NcclLane>& parent,
                      bool tearDownOnError,
                      bool groupReducesFp8,
                      double stallTimeoutSeconds,
                      std::optional<double> creationTimeoutSeconds,
                      bool launchInProgramOrder,
                      int globalRank) {
            pycomm::NcclLaneSpec spec;
            spec.comm.apis = pycomm::realGpuApis();
            spec.comm.device = device;
            spec.comm.rank = rank;
            spec.comm.size = size;
            spec.comm.settings = settingsFromDict(settings);
            spec.comm.timeout = std::chrono::milliseconds(
                static_cast<int64_t>(timeoutSeconds * 1000.0));
            if (creationTimeoutSeconds) {
              spec.comm.creationTimeout = std::chrono::milliseconds(
                  static_cast<int64_t>(*creationTimeoutSeconds * 1000.0));
            }
            spec.comm.label = label;
            spec.comm.launchInProgramOrder = launchInProgramOrder;
            spec.globalRank = globalRank;
            spec.role = role;
            spec.streamPriority = streamPriority;
            spec.tearDownOnError = tearDownOnError;
            spec.groupReducesFp8 = groupReducesFp8;
            spec.stallTimeout = std::chrono::milliseconds(
                static_cast<int64_t>(stallTimeoutSeconds * 1000.0));
            if (pycomm::nccl::usableVersion(*spec.comm.apis.nccl) >= pycomm::nccl::kMemAllocMinVersion) {
              spec.memory = std::make_shared<pycomm::TorchCommMemory>(spec.comm.apis, device, label);
            }
            const std::string id = uniqueId;
            py::gil_scoped_release release; // collective: peers must progress
            return pycomm::NcclLane::create(spec, id, parent);
          }),
          py::arg("device"),
          py::arg("rank"),
          py::arg("size"),
          py::arg("role"),
          py::arg("settings"),
          py::arg("stream_priority"),
          py::arg("timeout_seconds"),
          py::arg("label"),
          py::arg("unique_id") = py::bytes(),
          py::arg("parent") = nullptr,
          py::arg("tear_down_on_error") = true,
          py::arg("group_reduces_fp8") = true,
          py::arg("stall_timeout_seconds") = 480.0,
          py::arg("creation_timeout_seconds") = py::none(),
          py::arg("launch_in_program_order") = true,
          py::arg("global_rank") = 0)
      .def_property_readonly("stream_priority", &pycomm::NcclLane::streamPriority)
      .def_property_readonly("created_by_split", &pycomm::NcclLane::createdBySplit)
      .def_property_readonly(
          "registered_memory", &pycomm::NcclLane::registeredMemory,
          "Buffers registered with the lane's communicator (register_mem_pool)")
      .def_property_readonly(
          "memory",
          [](const pycomm::NcclLane& lane) {
            const auto use = lane.memoryUse();
            py::dict out;
            out["creation_bytes"] = use.creationBytes;
            out["first_use_bytes"] = use.firstUseBytes ? py::cast(*use.firstUseBytes) : py::none();
            return out;
          },
          "Device memory the communicator took: across its creation, and across "
          "its first op (None until that ended), as the device's free memory fell")
      .def_property_readonly("splittable", &pycomm::NcclLane::splittable)
      .def_property_readonly(
          "device_index",
          [](const pycomm::NcclLane& lane) { return lane.device().index(); })
      .def_static(
          "resolve_priority",
          [](int device, const std::string& role, std::optional<int> priority,
             const std::string& label) {
            pycomm::NcclLaneSpec spec;
            spec.comm.apis = pycomm::realGpuApis();
            spec.comm.device = device;
            spec.comm.label = label;
            spec.role = role;
            spec.streamPriority = priority;
            return pycomm::NcclLane::resolvePriority(spec);
          },
          py::arg("device"), py::arg("role"), py::arg("stream_priority"),
          py::arg("label"),
          "The stream priority a lane of `role` gets; ConfigError when "
          "`stream_priority` is outside the device's range");
}
#endif

} // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycomm's compiled core: rank layouts, lanes, pooled backends";
  py::register_exception_translator(&translate);

#ifdef PYCOMM_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  m.attr("LANE_TRACE_CAPACITY") = pycomm::LaneStats::kTraceCapacity;
  m.def(
      "flight_recorder_on",
      &pycomm::flightRecorderOn,
      "Whether torch's flight recorder records: TORCH_FR_BUFFER_SIZE (or "
      "TORCH_NCCL_TRACE_BUFFER_SIZE) read as torch reads it");
  m.def(
      "nccl_config_plan",
      [](const py::dict& settings, int version) {
        return planToDict(pycomm::planNcclFields(settingsFromDict(settings), version));
      },
      py::arg("settings"),
      py::arg("version"),
      "Which ncclConfig_t fields `settings` sets that NCCL `version` (e.g. "
      "23007) takes ('applied') and which it is too old for ('too_new', with "
      "the version each needs)");
  m.def(
      "nccl_require_config",
      [](const py::dict& settings, int version, const std::string& context) {
        return planToDict(pycomm::requireNcclFields(settingsFromDict(settings), version, context));
      },
      py::arg("settings"),
      py::arg("version"),
      py::arg("context"),
      "nccl_config_plan, or NcclVersionError naming every field `version` is "
      "too old for");

  py::class_<pycomm::DeviceLane, std::shared_ptr<pycomm::DeviceLane>>(m, "DeviceLane")
      .def("pending", &pycomm::DeviceLane::pending)
      .def("abort", &pycomm::DeviceLane::abort,
           py::call_guard<py::gil_scoped_release>());

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
      .def_readwrite("description", &pycomm::PooledGroupSpec::description)
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
      // torch 2.14 binds Backend.options for every backend; 2.11 only for
      // its own, so a pooled group's timeout, name and ranks are read here.
      .def_property_readonly("options", &pycomm::PooledBackend::getBackendOptions)
      .def("is_open", &pycomm::PooledBackend::isOpen)
      .def("stats", [](const pycomm::PooledBackend& b) {
        return statsToDict(b.stats());
      })
      .def("trace", [](const pycomm::PooledBackend& b) {
        return traceToList(b.trace());
      })
      .def("pending", &pycomm::PooledBackend::pending)
      .def("attach_device_lane", &pycomm::PooledBackend::attachDeviceLane,
           py::arg("lane"))
      .def_property_readonly("device_lane", &pycomm::PooledBackend::deviceLane)
      .def(
          "register_mem_pool",
          [](pycomm::PooledBackend& b, const py::object& pool, bool symm) {
            // What torch's NCCL backend offers Megatron-FSDP's nccl_ub: every
            // segment of the pool on this lane's device, registered with the
            // lane's communicator, and (allocator hooks) every segment the
            // pool gains or frees afterwards.
            auto lane = b.requireDeviceLane("register_mem_pool");
#ifdef PYCOMM_CUDA
            // Watched first: a segment the pool gains meanwhile is either in
            // the snapshot or reported to the hook (registering twice does
            // nothing).
            pycomm::attachMemPoolHooksToTorchAllocator();
            pycomm::MemPoolHooks::instance().watch(lane, poolId(pool), symm);
#endif
            const auto segments = poolSegments(pool, lane->device().index());
            py::gil_scoped_release release; // symmetric windows are collective
            b.registerMemory(segments, symm);
          },
          py::arg("pool"),
          py::arg("symm") = false)
      .def(
          "deregister_mem_pool",
          [](pycomm::PooledBackend& b, const py::object& pool) {
            auto lane = b.requireDeviceLane("deregister_mem_pool");
#ifdef PYCOMM_CUDA
            pycomm::MemPoolHooks::instance().unwatch(lane.get(), poolId(pool));
#endif
            const auto segments = poolSegments(pool, lane->device().index());
            py::gil_scoped_release release;
            b.deregisterMemory(segments);
          },
          py::arg("pool"))
      .def("close", [](pycomm::PooledBackend& b) { b.close(); },
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
      .def("destroy", [](pycomm::CommPool& pool) { pool.destroy(); },
           py::call_guard<py::gil_scoped_release>())
      .def("abort", &pycomm::CommPool::abort,
           py::call_guard<py::gil_scoped_release>())
      .def("is_open", &pycomm::CommPool::isOpen)
      .def("closed_reason", &pycomm::CommPool::closedReason)
      .def("throw_if_closed", &pycomm::CommPool::throwIfClosed);

#ifdef PYCOMM_CUDA
  bindCuda(m);
#endif
}
