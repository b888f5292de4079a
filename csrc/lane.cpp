#include "lane.h"

#include <iostream>
#include <utility>

#include "errors.h"

namespace pycomm {

namespace {
// Set while this thread runs a Start of `lane`: a done() from inside it is
// recorded instead of recursing, and drain() loops instead.
thread_local const Lane* startingLane = nullptr;
thread_local bool doneWhileStarting = false;
} // namespace

Lane::Lane(std::string name) : name_(std::move(name)) {}

Lane::~Lane() {
  abandon();
}

void Lane::post(Start start) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) {
      throw PoolClosedError("lane " + name_ + " is closed");
    }
    queue_.push_back(std::move(start));
    if (inFlight_) {
      return;
    }
    inFlight_ = true;
  }
  drain();
}

void Lane::done() {
  if (startingLane == this) {
    doneWhileStarting = true;
    return;
  }
  drain();
}

void Lane::drain() {
  while (true) {
    Start start;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (queue_.empty()) {
        inFlight_ = false;
        idle_.notify_all();
        return;
      }
      start = std::move(queue_.front());
      queue_.pop_front();
    }
    const Lane* outerLane = startingLane;
    const bool outerDone = doneWhileStarting;
    startingLane = this;
    doneWhileStarting = false;
    bool finishedInside = false;
    try {
      start();
      finishedInside = doneWhileStarting;
    } catch (const std::exception& e) {
      std::cerr << "pycomm: lane " << name_ << ": an op failed to start: "
                << e.what() << std::endl;
      finishedInside = true;
    } catch (...) {
      finishedInside = true;
    }
    startingLane = outerLane;
    doneWhileStarting = outerDone;
    if (!finishedInside) {
      return; // its done() will start the next one
    }
  }
}

void Lane::close() {
  std::unique_lock<std::mutex> lock(mutex_);
  closing_ = true;
  idle_.wait(lock, [&] { return !inFlight_ && queue_.empty(); });
}

std::vector<Lane::Start> Lane::abandon() {
  std::vector<Start> unstarted;
  std::lock_guard<std::mutex> lock(mutex_);
  closing_ = true;
  for (auto& start : queue_) {
    unstarted.push_back(std::move(start));
  }
  queue_.clear();
  return unstarted;
}

size_t Lane::pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size() + (inFlight_ ? 1 : 0);
}

} // namespace pycomm
