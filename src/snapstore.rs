//! Snapshot store: where a VM's memory snapshots go once QEMU has written them.
//!
//! One interface over [`object_store`]: a local directory by default, an
//! S3-compatible bucket when configured. Objects are zstd-compressed QEMU
//! migration files stored under [`snapshot_key`].
//!
//! Both directions stream: compression and decompression run in a blocking task
//! and exchange chunks with the async side over a bounded channel, so neither a
//! whole snapshot nor its compressed form is ever held in memory.
//!
//! Atomicity: a reader never sees a partial object under a key. On S3 the object
//! appears only when the multipart upload completes. The local store writes
//! `<key>#<n>` beside the target and renames it into place on completion (with
//! fsync of the file and its directory); a failed upload removes that staging
//! file, a crash may leave it behind, but never a file at `<key>` itself, and
//! [`SnapStore::delete_prefix`] sweeps such leftovers.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::sync::mpsc;

/// zstd level: fast, and still shrinks the zero pages of guest memory to almost nothing.
const ZSTD_LEVEL: i32 = 3;
/// Size of the chunks handed from the compressor to the uploader.
const CHUNK: usize = 4 << 20;
/// Multipart part size (S3 wants ≥ 5 MiB for every part but the last).
const PART_SIZE: usize = 8 << 20;
/// Parts in flight at once during an upload.
const MAX_PARTS_IN_FLIGHT: usize = 4;
/// Chunks buffered between the async and blocking halves.
const CHANNEL_DEPTH: usize = 4;

/// Where snapshots are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapStoreConfig {
    /// Local root used when `s3` is None (e.g. $HATCH_DATA_DIR/snapshots-store).
    pub local_root: PathBuf,
    pub s3: Option<S3Config>,
}

/// An S3 or S3-compatible bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Set for S3-compatible servers: path-style requests, `http://` allowed.
    pub endpoint: Option<String>,
    pub region: String,
    /// Static credentials; when unset the usual AWS environment variables,
    /// web identity or instance metadata are used.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapStoreError {
    #[error("snapshot store config: {0}")]
    Config(String),
    #[error("invalid snapshot key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("{op} {key}: not found")]
    NotFound { op: &'static str, key: String },
    #[error("{op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{op} {key}: {context}: {source}")]
    Io {
        op: &'static str,
        key: String,
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} {key}: worker task failed: {source}")]
    Task {
        op: &'static str,
        key: String,
        source: tokio::task::JoinError,
    },
}

impl SnapStoreError {
    /// True when the object asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SnapStoreError::NotFound { .. })
    }

    fn store(op: &'static str, key: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => SnapStoreError::NotFound {
                op,
                key: key.to_string(),
            },
            source => SnapStoreError::Store {
                op,
                key: key.to_string(),
                source,
            },
        }
    }

    fn io(op: &'static str, key: &str, context: impl Into<String>, source: io::Error) -> Self {
        SnapStoreError::Io {
            op,
            key: key.to_string(),
            context: context.into(),
            source,
        }
    }
}

/// `snapshots/<vm_id>/<snap_id>/memory.zst`
pub fn snapshot_key(vm_id: &str, snap_id: &str) -> String {
    format!("snapshots/{vm_id}/{snap_id}/memory.zst")
}

#[derive(Clone, Debug)]
enum Backend {
    Local(PathBuf),
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: String,
    },
}

/// A snapshot store; cheap to clone.
#[derive(Clone)]
pub struct SnapStore {
    store: Arc<dyn ObjectStore>,
    backend: Backend,
}

impl fmt::Debug for SnapStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapStore")
            .field("backend", &self.describe())
            .finish()
    }
}

