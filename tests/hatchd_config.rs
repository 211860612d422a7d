#![allow(clippy::unwrap_used)]
//! hatchd refuses to start on a configuration value that does not parse, and
//! names the variable.

use std::process::Command;

#[test]
fn a_bad_value_stops_the_start_and_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("HATCH_PROXY_WAKE_TIMEOUT", "soon"),
        ("HATCH_PROXY_ADDR", "nine-thousand"),
        ("HATCH_MAX_VMS_PER_USER", "many"),
        ("HATCH_IDLE_TIMEOUT", "45"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hatchd"))
            .env("HATCH_DATA_DIR", dir.path())
            .env("HATCH_HTTP_ADDR", "127.0.0.1:0")
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var) && stderr.contains(value), "{stderr}");
    }
}
