//! Stream transforms: byte-stream extensions applied to each record on write
//! and undone on read (compression, checksums, later encryption).
//!
//! Every transform has a descriptor `name/version[:key=value,...]` recorded
//! per record in the metadata, in the order of application. A reader rebuilds
//! each chain from an [`ExtensionRegistry`]; an unknown descriptor is an
//! `Unsupported` error that says which crate provides it, never a misread.

mod checksum32;
mod crc32c;

pub use self::checksum32::{build_checksum32, check_checksum32, Checksum32};
pub use self::crc32c::{Crc32c, Crc32cFactory};

use crate::error::{Error, ErrorKind, Result};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

/// How a transform relates input to output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformKind {
    /// Changes the bytes (compression, encryption): records must be read and
    /// decoded whole, and their stored length is not the logical length.
    Codec,
    /// Observes the bytes and records a value (a checksum); the stored bytes
    /// are the input bytes, so partial reads stay possible.
    Checksum,
}

/// A parsed descriptor: `name/version[:key=value,...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Lower-case name (`zstd`, `crc32c`).
    pub name: String,
    /// Version of the transform's stream format.
    pub version: u32,
    /// Parameters, in key order.
    pub params: BTreeMap<String, String>,
}

impl Descriptor {
    /// Parse and validate a descriptor string. Refuses empty or overlong
    /// strings, names outside `[a-z0-9._-]`, and malformed parameters.
    pub fn parse(s: &str) -> Result<Descriptor> {
        let bad = |why: &str| Error::corrupt(format!("invalid transform descriptor {s:?}: {why}"));
        if s.is_empty() || s.len() > 256 {
            return Err(bad("length must be 1 to 256 bytes"));
        }
        let (head, params_str) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let (name, version) = head
            .split_once('/')
            .ok_or_else(|| bad("missing /version"))?;
        let name_ok = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            return Err(bad(
                "name must be a lower-case letter followed by [a-z0-9._-]",
            ));
        }
        let version: u32 = version
            .parse()
            .map_err(|_| bad("version is not a number"))?;
        let mut params = BTreeMap::new();
        if let Some(p) = params_str {
            for kv in p.split(',') {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| bad("parameter is not key=value"))?;
                let k_ok =
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                let v_ok = v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                if !k_ok || !v_ok {
                    return Err(bad("parameter must be [A-Za-z0-9_]+=[A-Za-z0-9_.-]*"));
                }
                if params.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(bad("duplicate parameter"));
                }
            }
        }
        Ok(Descriptor {
            name: name.to_string(),
            version,
            params,
        })
    }
}

impl Descriptor {
    /// Refuse this descriptor, as [`ErrorKind::Unsupported`], unless its
    /// version is `version`: a factory reads exactly the stream versions it
    /// knows.
    pub fn check_version(&self, version: u32) -> Result<()> {
        if self.version != version {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "stream extension {self}: version {} is not supported (this build reads {}/{version})",
                    self.version, self.name
                ),
            ));
        }
        Ok(())
    }

    /// Refuse, as [`ErrorKind::Unsupported`], any parameter not in `allowed`.
    pub fn check_params(&self, allowed: &[&str]) -> Result<()> {
        if let Some(k) = self.params.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("stream extension {self}: unknown parameter {k:?}"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.version)?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

/// A configured transform: it encodes records on write and decodes them on
/// read. Implementations must be deterministic and must bound every
/// allocation on decode by the expected output length.
pub trait StreamTransformExtension: Send + Sync + fmt::Debug {
    /// The descriptor recorded in metadata, e.g. `zstd/1:level=3`.
    fn descriptor(&self) -> String;

    /// Whether the transform changes bytes or only observes them.
    fn kind(&self) -> TransformKind;

    /// A fresh encoder for one record.
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>>;

    /// Undo the transform over one whole record's stored bytes.
    ///
    /// `value` is what the encoder returned from `finish`; `expected_len` is
    /// the exact length the output must have (for a checksum, the input's).
    /// A `Codec` returns `Some(decoded)` and must fail, without allocating
    /// more than `expected_len`, when the output would be longer or shorter.
    /// A `Checksum` verifies and returns `None` (the input is the output);
    /// a mismatch is an error of kind [`ErrorKind::ChecksumMismatch`].
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>>;
}

/// Encodes one record, fed in pieces.
pub trait StreamEncoder: Send {
    /// Feed `input`; append produced bytes to `out`. A `Checksum` encoder
    /// must not append anything (the pipeline forwards `input` itself).
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<()>;

    /// Finish the record: append remaining bytes to `out` and return the
    /// value to record with it (a checksum), or an empty vector.
    fn finish(self: Box<Self>, out: &mut Vec<u8>) -> Result<Vec<u8>>;
}

/// Builds transforms from descriptors found in metadata.
pub trait ExtensionFactory: Send + Sync {
    /// The descriptor name this factory handles (`zstd`).
    fn name(&self) -> &str;

    /// Build the transform for `descriptor`; refuse unknown versions or
    /// parameters with an `Unsupported` error.
    fn build(&self, descriptor: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>>;
}

/// Maps descriptor names to factories. Readers resolve every descriptor of a
/// checkpoint through it before reading any byte. Every registry, a new one
/// included, resolves `crc32c` (the checksum saves record by default).
#[derive(Clone)]
pub struct ExtensionRegistry {
    factories: HashMap<String, Arc<dyn ExtensionFactory>>,
}

impl fmt::Debug for ExtensionRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.factories.keys().collect();
        names.sort();
        f.debug_struct("ExtensionRegistry")
            .field("names", &names)
            .finish()
    }
}

