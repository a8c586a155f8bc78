//! The throttle groups by name. QEMU keeps one list for the process; bexd's
//! daemon makes one registry and hands it to the object table (which adds
//! and removes groups as objects come and go) and to the node table (whose
//! throttle nodes look their group up when they open).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::group::ThrottleGroup;

#[derive(Debug, Default)]
pub struct ThrottleGroups {
    groups: Mutex<BTreeMap<String, Arc<ThrottleGroup>>>,
}

impl ThrottleGroups {
    /// Each update is one insert or remove, so a poisoned lock still guards a whole map.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<ThrottleGroup>>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, group: Arc<ThrottleGroup>) {
        self.lock().insert(group.name().to_string(), group);
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    pub fn get(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.lock().get(name).cloned()
    }

    /// Shutdown: every group lets its requests go ([`ThrottleGroup::drain`]).
    /// A group deleted as an object while its nodes lived on is not listed
    /// here; object-del refuses a group with members, so there is none.
    pub fn drain_all(&self) {
        for group in self.lock().values() {
            group.drain();
        }
    }
}
