use std::sync::Arc;
use std::time::Duration;

use super::bound::{FLUSHES_FILE, FLUSHES_FILE_MOVED};
use super::*;
use crate::model::{BlockClaim, PodMeta, PoolSpec};

fn pool() -> PoolSpec {
    PoolSpec {
        name: "default".into(),
        cidr: "10.0.0.0/24".parse().unwrap(),
        block_size: 28,
        namespaces: vec![],
        nat_outgoing: true,
        snat_address: None,
        isolated: false,
        allow_from: vec![],
        runtime: true,
    }
}

fn block() -> BlockClaim {
    BlockClaim {
        pool: "default".into(),
        cidr: "10.0.0.0/28".parse().unwrap(),
        node: "n1".into(),
        claimed_unix_ms: 1,
    }
}

fn alloc(i: u8) -> Allocation {
    Allocation {
        key: AllocKey {
            network: "ferry".into(),
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        },
        ip: Ipv4Addr::new(10, 0, 0, i),
        pool: "default".into(),
        block: "10.0.0.0/28".parse().unwrap(),
        pod: PodMeta {
            namespace: "ns".into(),
            name: format!("p{i}"),
            uid: "u".into(),
            netns: "/run/netns/x".into(),
        },
        created_unix_ms: 42,
    }
}

#[test]
fn sled_writes_the_files_we_sync() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    assert!(dir.path().join("db").join("db").is_file());
    assert!(dir.path().join("db").join("conf").is_file());
    drop(s);
}

#[tokio::test]
async fn apply_durable_reopen_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SledStore::open(dir.path()).unwrap();
        s.apply(&[Mutation::PutPool(pool()), Mutation::PutBlock(block())])
            .unwrap();
        let seq = s
            .apply(&[
                Mutation::PutAllocation(alloc(1)),
                Mutation::PutAllocation(alloc(2)),
                Mutation::PutAllocation(alloc(3)),
            ])
            .unwrap();
        s.apply(&[
            Mutation::DeleteAllocation {
                key: alloc(2).key,
                ip: alloc(2).ip,
            },
            Mutation::PutCooling {
                ip: alloc(2).ip,
                released_unix_ms: 500,
            },
            Mutation::PutCooling {
                ip: Ipv4Addr::new(10, 0, 0, 9),
                released_unix_ms: 100,
            },
        ])
        .unwrap();
        // Re-cooling an ip moves its entry rather than adding a second one.
        let last = s
            .apply(&[Mutation::PutCooling {
                ip: Ipv4Addr::new(10, 0, 0, 9),
                released_unix_ms: 700,
            }])
            .unwrap();
        assert!(last > seq);
        s.durable(last).await.unwrap();
        s.load().unwrap()
    };
    assert_eq!(before.allocations, vec![alloc(1), alloc(3)]);
    assert_eq!(
        before.cooling,
        vec![
            (Ipv4Addr::new(10, 0, 0, 2), 500),
            (Ipv4Addr::new(10, 0, 0, 9), 700)
        ]
    );
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.load().unwrap(), before);
    assert_eq!(s.last_seq(), 0);
    s.durable(0).await.unwrap();
    // The time index was rebuilt: deleting by ip alone still works.
    s.apply(&[Mutation::DeleteCooling {
        ip: Ipv4Addr::new(10, 0, 0, 9),
    }])
    .unwrap();
    assert_eq!(
        s.load().unwrap().cooling,
        vec![(Ipv4Addr::new(10, 0, 0, 2), 500)]
    );
}

