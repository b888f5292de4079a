#pragma once
// The ncclConfig_t fields a RoleConfig can set, and which of them a given NCCL
// version understands. Pure data, free of torch and NCCL headers, so the
// version guards are tested in every build variant.
//
// Thread-safety: values and pure functions only.
#include <optional>
#include <string>
#include <vector>

namespace pycomm {

// NCCL_VERSION_CODE's encoding for releases since 2.9.
constexpr int ncclVersionCode(int major, int minor, int patch) {
  return major * 10000 + minor * 100 + patch;
}

// The fields of ncclConfig_t pycomm sets per role; unset means NCCL's default.
struct NcclSettings {
  std::optional<int> cgaClusterSize;
  std::optional<int> minCtas;
  std::optional<int> maxCtas;
  std::optional<std::string> netName;
  std::optional<int> trafficClass;
  std::optional<int> ctaPolicy; // NCCL_CTA_POLICY_* value
  std::optional<std::string> commName;
  // 1: kernels of this communicator may launch in any order relative to other
  // communicators' on the same ranks, so a different issue order across ranks
  // cannot deadlock two communicators (NCCL 2.31; NCCL_LAUNCH_ORDER_IMPLICIT=1
  // does it for every communicator from 2.26).
  std::optional<int> launchOrderImplicit;
  // CTAs for NVLS (NVLink SHARP) algorithms; NCCL picks when unset.
  std::optional<int> nvlsCtas;
  // 1: CollNet (in-network reduction) may be used by this communicator.
  std::optional<int> collnetEnable;
  // The most peers a rank keeps point-to-point connections with.
  std::optional<int> maxP2pPeers;
  // 1: communicators split from this one share its resources (NCCL's default
  // is 0). Shared resources include the device stream, so lanes split from a
  // sharing lane no longer overlap with it.
  std::optional<int> splitShare;
  // Network channels per peer for point-to-point traffic (NCCL rounds up to a
  // power of two).
  std::optional<int> nChannelsPerNetPeer;
  // 1: NVLink-utilization-centric scheduling of collectives.
  std::optional<int> nvlinkCentricSched;
  // 0: no CUDA graphs, 1: one graph, 2: several graphs or graphs mixed with
  // eager launches (NCCL's default).
  std::optional<int> graphUsageMode;
  // One-sided RMA contexts the communicator provisions.
  std::optional<int> numRmaCtx;
  // 0: captured kernels go straight onto the capturing stream, with no
  // capture-time serialization by NCCL (needs graphUsageMode 0 or 1).
  std::optional<int> graphStreamOrdering;
};

enum class NcclField {
  CgaClusterSize,
  MinCtas,
  MaxCtas,
  NetName,
  TrafficClass,
  CommName,
  CtaPolicy,
  LaunchOrderImplicit,
  NvlsCtas,
  CollnetEnable,
  MaxP2pPeers,
  SplitShare,
  NChannelsPerNetPeer,
  NvlinkCentricSched,
  GraphUsageMode,
  NumRmaCtx,
  GraphStreamOrdering,
};

// ncclConfig_t's own spelling of the field ("cgaClusterSize", "CTAPolicy").
const char* ncclFieldName(NcclField field);
// The NCCL version that introduced the field.
int ncclFieldMinVersion(NcclField field);
// The fields `settings` sets, in declaration order.
std::vector<NcclField> fieldsSet(const NcclSettings& settings);

struct NcclFieldPlan {
  std::vector<NcclField> applied; // set and understood by `version`
  std::vector<NcclField> tooNew; // set but newer than `version`
};

// Which of the fields `settings` sets NCCL `version` can take. A field newer
// than the NCCL in use is never written into a struct that version does not
// have: NCCL would silently use its default for it (parseCommConfig resets
// each field newer than the config's version).
NcclFieldPlan planNcclFields(const NcclSettings& settings, int version);

// The fields of `settings` NCCL `version` cannot take, or an NcclVersionError
// naming each with the version it needs: asked-for tuning is never dropped.
NcclFieldPlan requireNcclFields(const NcclSettings& settings, int version, const std::string& context);

// "2.30.7" for 23007.
std::string ncclVersionText(int version);

} // namespace pycomm
