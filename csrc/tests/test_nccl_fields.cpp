#include <gtest/gtest.h>

#include <string>

#include "errors.h"
#include "nccl_fields.h"

using pycomm::NcclField;
using pycomm::NcclSettings;
using pycomm::ncclVersionCode;
using pycomm::planNcclFields;

namespace {
NcclSettings everyField() {
  NcclSettings s;
  s.cgaClusterSize = 2;
  s.minCtas = 4;
  s.maxCtas = 16;
  s.netName = "IB";
  s.trafficClass = 106;
  s.ctaPolicy = 1;
  s.commName = "pycomm_ag_of_0";
  s.launchOrderImplicit = 1;
  s.nvlsCtas = 16;
  s.collnetEnable = 1;
  s.maxP2pPeers = 8;
  s.splitShare = 1;
  s.nChannelsPerNetPeer = 4;
  s.nvlinkCentricSched = 1;
  s.graphUsageMode = 1;
  s.numRmaCtx = 2;
  s.graphStreamOrdering = 0;
  return s;
}
constexpr size_t kEveryField = 17;
} // namespace

TEST(NcclFields, NewestVersionTakesEveryField) {
  auto plan = planNcclFields(everyField(), ncclVersionCode(2, 31, 0));
  EXPECT_EQ(plan.applied.size(), kEveryField);
  EXPECT_TRUE(plan.tooNew.empty());
  // 2.30.7 has everything but the per-communicator launch order.
  plan = planNcclFields(everyField(), ncclVersionCode(2, 30, 7));
  EXPECT_EQ(plan.applied.size(), kEveryField - 1);
  ASSERT_EQ(plan.tooNew.size(), 1u);
  EXPECT_EQ(plan.tooNew[0], NcclField::LaunchOrderImplicit);
  EXPECT_STREQ(pycomm::ncclFieldName(plan.tooNew[0]), "launchOrderImplicit");
}

// NCCL 2.30.7 src/init.cc, parseCommConfig: a config of an older version gets
// NCCL's default for nChannelsPerNetPeer and nvlinkCentricSched below 2.28,
// graphUsageMode and numRmaCtx below 2.29, maxP2pPeers below 2.30 and
// graphStreamOrdering below 2.30.5.
TEST(NcclFields, FieldsNewerThanTheVersionAreTooNew) {
  auto plan = planNcclFields(everyField(), ncclVersionCode(2, 30, 4));
  ASSERT_EQ(plan.tooNew.size(), 2u);
  EXPECT_EQ(plan.tooNew[1], NcclField::GraphStreamOrdering);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 29, 2));
  ASSERT_EQ(plan.tooNew.size(), 3u);
  EXPECT_EQ(plan.tooNew[0], NcclField::LaunchOrderImplicit);
  EXPECT_EQ(plan.tooNew[1], NcclField::MaxP2pPeers);
  EXPECT_EQ(plan.tooNew[2], NcclField::GraphStreamOrdering);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 28, 9));
  ASSERT_EQ(plan.tooNew.size(), 5u);
  EXPECT_EQ(plan.tooNew[2], NcclField::GraphUsageMode);
  EXPECT_EQ(plan.tooNew[3], NcclField::NumRmaCtx);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 27, 7));
  ASSERT_EQ(plan.tooNew.size(), 7u);
  EXPECT_EQ(plan.tooNew[2], NcclField::NChannelsPerNetPeer);
  EXPECT_EQ(plan.tooNew[3], NcclField::NvlinkCentricSched);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 26, 5));
  EXPECT_EQ(plan.applied.size(), 6u); // the 2.17 four, splitShare, trafficClass
  ASSERT_EQ(plan.tooNew.size(), kEveryField - 6);
  EXPECT_EQ(plan.tooNew[0], NcclField::CommName);
  EXPECT_EQ(plan.tooNew[1], NcclField::CtaPolicy);

  // trafficClass from 2.25 (parseCommConfig resets it below 2.25).
  plan = planNcclFields(everyField(), ncclVersionCode(2, 25, 1));
  EXPECT_EQ(plan.applied.size(), 6u);
  plan = planNcclFields(everyField(), ncclVersionCode(2, 24, 3));
  EXPECT_EQ(plan.tooNew.front(), NcclField::TrafficClass);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 18, 1));
  EXPECT_EQ(plan.applied.size(), 5u);
  EXPECT_EQ(plan.applied.back(), NcclField::SplitShare);
  plan = planNcclFields(everyField(), ncclVersionCode(2, 17, 1));
  EXPECT_EQ(plan.applied.size(), 4u);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 16, 0));
  EXPECT_TRUE(plan.applied.empty());
  EXPECT_EQ(plan.tooNew.size(), kEveryField);
}

TEST(NcclFields, UnsetFieldsAreNeitherAppliedNorTooNew) {
  NcclSettings s;
  s.maxCtas = 8;
  auto plan = planNcclFields(s, ncclVersionCode(2, 10, 0));
  EXPECT_TRUE(plan.applied.empty());
  ASSERT_EQ(plan.tooNew.size(), 1u);
  EXPECT_STREQ(pycomm::ncclFieldName(plan.tooNew[0]), "maxCTAs");
}

TEST(NcclFields, RequiringFieldsNamesEachOneTheVersionIsTooOldFor) {
  EXPECT_EQ(pycomm::requireNcclFields(everyField(), ncclVersionCode(2, 31, 0), "g").applied.size(), kEveryField);
  try {
    pycomm::requireNcclFields(everyField(), ncclVersionCode(2, 29, 2), "pooled ag of dp");
    ADD_FAILURE() << "NCCL 2.29 took maxP2pPeers";
  } catch (const pycomm::NcclVersionError& e) {
    EXPECT_EQ(
        std::string(e.what()),
        "pooled ag of dp: ncclConfig_t.launchOrderImplicit needs NCCL 2.31.0, "
        "ncclConfig_t.maxP2pPeers needs NCCL 2.30.0, ncclConfig_t.graphStreamOrdering needs "
        "NCCL 2.30.5; the NCCL in use is 2.29.2 (unset the setting, or use a newer NCCL)");
  }
}

TEST(NcclFields, VersionText) {
  EXPECT_EQ(pycomm::ncclVersionText(23007), "2.30.7");
  EXPECT_EQ(pycomm::ncclVersionText(ncclVersionCode(2, 17, 1)), "2.17.1");
}
