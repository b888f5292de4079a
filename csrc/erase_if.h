#pragma once
// std::erase_if for vectors, which torch 2.11 cannot offer: it builds
// extensions as C++17 (2.14 as C++20).
#include <algorithm>
#include <vector>

namespace pycomm {

template <typename T, typename Allocator, typename Predicate>
void eraseIf(std::vector<T, Allocator>& values, Predicate predicate) {
  values.erase(std::remove_if(values.begin(), values.end(), predicate), values.end());
}

} // namespace pycomm
