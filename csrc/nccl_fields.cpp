#include "nccl_fields.h"

#include "errors.h"

namespace pycomm {

const char* ncclFieldName(NcclField field) {
  switch (field) {
    case NcclField::CgaClusterSize:
      return "cgaClusterSize";
    case NcclField::MinCtas:
      return "minCTAs";
    case NcclField::MaxCtas:
      return "maxCTAs";
    case NcclField::NetName:
      return "netName";
    case NcclField::TrafficClass:
      return "trafficClass";
    case NcclField::CommName:
      return "commName";
    case NcclField::CtaPolicy:
      return "CTAPolicy";
    case NcclField::LaunchOrderImplicit:
      return "launchOrderImplicit";
    case NcclField::NvlsCtas:
      return "nvlsCTAs";
    case NcclField::CollnetEnable:
      return "collnetEnable";
    case NcclField::MaxP2pPeers:
      return "maxP2pPeers";
    case NcclField::SplitShare:
      return "splitShare";
    case NcclField::NChannelsPerNetPeer:
      return "nChannelsPerNetPeer";
    case NcclField::NvlinkCentricSched:
      return "nvlinkCentricSched";
    case NcclField::GraphUsageMode:
      return "graphUsageMode";
    case NcclField::NumRmaCtx:
      return "numRmaCtx";
    case NcclField::GraphStreamOrdering:
      return "graphStreamOrdering";
  }
  return "?";
}

int ncclFieldMinVersion(NcclField field) {
  switch (field) {
    case NcclField::CgaClusterSize:
    case NcclField::MinCtas:
    case NcclField::MaxCtas:
    case NcclField::NetName:
      return ncclVersionCode(2, 17, 0);
    case NcclField::SplitShare:
      return ncclVersionCode(2, 18, 0);
    case NcclField::TrafficClass:
      return ncclVersionCode(2, 25, 0);
    // NCCL 2.30.7 src/init.cc, parseCommConfig: a config of an older
    // version gets NCCL's default for each field newer than it.
    case NcclField::CommName:
    case NcclField::CtaPolicy:
    case NcclField::NvlsCtas:
    case NcclField::CollnetEnable:
      return ncclVersionCode(2, 27, 0);
    case NcclField::NChannelsPerNetPeer:
    case NcclField::NvlinkCentricSched:
      return ncclVersionCode(2, 28, 0);
    case NcclField::GraphUsageMode:
    case NcclField::NumRmaCtx:
      return ncclVersionCode(2, 29, 0);
    case NcclField::MaxP2pPeers:
      return ncclVersionCode(2, 30, 0);
    case NcclField::GraphStreamOrdering:
      return ncclVersionCode(2, 30, 5);
    case NcclField::LaunchOrderImplicit:
      return ncclVersionCode(2, 31, 0);
  }
  return 0;
}

std::vector<NcclField> fieldsSet(const NcclSettings& s) {
  std::vector<NcclField> set;
  if (s.cgaClusterSize) {
    set.push_back(NcclField::CgaClusterSize);
  }
  if (s.minCtas) {
    set.push_back(NcclField::MinCtas);
  }
  if (s.maxCtas) {
    set.push_back(NcclField::MaxCtas);
  }
  if (s.netName) {
    set.push_back(NcclField::NetName);
  }
  if (s.trafficClass) {
    set.push_back(NcclField::TrafficClass);
  }
  if (s.commName) {
    set.push_back(NcclField::CommName);
  }
  if (s.ctaPolicy) {
    set.push_back(NcclField::CtaPolicy);
  }
  if (s.launchOrderImplicit) {
    set.push_back(NcclField::LaunchOrderImplicit);
  }
  if (s.nvlsCtas) {
    set.push_back(NcclField::NvlsCtas);
  }
  if (s.collnetEnable) {
    set.push_back(NcclField::CollnetEnable);
  }
  if (s.maxP2pPeers) {
    set.push_back(NcclField::MaxP2pPeers);
  }
  if (s.splitShare) {
    set.push_back(NcclField::SplitShare);
  }
  if (s.nChannelsPerNetPeer) {
    set.push_back(NcclField::NChannelsPerNetPeer);
  }
  if (s.nvlinkCentricSched) {
    set.push_back(NcclField::NvlinkCentricSched);
  }
  if (s.graphUsageMode) {
    set.push_back(NcclField::GraphUsageMode);
  }
  if (s.numRmaCtx) {
    set.push_back(NcclField::NumRmaCtx);
  }
  if (s.graphStreamOrdering) {
    set.push_back(NcclField::GraphStreamOrdering);
  }
  return set;
}

NcclFieldPlan planNcclFields(const NcclSettings& settings, int version) {
  NcclFieldPlan plan;
  for (NcclField field : fieldsSet(settings)) {
    (version >= ncclFieldMinVersion(field) ? plan.applied : plan.tooNew)
        .push_back(field);
  }
  return plan;
}

NcclFieldPlan requireNcclFields(const NcclSettings& settings, int version, const std::string& context) {
  NcclFieldPlan plan = planNcclFields(settings, version);
  if (!plan.tooNew.empty()) {
    std::string fields;
    for (NcclField field : plan.tooNew) {
      fields += (fields.empty() ? "" : ", ") + std::string("ncclConfig_t.") + ncclFieldName(field) +
          " needs NCCL " + ncclVersionText(ncclFieldMinVersion(field));
    }
    throw NcclVersionError(
        context + ": " + fields + "; the NCCL in use is " + ncclVersionText(version) +
        " (unset the setting, or use a newer NCCL)");
  }
  return plan;
}

std::string ncclVersionText(int version) {
  return std::to_string(version / 10000) + "." +
      std::to_string(version / 100 % 100) + "." + std::to_string(version % 100);
}

} // namespace pycomm
