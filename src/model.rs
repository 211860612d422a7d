//! Domain types shared by every layer: ids, VM states, the API's JSON shapes and
//! the seed's subdomain rules.

use std::fmt;
use std::sync::LazyLock;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde::{Serialize, Serializer};

/// Length of the random part of every id (`vm_` + 12).
pub const ID_RANDOM_LEN: usize = 12;

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `n` random lowercase alphanumerics.
pub fn random_alnum(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| ALNUM[rng.gen_range(0..ALNUM.len())] as char)
        .collect()
}

/// A new id with the given prefix (`vm`, `rt`, `snap`, `img`, `key`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_alnum(ID_RANDOM_LEN))
}

/// Timestamps are RFC 3339, UTC, microseconds.
pub fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn ser_ts<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ts(t))
}

fn ser_opt_ts<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&ts(t)),
        None => s.serialize_none(),
    }
}

/// Durations are shown in Go syntax (`45m0s` style is avoided: `2700s`).
fn ser_opt_dur<S: Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&fmt_duration(*d)),
        None => s.serialize_none(),
    }
}

/// `1500ms`, `30s`, `45m`, `2h`: the largest unit that divides the duration.
pub fn fmt_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// How an idle VM is put to sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SleepMode {
    /// Save memory and devices; the next request restores it (fast, keeps state).
    #[default]
    Snapshot,
    /// Power off; the next request boots it (for guests that cannot be snapshotted).
    Stop,
}

impl SleepMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SleepMode::Snapshot => "snapshot",
            SleepMode::Stop => "stop",
        }
    }
}

/// One lifecycle event of a VM, with the durations of its phases in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct VmEvent {
    #[serde(serialize_with = "ser_ts")]
    pub at: DateTime<Utc>,
    /// `boot`, `restore`, `snapshot`, `stop`, `exit`, `error`.
    pub kind: String,
    pub detail: serde_json::Value,
}

/// The lifecycle states of the API. `starting` and `stopping` are transient and
/// only ever held in memory while an operation runs; the store keeps the state a
/// VM returns to if hatchd dies mid-operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Starting,
    Running,
    Stopping,
    Stopped,
    Snapshotted,
    Error,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Snapshotted => "snapshotted",
            VmState::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        Some(match s {
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "snapshotted" => VmState::Snapshotted,
            "error" => VmState::Error,
            _ => return None,
        })
    }

    /// A sleeping VM can be woken by the proxy.
    pub fn is_asleep(self) -> bool {
        matches!(self, VmState::Stopped | VmState::Snapshotted)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Vm {
    pub id: String,
    pub image_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_id: String,
    pub state: VmState,
    pub vcpu_count: u32,
    pub mem_mib: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub boot_args: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_data: String,
    pub enable_network: bool,
    /// Cold boots performed for this VM (create, start, wake of a stopped VM).
    pub boot_count: i64,
    /// Restores from a snapshot (API restore or wake of a snapshotted VM).
    pub restore_count: i64,
    /// Why the VM last failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Idle time after which the VM is put to sleep (`HATCH_IDLE_TIMEOUT` when unset).
    #[serde(
        serialize_with = "ser_opt_dur",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<std::time::Duration>,
    /// How often the VM's idleness is checked (`HATCH_IDLE_CHECK_INTERVAL` when unset).
    #[serde(
        serialize_with = "ser_opt_dur",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_check_interval: Option<std::time::Duration>,
    /// How the VM goes to sleep: `snapshot` (default) or `stop`.
    pub sleep_mode: SleepMode,
    /// The last proxied request, connection or API operation.
    #[serde(serialize_with = "ser_opt_ts", skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "ser_ts")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "ser_ts")]
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub id: String,
    pub vm_id: String,
    pub subdomain: String,
    pub target_port: u16,
    pub auto_wake: bool,
    #[serde(serialize_with = "ser_ts")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "ser_ts")]
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub id: String,
    pub vm_id: String,
    /// Where the snapshot lives in the snapshot store (a path under the data dir).
    pub state_key: String,
    pub size_bytes: i64,
    #[serde(serialize_with = "ser_ts")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Image {
    pub id: String,
    pub kernel_path: String,
    /// The guest's root filesystem: an initramfs for the default image.
    pub rootfs_path: String,
    pub boot_args: String,
    #[serde(serialize_with = "ser_ts")]
    pub created_at: DateTime<Utc>,
}

/// The id of the image built by `scripts/build-image`.
pub const DEFAULT_IMAGE_ID: &str = "img_default";

/// Subdomains nobody may claim (the seed's list).
pub const RESERVED_SUBDOMAINS: &[&str] = &[
    "api",
    "www",
    "admin",
    "app",
    "dashboard",
    "mail",
    "smtp",
    "ftp",
    "ssh",
    "ns1",
    "ns2",
    "status",
    "docs",
    "help",
    "support",
    "billing",
    "login",
    "auth",
    "oauth",
    "cdn",
    "static",
    "assets",
    "media",
    "hatch",
    "console",
    "panel",
    "grafana",
    "prometheus",
    "traefik",
    "minio",
    "postgres",
    "db",
    "redis",
    "internal",
];

static SUBDOMAIN_RE: LazyLock<regex::Regex> = LazyLock::new(|| {
    #[allow(clippy::unwrap_used)] // a constant pattern
    regex::Regex::new(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$").unwrap()
});

/// Why a subdomain was refused; the messages are the seed's, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubdomainError {
    #[error("subdomain must be lowercase alphanumeric with optional hyphens (max 63 chars)")]
    Invalid,
    #[error("subdomain {0:?} is reserved")]
    Reserved(String),
}

/// Checks a requested subdomain against the seed's rule and reserved list.
pub fn validate_subdomain(s: &str) -> Result<(), SubdomainError> {
    if !SUBDOMAIN_RE.is_match(s) {
        return Err(SubdomainError::Invalid);
    }
    if RESERVED_SUBDOMAINS.contains(&s) {
        return Err(SubdomainError::Reserved(s.to_string()));
    }
    Ok(())
}

/// True when `s` could name a route (used by the proxy before any lookup).
pub fn is_valid_label(s: &str) -> bool {
    SUBDOMAIN_RE.is_match(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_twelve_alnums() {
        let id = new_id("vm");
        assert!(id.starts_with("vm_"));
        let rest = &id[3..];
        assert_eq!(rest.len(), 12);
        assert!(rest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }

    #[test]
    fn subdomain_rules() {
        assert!(validate_subdomain("myapp").is_ok());
        assert!(validate_subdomain("a").is_ok());
        assert!(validate_subdomain("a-b-1").is_ok());
        assert!(validate_subdomain(&"a".repeat(63)).is_ok());
        for bad in ["", "-a", "a-", "MyApp", "a_b", "a.b", " a", "é"] {
            assert_eq!(
                validate_subdomain(bad),
                Err(SubdomainError::Invalid),
                "{bad}"
            );
        }
        assert_eq!(
            validate_subdomain(&"a".repeat(64)),
            Err(SubdomainError::Invalid)
        );
        assert_eq!(
            validate_subdomain("api").unwrap_err().to_string(),
            "subdomain \"api\" is reserved"
        );
        for r in RESERVED_SUBDOMAINS {
            assert!(matches!(
                validate_subdomain(r),
                Err(SubdomainError::Reserved(_))
            ));
        }
        assert_eq!(RESERVED_SUBDOMAINS.len(), 34);
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let t = DateTime::parse_from_rfc3339("2026-03-06T13:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ts(&t), "2026-03-06T13:00:00.000000Z");
    }
}
