//! QEMU's blkdebug events (`BlkdebugEvent`): points in a driver's work at
//! which it tells the node below it what it is about to do (load an L2
//! table, write guest data, flush). A `blkdebug` node below uses them to
//! arm its error rules and change its state; every other driver passes the
//! event on to its primary child or ignores it, so without a blkdebug node
//! an event costs one call that does nothing.

macro_rules! debug_events {
    ($($variant:ident = $name:literal,)*) => {
        /// One event, named as QEMU's QAPI schema names it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DebugEvent {
            $($variant,)*
        }

        impl DebugEvent {
            /// Every event, in QEMU's schema order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$variant,)*];

            /// The QAPI name (`read_aio`, `l1_grow_alloc_table`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(DebugEvent::$variant => $name,)*
                }
            }

            /// The event named `name`, as QEMU's `BlkdebugEvent` lookup takes it.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(DebugEvent::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

debug_events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for e in DebugEvent::ALL {
            assert_eq!(DebugEvent::from_name(e.name()), Some(*e));
            assert!(seen.insert(e.name()));
        }
        assert_eq!(DebugEvent::ALL.len(), 48);
        assert_eq!(DebugEvent::from_name("l1_grow.alloc_table"), None);
    }
}
