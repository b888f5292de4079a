"""The CUDA+NCCL variant on every machine: it is built where it can be, it
imports and reports its NCCL versions without a GPU, the ncclConfig_t
version guards, and the device choice's errors. GPU behaviour is in
test_cuda.py."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pycomm
import pycomm.info
import pycomm.nccl
from pycomm import ConfigError, NcclVersionError, RoleConfig, _C, launch_order
from pycomm.launch import run_world
from pycomm.nccl import (
    LanePlan,
    _agree_on_plan,
    lane_settings,
    nccl_settings,
    resolve_device,
    torch_nccl_runtime_version,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pycomm_build  # noqa: E402

needs_cuda_build = pytest.mark.skipif(
    not _C.cuda_built, reason="this pycomm was built without the NCCL transport"
)


def _cuda_buildable() -> bool:
    try:
        pycomm_build.find_cuda_paths()
    except pycomm_build.CudaNotFound:
        return False
    return os.environ.get("PYCOMM_CUDA", "auto").lower() not in ("0", "off", "no", "false")


def test_cuda_variant_is_built_wherever_it_can_be() -> None:
    assert pycomm.build_info()["cuda"] == _cuda_buildable()


@needs_cuda_build
def test_build_info_reports_both_nccl_versions() -> None:
    info = pycomm.build_info()
    assert info["transports"] == ["gloo", "nccl"]
    built = _C.nccl_built_version()
    loaded = _C.nccl_loaded_version()
    assert info["nccl"] == f"{built // 10000}.{built // 100 % 100}.{built % 100}"
    assert info["nccl_loaded"] == f"{loaded // 10000}.{loaded // 100 % 100}.{loaded % 100}"
    # The libnccl loaded is the one torch uses: the same version.
    assert loaded == torch_nccl_runtime_version()
    assert _C.nccl_usable_version() == min(built, loaded)


def _elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (the extension)."""
    data = path.read_bytes()
    assert data[:6] == b"\x7fELF\x02\x01", f"{path} is not a 64-bit little-endian ELF file"
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    names_header = section_offset + names_index * entry_size
    names_offset, = struct.unpack_from("<Q", data, names_header + 0x18)
    names = set()
    for i in range(count):
        name_at, = struct.unpack_from("<I", data, section_offset + i * entry_size)
        end = data.index(b"\0", names_offset + name_at)
        names.add(data[names_offset + name_at:end].decode())
    return names


@pytest.mark.skipif(pycomm_build.compile_flags()[-1] == "-g", reason="built with debug information on request")
def test_the_extension_is_built_without_debug_information() -> None:
    built = Path(_C.__file__)
    sections = _elf_section_names(built)
    assert ".text" in sections and ".dynsym" in sections
    assert not {s for s in sections if s.startswith(".debug_")}, sorted(sections)
    assert built.stat().st_size < 8 * 2**20


def test_debug_information_is_kept_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYCOMM_DEBUG_INFO", raising=False)
    assert pycomm_build.compile_flags()[-1] == "-g0"
    monkeypatch.setenv("PYCOMM_DEBUG_INFO", "1")
    assert pycomm_build.compile_flags()[-1] == "-g"


@needs_cuda_build
def test_unique_ids_are_fresh_128_byte_strings() -> None:
    first, second = _C.nccl_unique_id(), _C.nccl_unique_id()
    assert len(first) == len(second) == 128
    assert first != second


def test_config_fields_are_guarded_by_nccl_version() -> None:
    config = RoleConfig(
        min_ctas=2, max_ctas=8, cga_cluster_size=2, net_name="IB",
        traffic_class=106, cta_policy="efficiency", launch_order_implicit=True,
    )
    settings = nccl_settings(config, "pycomm_ag_of_0")
    newest = _C.nccl_config_plan(settings, 23100)
    assert newest["applied"] == [
        "cgaClusterSize", "minCTAs", "maxCTAs", "netName", "trafficClass", "commName",
        "CTAPolicy", "launchOrderImplicit",
    ]
    assert newest["too_new"] == []
    at_2_30 = _C.nccl_config_plan(settings, 23007)
    assert at_2_30["too_new"] == [("launchOrderImplicit", "2.31.0")]
    at_2_26 = _C.nccl_config_plan(settings, 22605)
    assert at_2_26["too_new"] == [
        ("commName", "2.27.0"), ("CTAPolicy", "2.27.0"), ("launchOrderImplicit", "2.31.0"),
    ]
    at_2_18 = _C.nccl_config_plan(settings, 21803)
    assert at_2_18["applied"] == ["cgaClusterSize", "minCTAs", "maxCTAs", "netName"]
    assert [f for f, _ in at_2_18["too_new"]] == [
        "trafficClass", "commName", "CTAPolicy", "launchOrderImplicit",
    ]
    at_2_16 = _C.nccl_config_plan(settings, 21600)
    assert at_2_16["applied"] == []
    assert ("netName", "2.17.0") in at_2_16["too_new"]