#[test]
fn batch_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    s.apply(&[Mutation::PutPool(pool()), Mutation::PutAllocation(alloc(1))])
        .unwrap();
    // Put a corrupt record behind the store's back, then a batch whose
    // second step must decode it: the whole batch has to be rolled back.
    s.allocations
        .insert(alloc_key_bytes(&alloc(5).key), b"not json".to_vec())
        .unwrap();
    let before_seq = s.last_seq();
    let err = s
        .apply(&[
            Mutation::PutAllocation(alloc(2)),
            Mutation::PutAllocation(alloc(5)),
        ])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { ref key, .. } if key.contains("c5")),
        "{err}"
    );
    assert_eq!(s.last_seq(), before_seq);
    assert!(
        s.allocations
            .get(alloc_key_bytes(&alloc(2).key))
            .unwrap()
            .is_none()
    );
    assert!(s.ips.get(alloc(2).ip.octets()).unwrap().is_none());
}

#[test]
fn corrupt_record_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    s.pools.insert("broken", b"{".to_vec()).unwrap();
    match s.load() {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "pools/broken"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn reverse_index_follows_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    s.apply(&[
        Mutation::PutAllocation(alloc(1)),
        Mutation::PutAllocation(alloc(2)),
    ])
    .unwrap();
    // Moving a key to another ip drops its old index entry.
    let mut moved = alloc(1);
    moved.ip = Ipv4Addr::new(10, 0, 0, 7);
    s.apply(&[Mutation::PutAllocation(moved.clone())]).unwrap();
    s.apply(&[Mutation::DeleteAllocation {
        key: alloc(2).key,
        ip: alloc(2).ip,
    }])
    .unwrap();
    assert_eq!(s.ip_index().unwrap(), vec![(moved.ip, moved.key.clone())]);
    assert_eq!(s.load().unwrap().allocations, vec![moved]);
    // A stale index entry is reported as corruption.
    s.ips
        .insert([10, 0, 0, 99], alloc_key_bytes(&alloc(9).key))
        .unwrap();
    assert!(matches!(s.load(), Err(StoreError::Corrupt { key, .. }) if key == "ips/10.0.0.99"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_durable_calls_all_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(SledStore::open(dir.path()).unwrap());
    let mut tasks = Vec::new();
    for i in 0..64u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
            s.durable(seq).await.unwrap();
            seq
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=64).collect::<Vec<_>>());
    assert!(s.flushed.borrow().flushed >= 64);
    assert_eq!(s.load().unwrap().allocations.len(), 64);
    // Waiting for something already durable returns at once, and a seq
    // beyond the newest batch does not hang.
    s.durable(10).await.unwrap();
    s.durable(1_000).await.unwrap();
}

