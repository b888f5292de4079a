#include <gtest/gtest.h>

#include "errors.h"
#include "layout.h"

using pycomm::LayoutError;
using pycomm::RankLayout;
using Ranks = std::vector<int64_t>;

// Megatron order "tp-cp-ep-pp-dp" with pp=2, dp=2 on 4 ranks: dp groups are
// {0,2} and {1,3} (pp innermost of the two), the case where a hard-coded
// "tp-cp-ep-dp-pp" enumeration gets {0,1}.
TEST(RankLayout, OrderDecidesTheGroups) {
  RankLayout ppInner({1, 1, 1, 2, 2}, {"tp", "cp", "ep", "pp", "dp"});
  EXPECT_EQ(ppInner.groupOf(0, {"dp"}), (Ranks{0, 2}));
  EXPECT_EQ(ppInner.groupOf(3, {"dp"}), (Ranks{1, 3}));
  RankLayout dpInner({1, 1, 1, 2, 2}, {"tp", "cp", "ep", "dp", "pp"});
  EXPECT_EQ(dpInner.groupOf(0, {"dp"}), (Ranks{0, 1}));
}

TEST(RankLayout, GroupsOfSeveralDims) {
  RankLayout layout({2, 2, 2}, {"tp", "cp", "dp"});
  EXPECT_EQ(layout.groupOf(5, {"cp", "dp"}), (Ranks{1, 3, 5, 7}));
  EXPECT_EQ(layout.groupOf(5, {"tp"}), (Ranks{4, 5}));
  EXPECT_EQ(layout.groupCount({"cp", "dp"}), 2);
  auto all = layout.allGroups({"cp", "dp"});
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0], (Ranks{0, 2, 4, 6}));
  EXPECT_EQ(all[1], (Ranks{1, 3, 5, 7}));
}

TEST(RankLayout, OffsetShiftsEveryRank) {
  RankLayout layout({2, 2}, {"tp", "dp"}, 8);
  EXPECT_EQ(layout.worldSize(), 4);
  EXPECT_EQ(layout.groupOf(9, {"dp"}), (Ranks{9, 11}));
  EXPECT_THROW(layout.groupOf(0, {"dp"}), LayoutError);
}

TEST(RankLayout, EveryRankIsInExactlyOneGroup) {
  RankLayout layout({2, 3, 2, 2}, {"tp", "cp", "dp", "pp"});
  for (const std::vector<std::string>& dims :
       {std::vector<std::string>{"dp"}, {"cp", "dp"}, {"tp", "pp"}, {"pp"}}) {
    std::vector<int> seen(layout.worldSize(), 0);
    for (const auto& group : layout.allGroups(dims)) {
      for (auto r : group) {
        seen[r] += 1;
        EXPECT_EQ(layout.groupOf(r, dims), group);
      }
    }
    for (int count : seen) {
      EXPECT_EQ(count, 1);
    }
  }
}

TEST(RankLayout, BadLayoutsAreNamed) {
  EXPECT_THROW(RankLayout({2, 0}, {"tp", "dp"}), LayoutError);
  EXPECT_THROW(RankLayout({2, 2}, {"tp", "tp"}), LayoutError);
  EXPECT_THROW(RankLayout({2}, {"tp", "dp"}), LayoutError);
  EXPECT_THROW(RankLayout({2}, {"tp"}, -1), LayoutError);
  RankLayout layout({2, 2}, {"tp", "dp"});
  try {
    layout.groupOf(0, {"ep"});
    FAIL() << "an unknown dim must throw";
  } catch (const LayoutError& e) {
    EXPECT_NE(std::string(e.what()).find("'ep'"), std::string::npos);
  }
}

TEST(RankLayout, LargeWorldGroupOfIsCheap) {
  RankLayout layout({8, 2, 4, 128, 2}, {"tp", "cp", "ep", "dp", "pp"});
  ASSERT_EQ(layout.worldSize(), 16384);
  auto group = layout.groupOf(16383, {"cp", "dp"});
  EXPECT_EQ(group.size(), 256u);
  EXPECT_EQ(group.back(), 16383);
  EXPECT_EQ(group.front(), 16383 - (1 * 8 + 127 * 64));
}
