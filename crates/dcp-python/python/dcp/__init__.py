"""dcp: distributed checkpointing with a Rust core.

``dcp.torch`` holds ``torch.distributed.checkpoint`` storage writers and
readers (``FsspecWriter``, ``FsspecReader``, ``FileSystemWriter``,
``FileSystemReader``) whose bytes move in dcp's Rust core; it imports torch,
so it is a submodule: ``import dcp.torch``.
"""

from ._dcp import Reader, Writer, validate_checkpoint_id

__all__ = ["Reader", "Writer", "validate_checkpoint_id"]
