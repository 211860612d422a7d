//! `HATCH_*` configuration with the reference's names and defaults. A value that
//! does not parse is a startup error naming the variable, never a silent default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub reason: String,
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Try KVM by booting a probe guest, fall back to TCG.
    Auto,
    Tcg,
    Kvm,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub proxy_base_domain: String,
    pub proxy_wake_timeout: Duration,
    pub max_vms_per_user: u32,
    pub max_snapshots_per_vm: u32,
    pub default_vcpu: u32,
    pub default_mem_mib: u32,
    pub default_boot_args: String,
    pub default_kernel_path: Option<PathBuf>,
    pub default_rootfs_path: Option<PathBuf>,
    /// Where `scripts/build-image` put the default image; used when the two paths
    /// above are unset.
    pub default_image_dir: PathBuf,
    pub idle_timeout: Duration,
    pub idle_check_interval: Duration,
    pub vmm: String,
    pub qemu_bin: String,
    pub qemu_accel: Accel,
    pub ssh_port_min: u16,
    pub ssh_port_max: u16,
    pub ssh_allowed_cidr: String,
    pub s3_bucket: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_access_key: Option<String>,
    pub s3_secret_key: Option<String>,
    /// Largest request body held while a VM wakes.
    pub proxy_max_wake_body: usize,
    /// Requests that may wait for one VM's wake at once (more get 503 + Retry-After).
    pub proxy_max_wake_waiters: usize,
    /// Peers whose `X-Forwarded-*` headers are kept; empty = all peers.
    pub proxy_trusted_proxies: Vec<ipnet::IpNet>,
    /// A request head must be complete this long after its first byte.
    pub proxy_header_timeout: Duration,
    /// Idle keep-alive client connections are closed after this long.
    pub proxy_idle_timeout: Duration,
    /// Proxy worker threads (each with its own event loop and guest connection
    /// pool); 0 = one per CPU.
    pub proxy_workers: usize,
}

pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 quiet";

