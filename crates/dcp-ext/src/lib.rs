//! dcp-ext: arrives with its own issue.
