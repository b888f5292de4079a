"""pycomm's named exceptions. The compiled core raises these same classes."""

from __future__ import annotations


class PycommError(RuntimeError):
    """Base of every error pycomm raises on purpose."""


class UnknownRoleError(PycommError, ValueError):
    """A role outside the known set ('ag', 'rs')."""


class NotAMemberError(PycommError, ValueError):
    """This rank is not in the group it asked to duplicate or use."""


class PoolClosedError(PycommError):
    """The pool or pooled group was destroyed or aborted."""


class TensorMismatchError(PycommError, ValueError):
    """Tensor sizes, dtypes, devices or layouts do not fit the collective."""


class UnsupportedOpError(PycommError, ValueError):
    """The transport cannot run this collective (reduce op, device, dtype)."""


class LayoutError(PycommError, ValueError):
    """A rank layout that cannot exist for this world."""


class ConfigError(PycommError, ValueError):
    """A bad per-role setting or configuration file."""


class NcclVersionError(ConfigError):
    """A RoleConfig setting the loaded NCCL is too old to take (NCCL would
    silently use its default instead)."""


class RendezvousTimeoutError(PycommError, TimeoutError):
    """Members of a group did not all arrive to create a pooled group in time."""


class PoolMismatchError(RendezvousTimeoutError):
    """Members duplicated one group in different pools (pools made in
    different orders on different ranks, without names)."""


class CollectiveTimeoutError(PycommError, TimeoutError):
    """A collective did not finish within its timeout."""


class CollectiveError(PycommError):
    """The transport reported a failure (peer gone, connection closed)."""


class OrderMismatchError(PycommError):
    """Ranks issued different collectives at the same place of one lane."""


class NotInitializedError(PycommError):
    """A helper needs state (torch.distributed, Megatron parallel state) not yet set up."""