#[tokio::test]
async fn poisoned_store_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let seq = s.apply(&[Mutation::PutAllocation(alloc(1))]).unwrap();
    s.durable(seq).await.unwrap();
    assert!(s.health().is_ok());
    s.fail_next_flush();
    let seq = s.apply(&[Mutation::PutAllocation(alloc(2))]).unwrap();
    let err = s.durable(seq).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    // Sticky: reported by health, and nothing more is written.
    assert!(s.health().is_err());
    let before = s.last_seq();
    assert!(s.apply(&[Mutation::PutAllocation(alloc(3))]).is_err());
    assert_eq!(s.last_seq(), before);
    let held: Vec<Ipv4Addr> = s.load().unwrap().allocations.iter().map(|a| a.ip).collect();
    assert_eq!(held, vec![alloc(1).ip, alloc(2).ip]);
    assert!(s.durable(seq).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_share_one_flush() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(SledStore::open(dir.path()).unwrap());
    let mut seqs = Vec::new();
    for i in 0..50u8 {
        seqs.push(s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap());
    }
    let before = s.flush_count();
    let tasks: Vec<_> = seqs
        .into_iter()
        .map(|seq| {
            let s = s.clone();
            tokio::spawn(async move { s.durable(seq).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // The first flush covers every batch applied before it started.
    assert_eq!(s.flush_count() - before, 1);
}

/// What sled 0.34 itself does with a damaged log: it opens it without
/// an error, keeping only the valid prefix. The flush bound catches it.
#[tokio::test]
async fn truncated_or_overwritten_log_is_reported_lost() {
    use std::os::unix::fs::FileExt;
    type Damage = (&'static str, fn(&Path));
    let damage: [Damage; 3] = [
        ("truncated to 0", |log| {
            File::options()
                .write(true)
                .open(log)
                .unwrap()
                .set_len(0)
                .unwrap()
        }),
        ("truncated to 300 bytes", |log| {
            File::options()
                .write(true)
                .open(log)
                .unwrap()
                .set_len(300)
                .unwrap()
        }),
        ("head overwritten", |log| {
            File::options()
                .write(true)
                .open(log)
                .unwrap()
                .write_all_at(&[0xA5; 512], 0)
                .unwrap()
        }),
    ];
    for (what, hurt) in damage {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.apply(&[Mutation::PutPool(pool()), Mutation::PutBlock(block())])
                .unwrap();
            for i in 1..=20u8 {
                let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
                s.durable(seq).await.unwrap();
            }
        }
        // A clean reopen is fine and keeps everything.
        assert_eq!(
            SledStore::open(dir.path())
                .unwrap()
                .load()
                .unwrap()
                .allocations
                .len(),
            20,
            "{what}"
        );
        hurt(&dir.path().join("db").join("db"));
        match SledStore::open(dir.path()) {
            Err(e @ StoreError::Lost { .. }) => assert!(e.is_damage(), "{what}: {e}"),
            Err(e) => assert!(e.is_damage(), "{what}: not damage: {e}"),
            Ok(s) => panic!(
                "{what}: opened with {} allocations",
                s.load().map(|l| l.allocations.len()).unwrap_or(0)
            ),
        }
        // Moved aside, a fresh database opens, and so does the next start.
        let moved = SledStore::move_aside(dir.path(), SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(moved, dir.path().join("db.corrupt-0"));
        assert!(moved.join("db").is_file() && moved.join(FLUSHES_FILE_MOVED).is_file());
        assert!(
            SledStore::open(dir.path())
                .unwrap()
                .load()
                .unwrap()
                .allocations
                .is_empty()
        );
        SledStore::open(dir.path()).unwrap();
        // A second move in the same second does not clobber the first.
        let again = SledStore::move_aside(dir.path(), SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(again, dir.path().join("db.corrupt-0-1"));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// A crash that loses the log's tail written since open: the bound the
/// flusher advanced meanwhile catches it. (A clean close would too, but
/// after a crash only the flusher's bound is there.)
#[tokio::test]
async fn flusher_advances_the_bound_so_a_lost_tail_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let at_open_copy = dir.path().join("db.at-open");
    let every = 8;
    let policy = BoundPolicy {
        flushes: every,
        interval: Duration::from_secs(3600),
    };
    {
        // Something for the log to hold at the open below.
        let s = SledStore::open(dir.path()).unwrap();
        let seq = s
            .apply(&[Mutation::PutPool(pool()), Mutation::PutBlock(block())])
            .unwrap();
        s.durable(seq).await.unwrap();
    }
    let (at_open, crashed_bound) = {
        let s = SledStore::open_with(dir.path(), policy).unwrap();
        let at_open = read_flush_bound(dir.path()).unwrap().unwrap();
        // sled 0.34 fills a preallocated segment after a reopen, so
        // truncating the log to its length at open would cut nothing.
        copy_dir(&db, &at_open_copy);
        // One flush each: every durable() returns before the next apply.
        for i in 1..=(3 * every) as u8 {
            let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
            s.durable(seq).await.unwrap();
        }
        let durable = read_flushes(&s.meta).unwrap();
        let bound = read_flush_bound(dir.path()).unwrap().unwrap();
        // The write after flush N is done before flush N + 1 begins.
        assert!(
            bound >= at_open + 2 * every && bound <= durable,
            "bound {bound}: {at_open} at open, {durable} durable"
        );
        (at_open, bound)
    };
    // As the crash left it: the log as it was at open (its tail never
    // reached the disk) and the flusher's bound, not the clean close's.
    std::fs::remove_dir_all(&db).unwrap();
    std::fs::rename(&at_open_copy, &db).unwrap();
    write_flush_bound(dir.path(), crashed_bound).unwrap();
    match SledStore::open(dir.path()) {
        Err(e @ StoreError::Lost { .. }) => assert!(e.is_damage(), "{e}"),
        Err(e) => panic!("expected Lost, got {e}"),
        Ok(s) => panic!(
            "opened with {} allocations",
            s.load().map(|l| l.allocations.len()).unwrap_or(0)
        ),
    }
    // sled itself sees nothing wrong: only the bound tells.
    std::fs::remove_file(dir.path().join(FLUSHES_FILE)).unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(read_flushes(&s.meta).unwrap(), at_open);
    assert_eq!(s.load().unwrap().pools, vec![pool()]);
}

/// The time trigger alone: checked at each flush, no timer of its own.
#[tokio::test]
async fn bound_interval_is_checked_at_flush_time() {
    let dir = tempfile::tempdir().unwrap();
    let open = |interval| {
        let policy = BoundPolicy {
            flushes: u64::MAX,
            interval,
        };
        SledStore::open_with(dir.path(), policy).unwrap()
    };
    let bound = || read_flush_bound(dir.path()).unwrap().unwrap();
    let s = open(Duration::from_secs(3600));
    for i in 1..=3 {
        let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
        s.durable(seq).await.unwrap();
    }
    assert_eq!(bound(), 0, "not due yet");
    drop(s);
    let at_open = bound();
    let s = open(Duration::ZERO);
    for i in 4..=6 {
        let seq = s.apply(&[Mutation::PutAllocation(alloc(i))]).unwrap();
        s.durable(seq).await.unwrap();
    }
    // Due at every flush; the last write may still be under way.
    assert!(bound() >= at_open + 2, "{} after {at_open}", bound());
}

#[test]
fn garbage_conf_is_damage_and_other_errors_are_not() {
    let dir = tempfile::tempdir().unwrap();
    drop(SledStore::open(dir.path()).unwrap());
    std::fs::write(dir.path().join("db").join("conf"), b"\xff garbage").unwrap();
    let e = SledStore::open(dir.path()).unwrap_err();
    assert!(e.is_damage(), "{e}");
    let denied = StoreError::Io {
        path: dir.path().into(),
        source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    };
    assert!(!denied.is_damage());
    assert!(!StoreError::Closed.is_damage());
}

/// Each kind of sled error reads as before ("sled: ..."), keeps sled's
/// error as its source, and is damage exactly when it says the database is.
#[test]
fn sled_errors_keep_their_text_and_damage() {
    use std::io::{Error, ErrorKind};
    let cases: [(::sled::Error, bool); 7] = [
        (::sled::Error::Corruption { at: None, bt: () }, true),
        (::sled::Error::ReportableBug("bug".into()), true),
        (::sled::Error::Unsupported("format".into()), true),
        (
            ::sled::Error::Io(Error::from(ErrorKind::UnexpectedEof)),
            true,
        ),
        (::sled::Error::Io(Error::from(ErrorKind::InvalidData)), true),
        (
            ::sled::Error::Io(Error::from(ErrorKind::PermissionDenied)),
            false,
        ),
        (::sled::Error::CollectionNotFound("tree".into()), false),
    ];
    for (sled_error, damage) in cases {
        let text = format!("sled: {sled_error}");
        let e = StoreError::from(sled_error);
        assert_eq!(e.to_string(), text);
        assert_eq!(e.is_damage(), damage, "{e}");
        let source = std::error::Error::source(&e).expect("sled's error is the source");
        assert!(source.is::<::sled::Error>(), "{e}");
    }
}

#[test]
fn notice_is_kept_until_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.notice(), None);
    s.set_notice("rebuilt".into());
    assert_eq!(s.notice().as_deref(), Some("rebuilt"));
}
