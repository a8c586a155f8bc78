use super::*;
use crate::test_utils::MemDriver;

fn mem() -> Arc<BlockNode> {
    Arc::new(BlockNode::new(
        "m".into(),
        Arc::new(MemDriver::new(1 << 20)),
        false,
    ))
}

fn opened(opts: BlkdebugOptions) -> BlkdebugDriver {
    BlkdebugDriver::open(mem(), &opts).unwrap()
}

fn rule(event: DebugEvent, io: IoType, errno: i32) -> InjectError {
    InjectError::new(event, vec![io], errno)
}

#[test]
fn test_none_fires_at_open_so_its_rules_are_armed_at_once() {
    let d = BlkdebugDriver::new(mem(), vec![rule(DebugEvent::None, IoType::Read, libc::EIO)]);
    let mut buf = [0u8; 512];
    assert_eq!(d.read_at(&mut buf, 0).unwrap_err().errno(), libc::EIO);
}

#[test]
fn test_read_aio_rules_wait_for_the_driver_above() {
    let d = BlkdebugDriver::new(
        mem(),
        vec![InjectError {
            once: true,
            ..rule(DebugEvent::ReadAio, IoType::Read, libc::EIO)
        }],
    );
    let mut buf = [0u8; 512];
    assert!(d.read_at(&mut buf, 0).is_ok());
    d.debug_event(DebugEvent::ReadAio);
    assert_eq!(d.read_at(&mut buf, 0).unwrap_err().errno(), libc::EIO);
    assert!(d.read_at(&mut buf, 0).is_ok());
}

#[test]
fn test_pwritev_fires_on_the_node_itself_and_fails_that_write() {
    let d = BlkdebugDriver::new(
        mem(),
        vec![rule(DebugEvent::Pwritev, IoType::Write, libc::ENOSPC)],
    );
    assert_eq!(
        d.write_at(&[1; 512], 0, false).unwrap_err().errno(),
        libc::ENOSPC
    );
}

#[test]
fn test_a_flush_meets_the_rules_only_after_a_write() {
    let d = BlkdebugDriver::new(
        mem(),
        vec![rule(DebugEvent::None, IoType::Flush, libc::EIO)],
    );
    assert!(d.flush().is_ok());
    d.write_at(&[1; 512], 0, false).unwrap();
    assert_eq!(d.flush().unwrap_err().errno(), libc::EIO);
    // Still unflushed: the next flush meets the rule again.
    assert!(d.flush().is_err());
}

#[test]
fn test_config_file_rules_come_first_and_errors_are_qemus() {
    let dir = std::env::temp_dir().join(format!("blkdebug-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rules.conf");
    std::fs::write(
        &path,
        "[inject-error]\nevent = \"none\"\nerrno = \"28\"\niotype = \"read\"\n",
    )
    .unwrap();
    let d = opened(BlkdebugOptions {
        config: Some(path.clone()),
        inject: vec![rule(DebugEvent::None, IoType::Read, libc::EIO)],
        ..Default::default()
    });
    let mut buf = [0u8; 512];
    assert_eq!(d.read_at(&mut buf, 0).unwrap_err().errno(), libc::ENOSPC);
    let missing = BlkdebugDriver::open(
        mem(),
        &BlkdebugOptions {
            config: Some(dir.join("nonexistent")),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        missing.to_string(),
        "Could not read blkdebug config file: No such file or directory"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_align_pads_reads_and_makes_unaligned_writes_whole_blocks() {
    let d = opened(BlkdebugOptions {
        limits: Limits {
            align: 4096,
            max_transfer: 8192,
            ..Limits::default()
        },
        ..Default::default()
    });
    assert_eq!(d.capabilities().request_alignment, 4096);
    assert_eq!(d.capabilities().max_transfer, 8192);
    d.write_at(&[7; 1000], 100, false).unwrap();
    let mut all = vec![0u8; 20000];
    d.read_at(&mut all, 0).unwrap();
    assert!(all[..100].iter().all(|&b| b == 0));
    assert!(all[100..1100].iter().all(|&b| b == 7));
    assert!(all[1100..].iter().all(|&b| b == 0));
    d.write_zeroes(50, 20000, ZeroFlags::default()).unwrap();
    d.read_at(&mut all, 0).unwrap();
    assert!(all[..20050 - 50].iter().all(|&b| b == 0));
}

#[test]
fn test_an_unaligned_write_reads_its_ends_through_the_rules() {
    let d = BlkdebugDriver::open(
        mem(),
        &BlkdebugOptions {
            inject: vec![InjectError {
                once: true,
                ..rule(DebugEvent::PwritevRmwHead, IoType::Read, libc::EIO)
            }],
            limits: Limits {
                align: 4096,
                ..Limits::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    assert!(d.write_at(&[1; 4096], 0, false).is_ok());
    assert_eq!(
        d.write_at(&[1; 512], 512, false).unwrap_err().errno(),
        libc::EIO
    );
    assert!(d.write_at(&[1; 512], 512, false).is_ok());
}

#[test]
fn test_limits_are_checked_against_the_child() {
    let e = BlkdebugDriver::open(
        mem(),
        &BlkdebugOptions {
            limits: Limits {
                align: 3,
                ..Limits::default()
            },
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "Cannot meet constraints with align 3");
}
