//! Hard crash: ipamd is SIGKILLed 50 times, at random
//! moments, during a storm of 1,000 ADD and DEL operations (new pods, DELs
//! of added ones, re-ADDs of deleted ones; 8 workers), and restarted after
//! each kill.
//!
//! ADDs that fail while ipamd is down must fail with code 11 (try again);
//! DELs are retried until they succeed, as a runtime does. Afterwards: no
//! address is held twice, every ADD that succeeded and was not DELed since
//! still holds exactly its address, and DEL of every pod leaves nothing.
//! (tests/crash.rs is the 5-kill, ADD-only version.)

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::storm::{
    ensure_no_duplicates, holders_by_ip, new_pods, parallel, wait_node_clean,
};
use ferry_tests::*;
use rand::Rng;
use rand::seq::IndexedRandom;

const OPS: usize = 1000;
const WORKERS: usize = 8;
const KILLS: usize = 50;
/// Pods per worker: enough that about half the operations can ADD a new one.
const PODS_PER_WORKER: usize = 40;
/// How long one DEL may keep failing (ipamd restarts take well under this).
const DEL_RETRY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Fresh,
    /// ADD succeeded with this address, no DEL succeeded since.
    Live(Ipv4Addr),
    /// DELed, or its ADD failed.
    Gone,
}

/// What the storm saw that it should not have.
#[derive(Default)]
struct Problems(Mutex<Vec<String>>);

impl Problems {
    fn push(&self, p: String) {
        self.0.lock().unwrap().push(p);
    }
}

/// The first problem of each pod (a pod that fails once tends to fail again).
fn first_per_pod(problems: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    problems
        .iter()
        .filter(|p| seen.insert(p.split(" failed").next().unwrap_or(p).to_string()))
        .take(10)
        .cloned()
        .collect()
}