def test_unset_fields_and_cta_policy_values() -> None:
    assert nccl_settings(RoleConfig(), "x")["cta_policy"] is None
    assert nccl_settings(RoleConfig(cta_policy="zero"), "x")["cta_policy"] == 2
    plan = _C.nccl_config_plan(nccl_settings(RoleConfig(), "x"), 23007)
    assert plan == {"applied": ["commName"], "too_new": []}
    with pytest.raises(ConfigError, match="unknown ncclConfig_t setting 'max_ctaz'"):
        _C.nccl_config_plan({"max_ctaz": 3}, 23007)


def test_every_ncclconfig_field_of_nccl_2_30_reaches_the_plan() -> None:
    """NCCL 2.30.7's ncclConfig_t, field by field (splitShare from 2.18,
    nChannelsPerNetPeer and nvlinkCentricSched from 2.28, graphUsageMode and
    numRmaCtx from 2.29, graphStreamOrdering from 2.30.5: parseCommConfig
    gives NCCL's default below those)."""
    config = RoleConfig(
        split_share=True, n_channels_per_net_peer=4, nvlink_centric_sched=True,
        graph_usage_mode=1, num_rma_ctx=2, graph_stream_ordering=False, comm_name="dp_ag",
    )
    settings = nccl_settings(config, "pycomm-made name")
    assert settings["comm_name"] == "dp_ag"
    assert _C.nccl_config_plan(settings, 23007) == {
        "applied": [
            "commName", "splitShare", "nChannelsPerNetPeer", "nvlinkCentricSched",
            "graphUsageMode", "numRmaCtx", "graphStreamOrdering",
        ],
        "too_new": [],
    }
    assert _C.nccl_config_plan(settings, 23004)["too_new"] == [("graphStreamOrdering", "2.30.5")]
    assert [f for f, _ in _C.nccl_config_plan(settings, 22807)["too_new"]] == [
        "graphUsageMode", "numRmaCtx", "graphStreamOrdering",
    ]
    assert [f for f, _ in _C.nccl_config_plan(settings, 22703)["too_new"]] == [
        "nChannelsPerNetPeer", "nvlinkCentricSched", "graphUsageMode", "numRmaCtx", "graphStreamOrdering",
    ]


def test_a_field_the_nccl_in_use_is_too_old_for_is_a_named_error() -> None:
    """Nothing a RoleConfig asks for is dropped: NCCL would give its default
    for a field newer than the config's version, so the lane refuses it by
    name before any peer waits for it."""
    config = RoleConfig(max_p2p_peers=8, graph_usage_mode=1, graph_stream_ordering=False)
    assert lane_settings(config, "x", 23007, "pooled ag")["max_p2p_peers"] == 8
    with pytest.raises(NcclVersionError) as raised:
        lane_settings(config, "x", 22907, "pooled ag of dp")
    assert str(raised.value) == (
        "pooled ag of dp: ncclConfig_t.maxP2pPeers needs NCCL 2.30.0, ncclConfig_t.graphStreamOrdering "
        "needs NCCL 2.30.5; the NCCL in use is 2.29.7 (unset the setting, or use a newer NCCL)"
    )
    assert isinstance(raised.value, ConfigError)
    # pycomm's own communicator name is not something the user asked for.
    assert lane_settings(RoleConfig(), "x", 22605, "g")["comm_name"] is None
    with pytest.raises(NcclVersionError, match="commName needs NCCL 2.27.0"):
        lane_settings(RoleConfig(comm_name="mine"), "x", 22605, "g")


