//! Turning a URL plus fsspec-style `storage_options` into an OpenDAL
//! [`Operator`] rooted at the checkpoint prefix, and the tuning knobs of
//! [`OpendalOptions`].

use crate::OpendalOptions;
use dcp_core::location::{Backend, Location};
use dcp_core::{Error, Result};
use opendal::Operator;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Whether this build of dcp-fsspec serves `backend`.
// The arms depend on the features; with none on they look like `matches!`.
#[allow(clippy::match_like_matches_macro)]
fn enabled(backend: Backend) -> bool {
    match backend {
        Backend::S3 => cfg!(feature = "s3"),
        Backend::Gcs => cfg!(feature = "gcs"),
        Backend::Azblob => cfg!(feature = "azblob"),
        _ => true,
    }
}

/// Whether a completed write is durable (an upload, or an fsynced file).
pub(crate) fn durable(backend: Backend) -> bool {
    backend != Backend::Memory
}

/// A parsed checkpoint URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// The backend, from dcp-core's one table of location schemes
    /// ([`dcp_core::location`]); `Local` is OpenDAL's `fs` service here.
    pub scheme: Backend,
    /// Bucket, container, or memory store name (empty for `file://`).
    pub bucket: String,
    /// The prefix inside the bucket, without leading or trailing `/`; for
    /// `file://`, the absolute directory.
    pub prefix: String,
    /// The URL as given (normalised), for messages.
    pub url: String,
}

/// Parse `url` with [`Location::parse`]: `s3://bucket/prefix`,
/// `gs://bucket/prefix`, `azblob://container/prefix`, `file:///abs/path`,
/// `memory://name/prefix`, or a plain local path (made absolute, as fsspec
/// does). A scheme outside dcp-core's table is `InvalidInput`; one whose
/// feature this build lacks is `Unsupported`, naming the feature.
pub(crate) fn parse_url(url: &str) -> Result<Target> {
    let loc = Location::parse(url)?;
    let scheme = loc.backend();
    if !enabled(scheme) {
        let feature = scheme.feature().unwrap_or("?");
        return Err(Error::unsupported(format!(
            "{url}: {}:// needs the `{feature}` feature of dcp-fsspec, which this build lacks \
             (enable it: dcp-fsspec = {{ features = [\"{feature}\"] }}, or the \"{feature}\" feature of the dcp crate)",
            loc.scheme()
        )));
    }
    if let Some(path) = loc.local_path() {
        // fsspec treats a plain path as local, relative to the working directory.
        let path = std::path::absolute(path)
            .map_err(|e| Error::invalid(format!("cannot make {url:?} absolute: {e}")))?;
        let path = path.to_string_lossy().into_owned();
        return Ok(Target {
            scheme,
            bucket: String::new(),
            url: format!("file://{path}"),
            prefix: path,
        });
    }
    Ok(Target {
        scheme,
        bucket: loc.bucket().to_string(),
        prefix: loc.prefix().to_string(),
        url: loc.url(),
    })
}

/// The OpenDAL root for a prefix: `/prefix/`.
fn root_of(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".to_string()
    } else {
        format!("/{prefix}/")
    }
}

/// Keys of `storage_options` that tune dcp itself rather than the service.
const DCP_KEYS: &[&str] = &[
    "dcp_part_size",
    "dcp_write_concurrency",
    "dcp_read_chunk",
    "dcp_read_concurrency",
    "dcp_max_retries",
    "dcp_retry_min_delay_ms",
    "dcp_retry_max_delay_ms",
    "dcp_timeout_ms",
    "dcp_io_timeout_ms",
];

/// Keys the URL sets (the service's bucket or container, and root, with
/// OpenDAL's aliases for them): a storage option may not change them.
const URL_KEYS: &[&str] = &[
    "root",
    "bucket",
    "aws_bucket",
    "aws_bucket_name",
    "bucket_name",
    "google_bucket",
    "google_bucket_name",
    "container",
    "azure_container_name",
    "container_name",
];

/// fsspec (s3fs) and AWS spellings of S3 settings that dcp maps to
/// OpenDAL's names itself (see [`s3_alias`]).
const S3_FSSPEC_KEYS: &[&str] = &[
    "key",
    "secret",
    "token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "endpoint_url",
    "aws_endpoint_url",
    "aws_endpoint",
    "region_name",
    "aws_region",
];

/// gcsfs spellings of GCS settings that dcp maps itself (see
/// [`service_config`]): `endpoint_url`, and `token="anon"` for anonymous
/// access (any other `token` is OpenDAL's OAuth access token).
const GCS_FSSPEC_KEYS: &[&str] = &["endpoint_url"];

/// adlfs spellings of Azure settings that dcp maps itself: a whole
/// `connection_string`, `account_host` (`acct.blob.core.windows.net`), and
/// `endpoint_url`.
const AZBLOB_FSSPEC_KEYS: &[&str] = &["connection_string", "account_host", "endpoint_url"];

/// The nested dict s3fs users pass as `client_kwargs={"endpoint_url": ...}`
/// (gcsfs and adlfs take `endpoint_url` there too). A
/// `HashMap<String, String>` cannot hold a dict, so it arrives either
/// flattened, one key per entry (`client_kwargs.endpoint_url`), or as the
/// key `client_kwargs` whose value is a JSON object (what the Python
/// package sends for a dict value); both become the plain key.
pub(crate) const CLIENT_KWARGS: &str = "client_kwargs";

/// The keys accepted inside `client_kwargs` for `backend`.
fn client_kwargs_keys(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::S3 => &["endpoint_url", "region_name"],
        Backend::Gcs | Backend::Azblob => &["endpoint_url"],
        _ => &[],
    }
}

