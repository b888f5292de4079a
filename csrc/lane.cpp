#include "lane.h"

#include <pthread.h>

#include <exception>
#include <iostream>

#include "errors.h"

namespace pycomm {

CpuLane::CpuLane(std::string name)
    : name_(std::move(name)), state_(std::make_shared<State>()) {
  worker_ = std::thread(&CpuLane::work, state_, name_);
}

CpuLane::~CpuLane() {
  close();
}

void CpuLane::work(std::shared_ptr<State> state, std::string name) {
  // Linux limits thread names to 15 characters.
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
  std::unique_lock<std::mutex> lock(state->mutex);
  while (true) {
    state->wake.wait(
        lock, [&] { return state->closing || !state->queue.empty(); });
    if (state->queue.empty()) {
      return; // closing, and nothing left to run
    }
    Task task = std::move(state->queue.front());
    state->queue.pop_front();
    state->running = true;
    lock.unlock();
    try {
      task();
    } catch (const std::exception& e) {
      std::cerr << "pycomm: lane " << name << " dropped a task that threw: "
                << e.what() << std::endl;
    } catch (...) {
      std::cerr << "pycomm: lane " << name
                << " dropped a task that threw a non-standard exception"
                << std::endl;
    }
    task = nullptr; // release captured tensors before taking the lock
    lock.lock();
    state->running = false;
    state->wake.notify_all();
  }
}

void CpuLane::post(Task task) {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->closing) {
      throw PoolClosedError("lane " + name_ + " is closed");
    }
    state_->queue.push_back(std::move(task));
  }
  state_->wake.notify_all();
}

void CpuLane::close() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->closing = true;
  }
  state_->wake.notify_all();
  std::lock_guard<std::mutex> lock(threadMutex_);
  if (worker_.joinable()) {
    if (worker_.get_id() == std::this_thread::get_id()) {
      worker_.detach(); // closed from one of its own tasks
    } else {
      worker_.join();
    }
  }
}

std::vector<CpuLane::Task> CpuLane::abandon() {
  std::vector<Task> unstarted;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->closing = true;
    for (auto& task : state_->queue) {
      unstarted.push_back(std::move(task));
    }
    state_->queue.clear();
  }
  state_->wake.notify_all();
  std::lock_guard<std::mutex> lock(threadMutex_);
  if (worker_.joinable()) {
    worker_.detach();
  }
  return unstarted;
}

size_t CpuLane::pending() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->queue.size() + (state_->running ? 1 : 0);
}

} // namespace pycomm
