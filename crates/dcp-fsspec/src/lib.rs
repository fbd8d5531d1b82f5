//! dcp-fsspec: arrives with its own issue.