/// `storage_options` with `client_kwargs` (flattened or JSON) replaced by
/// the plain keys it holds. Refuses a `client_kwargs` that is not a JSON
/// object of strings, a key it may not hold, and a key given twice with
/// two values.
pub(crate) fn expand_client_kwargs(
    t: &Target,
    storage_options: &HashMap<String, String>,
) -> Result<HashMap<String, String>> {
    let allowed = client_kwargs_keys(t.scheme);
    let mut out: HashMap<String, String> = HashMap::new();
    let mut nested: Vec<(String, String)> = Vec::new();
    for (k, v) in storage_options {
        if k == CLIENT_KWARGS {
            let map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(v).map_err(|e| {
                    Error::invalid(format!(
                        "storage option client_kwargs={v:?} for {}: not a JSON object ({e}); \
                         pass {{\"endpoint_url\": \"...\"}} or the key client_kwargs.endpoint_url",
                        t.url
                    ))
                })?;
            for (nk, nv) in map {
                if !allowed.contains(&nk.as_str()) {
                    // Named as unknown below, before its type matters.
                    nested.push((nk, String::new()));
                    continue;
                }
                let serde_json::Value::String(nv) = nv else {
                    return Err(Error::invalid(format!(
                        "storage option client_kwargs.{nk} for {}: {nv} is not a string",
                        t.url
                    )));
                };
                nested.push((nk, nv));
            }
        } else if let Some(nk) = k.strip_prefix("client_kwargs.") {
            nested.push((nk.to_string(), v.clone()));
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    nested.sort();
    for (k, v) in nested {
        if !allowed.contains(&k.as_str()) {
            return Err(Error::invalid(format!(
                "unknown key {k:?} in storage option client_kwargs for {}; accepted there: {}",
                t.url,
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        match out.get(&k) {
            Some(old) if *old != v => {
                return Err(Error::invalid(format!(
                    "storage option {k} for {} is given twice, as {old:?} and in client_kwargs as {v:?}",
                    t.url
                )))
            }
            _ => {
                out.insert(k, v);
            }
        }
    }
    Ok(out)
}

/// The field names (with their serde aliases) of an OpenDAL service's
/// configuration struct, read from its `Deserialize` implementation.
#[cfg(any(feature = "s3", feature = "gcs", feature = "azblob"))]
fn config_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// The OpenDAL configuration keys of `backend`'s service that dcp passes
/// through (empty for services this build lacks, `file://` and memory).
fn service_keys(backend: Backend) -> &'static [&'static str] {
    match backend {
        #[cfg(feature = "s3")]
        Backend::S3 => config_fields::<opendal::services::S3Config>(),
        #[cfg(feature = "gcs")]
        Backend::Gcs => config_fields::<opendal::services::GcsConfig>(),
        #[cfg(feature = "azblob")]
        Backend::Azblob => config_fields::<opendal::services::AzblobConfig>(),
        _ => &[],
    }
}

/// Every `storage_options` key accepted for `backend`, sorted: the `dcp_*`
/// keys, the s3fs spellings dcp maps for S3, and the OpenDAL configuration
/// keys of the service, less the ones the URL sets.
pub(crate) fn accepted_keys(backend: Backend) -> Vec<&'static str> {
    let mut keys: Vec<&'static str> = DCP_KEYS.to_vec();
    match backend {
        Backend::S3 => keys.extend_from_slice(S3_FSSPEC_KEYS),
        Backend::Gcs => keys.extend_from_slice(GCS_FSSPEC_KEYS),
        Backend::Azblob => keys.extend_from_slice(AZBLOB_FSSPEC_KEYS),
        _ => {}
    }
    if !client_kwargs_keys(backend).is_empty() {
        keys.push(CLIENT_KWARGS);
    }
    keys.extend(
        service_keys(backend)
            .iter()
            .filter(|k| !URL_KEYS.contains(k)),
    );
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Refuse any key of `storage_options` that [`accepted_keys`] does not list
/// for `t` (OpenDAL would ignore it silently), and the keys the URL sets,
/// with [`ErrorKind::InvalidInput`](dcp_core::ErrorKind::InvalidInput);
/// `client_kwargs` is checked as [`expand_client_kwargs`] reads it.
pub(crate) fn check_keys(t: &Target, storage_options: &HashMap<String, String>) -> Result<()> {
    let storage_options = &expand_client_kwargs(t, storage_options)?;
    let accepted = accepted_keys(t.scheme);
    let mut keys: Vec<&str> = storage_options.keys().map(String::as_str).collect();
    keys.sort_unstable();
    for k in keys {
        if accepted.contains(&k) {
            continue;
        }
        if URL_KEYS.contains(&k) && !service_keys(t.scheme).is_empty() {
            return Err(Error::invalid(format!(
                "storage option {k:?} for {}: the URL sets it ({})",
                t.url,
                t.scheme.info().example
            )));
        }
        return Err(Error::invalid(format!(
            "unknown storage option {k:?} for {}; accepted: {}",
            t.url,
            accepted.join(", ")
        )));
    }
    Ok(())
}

fn parse_size(key: &str, v: &str) -> Result<usize> {
    let t = v.trim();
    let (num, mult) = [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(s, m)| t.strip_suffix(s).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            Error::invalid(format!(
                "storage option {key}={v:?} is not a size (bytes, or with KiB/MiB/GiB)"
            ))
        })
}

fn parse_u64(key: &str, v: &str) -> Result<u64> {
    v.trim().parse::<u64>().map_err(|_| {
        Error::invalid(format!(
            "storage option {key}={v:?} is not a non-negative integer"
        ))
    })
}

/// Apply the `dcp_*` keys of `storage_options` to `opts`.
pub(crate) fn apply_dcp_options(
    opts: &mut OpendalOptions,
    storage_options: &HashMap<String, String>,
) -> Result<()> {
    for (k, v) in storage_options {
        match k.as_str() {
            "dcp_part_size" => opts.part_size = parse_size(k, v)?,
            "dcp_write_concurrency" => opts.write_concurrency = parse_u64(k, v)? as usize,
            "dcp_read_chunk" => opts.read_chunk = parse_size(k, v)?,
            "dcp_read_concurrency" => opts.read_concurrency = parse_u64(k, v)? as usize,
            "dcp_max_retries" => opts.max_retries = parse_u64(k, v)? as usize,
            "dcp_retry_min_delay_ms" => {
                opts.retry_min_delay = Duration::from_millis(parse_u64(k, v)?)
            }
            "dcp_retry_max_delay_ms" => {
                opts.retry_max_delay = Duration::from_millis(parse_u64(k, v)?)
            }
            "dcp_timeout_ms" => opts.timeout = Duration::from_millis(parse_u64(k, v)?),
            "dcp_io_timeout_ms" => opts.io_timeout = Duration::from_millis(parse_u64(k, v)?),
            _ => {}
        }
    }
    Ok(())
}

/// fsspec (s3fs) spellings of S3 settings, mapped to OpenDAL's.
fn s3_alias(key: &str) -> &str {
    match key {
        "key" | "aws_access_key_id" => "access_key_id",
        "secret" | "aws_secret_access_key" => "secret_access_key",
        "token" | "aws_session_token" => "session_token",
        "endpoint_url" | "aws_endpoint_url" | "aws_endpoint" => "endpoint",
        "region_name" | "aws_region" => "region",
        other => other,
    }
}

/// The development storage account of the Azure emulators (Azurite), as
/// `UseDevelopmentStorage=true` in a connection string means it.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The OpenDAL azblob settings (`endpoint`, `account_name`, `account_key`,
/// `sas_token`) of an Azure Storage connection string
/// (`AccountName=..;AccountKey=..;BlobEndpoint=..` or with
/// `DefaultEndpointsProtocol` and `EndpointSuffix`, `SharedAccessSignature`,
/// or `UseDevelopmentStorage=true`). `source` names where it came from in
/// errors. Refuses a part without `=`, and a string that names neither an
/// account nor a blob endpoint.
pub(crate) fn parse_connection_string(conn: &str, source: &str) -> Result<Vec<(String, String)>> {
    let mut fields: HashMap<String, String> = HashMap::new();
    for part in conn.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            Error::invalid(format!(
                "{source}: {part:?} is not Key=Value (an Azure Storage connection string is \
                 Key=Value pairs separated by ';')"
            ))
        })?;
        fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let get = |k: &str| fields.get(k).filter(|v| !v.is_empty()).cloned();
    let mut out = Vec::new();
    if get("usedevelopmentstorage").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        out.push((
            "endpoint".to_string(),
            format!("http://127.0.0.1:10000/{AZURITE_ACCOUNT}"),
        ));
        out.push(("account_name".to_string(), AZURITE_ACCOUNT.to_string()));
        out.push(("account_key".to_string(), AZURITE_KEY.to_string()));
        return Ok(out);
    }
    let account = get("accountname");
    let endpoint = match (get("blobendpoint"), &account) {
        (Some(e), _) => e.trim_end_matches('/').to_string(),
        (None, Some(a)) => format!(
            "{}://{a}.blob.{}",
            get("defaultendpointsprotocol").unwrap_or_else(|| "https".into()),
            get("endpointsuffix").unwrap_or_else(|| "core.windows.net".into())
        ),
        (None, None) => {
            return Err(Error::invalid(format!(
                "{source}: the connection string names neither AccountName nor BlobEndpoint"
            )))
        }
    };
    out.push(("endpoint".to_string(), endpoint));
    if let Some(a) = account {
        out.push(("account_name".to_string(), a));
    }
    if let Some(k) = get("accountkey") {
        out.push(("account_key".to_string(), k));
    }
    if let Some(sas) = get("sharedaccesssignature") {
        out.push(("sas_token".to_string(), sas));
    }
    Ok(out)
}

/// `STORAGE_EMULATOR_HOST` as an endpoint URL: the Google client libraries
/// take `host:port` or a URL; a bare host gets `http://`.
fn emulator_endpoint(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    if host.contains("://") {
        host.to_string()
    } else {
        format!("http://{host}")
    }
}

/// Refuse (`InvalidInput`, naming `source` and the path) a Google
/// credential file that cannot be read or is not a JSON object with a
/// `type` (`service_account`, `authorized_user`, ...): OpenDAL would fail
/// only when signing the first request, with an error that reads like a
/// network problem (and is retried as one).
fn check_gcs_credential_file(path: &str, source: &str) -> Result<()> {
    let bad = |why: String| {
        Error::invalid(format!(
            "{source}={path:?}: {why}; it should be a service account or authorized-user \
             JSON key file"
        ))
    };
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    match v.get("type") {
        Some(serde_json::Value::String(_)) => Ok(()),
        _ => Err(bad("no \"type\" field".into())),
    }
}

/// GCS settings meaning "no credentials": none loaded from the
/// environment, the gcloud configuration or the VM metadata server.
const GCS_ANONYMOUS: [(&str, &str); 3] = [
    ("allow_anonymous", "true"),
    ("disable_vm_metadata", "true"),
    ("disable_config_load", "true"),
];

/// The variable of the AWS SDKs that turns their default upload checksums
/// off (`when_required`) or on (`when_supported`, the default).
pub(crate) const AWS_CHECKSUM_ENV: &str = "AWS_REQUEST_CHECKSUM_CALCULATION";

/// S3 upload checksums (OpenDAL's `checksum_algorithm`): CRC-32C unless
/// the storage options choose (`checksum_algorithm=none` turns them off,
/// any other value goes to OpenDAL) or [`AWS_CHECKSUM_ENV`] is
/// `when_required`, as for the AWS SDKs. Every part of a multipart upload
/// and every single PUT then carries `x-amz-checksum-crc32c`, which the
/// store checks on receipt (a part damaged in transit is refused), and the
/// upload declares the algorithm when it starts. Besides the integrity,
/// the store need not compute a whole-object checksum of its own when
/// completing the upload: moto, for one, then copies the whole object once
/// more (BENCHMARKS.md). Refuses (`InvalidInput`) another value of the
/// variable, naming it.
fn upload_checksum(
    cfg: &mut HashMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    const KEY: &str = "checksum_algorithm";
    match cfg.get(KEY).map(|v| v.trim().to_ascii_lowercase()) {
        Some(v) if v == "none" || v.is_empty() => {
            cfg.remove(KEY);
        }
        Some(v) => {
            cfg.insert(KEY.into(), v);
        }
        None => match env(AWS_CHECKSUM_ENV).map(|v| v.trim().to_ascii_lowercase()) {
            Some(v) if v == "when_required" => {}
            None => {
                cfg.insert(KEY.into(), "crc32c".into());
            }
            Some(v) if v == "when_supported" => {
                cfg.insert(KEY.into(), "crc32c".into());
            }
            Some(v) => {
                return Err(Error::invalid(format!(
                    "{AWS_CHECKSUM_ENV}={v:?}: expected \"when_supported\" (upload checksums, \
                     the default) or \"when_required\" (none)"
                )))
            }
        },
    }
    Ok(())
}

/// Service configuration: the environment, then the URL's bucket and root,
/// then `storage_options` (which override both; `client_kwargs` expanded
/// as [`expand_client_kwargs`] does).
///
/// - S3: `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION` /
///   `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
///   `AWS_SESSION_TOKEN`; s3fs's `key`, `secret`, `token`,
///   `endpoint_url`, `region_name`. Uploads carry CRC-32C checksums
///   unless `checksum_algorithm=none` or `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`
///   ([`upload_checksum`]).
/// - GCS: `STORAGE_EMULATOR_HOST` (an emulator: its endpoint, anonymous
///   access), else `GOOGLE_APPLICATION_CREDENTIALS` (a service account or
///   authorized-user JSON file); gcsfs's `endpoint_url` and `token="anon"`.
/// - Azure Blob: `AZURE_STORAGE_ACCOUNT` (or `AZURE_STORAGE_ACCOUNT_NAME`),
///   `AZURE_STORAGE_KEY` (or `AZURE_STORAGE_ACCOUNT_KEY`),
///   `AZURE_STORAGE_SAS_TOKEN`, then `AZURE_STORAGE_CONNECTION_STRING`,
///   which wins, as in the Azure CLI; adlfs's `connection_string`,
///   `account_host`, `endpoint_url`. With an account and no endpoint, the
///   endpoint is `https://{account}.blob.core.windows.net`.
///
/// Refuses (`InvalidInput`) a malformed connection string, naming where it
/// came from.
pub(crate) fn service_config(
    t: &Target,
    storage_options: &HashMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HashMap<String, String>> {
    let storage_options = expand_client_kwargs(t, storage_options)?;
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let mut cfg = HashMap::new();
    let mut user: Vec<(&String, &String)> = storage_options
        .iter()
        .filter(|(k, _)| !DCP_KEYS.contains(&k.as_str()))
        .collect();
    user.sort();
    match t.scheme {
        Backend::S3 => {
            let from_env = [
                ("endpoint", &["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"][..]),
                ("region", &["AWS_REGION", "AWS_DEFAULT_REGION"][..]),
                ("access_key_id", &["AWS_ACCESS_KEY_ID"][..]),
                ("secret_access_key", &["AWS_SECRET_ACCESS_KEY"][..]),
                ("session_token", &["AWS_SESSION_TOKEN"][..]),
            ];
            for (key, vars) in from_env {
                if let Some(v) = vars.iter().find_map(|v| env(v)) {
                    cfg.insert(key.to_string(), v);
                }
            }
            cfg.insert("bucket".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            for (k, v) in user {
                cfg.insert(s3_alias(k).to_string(), v.clone());
            }
            // Most S3-compatible servers ignore the region, but signing needs one.
            cfg.entry("region".into())
                .or_insert_with(|| "us-east-1".into());
            upload_checksum(&mut cfg, &env)?;
        }
        Backend::Gcs => {
            if let Some(host) = env("STORAGE_EMULATOR_HOST") {
                cfg.insert("endpoint".into(), emulator_endpoint(&host));
                for (k, v) in GCS_ANONYMOUS {
                    cfg.insert(k.into(), v.into());
                }
            } else if let Some(path) = env("GOOGLE_APPLICATION_CREDENTIALS") {
                cfg.insert("credential_path".into(), path);
            }
            let from_env = cfg.contains_key("credential_path");
            cfg.insert("bucket".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            for (k, v) in user {
                match (k.as_str(), v.as_str()) {
                    ("endpoint_url", _) => {
                        cfg.insert("endpoint".into(), v.clone());
                    }
                    ("token", "anon") => {
                        for (k, v) in GCS_ANONYMOUS {
                            cfg.insert(k.into(), v.into());
                        }
                    }
                    _ => {
                        cfg.insert(k.clone(), v.clone());
                    }
                }
            }
            if let Some(path) = cfg.get("credential_path") {
                let source = if from_env && !storage_options.contains_key("credential_path") {
                    "GOOGLE_APPLICATION_CREDENTIALS"
                } else {
                    "storage option credential_path"
                };
                check_gcs_credential_file(path, source)?;
            }
        }
        Backend::Azblob => {
            let from_env = [
                (
                    "account_name",
                    &["AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_ACCOUNT_NAME"][..],
                ),
                (
                    "account_key",
                    &["AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY"][..],
                ),
                ("sas_token", &["AZURE_STORAGE_SAS_TOKEN"][..]),
            ];
            for (key, vars) in from_env {
                if let Some(v) = vars.iter().find_map(|v| env(v)) {
                    cfg.insert(key.to_string(), v);
                }
            }
            if let Some(conn) = env("AZURE_STORAGE_CONNECTION_STRING") {
                for (k, v) in parse_connection_string(&conn, "AZURE_STORAGE_CONNECTION_STRING")? {
                    cfg.insert(k, v);
                }
            }
            cfg.insert("container".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            // A connection string first, so that keys given beside it win.
            if let Some(conn) = storage_options.get("connection_string") {
                for (k, v) in parse_connection_string(conn, "storage option connection_string")? {
                    cfg.insert(k, v);
                }
            }
            for (k, v) in user {
                match k.as_str() {
                    "connection_string" => {}
                    "endpoint_url" => {
                        cfg.insert("endpoint".into(), v.trim_end_matches('/').to_string());
                    }
                    "account_host" => {
                        cfg.insert(
                            "endpoint".into(),
                            format!("https://{}", v.trim_end_matches('/')),
                        );
                    }
                    _ => {
                        cfg.insert(k.clone(), v.clone());
                    }
                }
            }
            if !cfg.contains_key("endpoint") {
                if let Some(a) = cfg.get("account_name").cloned() {
                    cfg.insert(
                        "endpoint".into(),
                        format!("https://{a}.blob.core.windows.net"),
                    );
                }
            }
        }
        Backend::Local => {
            cfg.insert("root".into(), t.prefix.clone());
            // Writes go to a temporary file that is fsynced and renamed into
            // place on close: nothing is visible under a name until complete,
            // and `abort` removes the temporary file.
            let tmp = format!("{}/.dcp-opendal-tmp", t.prefix.trim_end_matches('/'));
            cfg.insert("atomic_write_dir".into(), tmp);
        }
        // Memory, and any backend dcp-core adds later (refused by
        // `build_operator`): no service settings.
        _ => {
            cfg.insert("root".into(), root_of(&t.prefix));
        }
    }
    Ok(cfg)
}

/// The endpoint the configuration talks to, for messages.
pub(crate) fn endpoint_of(t: &Target, cfg: &HashMap<String, String>) -> String {
    match t.scheme {
        Backend::S3 => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "https://s3.amazonaws.com (default)".into()),
        Backend::Gcs => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "https://storage.googleapis.com (default)".into()),
        Backend::Azblob => cfg.get("endpoint").cloned().unwrap_or_else(|| {
            "(no endpoint: set AZURE_STORAGE_ACCOUNT, AZURE_STORAGE_CONNECTION_STRING, \
                 or account_name or endpoint in storage_options)"
                .into()
        }),
        Backend::Local => "local file system".into(),
        _ => "process memory".into(),
    }
}

/// Memory stores by name: `memory://name` means the same store everywhere
/// in the process (as in fsspec), so a writer and a reader opened from the
/// same URL see the same objects.
fn memory_store(name: &str) -> Result<Operator> {
    static STORES: OnceLock<Mutex<HashMap<String, Operator>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(op) = stores.get(name) {
        return Ok(op.clone());
    }
    let op = Operator::new(opendal::services::Memory::default())
        .map_err(|e| Error::invalid(format!("memory://{name}: {e}")))?;
    stores.insert(name.to_string(), op.clone());
    Ok(op)
}

/// Build the operator for `t` with the service configuration `cfg`.
pub(crate) fn build_operator(t: &Target, cfg: HashMap<String, String>) -> Result<Operator> {
    let built = match t.scheme {
        Backend::Memory => {
            // The store is shared per name; the prefix is a layer of paths
            // inside it, handled by `OpendalFs` (the memory service's own
            // root would give each prefix a separate map).
            return memory_store(&t.bucket);
        }
        Backend::Local => Operator::from_iter::<opendal::services::Fs>(cfg),
        #[cfg(feature = "s3")]
        Backend::S3 => Operator::from_iter::<opendal::services::S3>(cfg),
        #[cfg(feature = "gcs")]
        Backend::Gcs => Operator::from_iter::<opendal::services::Gcs>(cfg),
        #[cfg(feature = "azblob")]
        Backend::Azblob => Operator::from_iter::<opendal::services::Azblob>(cfg),
        #[allow(unreachable_patterns)]
        _ => {
            return Err(Error::unsupported(format!(
                "{}: this build of dcp-fsspec lacks the feature for it",
                t.url
            )))
        }
    };
    built.map_err(|e| {
        Error::new(
            dcp_core::ErrorKind::InvalidInput,
            format!("cannot configure storage for {}: {e}", t.url),
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "s3")]
    #[test]
    fn s3_urls() {
        let t = parse_url("s3://bkt/a/b/").unwrap();
        assert_eq!(t.scheme, Backend::S3);
        assert_eq!(t.bucket, "bkt");
        assert_eq!(t.prefix, "a/b");
        assert_eq!(t.url, "s3://bkt/a/b");
        let t = parse_url("s3://bkt").unwrap();
        assert_eq!(t.prefix, "");
        assert_eq!(
            parse_url("s3:///p").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
        assert_eq!(
            parse_url("s3://b/../p").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn urls() {
        let t = parse_url("file:///tmp/x/").unwrap();
        assert_eq!((t.scheme, t.prefix.as_str()), (Backend::Local, "/tmp/x"));
        let t = parse_url("memory://m/p").unwrap();
        assert_eq!((t.scheme, t.bucket.as_str()), (Backend::Memory, "m"));
        assert_eq!(
            parse_url("ftp://x/y").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
        assert_eq!(
            parse_url("memory://m/../p").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
        assert_eq!(
            parse_url("file://rel/path").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
        #[cfg(not(feature = "s3"))]
        {
            let e = parse_url("s3://b/p").unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::Unsupported);
            assert!(e.message().contains("`s3` feature"), "{e}");
        }
        #[cfg(not(feature = "gcs"))]
        {
            let e = parse_url("gs://b/p").unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::Unsupported);
            assert!(e.message().contains("`gcs` feature"), "{e}");
        }
    }

    #[cfg(feature = "s3")]
    #[test]
    fn storage_options_override_env() {
        let t = parse_url("s3://b/p").unwrap();
        let env = |k: &str| match k {
            "AWS_ENDPOINT_URL" => Some("http://env:1".to_string()),
            "AWS_REGION" => Some("eu-west-1".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("envkey".to_string()),
            _ => None,
        };
        let opts: HashMap<String, String> = [
            ("endpoint_url".to_string(), "http://opt:2".to_string()),
            ("dcp_part_size".to_string(), "8MiB".to_string()),
        ]
        .into();
        let cfg = service_config(&t, &opts, &env).unwrap();
        assert_eq!(cfg["endpoint"], "http://opt:2");
        assert_eq!(cfg["region"], "eu-west-1");
        assert_eq!(cfg["access_key_id"], "envkey");
        assert_eq!(cfg["root"], "/p/");
        assert_eq!(cfg["bucket"], "b");
        assert!(!cfg.contains_key("dcp_part_size"));
        let cfg = service_config(&t, &HashMap::new(), &|_| None).unwrap();
        assert_eq!(cfg["region"], "us-east-1");
        assert!(!cfg.contains_key("endpoint"));
    }

    /// S3 uploads carry CRC-32C checksums unless the storage options or
    /// `AWS_REQUEST_CHECKSUM_CALCULATION=when_required` say otherwise; the
    /// storage options win over the variable; another value of the variable
    /// is refused naming it; GCS and Azure are untouched.
    #[cfg(feature = "s3")]
    #[test]
    fn s3_upload_checksums_default_to_crc32c() {
        let t = parse_url("s3://b/p").unwrap();
        let so = |v: &str| -> HashMap<String, String> {
            [("checksum_algorithm".to_string(), v.to_string())].into()
        };
        let with = |var: Option<&'static str>| {
            move |k: &str| {
                (k == AWS_CHECKSUM_ENV)
                    .then(|| var.map(str::to_string))
                    .flatten()
            }
        };
        let algo = |opts: &HashMap<String, String>, var: Option<&'static str>| {
            service_config(&t, opts, &with(var))
                .unwrap()
                .get("checksum_algorithm")
                .cloned()
        };
        let none = HashMap::new();
        assert_eq!(algo(&none, None).as_deref(), Some("crc32c"));
        assert_eq!(
            algo(&none, Some("WHEN_SUPPORTED")).as_deref(),
            Some("crc32c")
        );
        assert_eq!(algo(&none, Some("when_required")), None);
        assert_eq!(algo(&none, Some(" When_Required ")), None);
        assert_eq!(algo(&so("none"), None), None);
        assert_eq!(algo(&so("NONE"), Some("when_supported")), None);
        assert_eq!(algo(&so(""), None), None);
        assert_eq!(
            algo(&so("CRC32C"), Some("when_required")).as_deref(),
            Some("crc32c")
        );
        assert_eq!(algo(&so("md5"), None).as_deref(), Some("md5"));
        let e = service_config(&t, &none, &with(Some("always"))).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
        assert!(
            e.message().contains("AWS_REQUEST_CHECKSUM_CALCULATION"),
            "{e}"
        );
        assert!(e.message().contains("\"always\""), "{e}");
        // OpenDAL refuses an algorithm it does not know, naming it.
        let e =
            build_operator(&t, service_config(&t, &so("sha1"), &|_| None).unwrap()).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("sha1"), "{e}");
        #[cfg(feature = "gcs")]
        {
            let g = parse_url("gs://b/p").unwrap();
            let cfg = service_config(&g, &HashMap::new(), &|_| None).unwrap();
            assert!(!cfg.contains_key("checksum_algorithm"));
        }
    }

    #[test]
    fn unknown_storage_options_are_refused() {
        let opts =
            |k: &str| -> HashMap<String, String> { [(k.to_string(), "1".to_string())].into() };
        let t = parse_url("memory://m/p").unwrap();
        check_keys(&t, &opts("dcp_part_size")).unwrap();
        let e = check_keys(&t, &opts("foo")).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
        assert!(
            e.message()
                .starts_with("unknown storage option \"foo\" for memory://m/p; accepted: "),
            "{e}"
        );
        assert!(e.message().contains("dcp_read_chunk"), "{e}");
        // file:// takes the dcp keys only: dcp sets the fs service's root.
        let t = parse_url("file:///tmp/x").unwrap();
        let e = check_keys(&t, &opts("root")).unwrap_err();
        assert!(
            e.message().contains("unknown storage option \"root\""),
            "{e}"
        );
        check_keys(&t, &opts("dcp_timeout_ms")).unwrap();
    }

    #[cfg(feature = "s3")]
    #[test]
    fn s3_storage_options() {
        let t = parse_url("s3://b/p").unwrap();
        let keys = accepted_keys(Backend::S3);
        // dcp's own keys, s3fs spellings, OpenDAL's fields and their aliases.
        for k in [
            "dcp_part_size",
            "endpoint_url",
            "key",
            "endpoint",
            "access_key_id",
            "region",
            "role_arn",
            "enable_virtual_host_style",
            "aws_session_token",
        ] {
            assert!(keys.contains(&k), "{k}: {keys:?}");
            check_keys(&t, &[(k.to_string(), "x".to_string())].into()).unwrap();
        }
        let e = check_keys(&t, &[("endpiont".to_string(), "x".to_string())].into()).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
        let m = e.message();
        assert!(
            m.starts_with("unknown storage option \"endpiont\" for s3://b/p; accepted: "),
            "{m}"
        );
        assert!(
            m.contains("endpoint_url") && m.contains("secret_access_key"),
            "{m}"
        );
        for k in ["bucket", "root", "aws_bucket"] {
            let e = check_keys(&t, &[(k.to_string(), "x".to_string())].into()).unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
            assert!(e.message().contains("the URL sets it"), "{e}");
        }
    }

    #[cfg(feature = "gcs")]
    #[test]
    fn gcs_storage_options() {
        let keys = accepted_keys(Backend::Gcs);
        for k in ["credential", "credential_path", "endpoint", "dcp_part_size"] {
            assert!(keys.contains(&k), "{k}: {keys:?}");
        }
        assert!(!keys.contains(&"bucket") && !keys.contains(&"access_key_id"));
    }

    #[cfg(feature = "azblob")]
    #[test]
    fn azblob_storage_options() {
        let keys = accepted_keys(Backend::Azblob);
        for k in ["account_name", "account_key", "sas_token", "endpoint"] {
            assert!(keys.contains(&k), "{k}: {keys:?}");
        }
        assert!(!keys.contains(&"container") && !keys.contains(&"root"));
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    /// s3fs's nested `client_kwargs`, flattened or as JSON, becomes the plain
    /// key; conflicts, unknown nested keys and non-objects are refused.
    #[cfg(feature = "s3")]
    #[test]
    fn client_kwargs_flattened_or_json() {
        let t = parse_url("s3://b/p").unwrap();
        for opts in [
            map(&[
                ("client_kwargs.endpoint_url", "http://h:1"),
                ("client_kwargs.region_name", "eu-1"),
            ]),
            map(&[(
                "client_kwargs",
                r#"{"endpoint_url": "http://h:1", "region_name": "eu-1"}"#,
            )]),
            map(&[
                ("client_kwargs", r#"{"endpoint_url": "http://h:1"}"#),
                ("region_name", "eu-1"),
            ]),
            // The same value twice is no conflict.
            map(&[
                ("client_kwargs.endpoint_url", "http://h:1"),
                ("endpoint_url", "http://h:1"),
                ("region", "eu-1"),
            ]),
        ] {
            check_keys(&t, &opts).unwrap();
            let cfg = service_config(&t, &opts, &|_| None).unwrap();
            assert_eq!(cfg["endpoint"], "http://h:1", "{opts:?}");
            assert_eq!(cfg["region"], "eu-1", "{opts:?}");
            assert!(!cfg.keys().any(|k| k.contains("client_kwargs")), "{cfg:?}");
        }
        let cases = [
            (
                map(&[("client_kwargs", "{'endpoint_url': 'x'}")]),
                "not a JSON object",
            ),
            (map(&[("client_kwargs", "[1]")]), "not a JSON object"),
            (
                map(&[("client_kwargs", r#"{"endpoint_url": 5}"#)]),
                "client_kwargs.endpoint_url",
            ),
            (
                map(&[("client_kwargs.verify", "false")]),
                "unknown key \"verify\" in storage option client_kwargs",
            ),
            // What Python sends for client_kwargs={"verify": False}: the
            // unknown key is named, not its type.
            (
                map(&[("client_kwargs", r#"{"verify": false}"#)]),
                "unknown key \"verify\" in storage option client_kwargs",
            ),
            (
                map(&[
                    ("client_kwargs.endpoint_url", "http://a"),
                    ("endpoint_url", "http://b"),
                ]),
                "given twice",
            ),
        ];
        for (opts, want) in cases {
            let e = check_keys(&t, &opts).unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput, "{opts:?}");
            assert!(e.message().contains(want), "{opts:?}: {e}");
            assert!(service_config(&t, &opts, &|_| None).is_err());
        }
        // Memory takes no client_kwargs at all.
        let t = parse_url("memory://m/p").unwrap();
        let e = check_keys(&t, &map(&[("client_kwargs.endpoint_url", "x")])).unwrap_err();
        assert!(e.message().contains("accepted there: none"), "{e}");
    }

    #[cfg(feature = "gcs")]
    #[test]
    fn gcs_settings_from_the_environment_and_options() {
        let t = parse_url("gs://bkt/a/b").unwrap();
        // The emulator: its endpoint, and no credentials looked for.
        for (host, want) in [
            ("127.0.0.1:4443", "http://127.0.0.1:4443"),
            ("http://h:9/", "http://h:9"),
        ] {
            let env = move |k: &str| (k == "STORAGE_EMULATOR_HOST").then(|| host.to_string());
            let cfg = service_config(&t, &HashMap::new(), &env).unwrap();
            assert_eq!(cfg["endpoint"], want);
            assert_eq!(cfg["allow_anonymous"], "true");
            assert_eq!(cfg["disable_vm_metadata"], "true");
            assert_eq!(cfg["disable_config_load"], "true");
            assert_eq!(
                (cfg["bucket"].as_str(), cfg["root"].as_str()),
                ("bkt", "/a/b/")
            );
            build_operator(&t, cfg).unwrap();
        }
        // A credential file from GOOGLE_APPLICATION_CREDENTIALS (not with an
        // emulator, which takes none).
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.json");
        std::fs::write(
            &key,
            br#"{"type": "service_account", "client_email": "x@y"}"#,
        )
        .unwrap();
        let key = key.to_str().unwrap().to_string();
        let k2 = key.clone();
        let creds = move |k: &str| (k == "GOOGLE_APPLICATION_CREDENTIALS").then(|| k2.clone());
        let cfg = service_config(&t, &HashMap::new(), &creds).unwrap();
        assert_eq!(cfg["credential_path"], key);
        assert!(!cfg.contains_key("endpoint") && !cfg.contains_key("allow_anonymous"));
        let k3 = key.clone();
        let both = move |k: &str| match k {
            "GOOGLE_APPLICATION_CREDENTIALS" => Some(k3.clone()),
            "STORAGE_EMULATOR_HOST" => Some("e:1".to_string()),
            _ => None,
        };
        assert!(!service_config(&t, &HashMap::new(), &both)
            .unwrap()
            .contains_key("credential_path"));
        // storage_options win; gcsfs's spellings.
        let opts = map(&[("endpoint_url", "http://opt:2"), ("credential_path", &key)]);
        check_keys(&t, &opts).unwrap();
        let cfg = service_config(&t, &opts, &both).unwrap();
        assert_eq!(
            (cfg["endpoint"].as_str(), cfg["credential_path"].as_str()),
            ("http://opt:2", key.as_str())
        );
        // A credential file that cannot be used is refused up front, naming it.
        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, b"{ not json").unwrap();
        let garbage = garbage.to_str().unwrap().to_string();
        let no_type = dir.path().join("no-type.json");
        std::fs::write(&no_type, b"{}").unwrap();
        let no_type = no_type.to_str().unwrap().to_string();
        for (path, want) in [
            ("/no/such/key.json", "cannot read it"),
            (garbage.as_str(), "not JSON"),
            (no_type.as_str(), "no \"type\" field"),
        ] {
            let p = path.to_string();
            let env = move |k: &str| (k == "GOOGLE_APPLICATION_CREDENTIALS").then(|| p.clone());
            let e = service_config(&t, &HashMap::new(), &env).unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
            assert!(
                e.message()
                    .starts_with(&format!("GOOGLE_APPLICATION_CREDENTIALS={path:?}: {want}")),
                "{e}"
            );
            let e = service_config(&t, &map(&[("credential_path", path)]), &|_| None).unwrap_err();
            assert!(
                e.message()
                    .starts_with(&format!("storage option credential_path={path:?}: {want}")),
                "{e}"
            );
        }
        let opts = map(&[
            ("token", "anon"),
            ("client_kwargs", r#"{"endpoint_url":"http://kw:3"}"#),
        ]);
        check_keys(&t, &opts).unwrap();
        let cfg = service_config(&t, &opts, &|_| None).unwrap();
        assert_eq!(cfg["endpoint"], "http://kw:3");
        assert_eq!(cfg["allow_anonymous"], "true");
        assert!(!cfg.contains_key("token"));
        // Any other token is OpenDAL's OAuth access token.
        let cfg = service_config(&t, &map(&[("token", "ya29.x")]), &|_| None).unwrap();
        assert_eq!(cfg["token"], "ya29.x");
        assert_eq!(
            endpoint_of(&t, &HashMap::new()),
            "https://storage.googleapis.com (default)"
        );
    }

    #[test]
    fn connection_strings() {
        let got = |c: &str| -> HashMap<String, String> {
            parse_connection_string(c, "test")
                .unwrap()
                .into_iter()
                .collect()
        };
        let c = got(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5==;\
                     BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1/;QueueEndpoint=http://q;",
        );
        assert_eq!(c["endpoint"], "http://127.0.0.1:10000/devstoreaccount1");
        assert_eq!(c["account_name"], "devstoreaccount1");
        assert_eq!(c["account_key"], "a2V5==", "a value keeps its '='");
        assert_eq!(c.len(), 3);
        let c = got("AccountName=acct;AccountKey=k;EndpointSuffix=core.chinacloudapi.cn");
        assert_eq!(c["endpoint"], "https://acct.blob.core.chinacloudapi.cn");
        let c = got("accountname=acct; sharedaccesssignature=sv=2021&sig=x ;");
        assert_eq!(c["endpoint"], "https://acct.blob.core.windows.net");
        assert_eq!(c["sas_token"], "sv=2021&sig=x");
        assert!(!c.contains_key("account_key"));
        let c = got("UseDevelopmentStorage=true");
        assert_eq!(c["endpoint"], "http://127.0.0.1:10000/devstoreaccount1");
        assert_eq!(c["account_name"], "devstoreaccount1");
        assert_eq!(c["account_key"], AZURITE_KEY);
        for (bad, want) in [
            ("AccountName=a;garbage", "\"garbage\" is not Key=Value"),
            ("AccountKey=k", "neither AccountName nor BlobEndpoint"),
            ("", "neither AccountName nor BlobEndpoint"),
        ] {
            let e = parse_connection_string(bad, "AZURE_STORAGE_CONNECTION_STRING").unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
            assert!(
                e.message().starts_with("AZURE_STORAGE_CONNECTION_STRING: "),
                "{e}"
            );
            assert!(e.message().contains(want), "{bad:?}: {e}");
        }
    }

    #[cfg(feature = "azblob")]
    #[test]
    fn azblob_settings_from_the_environment_and_options() {
        let t = parse_url("azblob://cont/a").unwrap();
        // Account and key: the default public endpoint.
        let env = env_of(&[
            ("AZURE_STORAGE_ACCOUNT", "acct"),
            ("AZURE_STORAGE_KEY", "a2V5"),
        ]);
        let cfg = service_config(&t, &HashMap::new(), &env).unwrap();
        assert_eq!(cfg["account_name"], "acct");
        assert_eq!(cfg["account_key"], "a2V5");
        assert_eq!(cfg["endpoint"], "https://acct.blob.core.windows.net");
        assert_eq!(
            (cfg["container"].as_str(), cfg["root"].as_str()),
            ("cont", "/a/")
        );
        build_operator(&t, cfg).unwrap();
        // The longer names reqsign reads work too.
        let env2 = env_of(&[
            ("AZURE_STORAGE_ACCOUNT_NAME", "a2"),
            ("AZURE_STORAGE_ACCOUNT_KEY", "k2"),
        ]);
        let cfg = service_config(&t, &HashMap::new(), &env2).unwrap();
        assert_eq!(
            (cfg["account_name"].as_str(), cfg["account_key"].as_str()),
            ("a2", "k2")
        );
        // A connection string wins over account and key (as in the Azure CLI).
        let env = env_of(&[
            ("AZURE_STORAGE_ACCOUNT", "acct"),
            ("AZURE_STORAGE_KEY", "a2V5"),
            ("AZURE_STORAGE_CONNECTION_STRING", "AccountName=devstoreaccount1;AccountKey=ZGV2;BlobEndpoint=http://127.0.0.1:1/devstoreaccount1"),
        ]);
        let cfg = service_config(&t, &HashMap::new(), &env).unwrap();
        assert_eq!(cfg["account_name"], "devstoreaccount1");
        assert_eq!(cfg["account_key"], "ZGV2");
        assert_eq!(cfg["endpoint"], "http://127.0.0.1:1/devstoreaccount1");
        // storage_options win over both; adlfs's spellings.
        let opts = map(&[
            ("account_name", "o"),
            ("account_host", "o.blob.core.windows.net"),
        ]);
        check_keys(&t, &opts).unwrap();
        let cfg = service_config(&t, &opts, &env).unwrap();
        assert_eq!(cfg["account_name"], "o");
        assert_eq!(cfg["endpoint"], "https://o.blob.core.windows.net");
        let opts = map(&[
            ("connection_string", "UseDevelopmentStorage=true"),
            (
                "client_kwargs.endpoint_url",
                "http://127.0.0.1:7/devstoreaccount1",
            ),
        ]);
        check_keys(&t, &opts).unwrap();
        let cfg = service_config(&t, &opts, &env).unwrap();
        assert_eq!(cfg["endpoint"], "http://127.0.0.1:7/devstoreaccount1");
        assert_eq!(cfg["account_key"], AZURITE_KEY);
        assert!(!cfg.contains_key("connection_string"));
        // A malformed connection string names where it came from.
        let bad = env_of(&[("AZURE_STORAGE_CONNECTION_STRING", "nonsense")]);
        let e = service_config(&t, &HashMap::new(), &bad).unwrap_err();
        assert!(
            e.message().starts_with("AZURE_STORAGE_CONNECTION_STRING: "),
            "{e}"
        );
        let e = service_config(&t, &map(&[("connection_string", "x")]), &|_| None).unwrap_err();
        assert!(
            e.message()
                .starts_with("storage option connection_string: "),
            "{e}"
        );
        // Nothing at all: the message says what to set.
        let cfg = service_config(&t, &HashMap::new(), &|_| None).unwrap();
        assert!(!cfg.contains_key("endpoint"));
        assert!(endpoint_of(&t, &cfg).contains("AZURE_STORAGE_CONNECTION_STRING"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("k", "5MiB").unwrap(), 5 << 20);
        assert_eq!(parse_size("k", "123").unwrap(), 123);
        assert_eq!(parse_size("k", "2 K").unwrap(), 2048);
        parse_size("k", "lots").unwrap_err();
        parse_size("k", "99999999999999999999GiB").unwrap_err();
    }
}
