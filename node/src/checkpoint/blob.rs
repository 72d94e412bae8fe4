//! Blob storage from a URL, through object_store.
//!
//! | URL | backend |
//! | --- | --- |
//! | `file:///abs/path` or a plain path | local files (created if missing) |
//! | `memory://` | in memory (tests) |
//! | `s3://bucket/prefix` | S3 or an S3-compatible server; settings from [`S3Options`] and the usual `AWS_*` environment variables |
//! | `gs://bucket/prefix` | Google Cloud Storage (`GOOGLE_*` environment variables) |
//! | `az://container/prefix` | Azure Blob Storage (`AZURE_*` environment variables) |

use std::path::Path;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

/// A blob store that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The URL is not one of the supported forms.
    #[error("blob URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What was expected.
        reason: String,
    },
    /// The backend refused its configuration.
    #[error("blob store {url:?}: {}", crate::error::error_chain(source))]
    Backend {
        /// The URL.
        url: String,
        /// Why.
        source: object_store::Error,
    },
}

/// S3 settings that override the environment (`AWS_ENDPOINT`, `AWS_REGION`, …).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Options {
    /// Endpoint of an S3-compatible server, e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Region (S3-compatible servers usually accept any).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain HTTP endpoints.
    pub allow_http: bool,
}

/// An opened blob store: the store and the key prefix everything lives under.
#[derive(Clone)]
pub struct Blob {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside it.
    pub prefix: ObjectPath,
    /// The URL it was opened from (for messages).
    pub url: String,
    /// How a write is durable when it returns: `fsync`, `no-fsync` (local files), `backend`
    /// (S3, GCS, Azure) or `none` (memory).
    pub durability: &'static str,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({})", self.url)
    }
}

fn split_bucket(url: &str, rest: &str) -> Result<(String, ObjectPath), BlobError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(BlobError::Url {
            url: url.into(),
            reason: "expected a bucket name after the scheme, as in s3://bucket/prefix".into(),
        });
    }
    Ok((
        bucket.to_string(),
        ObjectPath::from(prefix.trim_matches('/')),
    ))
}

/// Requests give up after a few quick retries: the epoch coordinator retries failed epochs
/// itself (and reports them), so a blob store outage shows within seconds, not minutes.
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(20),
            max_backoff: std::time::Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(10),
    }
}

/// The HTTP client's options: 10 s per request, 2 s to connect, then what the environment
/// sets with `prefix` (`AWS_ALLOW_HTTP`, `AWS_PROXY_URL`, `GOOGLE_TIMEOUT`, …), which the
/// builders' `from_env` reads but `with_client_options` would replace.
fn client_options(prefix: &str) -> object_store::ClientOptions {
    let mut o = object_store::ClientOptions::new()
        .with_timeout(std::time::Duration::from_secs(10))
        .with_connect_timeout(std::time::Duration::from_secs(2));
    // `vars_os`: a variable that is not Unicode (anyone's) must not stop the node.
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        let k = k.to_ascii_lowercase();
        if let Some(key) = k
            .strip_prefix(prefix)
            .and_then(|k| k.parse::<object_store::ClientConfigKey>().ok())
        {
            o = o.with_config(key, v);
        }
    }
    o
}

/// Opens the blob store named by `url`. `fsync`: local files (and the directory entries that
/// name them) are on stable storage before a write returns (see `[checkpoint] fsync`); the
/// other backends' writes are durable when they return.
pub fn open(url: &str, s3: &S3Options, fsync: bool) -> Result<Blob, BlobError> {
    let backend = |source| BlobError::Backend {
        url: url.to_string(),
        source,
    };
    let blob = |store: Arc<dyn ObjectStore>, prefix| Blob {
        store,
        prefix,
        url: url.into(),
        durability: "backend",
    };
    if url == "memory://" || url == "memory:" {
        return Ok(Blob {
            durability: "none",
            ..blob(
                Arc::new(object_store::memory::InMemory::new()),
                ObjectPath::default(),
            )
        });
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = split_bucket(url, rest)?;
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry_config())
            .with_client_options(client_options("aws_"));
        if let Some(e) = &s3.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &s3.region {
            b = b.with_region(r);
        }
        if let Some(k) = &s3.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &s3.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        if s3.allow_http {
            b = b.with_allow_http(true);
        }
        // Create-only puts (the manifest) use S3's conditional writes (If-None-Match).
        b = b.with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch);
        return Ok(blob(Arc::new(b.build().map_err(backend)?), prefix));
    }
    if let Some(rest) = url.strip_prefix("gs://") {
        let (bucket, prefix) = split_bucket(url, rest)?;
        let b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry_config())
            .with_client_options(client_options("google_"));
        return Ok(blob(Arc::new(b.build().map_err(backend)?), prefix));
    }
    if let Some(rest) = url.strip_prefix("az://") {
        let (container, prefix) = split_bucket(url, rest)?;
        let b = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_container_name(container)
            .with_retry(retry_config())
            .with_client_options(client_options("azure_"));
        return Ok(blob(Arc::new(b.build().map_err(backend)?), prefix));
    }
    let path = match url.strip_prefix("file://") {
        Some(p) => p,
        None if !url.contains("://") => url,
        None => {
            return Err(BlobError::Url {
                url: url.into(),
                reason: "expected file://PATH, memory://, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX".into(),
            })
        }
    };
    let dir = Path::new(path);
    std::fs::create_dir_all(dir).map_err(|e| BlobError::Url {
        url: url.into(),
        reason: format!("cannot create directory {}: {e}", dir.display()),
    })?;
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
        .map_err(backend)?
        .with_fsync(fsync);
    Ok(Blob {
        durability: if fsync { "fsync" } else { "no-fsync" },
        ..blob(Arc::new(fs), ObjectPath::default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(open("memory://", &S3Options::default(), true).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let b = open(
            &format!("file://{}/cp", dir.path().display()),
            &S3Options::default(),
            true,
        )
        .unwrap();
        assert!(b.prefix.as_ref().is_empty());
        assert!(dir.path().join("cp").is_dir());
        let e = open("ftp://x", &S3Options::default(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected file://PATH"), "{e}");
        let e = open("s3://", &S3Options::default(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a bucket name"), "{e}");
        let b = open(
            "s3://bkt/some/prefix/",
            &S3Options {
                endpoint: Some("http://127.0.0.1:1".into()),
                region: Some("us-east-1".into()),
                allow_http: true,
                ..Default::default()
            },
            true,
        )
        .unwrap();
        assert_eq!(b.prefix.as_ref(), "some/prefix");
    }
}
