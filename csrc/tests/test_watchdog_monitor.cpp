// The stall monitor: a marked call that outlasts its bound is reported once,
// with what the thread was doing; calls within the bound are not; and
// runBounded() returns within its bound whatever the call does.
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "watchdog_monitor.h"

using namespace std::chrono_literals;

namespace pycomm {
namespace {

struct Reports {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::string> seen;
  StallWatch::Handler handler() {
    return [this](const std::string& report) {
      std::lock_guard<std::mutex> lock(mutex);
      seen.push_back(report);
      changed.notify_all();
    };
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mutex);
    return seen.size();
  }
  bool waitFor(size_t n, std::chrono::milliseconds within) {
    std::unique_lock<std::mutex> lock(mutex);
    return changed.wait_for(lock, within, [&] { return seen.size() >= n; });
  }
};

TEST(StallWatch, ACallPastItsBoundIsReportedOnceByName) {
  Reports reports;
  auto watch = StallWatch::create("lane 'ag' of group 'g'", 100ms, reports.handler());
  const auto start = std::chrono::steady_clock::now();
  {
    StallWatch::Call call(*watch, "querying the end event");
    ASSERT_TRUE(reports.waitFor(1, 2s));
    // Reported within 1.25 bounds plus scheduling.
    EXPECT_LT(std::chrono::steady_clock::now() - start, 400ms);
    std::this_thread::sleep_for(150ms);
  }
  EXPECT_EQ(reports.count(), 1u) << "one report per watch";
  EXPECT_TRUE(watch->stalled());
  const std::string& report = reports.seen[0];
  EXPECT_NE(report.find("lane 'ag' of group 'g'"), std::string::npos) << report;
  EXPECT_NE(report.find("querying the end event"), std::string::npos) << report;
  EXPECT_NE(report.find("100 ms"), std::string::npos) << report;
}

TEST(StallWatch, CallsWithinTheBoundAndIdleTimeAreNotStalls) {
  Reports reports;
  auto watch = StallWatch::create("quick", 80ms, reports.handler());
  for (int i = 0; i < 10; ++i) {
    StallWatch::Call call(*watch, "a short call");
    std::this_thread::sleep_for(20ms);
  }
  std::this_thread::sleep_for(200ms); // idle between calls is no stall
  EXPECT_EQ(reports.count(), 0u);
  EXPECT_FALSE(watch->stalled());
}

TEST(StallWatch, AWatchGoneIsForgotten) {
  Reports reports;
  {
    auto watch = StallWatch::create("gone", 50ms, reports.handler());
  }
  auto other = StallWatch::create("other", 50ms, reports.handler());
  {
    StallWatch::Call call(*other, "blocking");
    ASSERT_TRUE(reports.waitFor(1, 2s));
  }
  EXPECT_EQ(reports.count(), 1u);
  EXPECT_NE(reports.seen[0].find("other"), std::string::npos);
}

TEST(RunBounded, ReturnsWithinItsBoundWhileTheCallGoesOn) {
  std::mutex mutex;
  std::condition_variable released;
  bool release = false;
  std::atomic<bool> finished{false};
  auto keep = std::make_shared<int>(7);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(runBounded(100ms, [&, keep] {
    std::unique_lock<std::mutex> lock(mutex);
    released.wait(lock, [&] { return release; });
    finished = true;
  }));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 500ms);
  EXPECT_FALSE(finished.load());
  EXPECT_EQ(keep.use_count(), 2) << "the call keeps what it captured";
  {
    std::lock_guard<std::mutex> lock(mutex);
    release = true;
  }
  released.notify_all();
  for (int i = 0; i < 200 && keep.use_count() > 1; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_TRUE(finished.load());
  EXPECT_EQ(keep.use_count(), 1) << "and lets it go when it returns";
  EXPECT_TRUE(runBounded(1s, [] {}));
}

} // namespace
} // namespace pycomm