def test_launch_order_field_and_the_variable_that_overrides_it() -> None:
    """NCCL_LAUNCH_ORDER_IMPLICIT (set to 1 by pycomm at import unless set)
    overrides ncclConfig_t.launchOrderImplicit (NCCL's docs): asking for it
    is what the variable already does on NCCL 2.26 to 2.30, and asking
    against it is a named error."""
    assert launch_order.value_at_import() == "1"
    on = RoleConfig(launch_order_implicit=True)
    assert lane_settings(on, "x", 23007, "g")["launch_order_implicit"] is None
    with pytest.raises(NcclVersionError, match="launchOrderImplicit needs NCCL 2.31.0"):
        lane_settings(on, "x", 22507, "g")
    with pytest.raises(ConfigError, match="launch_order_implicit: false has no effect while NCCL_LAUNCH_ORDER_IMPLICIT=1"):
        lane_settings(RoleConfig(launch_order_implicit=False), "x", 23100, "g")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_device_choice_without_a_gpu() -> None:
    assert resolve_device("auto", None) is None
    assert resolve_device(None, None) is None
    expected = "CUDA is not available" if _C.cuda_built else "built without the NCCL transport"
    with pytest.raises(ConfigError, match=expected):
        resolve_device(0, None)
    with pytest.raises(ConfigError, match=expected):
        pycomm.CommPool(device="cuda:0")
    with pytest.raises(ConfigError, match="must be a CUDA device"):
        resolve_device("cpu", None)
    with pytest.raises(ConfigError, match="must be 'auto', None, an index or a CUDA device"):
        pycomm.CommPool(device="gpu-zero")


def _auto_device_of_gloo_world(rank: int, world_size: int) -> int | None:
    import torch.distributed as dist

    return resolve_device("auto", dist.group.WORLD)


def test_auto_gives_gloo_only_groups_no_nccl_lane() -> None:
    """Also on a GPU machine: a base group without torch's NCCL backend makes
    no NCCL communicators unless a device is named."""
    assert run_world(_auto_device_of_gloo_world, 2) == [None, None]


