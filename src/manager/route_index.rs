//! The proxy's view of the routes: subdomain → target, kept in memory and in step
//! with the store by the manager, so a proxied request never queries the database.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::model::Route;

/// What the proxy needs to forward a request for one subdomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTarget {
    pub route_id: Arc<str>,
    pub vm_id: Arc<str>,
    pub port: u16,
    pub auto_wake: bool,
}

impl From<&Route> for RouteTarget {
    fn from(r: &Route) -> Self {
        RouteTarget {
            route_id: r.id.as_str().into(),
            vm_id: r.vm_id.as_str().into(),
            port: r.target_port,
            auto_wake: r.auto_wake,
        }
    }
}

#[derive(Default)]
pub struct RouteIndex {
    by_subdomain: RwLock<HashMap<String, RouteTarget>>,
}

impl RouteIndex {
    pub fn load(routes: &[Route]) -> RouteIndex {
        let map = routes
            .iter()
            .map(|r| (r.subdomain.clone(), RouteTarget::from(r)))
            .collect();
        RouteIndex {
            by_subdomain: RwLock::new(map),
        }
    }

    pub fn get(&self, subdomain: &str) -> Option<RouteTarget> {
        self.read().get(subdomain).cloned()
    }

    pub fn insert(&self, r: &Route) {
        self.write()
            .insert(r.subdomain.clone(), RouteTarget::from(r));
    }

    pub fn remove_route(&self, route_id: &str) {
        self.write().retain(|_, t| &*t.route_id != route_id);
    }

    pub fn remove_vm(&self, vm_id: &str) {
        self.write().retain(|_, t| &*t.vm_id != vm_id);
    }

    /// Target ports of every route of the VM, deduplicated.
    pub fn ports_of(&self, vm_id: &str) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .read()
            .values()
            .filter(|t| &*t.vm_id == vm_id)
            .map(|t| t.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock only means a panic elsewhere while holding it; the map
    // itself is always consistent (single insert/retain calls), so keep serving.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, RouteTarget>> {
        self.by_subdomain.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, RouteTarget>> {
        self.by_subdomain.write().unwrap_or_else(|e| e.into_inner())
    }
}
