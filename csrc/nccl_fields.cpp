#include "nccl_fields.h"

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
    case NcclField::TrafficClass:
      return ncclVersionCode(2, 25, 0);
    // NCCL 2.30.7 src/init.cc, parseCommConfig: a config of an older
    // version gets NCCL's default for each field newer than it.
    case NcclField::CommName:
    case NcclField::CtaPolicy:
    case NcclField::NvlsCtas:
    case NcclField::CollnetEnable:
      return ncclVersionCode(2, 27, 0);
    case NcclField::MaxP2pPeers:
      return ncclVersionCode(2, 30, 0);
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
  return set;
}

NcclFieldPlan planNcclFields(const NcclSettings& settings, int version) {
  NcclFieldPlan plan;
  for (NcclField field : fieldsSet(settings)) {
    (version >= ncclFieldMinVersion(field) ? plan.applied : plan.skipped)
        .push_back(field);
  }
  return plan;
}

std::string ncclVersionText(int version) {
  return std::to_string(version / 10000) + "." +
      std::to_string(version / 100 % 100) + "." + std::to_string(version % 100);
}

} // namespace pycomm