def _members_agree(can_split: list[bool], reduces_fp8: list[bool] | None = None) -> list[LanePlan]:
    import threading

    import torch.distributed as dist

    store = dist.HashStore()
    plans: list[LanePlan] = [LanePlan(b"", True)] * len(can_split)
    fp8 = reduces_fp8 or [True] * len(can_split)

    def member(i: int) -> None:
        plans[i] = _agree_on_plan(store, len(can_split), can_split[i], 30.0, "test", fp8[i])

    threads = [threading.Thread(target=member, args=(i,)) for i in range(len(can_split))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return plans


@needs_cuda_build
def test_members_split_only_if_every_member_can() -> None:
    assert [p.decision for p in _members_agree([True, True, True])] == [b"split"] * 3
    plans = [p.decision for p in _members_agree([True, False, True])]
    assert len(set(plans)) == 1, "every member must get the same plan"
    assert plans[0].startswith(b"init:") and len(plans[0]) == len(b"init:") + 128


@needs_cuda_build
def test_members_learn_whether_every_gpu_reduces_fp8() -> None:
    """NCCL checks FP8 reductions against the lowest compute capability of a
    communicator's ranks: one pre-Hopper member turns them off for all."""
    assert [p.reduces_fp8 for p in _members_agree([True] * 3, [True] * 3)] == [True] * 3
    assert [p.reduces_fp8 for p in _members_agree([True] * 3, [True, False, True])] == [False] * 3


@needs_cuda_build
@pytest.mark.parametrize(
    ("launch_order", "config_orders", "nccl_version", "in_program_order"),
    [("1", None, 23007, True), ("0", None, 23007, False), ("0", True, 23100, True), ("0", True, 23007, None)],
)
def test_an_nccl_lane_is_created_within_what_the_duplications_deadline_left(
    monkeypatch: pytest.MonkeyPatch, launch_order: str, config_orders: bool | None, nccl_version: int,
    in_program_order: bool | None,
) -> None:
    """create_lane gives the plan and the communicator what time_left says,
    never the role's own timeout again. Only the GPU calls are stood in for
    (the extension's NcclLane and the capability query): the store and the
    plan agreement are real. The lane launches in program order unless
    NCCL_LAUNCH_ORDER_IMPLICIT was 0 when pycomm was imported (NCCL latches
    it) and its RoleConfig does not ask NCCL >= 2.31 to order launches; an
    older NCCL cannot, and the lane is refused by name before the plan."""
    import pycomm.launch_order

    monkeypatch.setattr(pycomm.launch_order, "_value_at_import", launch_order)
    monkeypatch.setenv("NCCL_LAUNCH_ORDER_IMPLICIT", "1" if launch_order == "0" else "0")  # ignored
    made: dict[str, object] = {}

    class LaneRecorder:
        created_by_split = False
        stream_priority = 0

        def __init__(self, **kwargs: object) -> None:
            made.update(kwargs)

        @staticmethod
        def resolve_priority(device: int, role: str, asked: object, label: str) -> int:
            return 0

    monkeypatch.setattr(pycomm.nccl._C, "NcclLane", LaneRecorder)
    monkeypatch.setattr(pycomm.nccl._C, "nccl_usable_version", lambda: nccl_version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    steps: list[str] = []

    def time_left(step: str) -> float:
        steps.append(step)
        return 2.5

    def create() -> None:
        pycomm.nccl.create_lane(
            device=0, parent=None, role="ag",
            config=RoleConfig(timeout=600.0, launch_order_implicit=config_orders), group_rank=0,
            group_size=1, store=dist.HashStore(), label="test", comm_name="pycomm_ag_of_test", time_left=time_left,
        )

    if in_program_order is None:
        with pytest.raises(NcclVersionError, match="test: ncclConfig_t.launchOrderImplicit needs NCCL 2.31.0; "
                           "the NCCL in use is 2.30.7"):
            create()
        assert steps == [] and made == {}
        return
    create()
    assert steps == ["agreeing on the NCCL communicator plan", "creating the NCCL communicator"]
    assert made["creation_timeout_seconds"] == 2.5
    assert made["timeout_seconds"] == 600.0  # the ops keep the role's timeout
    assert made["launch_in_program_order"] is in_program_order
    # doctor reports the value NCCL latched, not the one set since
    assert pycomm.info.launch_order().startswith(f"NCCL_LAUNCH_ORDER_IMPLICIT={launch_order}: ")


@needs_cuda_build
def test_the_extensions_lane_takes_the_launch_order() -> None:
    assert "launch_in_program_order: bool = True" in (pycomm._C.NcclLane.__init__.__doc__ or "")


@pytest.mark.parametrize(("before", "after"), [(None, "1"), ("0", "0"), ("1", "1")])
def test_importing_pycomm_orders_nccls_launches_unless_the_user_chose(
    before: str | None, after: str,
) -> None:
    """NCCL reads NCCL_LAUNCH_ORDER_IMPLICIT at the process's first launch,
    so `import pycomm` sets it, without importing torch, unless it is set."""
    env = {k: v for k, v in os.environ.items() if k != "NCCL_LAUNCH_ORDER_IMPLICIT"}
    if before is not None:
        env["NCCL_LAUNCH_ORDER_IMPLICIT"] = before
    probe = (
        "import os, sys, pycomm; "
        "print(os.environ.get('NCCL_LAUNCH_ORDER_IMPLICIT'), 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.split()
    assert out == [after, "False"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_toolkit_is_found_through_an_nvcc_wrapper(tmp_path: Path) -> None:
    """nvcc on PATH may be a script outside the toolkit (as /usr/local/bin/nvcc
    here): the build must still find the folder with include/cuda_runtime.h."""
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("nvcc")} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    toolkit = pycomm_build._toolkit_from_nvcc(str(wrapper))
    assert toolkit is not None
    assert (toolkit / "include" / "cuda_runtime.h").is_file()


def test_cpu_variant_is_chosen_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCOMM_CUDA", "0")
    assert pycomm_build.cuda_paths_or_none() is None
    assert all("csrc/cuda/" not in s for s in pycomm_build.sources(ROOT, cuda=False))
    assert any("csrc/cuda/nccl_lane.cpp" in s for s in pycomm_build.sources(ROOT, cuda=True))


def test_errors_tear_down_as_torchs_async_error_handling_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycomm.nccl import ASYNC_ERROR_HANDLING_ENV, TORCH_ASYNC_ERROR_HANDLING_ENV, tear_down_on_error

    monkeypatch.delenv(ASYNC_ERROR_HANDLING_ENV, raising=False)
    monkeypatch.delenv(TORCH_ASYNC_ERROR_HANDLING_ENV, raising=False)
    assert tear_down_on_error() is True  # torch's default, 3
    for mode, tears_down in (("0", False), ("1", True), ("2", False), ("3", True)):
        monkeypatch.setenv(TORCH_ASYNC_ERROR_HANDLING_ENV, mode)
        assert tear_down_on_error() is tears_down, mode
    # pycomm's own variable overrides torch's for pooled lanes
    monkeypatch.setenv(TORCH_ASYNC_ERROR_HANDLING_ENV, "3")
    monkeypatch.setenv(ASYNC_ERROR_HANDLING_ENV, "0")
    assert tear_down_on_error() is False
    monkeypatch.setenv(ASYNC_ERROR_HANDLING_ENV, "1")
    monkeypatch.setenv(TORCH_ASYNC_ERROR_HANDLING_ENV, "2")
    assert tear_down_on_error() is True
    monkeypatch.setenv(ASYNC_ERROR_HANDLING_ENV, "yes")
    with pytest.raises(ConfigError, match="0, 1, 2 or 3"):
        tear_down_on_error()


def test_stall_bound_follows_torchs_heartbeat_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycomm.nccl import STALL_TIMEOUT_ENV, stall_timeout_seconds

    monkeypatch.delenv(STALL_TIMEOUT_ENV, raising=False)
    assert stall_timeout_seconds() == 480.0
    monkeypatch.setenv(STALL_TIMEOUT_ENV, "30")
    assert stall_timeout_seconds() == 30.0
    for bad in ("0", "-5", "soon", "inf", "nan"):
        monkeypatch.setenv(STALL_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=STALL_TIMEOUT_ENV):
            stall_timeout_seconds()


@needs_cuda_build
def test_no_split_parent_without_a_lane_of_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split parent is only ever another pooled lane of the same group:
    a pool without one (no GPU here) makes every communicator from an id."""
    from pycomm.nccl import SPLIT_ENV, split_parent

    core = _C.CommPool()
    assert split_parent(core, "group-0", "rs", 0) is None
    monkeypatch.setenv(SPLIT_ENV, "0")
    assert split_parent(core, "group-0", "rs", 0) is None


def _register_without_a_lane(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    with pycomm.CommPool(device=None) as pool:
        ag = pool.duplicate(dist.group.WORLD, "ag")
        backend = ag._get_backend(torch.device("cpu"))
        errors = []
        for call in (lambda: backend.register_mem_pool(object(), symm=True),
                     lambda: backend.deregister_mem_pool(object()),
                     lambda: backend.allocate_tensor(16, dtype=torch.float32, device=torch.device("cpu")),
                     lambda: backend.mem_allocator):
            try:
                call()
            except pycomm.UnsupportedOpError as e:
                errors.append(str(e))
        supported = backend.supports_tensor_alloc(torch.device("cpu"))
        return errors + [f"supports_tensor_alloc: {supported}"]


def test_mem_pool_registration_and_nccl_memory_need_an_nccl_lane() -> None:
    """Megatron-FSDP's nccl_ub calls register_mem_pool on its AG group's
    backend, FSDP2's allocation from the process group allocate_tensor: a
    pooled group takes the calls, and without an NCCL lane (a CPU world)
    says why it cannot serve them."""
    for errors in run_world(_register_without_a_lane, 2):
        assert len(errors) == 5, errors
        assert all("needs an NCCL lane" in e for e in errors[:4]), errors
        assert "register_mem_pool" in errors[0] and "deregister_mem_pool" in errors[1]
        assert "allocate_tensor" in errors[2] and "mem_allocator" in errors[3]
        assert errors[4] == "supports_tensor_alloc: False"


def test_nvls_collnet_and_p2p_fields_reach_the_plan_by_version() -> None:
    """NCCL 2.30.7 src/init.cc (parseCommConfig): nvlsCTAs and collnetEnable
    from 2.27, maxP2pPeers from 2.30; `doctor` lists what the loaded NCCL
    takes."""
    settings = nccl_settings(RoleConfig(nvls_ctas=16, collnet_enable=True, max_p2p_peers=8), "x")
    assert (settings["nvls_ctas"], settings["collnet_enable"], settings["max_p2p_peers"]) == (16, True, 8)
    assert _C.nccl_config_plan(settings, 23007) == {
        "applied": ["commName", "nvlsCTAs", "collnetEnable", "maxP2pPeers"], "too_new": [],
    }
    assert _C.nccl_config_plan(settings, 22907)["too_new"] == [("maxP2pPeers", "2.30.0")]
    assert _C.nccl_config_plan(settings, 22605)["too_new"] == [
        ("commName", "2.27.0"), ("nvlsCTAs", "2.27.0"), ("collnetEnable", "2.27.0"), ("maxP2pPeers", "2.30.0"),
    ]
    if _C.cuda_built:
        from pycomm.nccl import config_fields_support

        taken, too_new = config_fields_support()
        assert len(taken) + len(too_new) == 17
        # Which side each field is on follows the NCCL loaded (2.30.7 here,
        # 2.28.9 with torch 2.11's wheel on the lent GPU machine).
        loaded = _C.nccl_usable_version()
        needs = {"nvlsCTAs": 22700, "collnetEnable": 22700, "maxP2pPeers": 23000,
                 "graphStreamOrdering": 23005, "launchOrderImplicit": 23100}
        for field, need in needs.items():
            assert (field in taken) == (loaded >= need), (field, loaded)
        assert "CTAPolicy" in taken
        if loaded >= 23005:
            assert too_new == [("launchOrderImplicit", "2.31.0")]