/// Reads the configuration from a variable lookup (the process environment in
/// `hatchd`, a map in tests).
pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let raw = |var: &str| {
        get(var)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let err = |var: &str, value: &str, reason: String| ConfigError {
        var: var.to_string(),
        value: value.to_string(),
        reason,
    };
    let addr = |var: &str, def: &str| {
        let v = raw(var).unwrap_or_else(|| def.to_string());
        parse_addr(&v).map_err(|r| err(var, &v, r))
    };
    let dur = |var: &str, def: &str| {
        let v = raw(var).unwrap_or_else(|| def.to_string());
        parse_duration(&v).map_err(|r| err(var, &v, r))
    };
    fn num<T: std::str::FromStr>(v: Option<String>, var: &str, def: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match v {
            None => Ok(def),
            Some(v) => v.parse::<T>().map_err(|e| ConfigError {
                var: var.to_string(),
                value: v.clone(),
                reason: e.to_string(),
            }),
        }
    }
    let accel_raw = raw("HATCH_QEMU_ACCEL").unwrap_or_else(|| "auto".into());
    let qemu_accel = match accel_raw.to_ascii_lowercase().as_str() {
        "auto" => Accel::Auto,
        "tcg" => Accel::Tcg,
        "kvm" => Accel::Kvm,
        _ => {
            return Err(err(
                "HATCH_QEMU_ACCEL",
                &accel_raw,
                "expected auto, tcg or kvm".into(),
            ))
        }
    };
    let vmm = raw("HATCH_VMM").unwrap_or_else(|| "qemu".into());
    if vmm != "qemu" && vmm != "firecracker" {
        return Err(err(
            "HATCH_VMM",
            &vmm,
            "expected qemu or firecracker".into(),
        ));
    }
    let cfg = Config {
        http_addr: addr("HATCH_HTTP_ADDR", ":8080")?,
        proxy_addr: addr("HATCH_PROXY_ADDR", ":9090")?,
        data_dir: PathBuf::from(raw("HATCH_DATA_DIR").unwrap_or_else(|| "./data".into())),
        database_url: raw("DATABASE_URL"),
        proxy_base_domain: raw("HATCH_PROXY_BASE_DOMAIN")
            .unwrap_or_else(|| "hatch.local".into())
            .trim_start_matches('.')
            .trim_end_matches('.')
            .to_ascii_lowercase(),
        proxy_wake_timeout: dur("HATCH_PROXY_WAKE_TIMEOUT", "60s")?,
        max_vms_per_user: num(raw("HATCH_MAX_VMS_PER_USER"), "HATCH_MAX_VMS_PER_USER", 5)?,
        max_snapshots_per_vm: num(
            raw("HATCH_MAX_SNAPSHOTS_PER_VM"),
            "HATCH_MAX_SNAPSHOTS_PER_VM",
            10,
        )?,
        default_vcpu: num(raw("HATCH_DEFAULT_VCPU"), "HATCH_DEFAULT_VCPU", 1)?,
        default_mem_mib: num(raw("HATCH_DEFAULT_MEM_MIB"), "HATCH_DEFAULT_MEM_MIB", 512)?,
        default_boot_args: raw("HATCH_DEFAULT_BOOT_ARGS").unwrap_or_default(),
        default_kernel_path: raw("HATCH_DEFAULT_KERNEL_PATH").map(PathBuf::from),
        default_rootfs_path: raw("HATCH_DEFAULT_ROOTFS_PATH").map(PathBuf::from),
        default_image_dir: PathBuf::from(
            raw("HATCH_DEFAULT_IMAGE_DIR")
                .unwrap_or_else(|| "/var/lib/hatch/images/default".into()),
        ),
        idle_timeout: dur("HATCH_IDLE_TIMEOUT", "45m")?,
        idle_check_interval: dur("HATCH_IDLE_CHECK_INTERVAL", "5m")?,
        vmm,
        qemu_bin: raw("HATCH_QEMU_BIN").unwrap_or_else(|| "qemu-system-x86_64".into()),
        qemu_accel,
        ssh_port_min: num(raw("HATCH_SSH_PORT_MIN"), "HATCH_SSH_PORT_MIN", 16000)?,
        ssh_port_max: num(raw("HATCH_SSH_PORT_MAX"), "HATCH_SSH_PORT_MAX", 26000)?,
        ssh_allowed_cidr: raw("HATCH_SSH_ALLOWED_CIDR").unwrap_or_else(|| "127.0.0.1/32".into()),
        s3_bucket: raw("HATCH_S3_BUCKET"),
        s3_endpoint: raw("HATCH_S3_ENDPOINT"),
        s3_region: raw("HATCH_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
        s3_access_key: raw("HATCH_S3_ACCESS_KEY"),
        s3_secret_key: raw("HATCH_S3_SECRET_KEY"),
        proxy_max_wake_body: num(
            raw("HATCH_PROXY_MAX_WAKE_BODY"),
            "HATCH_PROXY_MAX_WAKE_BODY",
            32 * 1024 * 1024,
        )?,
        proxy_max_wake_waiters: num(
            raw("HATCH_PROXY_MAX_WAKE_WAITERS"),
            "HATCH_PROXY_MAX_WAKE_WAITERS",
            1024,
        )?,
        proxy_trusted_proxies: match raw("HATCH_PROXY_TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(v) => parse_nets(&v).map_err(|r| err("HATCH_PROXY_TRUSTED_PROXIES", &v, r))?,
        },
        proxy_header_timeout: dur("HATCH_PROXY_HEADER_TIMEOUT", "5s")?,
        proxy_idle_timeout: dur("HATCH_PROXY_IDLE_TIMEOUT", "75s")?,
        proxy_workers: num(raw("HATCH_PROXY_WORKERS"), "HATCH_PROXY_WORKERS", 0)?,
    };
    if cfg.proxy_workers > 1024 {
        return Err(err(
            "HATCH_PROXY_WORKERS",
            &cfg.proxy_workers.to_string(),
            "at most 1024 proxy worker threads (0 = one per CPU)".into(),
        ));
    }
    if cfg.ssh_port_min == 0 || cfg.ssh_port_min > cfg.ssh_port_max {
        return Err(err(
            "HATCH_SSH_PORT_MIN",
            &cfg.ssh_port_min.to_string(),
            format!(
                "invalid SSH port range: {}-{}",
                cfg.ssh_port_min, cfg.ssh_port_max
            ),
        ));
    }
    if !is_cidr(&cfg.ssh_allowed_cidr) {
        return Err(err(
            "HATCH_SSH_ALLOWED_CIDR",
            &cfg.ssh_allowed_cidr,
            "expected an address/prefix such as 127.0.0.1/32".into(),
        ));
    }
    if cfg.proxy_wake_timeout.is_zero() {
        return Err(err(
            "HATCH_PROXY_WAKE_TIMEOUT",
            "0",
            "must be positive".into(),
        ));
    }
    if cfg.default_vcpu == 0 {
        return Err(err("HATCH_DEFAULT_VCPU", "0", "must be at least 1".into()));
    }
    if let Some(url) = &cfg.database_url {
        if !url.starts_with("sqlite:") {
            return Err(err(
                "DATABASE_URL",
                url,
                "only sqlite: URLs are supported by this build (PostgreSQL is planned)".into(),
            ));
        }
    }
    if cfg.vmm == "firecracker" {
        return Err(err(
            "HATCH_VMM",
            "firecracker",
            "the Firecracker driver is not part of this build yet; use qemu".into(),
        ));
    }
    Ok(cfg)
}

pub fn from_env() -> Result<Config, ConfigError> {
    from_lookup(|k| std::env::var(k).ok())
}

fn is_cidr(s: &str) -> bool {
    let Some((ip, prefix)) = s.split_once('/') else {
        return false;
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix.parse::<u8>().is_ok_and(|p| p <= 32),
        Ok(std::net::IpAddr::V6(_)) => prefix.parse::<u8>().is_ok_and(|p| p <= 128),
        Err(_) => false,
    }
}

/// A comma-separated list of addresses and networks (`10.0.0.1, 192.168.0.0/16`).
pub fn parse_nets(s: &str) -> Result<Vec<ipnet::IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{p:?} is not an address or network"))
        })
        .collect()
}