/// ipamd's log lines that name `pod`'s container or host veth.
fn log_about(log: &str, pod: &Pod) -> String {
    let veth = pod.host_veth();
    log.lines()
        .filter(|l| l.contains(&veth) || l.contains(&pod.container_id))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe(out: &Result<CniOutput>) -> String {
    match out {
        Ok(o) => o.to_string(),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn adds_and_dels_survive_fifty_ipamd_kills() -> Result<()> {
    require_root();
    let start = Instant::now();
    let mut w = OneNode::start(IpamdConfig::default())?;
    let pods = new_pods(WORKERS * PODS_PER_WORKER, WORKERS)?;
    let conf = ferry_netconf(w.ipamd.socket(), "1.1.0");
    let OneNode {
        rt, ipamd, node, ..
    } = &mut w;
    let cni = &rt.cni;

    let states: Mutex<Vec<State>> = Mutex::new(vec![State::Fresh; pods.len()]);
    // Live addresses, to catch a duplicate the moment it is handed out.
    let live: Mutex<HashMap<Ipv4Addr, usize>> = Mutex::new(HashMap::new());
    let problems = Problems::default();
    let odd_pods: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let up = AtomicBool::new(true);
    // Kills so far, and per pod the kill count around its last good DEL
    // (start, end): tells a failure caused by a crash from one that is not.
    let kills = AtomicUsize::new(0);
    let del_epochs: Mutex<Vec<Option<(usize, usize)>>> = Mutex::new(vec![None; pods.len()]);
    let tickets = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let tally: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());
    let count = |what: String| *tally.lock().unwrap().entry(what).or_default() += 1;

    // Waits (bounded) while the killer has ipamd down, so that the kills
    // land on operations in flight rather than on a backlog of instant failures.
    let wait_up = || {
        let _ = wait_until("ipamd to be back", Duration::from_secs(60), || {
            Ok(up.load(Ordering::SeqCst).then_some(()))
        });
    };

    let add = |i: usize| {
        let out = cni.ferry(&CniCall::add(&pods[i]), &conf);
        match &out {
            Ok(o) if o.success() => match o.ips().as_slice() {
                [ip] => {
                    count("ADD ok".into());
                    if let Some(other) = live.lock().unwrap().insert(*ip, i) {
                        problems.push(format!(
                            "{ip} handed to pod {i} while pod {other} still holds it"
                        ));
                    }
                    states.lock().unwrap()[i] = State::Live(*ip);
                }
                other => problems.push(format!("ADD {i} returned {other:?}: {o}")),
            },
            Ok(o) if o.error_code() == Some(11) => {
                count("ADD code 11".into());
                states.lock().unwrap()[i] = State::Gone;
            }
            _ => {
                count(format!(
                    "ADD {:?}",
                    out.as_ref().ok().and_then(|o| o.error_code())
                ));
                odd_pods.lock().unwrap().push(i);
                let last_del = match del_epochs.lock().unwrap()[i] {
                    Some((a, b)) => format!("its last DEL ran from kill {a} to kill {b}"),
                    None => "never DELed".to_string(),
                };
                problems.push(format!(
                    "ADD {i} failed, not with code 11 (at kill {}; {last_del}): {}",
                    kills.load(Ordering::SeqCst),
                    describe(&out)
                ));
                states.lock().unwrap()[i] = State::Gone;
            }
        }
    };

    let del = |i: usize| {
        let deadline = Instant::now() + DEL_RETRY;
        loop {
            let epoch = kills.load(Ordering::SeqCst);
            let out = cni.ferry(&CniCall::del(&pods[i]), &conf);
            match &out {
                Ok(o) if o.success() => {
                    count("DEL ok".into());
                    del_epochs.lock().unwrap()[i] = Some((epoch, kills.load(Ordering::SeqCst)));
                    if let State::Live(ip) = states.lock().unwrap()[i] {
                        live.lock().unwrap().remove(&ip);
                    }
                    states.lock().unwrap()[i] = State::Gone;
                    return;
                }
                Ok(o) if o.error_code() == Some(11) => count("DEL code 11 (retried)".into()),
                _ => {
                    count("DEL other failure (retried)".into());
                    problems.push(format!(
                        "DEL {i} failed, not with code 11: {}",
                        describe(&out)
                    ));
                }
            }
            if Instant::now() > deadline {
                problems.push(format!(
                    "DEL {i} kept failing for {DEL_RETRY:?}: {}",
                    describe(&out)
                ));
                return;
            }
            wait_up();
        }
    };

    // Worker `w` owns pods w, w + WORKERS, ...: no two calls for one pod at once.
    let worker = |wid: usize| {
        let mut rng = rand::rng();
        let mine: Vec<usize> = (wid..pods.len()).step_by(WORKERS).collect();
        while tickets.fetch_add(1, Ordering::SeqCst) < OPS {
            wait_up();
            let st = states.lock().unwrap().clone();
            let of = |want: fn(&State) -> bool| -> Vec<usize> {
                mine.iter().copied().filter(|&i| want(&st[i])).collect()
            };
            let fresh = of(|s| *s == State::Fresh);
            let lived = of(|s| matches!(s, State::Live(_)));
            let gone = of(|s| *s == State::Gone);
            let r: f64 = rng.random();
            let pick = |v: &[usize], rng: &mut rand::rngs::ThreadRng| v.choose(rng).copied();
            if r < 0.5
                && let Some(i) = pick(&fresh, &mut rng)
            {
                add(i);
            } else if r < 0.7
                && let Some(i) = pick(&lived, &mut rng)
            {
                del(i);
            } else if let Some(i) = pick(&gone, &mut rng) {
                add(i);
            } else if let Some(i) = pick(&fresh, &mut rng) {
                add(i);
            } else if let Some(i) = pick(&lived, &mut rng) {
                del(i);
            }
            done.fetch_add(1, Ordering::SeqCst);
        }
    };

    let killer = || -> Result<()> {
        let mut rng = rand::rng();
        let span = OPS / (KILLS + 1);
        for k in 0..KILLS {
            let at = span * (k + 1) - span / 2 + rng.random_range(0..span);
            wait_until("operations to progress", Duration::from_secs(120), || {
                Ok((done.load(Ordering::SeqCst) >= at).then_some(()))
            })?;
            // Land the kill somewhere inside the calls now in flight.
            std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
            up.store(false, Ordering::SeqCst);
            kills.fetch_add(1, Ordering::SeqCst);
            ipamd.kill();
            let restarted = ipamd
                .restart()
                .with_context(|| format!("restarting ipamd after kill {}", k + 1));
            up.store(true, Ordering::SeqCst);
            restarted?;
        }
        Ok(())
    };

    let killed = std::thread::scope(|s| {
        let k = s.spawn(killer);
        for wid in 0..WORKERS {
            s.spawn(move || worker(wid));
        }
        k.join().expect("killer thread")
    });
    let t_storm = start.elapsed();
    eprintln!(
        "hard crash: storm of {OPS} operations with {KILLS} kills took {t_storm:?}: {:#?}",
        tally.lock().unwrap()
    );
    killed?;
    ensure!(ipamd.is_running(), "ipamd is not running after the storm");

    // Every live ADD still holds exactly its address; nothing is held twice.
    let allocs = ipamd.allocations()?;
    ensure_no_duplicates(&allocs)?;
    let by_ip = holders_by_ip(&allocs)?;
    let states = states.into_inner().unwrap();
    let mut by_container: HashMap<&str, Vec<&str>> = HashMap::new();
    for a in &allocs {
        let cid = a["containerId"].as_str().unwrap_or_default();
        by_container
            .entry(cid)
            .or_default()
            .push(a["ip"].as_str().unwrap_or_default());
    }
    let mut live_count = 0;
    for (i, st) in states.iter().enumerate() {
        let State::Live(ip) = st else { continue };
        live_count += 1;
        let cid = pods[i].container_id.as_str();
        let ip_s = ip.to_string();
        let held = by_container.get(cid).cloned().unwrap_or_default();
        ensure!(
            held == [ip_s.as_str()],
            "pod {i} was ADDed with {ip} and not DELed, but ipamd holds {held:?} for it \
             (and {ip} belongs to {:?})",
            by_ip.get(&ip_s)
        );
        ensure!(
            pods[i].addrs()? == [*ip],
            "pod {i}'s {} does not hold {ip}",
            pods[i].ifname
        );
    }
    ensure!(
        tally.lock().unwrap().get("ADD ok").copied().unwrap_or(0) > OPS / 4,
        "too few ADDs succeeded to mean anything: {:?}",
        tally.lock().unwrap()
    );
    eprintln!(
        "hard crash: {live_count} live pods, {} allocations after the storm",
        allocs.len()
    );

    // DEL every pod, as a runtime would (retrying), and nothing may be left.
    let dels = parallel(WORKERS, pods.len(), |i| {
        wait_until(&format!("DEL of pod {i} to succeed"), DEL_RETRY, || {
            let out = cni.ferry(&CniCall::del(&pods[i]), &conf)?;
            if out.success() {
                Ok(Some(()))
            } else {
                bail!("{out}")
            }
        })
    });
    dels.into_iter().collect::<Result<Vec<()>>>()?;
    wait_node_clean(ipamd, node, Duration::from_secs(30))?;

    let problems = problems.0.into_inner().unwrap();
    let odd_pods = odd_pods.into_inner().unwrap();
    ensure!(
        problems.is_empty(),
        "{} problems during the storm; the first per pod:\n{}\n\
         ipamd's log on the first such pod's veth:\n{}",
        problems.len(),
        first_per_pod(&problems).join("\n"),
        odd_pods
            .first()
            .map(|&i| log_about(&ipamd.log(), &pods[i]))
            .unwrap_or_default()
    );
    eprintln!("hard crash: done in {:?}", start.elapsed());
    Ok(())
}