impl SnapStore {
    /// Opens the store; for a local store, creates its root directory.
    pub fn new(cfg: &SnapStoreConfig) -> Result<SnapStore, SnapStoreError> {
        match &cfg.s3 {
            None => {
                let root = &cfg.local_root;
                std::fs::create_dir_all(root).map_err(|e| {
                    SnapStoreError::Config(format!("create {}: {e}", root.display()))
                })?;
                let fs = LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| SnapStoreError::Config(format!("{}: {e}", root.display())))?
                    .with_automatic_cleanup(true)
                    .with_fsync(true);
                let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
                Ok(SnapStore {
                    store: Arc::new(fs),
                    backend: Backend::Local(root),
                })
            }
            Some(s3) => {
                if s3.bucket.is_empty() {
                    return Err(SnapStoreError::Config("s3: empty bucket name".into()));
                }
                if s3.access_key.is_some() != s3.secret_key.is_some() {
                    return Err(SnapStoreError::Config(
                        "s3: set both access key and secret key, or neither".into(),
                    ));
                }
                // from_env: credentials (and their providers) come from the
                // environment unless given here; the explicit values win.
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region);
                if let Some(ep) = &s3.endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_virtual_hosted_style_request(false)
                        .with_allow_http(ep.starts_with("http://"));
                }
                if let (Some(ak), Some(sk)) = (&s3.access_key, &s3.secret_key) {
                    b = b.with_access_key_id(ak).with_secret_access_key(sk);
                }
                let store = b
                    .build()
                    .map_err(|e| SnapStoreError::Config(format!("s3 {}: {e}", s3.bucket)))?;
                Ok(SnapStore {
                    store: Arc::new(store),
                    backend: Backend::S3 {
                        bucket: s3.bucket.clone(),
                        endpoint: s3.endpoint.clone(),
                        region: s3.region.clone(),
                    },
                })
            }
        }
    }

    /// `local /path` or `s3 bucket (endpoint)`, for logs.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local(root) => format!("local {}", root.display()),
            Backend::S3 {
                bucket,
                endpoint: Some(ep),
                ..
            } => format!("s3 {bucket} ({ep})"),
            Backend::S3 {
                bucket,
                endpoint: None,
                region,
            } => format!("s3 {bucket} (aws {region})"),
        }
    }

    /// Compresses `raw` with zstd and stores it under `key`, streaming;
    /// returns the stored (compressed) size. Nothing appears under `key`
    /// unless the whole upload succeeds.
    pub async fn upload(&self, key: &str, raw: &Path) -> Result<u64, SnapStoreError> {
        const OP: &str = "upload";
        let path = parse_key(key)?;
        let file = tokio::fs::File::open(raw)
            .await
            .map_err(|e| SnapStoreError::io(OP, key, format!("open {}", raw.display()), e))?
            .into_std()
            .await;
        self.upload_reader(&path, key, io::BufReader::with_capacity(1 << 20, file))
            .await
    }

    /// Compresses what `reader` yields and stores it under `path` (the body of [`upload`]).
    async fn upload_reader<R>(
        &self,
        path: &ObjPath,
        key: &str,
        reader: R,
    ) -> Result<u64, SnapStoreError>
    where
        R: Read + Send + 'static,
    {
        const OP: &str = "upload";
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(|e| SnapStoreError::store(OP, key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);

        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let compress = tokio::task::spawn_blocking(move || compress(reader, tx));

        let mut sent: u64 = 0;
        let mut put_err = None;
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = writer.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await {
                put_err = Some(e);
                break;
            }
            sent += chunk.len() as u64;
            writer.put(chunk);
        }
        // Dropping the receiver makes a still-running compressor stop.
        drop(rx);
        let compressed = compress.await;

        let failure = match (put_err, compressed) {
            (Some(e), _) => Some(SnapStoreError::store(OP, key, e)),
            (None, Err(e)) => Some(SnapStoreError::Task {
                op: OP,
                key: key.to_string(),
                source: e,
            }),
            (None, Ok(Err(e))) => Some(SnapStoreError::io(OP, key, "compress", e)),
            (None, Ok(Ok(total))) if total != sent => Some(SnapStoreError::io(
                OP,
                key,
                "compress",
                io::Error::other(format!("compressor wrote {total} bytes, {sent} sent")),
            )),
            (None, Ok(Ok(_))) => None,
        };
        if let Some(err) = failure {
            if let Err(e) = writer.abort().await {
                tracing::warn!(key, error = %e, "abort of failed snapshot upload failed");
            }
            return Err(err);
        }
        writer
            .finish()
            .await
            .map_err(|e| SnapStoreError::store(OP, key, e))?;
        Ok(sent)
    }

    /// Fetches `key` and decompresses it to `dest` (via `dest.tmp`, fsynced and
    /// renamed into place); returns the decompressed size.
    pub async fn download(&self, key: &str, dest: &Path) -> Result<u64, SnapStoreError> {
        const OP: &str = "download";
        let path = parse_key(key)?;
        let got = self
            .store
            .get(&path)
            .await
            .map_err(|e| SnapStoreError::store(OP, key, e))?;
        let mut stream = got.into_stream();

        let tmp = tmp_path(dest);
        // Some(chunk)s, then None at the end of the object.
        let (tx, rx) = mpsc::channel::<io::Result<Option<Bytes>>>(CHANNEL_DEPTH);
        let (dest_b, tmp_b) = (dest.to_path_buf(), tmp.clone());
        let decompress = tokio::task::spawn_blocking(move || {
            let r = decompress_to(rx, &tmp_b, &dest_b);
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp_b);
            }
            r
        });

        let mut get_err = None;
        loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if tx.send(Ok(Some(chunk))).await.is_err() {
                        break; // the decompressor failed: its error says why
                    }
                }
                Some(Err(e)) => {
                    let msg = e.to_string();
                    get_err = Some(e);
                    let _ = tx.send(Err(io::Error::other(msg))).await;
                    break;
                }
                None => {
                    let _ = tx.send(Ok(None)).await;
                    break;
                }
            }
        }
        drop(tx);
        let written = decompress.await;
        if let Some(e) = get_err {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(SnapStoreError::store(OP, key, e));
        }
        match written {
            Ok(Ok(n)) => Ok(n),
            Ok(Err((context, e))) => Err(SnapStoreError::io(OP, key, context, e)),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(SnapStoreError::Task {
                    op: OP,
                    key: key.to_string(),
                    source: e,
                })
            }
        }
    }

    /// Deletes `key`; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), SnapStoreError> {
        let path = parse_key(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(SnapStoreError::store("delete", key, e)),
        }
    }

    /// Deletes every object under `prefix` (whole path segments: `snapshots/vm1`
    /// covers `snapshots/vm1/…`, not `snapshots/vm10/…`). An empty prefix is refused.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), SnapStoreError> {
        const OP: &str = "delete prefix";
        let path = parse_key(prefix)?;
        let locations = self
            .store
            .list(Some(&path))
            .map(|meta| meta.map(|m| m.location))
            .boxed();
        let mut deleted = self.store.delete_stream(locations);
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(SnapStoreError::store(OP, prefix, e)),
            }
        }
        if let Backend::Local(root) = &self.backend {
            // Staging files a crash left behind are invisible to list: sweep them.
            let dir = path
                .parts()
                .fold(root.clone(), |d, part| d.join(part.as_ref()));
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    let ctx = format!("remove {}", dir.display());
                    return Err(SnapStoreError::io(OP, prefix, ctx, e));
                }
            }
        }
        Ok(())
    }

    /// Whether an object exists under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, SnapStoreError> {
        let path = parse_key(key)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(SnapStoreError::store("exists", key, e)),
        }
    }
}