/// Go-style listen address: `:8080` means every interface.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else if let Some(host) = s.strip_prefix("localhost:") {
        format!("127.0.0.1:{host}")
    } else {
        s.to_string()
    };
    full.parse::<SocketAddr>()
        .map_err(|e| format!("expected host:port or :port ({e})"))
}

/// Go `time.ParseDuration` syntax: `60s`, `45m`, `1h30m`, `1.5s`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration such as 60s, 45m or 1h30m, got {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_addr.port(), 8080);
        assert_eq!(c.proxy_addr.port(), 9090);
        assert_eq!(c.proxy_base_domain, "hatch.local");
        assert_eq!(c.proxy_wake_timeout, Duration::from_secs(60));
        assert_eq!(c.idle_timeout, Duration::from_secs(45 * 60));
        assert_eq!(c.idle_check_interval, Duration::from_secs(5 * 60));
        assert_eq!(c.max_vms_per_user, 5);
        assert_eq!(c.max_snapshots_per_vm, 10);
        assert_eq!(c.default_mem_mib, 512);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.proxy_workers, 0, "one per CPU");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "60", "s", "abc", "5x", "1h-3m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = cfg(&[("HATCH_PROXY_WAKE_TIMEOUT", "soon")]).unwrap_err();
        assert_eq!(e.var, "HATCH_PROXY_WAKE_TIMEOUT");
        assert!(e.to_string().contains("HATCH_PROXY_WAKE_TIMEOUT"));
        assert_eq!(
            cfg(&[("HATCH_PROXY_ADDR", "nope")]).unwrap_err().var,
            "HATCH_PROXY_ADDR"
        );
        assert_eq!(
            cfg(&[("HATCH_MAX_VMS_PER_USER", "-1")]).unwrap_err().var,
            "HATCH_MAX_VMS_PER_USER"
        );
        assert_eq!(
            cfg(&[("HATCH_QEMU_ACCEL", "xen")]).unwrap_err().var,
            "HATCH_QEMU_ACCEL"
        );
        assert_eq!(
            cfg(&[("HATCH_SSH_ALLOWED_CIDR", "everyone")])
                .unwrap_err()
                .var,
            "HATCH_SSH_ALLOWED_CIDR"
        );
        for bad in ["many", "-1", "5000"] {
            assert_eq!(
                cfg(&[("HATCH_PROXY_WORKERS", bad)]).unwrap_err().var,
                "HATCH_PROXY_WORKERS",
                "{bad}"
            );
        }
        assert_eq!(
            cfg(&[("HATCH_PROXY_WORKERS", "3")]).unwrap().proxy_workers,
            3
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr(":9090").unwrap().to_string(), "0.0.0.0:9090");
        assert_eq!(parse_addr("127.0.0.1:0").unwrap().port(), 0);
        assert_eq!(parse_addr("[::1]:80").unwrap().port(), 80);
        assert!(parse_addr("9090").is_err());
    }
}
