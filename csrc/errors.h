#pragma once
// The exceptions the C++ core raises. bindings.cpp maps each one to the Python
// class of the same name in pycomm.errors, so callers can catch them by name.
#include <exception>
#include <stdexcept>
#include <string>

namespace pycomm {

class PycommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A role name outside the known set.
class UnknownRoleError : public PycommError {
 public:
  using PycommError::PycommError;
};

// This rank is not a member of the group it asked about.
class NotAMemberError : public PycommError {
 public:
  using PycommError::PycommError;
};

// The pool or the pooled group was destroyed or aborted.
class PoolClosedError : public PycommError {
 public:
  using PycommError::PycommError;
};

// Tensor sizes, dtypes, devices or layouts do not fit the collective.
class TensorMismatchError : public PycommError {
 public:
  using PycommError::PycommError;
};

// The transport cannot run this collective (reduce op, device, dtype).
class UnsupportedOpError : public PycommError {
 public:
  using PycommError::PycommError;
};

// A rank layout that cannot exist (does not divide the world, unknown dims).
class LayoutError : public PycommError {
 public:
  using PycommError::PycommError;
};

// A bad per-role setting.
class ConfigError : public PycommError {
 public:
  using PycommError::PycommError;
};

// A setting the NCCL in use is too old to take.
class NcclVersionError : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

// A collective did not finish within its timeout.
class CollectiveTimeoutError : public PycommError {
 public:
  using PycommError::PycommError;
};

// The transport reported a failure (peer gone, connection closed, NCCL error).
class CollectiveError : public PycommError {
 public:
  using PycommError::PycommError;
};

// Ranks issued different collectives at the same position of one lane.
class OrderMismatchError : public PycommError {
 public:
  using PycommError::PycommError;
};

// The text of the exception `error` holds, for messages that wrap it.
inline std::string messageOf(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown error";
  }
}

} // namespace pycomm
