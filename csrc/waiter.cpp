#include "waiter.h"

#include <pthread.h>

#include <utility>

namespace pycomm {

Waiter::Waiter(std::string name)
    : name_(std::move(name)), state_(std::make_shared<State>()) {
  thread_ = std::thread(&Waiter::run, state_, name_);
}

Waiter::~Waiter() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stopping = true;
  }
  state_->wake.notify_all();
  // Destruction may happen on the waiter's own thread (its callback dropped
  // the last reference) or while a work it waits on never ends: detach then.
  if (thread_.get_id() == std::this_thread::get_id()) {
    thread_.detach();
    return;
  }
  bool idle;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    idle = state_->queue.empty();
  }
  if (idle) {
    thread_.join();
  } else {
    thread_.detach();
  }
}

void Waiter::watch(c10::intrusive_ptr<c10d::Work> work, Callback callback) {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->queue.push_back(Item{std::move(work), std::move(callback)});
  }
  state_->wake.notify_all();
}

bool Waiter::idle() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->queue.empty();
}

void Waiter::run(std::shared_ptr<State> state, std::string name) {
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
  std::unique_lock<std::mutex> lock(state->mutex);
  while (true) {
    state->wake.wait(lock, [&] { return state->stopping || !state->queue.empty(); });
    if (state->queue.empty()) {
      return;
    }
    Item item = std::move(state->queue.front());
    lock.unlock();
    std::exception_ptr error;
    try {
      item.work->wait();
    } catch (...) {
      error = std::current_exception();
    }
    item.callback(error);
    item = Item{};
    lock.lock();
    state->queue.pop_front();
  }
}

} // namespace pycomm
