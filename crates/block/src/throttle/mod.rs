//! I/O limits as QEMU has them: `throttle-group` objects and the `throttle`
//! filter node (QEMU's util/throttle.c, block/throttle-groups.c).
//!
//! `config` is the limits and QEMU's validation of them; `state` the leaky
//! buckets, pure arithmetic over a clock the caller passes in (so it is
//! tested with a fake clock); `group` a group shared by its member nodes,
//! where throttled requests wait on a tokio timer, served round-robin
//! between members; `registry` the groups by name, shared by the object
//! table (which makes them) and the node table (whose throttle nodes join
//! them).

pub mod config;
pub mod group;
pub mod registry;
pub mod state;

pub use config::{BucketKind, BucketLimit, LimitMember, ThrottleConfig, ThrottleConfigError};
pub use group::{Direction, ThrottleGroup, ThrottleMember};
pub use registry::ThrottleGroups;
pub use state::ThrottleState;
