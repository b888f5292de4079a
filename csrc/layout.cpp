#include "layout.h"

#include <algorithm>
#include <set>
#include <sstream>
#include <utility>

#include "errors.h"

namespace pycomm {

namespace {
std::string joined(const std::vector<std::string>& names) {
  std::ostringstream out;
  for (size_t i = 0; i < names.size(); ++i) {
    out << (i ? "-" : "") << names[i];
  }
  return out.str();
}
} // namespace

RankLayout::RankLayout(
    std::vector<int64_t> shape,
    std::vector<std::string> dimNames,
    int64_t rankOffset)
    : shape_(std::move(shape)),
      dimNames_(std::move(dimNames)),
      rankOffset_(rankOffset),
      worldSize_(1) {
  if (shape_.empty() || shape_.size() != dimNames_.size()) {
    throw LayoutError(
        "a rank layout needs one size per dimension name, got " +
        std::to_string(shape_.size()) + " sizes for " +
        std::to_string(dimNames_.size()) + " names");
  }
  if (rankOffset_ < 0) {
    throw LayoutError(
        "rank offset must be >= 0, got " + std::to_string(rankOffset_));
  }
  std::set<std::string> seen;
  for (size_t i = 0; i < shape_.size(); ++i) {
    if (dimNames_[i].empty() || !seen.insert(dimNames_[i]).second) {
      throw LayoutError(
          "dimension names must be non-empty and unique, got " +
          joined(dimNames_));
    }
    if (shape_[i] < 1) {
      throw LayoutError(
          "dimension " + dimNames_[i] + " has size " +
          std::to_string(shape_[i]) + "; sizes must be >= 1");
    }
    strides_.push_back(worldSize_);
    worldSize_ *= shape_[i];
  }
}

std::vector<bool> RankLayout::maskOf(const std::vector<std::string>& dims) const {
  std::vector<bool> mask(dimNames_.size(), false);
  for (const auto& dim : dims) {
    auto it = std::find(dimNames_.begin(), dimNames_.end(), dim);
    if (it == dimNames_.end()) {
      throw LayoutError(
          "dimension '" + dim + "' is not in the layout " + joined(dimNames_));
    }
    mask[it - dimNames_.begin()] = true;
  }
  return mask;
}

std::vector<int64_t> RankLayout::membersFrom(
    int64_t baseIndex,
    const std::vector<bool>& mask) const {
  // baseIndex has coordinate 0 along every masked dimension; walk all
  // combinations of the masked coordinates like an odometer.
  std::vector<int64_t> members{baseIndex};
  for (size_t d = 0; d < shape_.size(); ++d) {
    if (!mask[d]) {
      continue;
    }
    const size_t before = members.size();
    for (int64_t c = 1; c < shape_[d]; ++c) {
      for (size_t i = 0; i < before; ++i) {
        members.push_back(members[i] + c * strides_[d]);
      }
    }
  }
  for (auto& m : members) {
    m += rankOffset_;
  }
  std::sort(members.begin(), members.end());
  return members;
}

std::vector<int64_t> RankLayout::groupOf(
    int64_t rank,
    const std::vector<std::string>& dims) const {
  const int64_t index = rank - rankOffset_;
  if (index < 0 || index >= worldSize_) {
    throw LayoutError(
        "rank " + std::to_string(rank) + " is outside the layout's ranks [" +
        std::to_string(rankOffset_) + ", " +
        std::to_string(rankOffset_ + worldSize_) + ")");
  }
  const auto mask = maskOf(dims);
  int64_t base = index;
  for (size_t d = 0; d < shape_.size(); ++d) {
    if (mask[d]) {
      base -= ((index / strides_[d]) % shape_[d]) * strides_[d];
    }
  }
  return membersFrom(base, mask);
}

int64_t RankLayout::groupCount(const std::vector<std::string>& dims) const {
  const auto mask = maskOf(dims);
  int64_t groupSize = 1;
  for (size_t d = 0; d < shape_.size(); ++d) {
    if (mask[d]) {
      groupSize *= shape_[d];
    }
  }
  return worldSize_ / groupSize;
}

std::vector<std::vector<int64_t>> RankLayout::allGroups(
    const std::vector<std::string>& dims) const {
  const auto mask = maskOf(dims);
  std::vector<std::vector<int64_t>> groups;
  groups.reserve(groupCount(dims));
  for (int64_t index = 0; index < worldSize_; ++index) {
    bool isBase = true;
    for (size_t d = 0; d < shape_.size() && isBase; ++d) {
      isBase = !mask[d] || (index / strides_[d]) % shape_[d] == 0;
    }
    if (isBase) {
      groups.push_back(membersFrom(index, mask));
    }
  }
  return groups;
}

} // namespace pycomm
