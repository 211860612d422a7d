//! Hatch: real microVMs exposed on subdomains, put to sleep when idle and woken by
//! the next request.
//!
//! Modules are written as if they were crates; dependencies flow one way:
//!
//! ```text
//! model ← store ─┐
//! model ← vmm ───┴→ manager → api, proxy → daemon
//! ```
//!
//! `api` and `proxy` talk to the [`manager`] only: never to the store or to a
//! concrete hypervisor driver.

pub mod api;
pub mod config;
pub mod daemon;
pub mod manager;
pub mod model;
pub mod proxy;
pub mod snapstore;
pub mod store;
pub mod vmm;
