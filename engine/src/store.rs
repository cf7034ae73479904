//! Object stores from paths and URLs.
//!
//! * a plain path or `file:///abs/path`: the local file system;
//! * `s3://bucket/prefix`: Amazon S3 or any S3-compatible endpoint, configured by
//!   [`S3Config`] and the standard `AWS_*` environment variables.

use std::path::Path as FsPath;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use url::Url;

/// S3 connection settings; unset fields come from the environment (`AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL, for S3-compatible stores (e.g. `http://127.0.0.1:5000`).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Allow plain HTTP endpoints.
    pub allow_http: bool,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
}

/// Errors resolving a location.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The location is not a path or a supported URL.
    #[error("`{location}`: {reason}")]
    BadLocation {
        /// What was given.
        location: String,
        /// Why it is not usable.
        reason: String,
    },
    /// The store could not be built.
    #[error("`{location}`: {source}")]
    Store {
        /// What was given.
        location: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
}

/// A store and a path inside it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The path in the store (a prefix for directories).
    pub path: Path,
    /// The URL this location was resolved from, for messages and DataFusion registration.
    pub url: Url,
    /// The same store when it is the local file system (see [`Location::local_file`]).
    local: Option<Arc<LocalFileSystem>>,
}

impl Location {
    /// Resolves a path or URL. Local directories are created when `create` is set.
    pub fn parse(location: &str, s3: &S3Config, create: bool) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadLocation {
            location: location.to_string(),
            reason,
        };
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket in s3:// URL".into()));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(e) = &s3.endpoint {
                builder = builder.with_endpoint(e);
            }
            if let Some(r) = &s3.region {
                builder = builder.with_region(r);
            }
            if s3.allow_http {
                builder = builder.with_allow_http(true);
            }
            if let Some(k) = &s3.access_key_id {
                builder = builder.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret_access_key {
                builder = builder.with_secret_access_key(k);
            }
            let store = builder.build().map_err(|source| StoreError::Store {
                location: location.to_string(),
                source,
            })?;
            let url = Url::parse(&format!("s3://{bucket}/")).map_err(|e| bad(e.to_string()))?;
            return Ok(Self {
                store: Arc::new(store),
                path: Path::from(prefix.trim_end_matches('/')),
                url,
                local: None,
            });
        }
        let local = match location.strip_prefix("file://") {
            Some(p) => p.to_string(),
            None if location.contains("://") => {
                return Err(bad("supported schemes are file:// and s3://".into()));
            }
            None => location.to_string(),
        };
        let local = FsPath::new(&local);
        if create && !local.exists() {
            std::fs::create_dir_all(local).map_err(|e| bad(e.to_string()))?;
        }
        let absolute = std::fs::canonicalize(local)
            .or_else(|_| std::path::absolute(local))
            .map_err(|e| bad(e.to_string()))?;
        let path = Path::from_absolute_path(&absolute).map_err(|e| bad(e.to_string()))?;
        let url = Url::from_directory_path("/").map_err(|_| bad("invalid root".into()))?;
        let local = Arc::new(LocalFileSystem::new());
        Ok(Self {
            store: Arc::clone(&local) as Arc<dyn ObjectStore>,
            path,
            url,
            local: Some(local),
        })
    }

    /// A location in any store, addressed only through object_store (never as local
    /// files, even for a [`LocalFileSystem`]).
    pub fn from_store(store: Arc<dyn ObjectStore>, path: Path, url: Url) -> Self {
        Self {
            store,
            path,
            url,
            local: None,
        }
    }

    /// `path` joined with a relative `child` (`/`-separated).
    pub fn child(&self, child: &str) -> Path {
        let mut p = self.path.clone();
        for part in child.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    /// The location of a folder below this one.
    pub fn sub(&self, child: &str) -> Location {
        Location {
            store: Arc::clone(&self.store),
            path: self.child(child),
            url: self.url.clone(),
            local: self.local.clone(),
        }
    }

    /// For a location on the local file system, the path on disk of `path`, a path of
    /// its store; `None` for other stores.
    pub fn local_path(&self, path: &Path) -> Option<std::path::PathBuf> {
        self.local.as_ref()?.path_to_filesystem(path).ok()
    }

    /// [`Location::local_path`] of `child` (see [`Location::child`]).
    pub fn local_file(&self, child: &str) -> Option<std::path::PathBuf> {
        self.local_path(&self.child(child))
    }

    /// A human-readable form.
    pub fn display(&self) -> String {
        if self.url.scheme() == "file" {
            format!("/{}", self.path)
        } else {
            format!("{}{}", self.url, self.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_file_urls_and_s3_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let plain =
            Location::parse(dir.path().to_str().unwrap(), &S3Config::default(), false).unwrap();
        let url = format!("file://{}", dir.path().display());
        let file = Location::parse(&url, &S3Config::default(), false).unwrap();
        assert_eq!(plain.path, file.path);
        assert_eq!(plain.url.scheme(), "file");
        assert_eq!(
            plain.child("a/b.parquet").as_ref(),
            format!("{}/a/b.parquet", plain.path)
        );

        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            plain.sub("x").local_file("a/b.parquet"),
            Some(canonical.join("x/a/b.parquet"))
        );
        // A directory name with `=`, a space and a `%` maps to itself.
        let odd = canonical.join("date=1 %2");
        std::fs::create_dir(&odd).unwrap();
        let in_odd = Location::parse(odd.to_str().unwrap(), &S3Config::default(), false).unwrap();
        assert_eq!(in_odd.local_file("f.parquet"), Some(odd.join("f.parquet")));

        let created = dir.path().join("new/log");
        Location::parse(created.to_str().unwrap(), &S3Config::default(), true).unwrap();
        assert!(created.is_dir());

        let s3 = S3Config {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            allow_http: true,
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
        };
        let remote = Location::parse("s3://bucket/some/prefix/", &s3, false).unwrap();
        assert_eq!(remote.url.as_str(), "s3://bucket/");
        assert_eq!(remote.path.as_ref(), "some/prefix");
        assert_eq!(remote.display(), "s3://bucket/some/prefix");
        assert_eq!(remote.local_file("a.parquet"), None);

        for bad in ["s3:///x", "gs://bucket/x", "http://host/x"] {
            assert!(Location::parse(bad, &s3, false).is_err(), "{bad}");
        }
    }
}
