#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <vector>

#include "errors.h"
#include "lane.h"

using namespace std::chrono_literals;
using pycomm::CpuLane;

TEST(CpuLane, RunsTasksInPostOrder) {
  std::vector<int> order;
  std::mutex mutex;
  {
    CpuLane lane("test");
    for (int i = 0; i < 200; ++i) {
      lane.post([&, i] {
        std::lock_guard<std::mutex> lock(mutex);
        order.push_back(i);
      });
    }
  } // the destructor runs what was posted, then joins
  ASSERT_EQ(order.size(), 200u);
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ(order[i], i);
  }
}

TEST(CpuLane, TwoLanesRunConcurrently) {
  CpuLane a("a");
  CpuLane b("b");
  std::promise<void> bStarted;
  auto started = bStarted.get_future();
  std::atomic<bool> aSawB{false};
  a.post([&] { aSawB = started.wait_for(5s) == std::future_status::ready; });
  b.post([&] { bStarted.set_value(); });
  a.close();
  b.close();
  EXPECT_TRUE(aSawB.load()); // a's task waited for b's: they overlapped
}

TEST(CpuLane, CloseRefusesNewTasks) {
  CpuLane lane("closed");
  lane.close();
  lane.close(); // idempotent
  EXPECT_THROW(lane.post([] {}), pycomm::PoolClosedError);
}

TEST(CpuLane, AbandonReturnsUnstartedTasksWithoutWaiting) {
  auto lane = std::make_unique<CpuLane>("abandon");
  std::promise<void> release;
  auto released = release.get_future().share();
  std::promise<void> running;
  lane->post([&running, released] {
    running.set_value();
    released.wait();
  });
  std::atomic<int> ran{0};
  for (int i = 0; i < 3; ++i) {
    lane->post([&] { ran += 1; });
  }
  running.get_future().wait();
  auto begin = std::chrono::steady_clock::now();
  auto unstarted = lane->abandon();
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 1s);
  EXPECT_EQ(unstarted.size(), 3u);
  EXPECT_THROW(lane->post([] {}), pycomm::PoolClosedError);
  lane.reset(); // destroying an abandoned lane does not wait either
  release.set_value();
  EXPECT_EQ(ran.load(), 0);
}

TEST(CpuLane, ATaskThatThrowsDoesNotStopTheLane) {
  std::atomic<int> ran{0};
  {
    CpuLane lane("throws");
    lane.post([] { throw std::runtime_error("boom"); });
    lane.post([&] { ran += 1; });
  }
  EXPECT_EQ(ran.load(), 1);
}

TEST(CpuLane, PendingCountsQueuedAndRunning) {
  CpuLane lane("pending");
  std::promise<void> release;
  auto released = release.get_future().share();
  lane.post([released] { released.wait(); });
  lane.post([] {});
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (lane.pending() != 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(lane.pending(), 2u);
  release.set_value();
  lane.close();
  EXPECT_EQ(lane.pending(), 0u);
}
