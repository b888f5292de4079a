#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "errors.h"
#include "lane.h"

using namespace std::chrono_literals;
using pycomm::Lane;

TEST(Lane, StartsOneOpAtATimeInPostOrder) {
  Lane lane("order");
  std::mutex mutex;
  std::vector<int> started;
  std::vector<std::function<void()>> finishers; // ends ops from another thread
  std::atomic<int> inFlight{0};
  std::atomic<int> maxInFlight{0};
  for (int i = 0; i < 50; ++i) {
    lane.post([&, i] {
      int now = ++inFlight;
      maxInFlight = std::max(maxInFlight.load(), now);
      std::lock_guard<std::mutex> lock(mutex);
      started.push_back(i);
      finishers.push_back([&] {
        --inFlight;
        lane.done();
      });
    });
  }
  // Each op is ended by a helper thread, as a transport's worker would.
  for (int i = 0; i < 50; ++i) {
    std::function<void()> finish;
    auto deadline = std::chrono::steady_clock::now() + 5s;
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (static_cast<int>(finishers.size()) > i) {
          finish = finishers[i];
          break;
        }
      }
      ASSERT_LT(std::chrono::steady_clock::now(), deadline);
      std::this_thread::sleep_for(1ms);
    }
    std::thread(finish).join();
  }
  lane.close();
  ASSERT_EQ(started.size(), 50u);
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(started[i], i);
  }
  EXPECT_EQ(maxInFlight.load(), 1);
}

TEST(Lane, OpsThatFinishWhileStartingDoNotRecurse) {
  Lane lane("inline");
  int ran = 0;
  for (int i = 0; i < 200000; ++i) {
    lane.post([&] {
      ++ran;
      lane.done();
    });
  }
  EXPECT_EQ(ran, 200000);
  EXPECT_EQ(lane.pending(), 0u);
}

TEST(Lane, QueuedOpsDrainWithoutRecursionWhenTheyFinishInline) {
  Lane lane("queued");
  std::promise<std::function<void()>> first;
  lane.post([&] { first.set_value([&] { lane.done(); }); });
  int ran = 0;
  for (int i = 0; i < 100000; ++i) {
    lane.post([&] {
      ++ran;
      lane.done();
    });
  }
  EXPECT_EQ(ran, 0);
  first.get_future().get()(); // ends op 0; the rest start and end on this thread
  EXPECT_EQ(ran, 100000);
}

TEST(Lane, TwoLanesAreIndependent) {
  Lane a("a");
  Lane b("b");
  a.post([] {}); // never done: a stays busy
  bool bRan = false;
  b.post([&] {
    bRan = true;
    b.done();
  });
  EXPECT_TRUE(bRan);
  EXPECT_EQ(a.pending(), 1u);
  a.done();
}

TEST(Lane, CloseWaitsForTheOpInFlightAndRefusesNewOnes) {
  Lane lane("close");
  lane.post([] {});
  std::thread finisher([&] {
    std::this_thread::sleep_for(100ms);
    lane.done();
  });
  auto begin = std::chrono::steady_clock::now();
  lane.close();
  EXPECT_GE(std::chrono::steady_clock::now() - begin, 90ms);
  finisher.join();
  EXPECT_THROW(lane.post([] {}), pycomm::PoolClosedError);
  lane.close(); // idempotent
}

TEST(Lane, AbandonReturnsUnstartedOpsWithoutWaiting) {
  Lane lane("abandon");
  lane.post([] {}); // in flight, never done before abandon
  int ran = 0;
  for (int i = 0; i < 3; ++i) {
    lane.post([&] { ++ran; });
  }
  auto unstarted = lane.abandon();
  EXPECT_EQ(unstarted.size(), 3u);
  EXPECT_THROW(lane.post([] {}), pycomm::PoolClosedError);
  lane.done(); // the op in flight ends late: nothing else starts
  EXPECT_EQ(ran, 0);
  EXPECT_EQ(lane.pending(), 0u);
}

TEST(Lane, AStartThatThrowsCountsAsDone) {
  Lane lane("throws");
  lane.post([] { throw std::runtime_error("boom"); });
  bool ran = false;
  lane.post([&] {
    ran = true;
    lane.done();
  });
  EXPECT_TRUE(ran);
}