/// Descriptor names that dcp's own crates provide, for error messages.
const KNOWN_PROVIDERS: &[(&str, &str)] = &[
    ("zstd", "dcp-ext"),
    ("lz4", "dcp-ext"),
    ("crc32", "dcp-ext"),
];

impl Default for ExtensionRegistry {
    fn default() -> Self {
        let mut r = ExtensionRegistry {
            factories: HashMap::new(),
        };
        r.register(Arc::new(Crc32cFactory));
        r
    }
}

impl ExtensionRegistry {
    /// A registry holding dcp-core's own transforms (`crc32c`).
    pub fn new() -> Self {
        Self::default()
    }

    /// The names registered, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.factories.keys().cloned().collect();
        names.sort();
        names
    }

    /// Register a factory; a later one with the same name replaces it.
    pub fn register(&mut self, factory: Arc<dyn ExtensionFactory>) {
        self.factories.insert(factory.name().to_string(), factory);
    }

    /// True if a factory for `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// Resolve a descriptor string to a transform.
    pub fn resolve(&self, descriptor: &str) -> Result<Arc<dyn StreamTransformExtension>> {
        let d = Descriptor::parse(descriptor)?;
        match self.factories.get(&d.name) {
            Some(f) => f
                .build(&d)
                .map_err(|e| e.context(format!("stream extension {descriptor:?}"))),
            None => {
                let hint = KNOWN_PROVIDERS
                    .iter()
                    .find(|(n, _)| *n == d.name)
                    .map(|(_, c)| {
                        format!(
                            " (provided by the {c} crate: register its extensions with the reader, or open the reader with the dcp crate, which does)"
                        )
                    })
                    .unwrap_or_default();
                Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("checkpoint needs stream extension {descriptor:?}, which this reader does not have{hint}"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_parse_and_print() {
        let d = Descriptor::parse("zstd/1:level=3").unwrap();
        assert_eq!(d.name, "zstd");
        assert_eq!(d.version, 1);
        assert_eq!(d.params["level"], "3");
        assert_eq!(d.to_string(), "zstd/1:level=3");
        assert_eq!(
            Descriptor::parse("crc32c/1").unwrap().to_string(),
            "crc32c/1"
        );
        for bad in [
            "",
            "zstd",
            "zstd/x",
            "Zstd/1",
            "zstd/1:level",
            "zstd/1:a=1,a=2",
            "a/1:k=v v",
            "../1",
        ] {
            assert_eq!(
                Descriptor::parse(bad).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "{bad:?}"
            );
        }
        let e = ExtensionRegistry::new().resolve("zstd/1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("dcp-ext"), "{e}");
    }
}
