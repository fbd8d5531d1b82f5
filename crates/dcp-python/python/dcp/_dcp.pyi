"""The Rust half of the dcp package (PyO3). ``dcp.torch`` drives it."""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

# (name, "tensor", dtype, shape, [(offsets, sizes), ...]) or
# (name, "bytes", length, None, None)
MetadataItem = Union[
    Tuple[str, str, str, List[int], List[Tuple[List[int], List[int]]]],
    Tuple[str, str, int, None, None],
]

class Writer:
    """The storage side of a save: one location, options fixed at creation."""

    def __init__(
        self,
        location: str,
        storage_options: Optional[Mapping[str, str]] = None,
        *,
        thread_count: int = 1,
        sync_files: bool = True,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        single_file_per_rank: bool = True,
        compression: Optional[str] = None,
        zstd_level: int = 3,
        checksum: Optional[str] = "crc32c",
        format: str = "raw",
    ) -> None: ...
    @property
    def location(self) -> str: ...
    def begin(self) -> Tuple[str, int]:
        """Coordinator: create the location, refuse an existing checkpoint
        unless overwriting (FileExistsError), take the lease. Returns
        ``(save_id, generation)``."""
    def write(
        self,
        rank: int,
        save_id: str,
        records: Sequence[
            Tuple[str, Optional[str], Sequence[int], Sequence[int], Sequence[int], Any]
        ],
    ) -> bytes:
        """Write this rank's records ``(name, dtype or None for bytes, global
        shape, offsets, sizes, memory)`` from their memory, GIL released.
        ``memory`` is a uint8 C-contiguous numpy array, or a source dcp
        stages (device memory): an object with an int ``nbytes`` and
        ``stage(lane, offset, length)`` returning a handle whose ``wait()``
        returns those bytes as such an array. Returns this rank's opaque
        result for ``commit``."""
    def commit(
        self,
        save_id: str,
        generation: int,
        results: Sequence[Optional[bytes]],
        declared: Sequence[Tuple[str, str, Sequence[int]]],
        user: Mapping[str, str],
    ) -> List[str]:
        """Coordinator: assemble dcp metadata from every rank's result and
        commit it atomically; remove dead files; release the lease. Returns
        the names of the files removed."""
    def end(self) -> None:
        """Release the lease of a save that failed before its commit."""

class Reader:
    """The storage side of a load."""

    def __init__(
        self,
        location: str,
        storage_options: Optional[Mapping[str, str]] = None,
        *,
        thread_count: int = 1,
        verify_checksums: bool = True,
    ) -> None: ...
    @property
    def location(self) -> str: ...
    def read_metadata(self) -> Dict[str, object]:
        """Read and validate ``.metadata``: ``save_id``, ``generation``,
        ``world_size``, ``format``, ``user`` and ``items`` (MetadataItem)."""
    def read(
        self,
        tensors: Sequence[Tuple[str, Sequence[int], Sequence[int], np.ndarray]],
        byte_items: Sequence[str],
        *,
        exchange: Optional[Any] = None,
        rank: int = 0,
        world_size: int = 1,
        failure: Optional[str] = None,
    ) -> Dict[str, bytes]:
        """Fill each ``(name, global offsets, sizes, writable uint8 array)``
        in place and return the bytes of ``byte_items``, GIL released.

        With ``exchange`` (an object with ``buffer(n)`` returning a writable
        uint8 numpy array and ``all_to_all(buffer, splits)`` returning
        ``(received array, recv_splits)`` over a process group) and
        ``world_size > 1``, every rank calls ``read`` together and each
        saved record several ranks need is read by one of them and its
        slices exchanged; the outcome is agreed (any rank's failure fails
        every rank). ``failure``: this rank failed before it could read (its
        message); it takes part so the others fail at once, and raises
        ``RuntimeError``."""
    def stats(self) -> Dict[str, int]:
        """What the last ``read`` on this rank read from storage:
        ``bytes_read``, ``requests``, ``records``."""

def validate_checkpoint_id(location: str) -> bool:
    """Whether this build opens ``location`` (touches no storage)."""