/// Checks `key` is a clean relative object path (no empty, `.` or `..` segments).
fn parse_key(key: &str) -> Result<ObjPath, SnapStoreError> {
    let invalid = |reason: String| SnapStoreError::InvalidKey {
        key: key.to_string(),
        reason,
    };
    let trimmed = key.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("empty".into()));
    }
    let path = ObjPath::parse(trimmed).map_err(|e| invalid(e.to_string()))?;
    if path.as_ref() != trimmed {
        return Err(invalid("not a normalized path".into()));
    }
    Ok(path)
}

fn tmp_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Sends fixed-size chunks of what is written to it down a channel (blocking side).
struct ChunkSender {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    total: u64,
}

impl ChunkSender {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.total += chunk.len() as u64;
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compresses `reader` into chunks sent on `tx`; returns the compressed size.
fn compress<R: Read>(mut reader: R, tx: mpsc::Sender<Bytes>) -> io::Result<u64> {
    let sink = ChunkSender {
        tx,
        buf: Vec::with_capacity(CHUNK),
        total: 0,
    };
    let mut enc = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if threads > 1 {
        enc.multithread(threads as u32)?;
    }
    io::copy(&mut reader, &mut enc)?;
    let mut sink = enc.finish()?;
    sink.send_buf()?;
    Ok(sink.total)
}

/// Reads chunks received on a channel (blocking side). The sender marks the
/// end with `Ok(None)`: a channel closed without it (the download was dropped
/// halfway) is an error, never a short, clean end of data.
struct ChunkReceiver {
    rx: mpsc::Receiver<io::Result<Option<Bytes>>>,
    cur: Bytes,
    ended: bool,
}

impl Read for ChunkReceiver {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(Some(chunk))) => self.cur = chunk,
                Some(Ok(None)) => self.ended = true,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "download stopped before the end of the object",
                    ))
                }
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Decompresses the received stream into `tmp`, fsyncs it and renames it to
/// `dest`; returns the decompressed size, or what failed and why.
fn decompress_to(
    rx: mpsc::Receiver<io::Result<Option<Bytes>>>,
    tmp: &Path,
    dest: &Path,
) -> Result<u64, (String, io::Error)> {
    let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
    let reader = ChunkReceiver {
        rx,
        cur: Bytes::new(),
        ended: false,
    };
    let mut dec = zstd::stream::read::Decoder::new(reader).map_err(|e| ("zstd".into(), e))?;
    let file = std::fs::File::create(tmp).map_err(|e| (ctx("create", tmp), e))?;
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    let n = io::copy(&mut dec, &mut out).map_err(|e| (ctx("decompress to", tmp), e))?;
    let file = out
        .into_inner()
        .map_err(|e| (ctx("write", tmp), e.into_error()))?;
    file.sync_all().map_err(|e| (ctx("fsync", tmp), e))?;
    drop(file);
    std::fs::rename(tmp, dest).map_err(|e| (ctx("rename to", dest), e))?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| (ctx("fsync", parent), e))?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn local(dir: &Path) -> SnapStore {
        SnapStore::new(&SnapStoreConfig {
            local_root: dir.join("store"),
            s3: None,
        })
        .unwrap()
    }

    /// `len` bytes: alternating 1 MiB runs of zeros (¾) and random data (¼).
    fn mixed_file(path: &Path, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        let mut rng = rand::thread_rng();
        for (i, block) in data.chunks_mut(1 << 20).enumerate() {
            if i % 4 == 3 {
                rng.fill_bytes(block);
            }
        }
        std::fs::write(path, &data).unwrap();
        data
    }

    /// Every file under `dir`, recursively.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn round_trip_of_mixed_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        assert!(
            store.describe().starts_with("local /"),
            "{}",
            store.describe()
        );
        let raw = dir.path().join("memory");
        let data = mixed_file(&raw, 20 << 20);
        let key = snapshot_key("vm1", "snap1");
        assert_eq!(key, "snapshots/vm1/snap1/memory.zst");

        let stored = store.upload(&key, &raw).await.unwrap();
        assert!(stored < data.len() as u64 / 2, "stored {stored} bytes");
        assert!(store.exists(&key).await.unwrap());
        let on_disk = dir.path().join("store/snapshots/vm1/snap1/memory.zst");
        assert_eq!(std::fs::metadata(&on_disk).unwrap().len(), stored);

        let dest = dir.path().join("restored");
        let n = store.download(&key, &dest).await.unwrap();
        assert_eq!(n, data.len() as u64);
        assert!(
            std::fs::read(&dest).unwrap() == data,
            "restored bytes differ"
        );
        assert!(!tmp_path(&dest).exists());
    }

    #[tokio::test]
    async fn zeros_compress_to_almost_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let raw = dir.path().join("zeros");
        std::fs::write(&raw, vec![0u8; 16 << 20]).unwrap();
        let stored = store.upload("a/zeros.zst", &raw).await.unwrap();
        assert!(stored < 64 << 10, "stored {stored} bytes");
        let dest = dir.path().join("out");
        assert_eq!(
            store.download("a/zeros.zst", &dest).await.unwrap(),
            16 << 20
        );
    }

    #[tokio::test]
    async fn empty_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let raw = dir.path().join("empty");
        std::fs::write(&raw, b"").unwrap();
        store.upload("e/memory.zst", &raw).await.unwrap();
        let dest = dir.path().join("out");
        assert_eq!(store.download("e/memory.zst", &dest).await.unwrap(), 0);
        assert_eq!(std::fs::read(&dest).unwrap().len(), 0);
    }

    #[tokio::test]
    async fn delete_exists_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let raw = dir.path().join("m");
        std::fs::write(&raw, b"hello snapshot").unwrap();
        let keys = [
            snapshot_key("vm1", "s1"),
            snapshot_key("vm1", "s2"),
            snapshot_key("vm10", "s1"),
        ];
        for k in &keys {
            store.upload(k, &raw).await.unwrap();
            assert!(store.exists(k).await.unwrap());
        }

        store.delete(&keys[0]).await.unwrap();
        assert!(!store.exists(&keys[0]).await.unwrap());
        store.delete(&keys[0]).await.unwrap(); // missing: still Ok

        // A crash's leftover staging file is swept by delete_prefix.
        let stale = dir.path().join("store/snapshots/vm1/s3/memory.zst#1");
        std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
        std::fs::write(&stale, b"partial").unwrap();
        assert!(!store.exists(&snapshot_key("vm1", "s3")).await.unwrap());

        store.delete_prefix("snapshots/vm1/").await.unwrap();
        assert!(!store.exists(&keys[1]).await.unwrap());
        assert!(!stale.exists());
        assert!(
            store.exists(&keys[2]).await.unwrap(),
            "vm10 is not under vm1/"
        );
        store.delete_prefix("snapshots/vm1/").await.unwrap(); // nothing left: Ok
        store.delete_prefix("snapshots/nothing").await.unwrap();

        assert!(matches!(
            store.delete_prefix("").await,
            Err(SnapStoreError::InvalidKey { .. })
        ));
        assert!(matches!(
            store.exists("a/../b").await,
            Err(SnapStoreError::InvalidKey { .. })
        ));
    }

    #[tokio::test]
    async fn download_of_missing_key_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let dest = dir.path().join("out");
        let err = store
            .download(&snapshot_key("vm1", "nope"), &dest)
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("download snapshots/vm1/nope/memory.zst"),
            "{msg}"
        );
        assert!(!dest.exists() && !tmp_path(&dest).exists());
    }

    #[tokio::test]
    async fn upload_of_missing_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let err = store
            .upload("k/memory.zst", &dir.path().join("absent"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("upload k/memory.zst: open "),
            "{err}"
        );
        assert!(!store.exists("k/memory.zst").await.unwrap());
    }

    /// Yields `good` bytes of data, then fails.
    struct FailingReader {
        good: usize,
    }

    impl Read for FailingReader {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.good == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = out.len().min(self.good);
            rand::thread_rng().fill_bytes(&mut out[..n]);
            self.good -= n;
            Ok(n)
        }
    }

    #[tokio::test]
    async fn failed_upload_leaves_nothing_under_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let key = snapshot_key("vm1", "broken");

        // An earlier good object under the key stays intact.
        let raw = dir.path().join("m");
        std::fs::write(&raw, b"previous").unwrap();
        store.upload(&key, &raw).await.unwrap();

        // Fails after several parts have been written.
        let path = parse_key(&key).unwrap();
        let err = store
            .upload_reader(&path, &key, FailingReader { good: 40 << 20 })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        let dest = dir.path().join("out");
        store.download(&key, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"previous");

        // On a fresh key: no object, and no staging file left behind.
        let key2 = snapshot_key("vm1", "broken2");
        let path2 = parse_key(&key2).unwrap();
        store
            .upload_reader(&path2, &key2, FailingReader { good: 20 << 20 })
            .await
            .unwrap_err();
        assert!(!store.exists(&key2).await.unwrap());
        // The staging file is removed by a blocking task: give it a moment.
        let store_dir = dir.path().join("store");
        for _ in 0..100 {
            if files_under(&store_dir).len() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            files_under(&store_dir),
            vec![store_dir.join("snapshots/vm1/broken/memory.zst")]
        );
    }

    #[tokio::test]
    async fn corrupt_object_download_fails_without_dest() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let obj = dir.path().join("store/x/memory.zst");
        std::fs::create_dir_all(obj.parent().unwrap()).unwrap();
        std::fs::write(&obj, b"this is not zstd").unwrap();
        let dest = dir.path().join("out");
        let err = store.download("x/memory.zst", &dest).await.unwrap_err();
        assert!(
            err.to_string().starts_with("download x/memory.zst: "),
            "{err}"
        );
        assert!(!dest.exists() && !tmp_path(&dest).exists());
    }

    #[tokio::test]
    async fn truncated_object_download_fails_without_dest() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let raw = dir.path().join("m");
        mixed_file(&raw, 4 << 20);
        store.upload("t/memory.zst", &raw).await.unwrap();
        let obj = dir.path().join("store/t/memory.zst");
        let len = std::fs::metadata(&obj).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&obj).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        let dest = dir.path().join("out");
        let err = store.download("t/memory.zst", &dest).await.unwrap_err();
        assert!(
            err.to_string().starts_with("download t/memory.zst: "),
            "{err}"
        );
        assert!(!dest.exists() && !tmp_path(&dest).exists());
    }

    #[tokio::test]
    async fn dropped_download_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let raw = dir.path().join("m");
        mixed_file(&raw, 20 << 20);
        store.upload("d/memory.zst", &raw).await.unwrap();
        let dest = dir.path().join("out");
        let dl = store.download("d/memory.zst", &dest);
        // Cut it off almost at once, then give the blocking half time to notice.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(5), dl).await;
        for _ in 0..250 {
            if !tmp_path(&dest).exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if dest.exists() {
            // It finished within the timeout: then it must be whole.
            assert_eq!(std::fs::metadata(&dest).unwrap().len(), 20 << 20);
        }
        assert!(!tmp_path(&dest).exists());
    }

    #[test]
    fn s3_config_debug_hides_secret() {
        let c = S3Config {
            bucket: "b".into(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key: Some("AK".into()),
            secret_key: Some("SECRET".into()),
        };
        assert!(!format!("{c:?}").contains("SECRET"));
    }
}
