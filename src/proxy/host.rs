//! Host header → subdomain. Case-insensitive; the port and one trailing dot are
//! ignored; only `<label>.<base domain>` names a route.

use crate::model::is_valid_label;

#[derive(Debug, PartialEq, Eq)]
pub enum HostError {
    /// No Host (or :authority), or more than one.
    Missing,
    Multiple,
    /// Not a well-formed host[:port].
    Malformed,
    /// Well-formed, but not a single label under the base domain.
    NotRouted,
}

impl HostError {
    pub fn status(&self) -> u16 {
        match self {
            HostError::NotRouted => 404,
            _ => 400,
        }
    }

    pub fn message(&self, base: &str) -> String {
        match self {
            HostError::Missing => "missing Host header".into(),
            HostError::Multiple => "more than one Host header".into(),
            HostError::Malformed => "malformed Host header".into(),
            HostError::NotRouted => format!("no route: host is not <subdomain>.{base}"),
        }
    }
}

/// Extracts the route label from a Host value. `base` is lowercase, without
/// leading or trailing dots.
pub fn subdomain_of(host: &str, base: &str) -> Result<String, HostError> {
    if host.is_empty() {
        return Err(HostError::Missing);
    }
    let name = if host.starts_with('[') {
        // An IPv6 literal never names a route, but must be well-formed.
        let end = host.find(']').ok_or(HostError::Malformed)?;
        check_port(&host[end + 1..])?;
        return Err(HostError::NotRouted);
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => {
                check_port_digits(port)?;
                name
            }
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty()
        || name.ends_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(HostError::Malformed);
    }
    // Hosts are nearly always lowercase already: copy only when not.
    let name: std::borrow::Cow<str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        name.to_ascii_lowercase().into()
    } else {
        name.into()
    };
    let Some(label) = name
        .strip_suffix(base)
        .and_then(|rest| rest.strip_suffix('.'))
    else {
        return Err(HostError::NotRouted);
    };
    if label.is_empty() || label.split('.').any(str::is_empty) {
        return Err(HostError::Malformed);
    }
    if label.contains('.') || !is_valid_label(label) {
        return Err(HostError::NotRouted);
    }
    Ok(label.to_string())
}

/// What follows an IPv6 literal's `]`: nothing, or `:port`.
fn check_port(rest: &str) -> Result<(), HostError> {
    match rest.strip_prefix(':') {
        None if rest.is_empty() => Ok(()),
        Some(p) => check_port_digits(p),
        None => Err(HostError::Malformed),
    }
}

/// A port: 1 to 5 digits, at most 65535.
fn check_port_digits(p: &str) -> Result<(), HostError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::Malformed);
    }
    match p.parse::<u32>() {
        Ok(n) if n <= 65535 => Ok(()),
        _ => Err(HostError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "hatch.local";

    #[test]
    fn h1_case_and_port_ignored() {
        assert_eq!(subdomain_of("MyApp.Hatch.Local:9090", B).unwrap(), "myapp");
        assert_eq!(subdomain_of("myapp.hatch.local:80", B).unwrap(), "myapp");
        assert_eq!(subdomain_of("myapp.hatch.local", B).unwrap(), "myapp");
        assert_eq!(subdomain_of("myapp.hatch.local.", B).unwrap(), "myapp");
        assert_eq!(subdomain_of("myapp.hatch.local.:9090", B).unwrap(), "myapp");
    }

    #[test]
    fn h2_uppercase_host_reaches_lowercase_route() {
        assert_eq!(subdomain_of("MYAPP.HATCH.LOCAL", B).unwrap(), "myapp");
    }

    #[test]
    fn h3_bad_hosts_are_4xx() {
        for (h, want) in [
            ("[::1]:9090", HostError::NotRouted),
            ("myapp.hatch.local:", HostError::Malformed),
            ("myapp.hatch.local:abc", HostError::Malformed),
            (".hatch.local", HostError::Malformed),
            ("a.b.hatch.local", HostError::NotRouted),
            ("", HostError::Missing),
            ("hatch.local", HostError::NotRouted),
            ("myapp.hatch.local..", HostError::Malformed),
            ("myapp.hatch.local:99999", HostError::Malformed),
            ("my_app.hatch.local", HostError::Malformed),
            ("myapp.other.local", HostError::NotRouted),
            ("myapphatch.local", HostError::NotRouted),
            ("[::1", HostError::Malformed),
        ] {
            let got = subdomain_of(h, B).unwrap_err();
            assert_eq!(got, want, "{h}");
            assert!((400..500).contains(&got.status()));
        }
    }
}
