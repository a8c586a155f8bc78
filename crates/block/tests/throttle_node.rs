//! A `throttle` node: data passes through unchanged, and reads, writes,
//! write-zeroes and discards wait for the group's limits (on a paused
//! tokio clock, so the test takes no real time).

use std::sync::Arc;
use std::time::Duration;

use block::drivers::throttle::ThrottleDriver;
use block::test_utils::MemDriver;
use block::throttle::{LimitMember, ThrottleConfig, ThrottleGroup};
use block::{BlockNode, IoBuf, ZeroFlags};
use tokio::time::Instant;

fn iops_total(n: i64) -> ThrottleConfig {
    let mut c = ThrottleConfig::default();
    let (name, member) = LimitMember::ALL[0];
    c.set_limit(name, member, n).unwrap();
    c.validate().unwrap();
    c
}

fn throttle_node(group: &Arc<ThrottleGroup>) -> BlockNode {
    let child = Arc::new(BlockNode::new(
        "mem".into(),
        Arc::new(MemDriver::new(1 << 20)),
        false,
    ));
    BlockNode::new(
        "t".into(),
        Arc::new(ThrottleDriver::new(child, true)),
        false,
    )
    .with_throttle(group.join())
}

#[test]
fn test_data_passes_through_the_filter() {
    block::test_utils::conformance::run_all(
        throttle_node(&ThrottleGroup::new("g".into(), ThrottleConfig::default()))
            .driver()
            .as_ref(),
    );
}

#[tokio::test(start_paused = true)]
async fn test_every_kind_of_request_waits_for_the_limit() {
    let group = ThrottleGroup::new("g".into(), iops_total(10));
    let node = throttle_node(&group);
    let start = Instant::now();
    // The bucket holds a tenth of a second (1 operation): 2 go at once,
    // the other 20 at 10 per second.
    for i in 0..22u64 {
        match i % 3 {
            0 => node.read(IoBuf::zeroed(512), i * 512).await.1.unwrap(),
            1 => node
                .write(IoBuf::zeroed(512), i * 512, false)
                .await
                .1
                .unwrap(),
            _ => node
                .write_zeroes(i * 512, 512, ZeroFlags::default())
                .await
                .unwrap(),
        }
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    // The memory driver drops discards, so they never reach the throttle (as
    // in QEMU, where a node without discard=unmap drops them first).
    for i in 0..100u64 {
        node.discard(i * 512, 512).await.unwrap();
    }
    assert_eq!(start.elapsed(), took);
}

#[tokio::test(start_paused = true)]
async fn test_reads_and_writes_have_their_own_limits() {
    let mut config = ThrottleConfig::default();
    let member = |name| LimitMember::ALL.iter().find(|(n, _)| *n == name).unwrap().1;
    config
        .set_limit("iops-read", member("iops-read"), 10)
        .unwrap();
    let group = ThrottleGroup::new("g".into(), config);
    let node = throttle_node(&group);
    let start = Instant::now();
    for i in 0..100u64 {
        node.write(IoBuf::zeroed(512), i * 512, false)
            .await
            .1
            .unwrap();
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    for i in 0..12u64 {
        node.read(IoBuf::zeroed(512), i * 512).await.1.unwrap();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
}
