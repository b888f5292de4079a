#include <gtest/gtest.h>

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
  return s;
}
} // namespace

TEST(NcclFields, NewestVersionTakesEveryField) {
  auto plan = planNcclFields(everyField(), ncclVersionCode(2, 31, 0));
  EXPECT_EQ(plan.applied.size(), 11u);
  EXPECT_TRUE(plan.skipped.empty());
  // 2.30 has everything but the per-communicator launch order.
  plan = planNcclFields(everyField(), ncclVersionCode(2, 30, 7));
  EXPECT_EQ(plan.applied.size(), 10u);
  ASSERT_EQ(plan.skipped.size(), 1u);
  EXPECT_EQ(plan.skipped[0], NcclField::LaunchOrderImplicit);
  EXPECT_STREQ(pycomm::ncclFieldName(plan.skipped[0]), "launchOrderImplicit");
}

TEST(NcclFields, SkipsFieldsNewerThanTheVersion) {
  auto plan = planNcclFields(everyField(), ncclVersionCode(2, 26, 5));
  EXPECT_EQ(plan.applied.size(), 5u); // the 2.17 four and trafficClass
  ASSERT_EQ(plan.skipped.size(), 6u);
  EXPECT_EQ(plan.skipped[0], NcclField::CommName);
  EXPECT_EQ(plan.skipped[1], NcclField::CtaPolicy);

  // NCCL 2.30.7 src/init.cc: nvlsCTAs and collnetEnable from 2.27,
  // maxP2pPeers from 2.30.
  plan = planNcclFields(everyField(), ncclVersionCode(2, 29, 2));
  ASSERT_EQ(plan.skipped.size(), 2u);
  EXPECT_EQ(plan.skipped[0], NcclField::LaunchOrderImplicit);
  EXPECT_EQ(plan.skipped[1], NcclField::MaxP2pPeers);
  EXPECT_STREQ(pycomm::ncclFieldName(plan.skipped[1]), "maxP2pPeers");

  // trafficClass from 2.25 (parseCommConfig resets it below 2.25).
  plan = planNcclFields(everyField(), ncclVersionCode(2, 25, 1));
  EXPECT_EQ(plan.applied.size(), 5u);
  EXPECT_EQ(plan.applied.back(), NcclField::TrafficClass);
  plan = planNcclFields(everyField(), ncclVersionCode(2, 24, 3));
  EXPECT_EQ(plan.skipped.front(), NcclField::TrafficClass);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 18, 1));
  EXPECT_EQ(plan.applied.size(), 4u);
  EXPECT_EQ(plan.skipped.front(), NcclField::TrafficClass);

  plan = planNcclFields(everyField(), ncclVersionCode(2, 16, 0));
  EXPECT_TRUE(plan.applied.empty());
  EXPECT_EQ(plan.skipped.size(), 11u);
}

TEST(NcclFields, UnsetFieldsAreNeitherAppliedNorSkipped) {
  NcclSettings s;
  s.maxCtas = 8;
  auto plan = planNcclFields(s, ncclVersionCode(2, 10, 0));
  EXPECT_TRUE(plan.applied.empty());
  ASSERT_EQ(plan.skipped.size(), 1u);
  EXPECT_STREQ(pycomm::ncclFieldName(plan.skipped[0]), "maxCTAs");
}

TEST(NcclFields, VersionText) {
  EXPECT_EQ(pycomm::ncclVersionText(23007), "2.30.7");
  EXPECT_EQ(pycomm::ncclVersionText(ncclVersionCode(2, 17, 1)), "2.17.1");
}
