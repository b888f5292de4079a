#pragma once
// torch's Work.get_future_result() for pooled Works: a future that completes
// when the op does, with the c10d::WorkResult it ended with (SUCCESS,
// TIMEOUT, COMM_ERROR) as ProcessGroupNCCL's does, instead of an error.
//
// Thread-safety: as c10::ivalue::Future's callbacks.
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "errors.h"

namespace pycomm {

inline c10::intrusive_ptr<c10::ivalue::Future> futureWorkResult(
    const c10::intrusive_ptr<c10::ivalue::Future>& opFuture) {
  auto result = c10::make_intrusive<c10::ivalue::Future>(c10::IntType::get());
  opFuture->addCallback([result](c10::ivalue::Future& op) {
    auto outcome = c10d::WorkResult::SUCCESS;
    if (op.hasError()) {
      try {
        std::rethrow_exception(op.exception_ptr());
      } catch (const CollectiveTimeoutError&) {
        outcome = c10d::WorkResult::TIMEOUT;
      } catch (...) {
        outcome = c10d::WorkResult::COMM_ERROR;
      }
    }
    result->markCompleted(static_cast<int64_t>(outcome));
  });
  return result;
}

} // namespace pycomm
