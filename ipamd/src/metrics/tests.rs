use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::Code;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use super::exposition::{Text, escape_help};
use super::http::{Route, route};
use super::*;
use crate::ipam::Ipam;
use crate::model::{BlockClaim, BlockUsage, Finding, FindingKind, PoolSpec, PoolUsage};

fn pool(name: &str, cidr: &str, size: u64, allocated: u64, cooling: u64, blocks: u32) -> PoolUsage {
    PoolUsage {
        pool: PoolSpec::new(name, cidr.parse().unwrap(), 26, vec![]),
        is_default: name == "default",
        size,
        allocated,
        cooling,
        blocks,
    }
}

fn block(pool: &str, cidr: &str, size: u32, allocated: u32, cooling: u32) -> BlockUsage {
    BlockUsage {
        claim: BlockClaim {
            pool: pool.into(),
            cidr: cidr.parse().unwrap(),
            node: "n1".into(),
            claimed_unix_ms: 0,
        },
        size,
        allocated,
        cooling,
    }
}

/// The value of the one sample line that starts with `series` (name and
/// labels exactly as written).
fn value(text: &str, series: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(str::to_string)
    })
}

#[test]
fn label_values_and_help_are_escaped() {
    assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
    assert_eq!(escape_label_value("x\ny"), "x\\ny");
    assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    let mut t = Text::default();
    t.sample("x", &[("pool", "we\"ird\\\n"), ("b", "ok")], 3);
    assert_eq!(t.0, "ferry_ipamd_x{pool=\"we\\\"ird\\\\\\n\",b=\"ok\"} 3\n");
    let mut t = Text::default();
    t.family("x", "gauge", "line one\nline \\two");
    assert_eq!(
        t.0,
        "# HELP ferry_ipamd_x line one\\nline \\\\two\n# TYPE ferry_ipamd_x gauge\n"
    );
}

#[test]
fn pool_gauges_per_pool() {
    let pools = [
        pool("default", "10.244.0.0/16", 65534, 3, 1, 2),
        pool("team-a", "10.99.0.0/24", 254, 0, 0, 0),
    ];
    let blocks = [
        // 64 - 2 - 1 and 64 - 1 - 0: 61 + 63.
        block("default", "10.244.0.0/26", 64, 2, 1),
        block("default", "10.244.0.64/26", 64, 1, 0),
        // A block's cooling can exceed what is left; never negative.
        block("gone", "10.1.0.0/30", 2, 2, 5),
    ];
    let m = Metrics::new();
    let text = m.render(&pools, &blocks);
    let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    assert_eq!(v("ferry_ipamd_pool_allocations{pool=\"default\"}"), "3");
    assert_eq!(v("ferry_ipamd_pool_allocations{pool=\"team-a\"}"), "0");
    assert_eq!(
        v("ferry_ipamd_pool_cooling_addresses{pool=\"default\"}"),
        "1"
    );
    assert_eq!(v("ferry_ipamd_pool_blocks{pool=\"default\"}"), "2");
    assert_eq!(v("ferry_ipamd_pool_blocks{pool=\"team-a\"}"), "0");
    assert_eq!(v("ferry_ipamd_pool_size_addresses{pool=\"team-a\"}"), "254");
    assert_eq!(
        v("ferry_ipamd_pool_free_addresses{pool=\"default\"}"),
        "124"
    );
    assert_eq!(v("ferry_ipamd_pool_free_addresses{pool=\"team-a\"}"), "0");
    assert!(!text.contains("pool=\"gone\""), "{text}");
    assert_eq!(v("ferry_ipamd_up"), "1");
    assert!(
        text.contains(&format!(
            "ferry_ipamd_build_info{{version=\"{}\",api_version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            ferry_proto::PROTOCOL_VERSION
        )),
        "{text}"
    );
    let rss: u64 = v("ferry_ipamd_resident_memory_bytes").parse().unwrap();
    assert!(rss > 0);
    // Every family is announced once, with its type, before its samples.
    for name in [
        "pool_allocations",
        "pool_free_addresses",
        "grpc_requests_total",
        "grpc_request_duration_seconds",
        "reconcile_findings_total",
    ] {
        assert_eq!(
            text.matches(&format!("# TYPE ferry_ipamd_{name} ")).count(),
            1,
            "{name}"
        );
    }
}

#[test]
fn histogram_buckets_are_cumulative_and_end_in_inf() {
    let m = Metrics::new();
    let svc = "ferry.ipam.v1.Ipam";
    m.record_request(svc, "Allocate", Code::Ok, Duration::from_micros(50));
    m.record_request(svc, "Allocate", Code::Ok, Duration::from_millis(3));
    m.record_request(
        svc,
        "Allocate",
        Code::ResourceExhausted,
        Duration::from_secs(2),
    );
    m.record_request(svc, "Release", Code::Ok, Duration::from_millis(1));
    let text = m.render(&[], &[]);
    let labels = "service=\"ferry.ipam.v1.Ipam\",method=\"Allocate\"";
    let v = |s: String| value(&text, &s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    let bucket = |le: &str| {
        v(format!(
            "ferry_ipamd_grpc_request_duration_seconds_bucket{{{labels},le=\"{le}\"}}"
        ))
    };
    assert_eq!(bucket("0.0001"), "1");
    assert_eq!(bucket("0.0025"), "1");
    assert_eq!(bucket("0.005"), "2");
    assert_eq!(bucket("1"), "2");
    assert_eq!(bucket("+Inf"), "3");
    assert_eq!(
        v(format!(
            "ferry_ipamd_grpc_request_duration_seconds_count{{{labels}}}"
        )),
        "3"
    );
    let sum: f64 = v(format!(
        "ferry_ipamd_grpc_request_duration_seconds_sum{{{labels}}}"
    ))
    .parse()
    .unwrap();
    assert!((sum - 2.00305).abs() < 1e-9, "{sum}");
    assert_eq!(
        v(format!(
            "ferry_ipamd_grpc_requests_total{{{labels},code=\"OK\"}}"
        )),
        "2"
    );
    assert_eq!(
        v(format!(
            "ferry_ipamd_grpc_requests_total{{{labels},code=\"RESOURCE_EXHAUSTED\"}}"
        )),
        "1"
    );
    // The bucket lines come in ascending order of le, +Inf last.
    let les: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("_bucket{") && l.contains("method=\"Release\""))
        .map(|l| l.split("le=\"").nth(1).unwrap().split('"').next().unwrap())
        .collect();
    assert_eq!(les.len(), LATENCY_BUCKETS.len() + 1);
    assert_eq!(les.last(), Some(&"+Inf"));
}

#[test]
fn method_series_are_bounded() {
    let m = Metrics::new();
    for i in 0..(MAX_METHOD_SERIES + 10) {
        m.record_request("s", &format!("M{i}"), Code::Unimplemented, Duration::ZERO);
    }
    let text = m.render(&[], &[]);
    let n = text
        .lines()
        .filter(|l| l.starts_with("ferry_ipamd_grpc_requests_total{"))
        .count();
    assert_eq!(n, MAX_METHOD_SERIES + 1, "{text}");
    assert_eq!(
        value(
            &text,
            "ferry_ipamd_grpc_requests_total{service=\"s\",method=\"other\",code=\"UNIMPLEMENTED\"}"
        )
        .as_deref(),
        Some("10")
    );
}

#[test]
fn reconcile_counters() {
    let m = Metrics::new();
    let text = m.render(&[], &[]);
    for kind in FindingKind::ALL.map(FindingKind::as_str) {
        assert_eq!(
            value(
                &text,
                &format!("ferry_ipamd_reconcile_findings_total{{kind=\"{kind}\"}}")
            )
            .as_deref(),
            Some("0"),
            "{text}"
        );
    }
    let f = |kind| Finding {
        kind,
        detail: String::new(),
        allocation: None,
    };
    m.clone()
        .record_findings(&[f(FindingKind::OrphanVeth), f(FindingKind::OrphanVeth)]);
    m.record_findings(&[f(FindingKind::MissingVeth)]);
    m.record_reconcile_released(2);
    m.record_reconcile_released(1);
    let text = m.render(&[], &[]);
    let v = |s: &str| value(&text, s);
    assert_eq!(
        v("ferry_ipamd_reconcile_findings_total{kind=\"orphan-veth\"}").as_deref(),
        Some("2")
    );
    assert_eq!(
        v("ferry_ipamd_reconcile_findings_total{kind=\"missing-veth\"}").as_deref(),
        Some("1")
    );
    assert_eq!(
        v("ferry_ipamd_reconcile_released_total").as_deref(),
        Some("3")
    );
}

#[test]
fn routes() {
    assert_eq!(
        route("GET /metrics HTTP/1.1"),
        Route::Metrics { head_only: false }
    );
    assert_eq!(
        route("GET /metrics?x=1 HTTP/1.0"),
        Route::Metrics { head_only: false }
    );
    assert_eq!(
        route("HEAD /metrics HTTP/1.1"),
        Route::Metrics { head_only: true }
    );
    assert_eq!(route("POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
    assert_eq!(route("GET / HTTP/1.1"), Route::NotFound);
    assert_eq!(route("GET /metrics/ HTTP/1.1"), Route::NotFound);
    assert_eq!(route("GET /metrics"), Route::BadRequest);
    assert_eq!(route("garbage"), Route::BadRequest);
    assert_eq!(route("GET /metrics SPDY/3"), Route::BadRequest);
}

/// A stand-in tonic service answering like generated code: an error as
/// a trailers-only response with grpc-status in the headers.
#[derive(Clone)]
struct Fake;

impl NamedService for Fake {
    const NAME: &'static str = "test.Fake";
}

impl Service<http::Request<()>> for Fake {
    type Response = http::Response<()>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<()>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<()>) -> Self::Future {
        let path = req.uri().path().to_string();
        Box::pin(async move {
            let mut resp = http::Response::new(());
            match path.as_str() {
                "/test.Fake/Fail" => {
                    resp.headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static("9"));
                }
                "/test.Fake/Hang" => std::future::pending::<()>().await,
                _ => {}
            }
            Ok(resp)
        })
    }
}

fn req(path: &str) -> http::Request<()> {
    http::Request::builder().uri(path).body(()).unwrap()
}

#[tokio::test]
async fn grpc_wrapper_counts_codes_from_headers() {
    let m = Metrics::new();
    let mut svc = m.grpc(Fake);
    svc.call(req("/test.Fake/Allocate")).await.unwrap();
    svc.call(req("/test.Fake/Allocate")).await.unwrap();
    svc.call(req("/test.Fake/Fail")).await.unwrap();
    // Dropped before it answers: the client went away.
    let hung = svc.call(req("/test.Fake/Hang"));
    assert!(
        tokio::time::timeout(Duration::from_millis(10), hung)
            .await
            .is_err()
    );
    let text = m.render(&[], &[]);
    let v = |method: &str, code: &str| {
        value(
            &text,
            &format!(
                "ferry_ipamd_grpc_requests_total{{service=\"test.Fake\",method=\"{method}\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(v("Allocate", "OK").as_deref(), Some("2"), "{text}");
    assert_eq!(
        v("Fail", "FAILED_PRECONDITION").as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(v("Hang", "CANCELLED").as_deref(), Some("1"), "{text}");
    assert_eq!(
        value(
            &text,
            "ferry_ipamd_grpc_request_duration_seconds_count{service=\"test.Fake\",method=\"Allocate\"}"
        )
        .as_deref(),
        Some("2")
    );
}

async fn get(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_metrics_over_a_real_core_and_404_elsewhere() {
    use crate::cluster::local::LocalCluster;
    use crate::ipam::IpamOptions;
    use crate::model::{AllocKey, AllocateParams, PodMeta};
    use crate::store::memory::MemoryStore;

    let ipam = Arc::new(
        Ipam::open(
            IpamOptions::one_pool_for_tests(),
            Arc::new(MemoryStore::new()),
            Arc::new(LocalCluster),
        )
        .await
        .unwrap(),
    );
    ipam.allocate(AllocateParams {
        key: AllocKey {
            network: "net".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
        },
        pod: PodMeta::default(),
        requested_ips: vec![],
        pool_hint: None,
    })
    .await
    .unwrap();
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(listener, Metrics::new(), ipam.clone(), stop_rx));

    let resp = get(addr, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    // 10.244.0.0/24 in /26 blocks: one block of 64 with one allocation;
    // the pool's network and broadcast addresses are not usable.
    let usage = &ipam.pools()[0];
    let block = &ipam.blocks(None)[0];
    assert_eq!(
        value(body, "ferry_ipamd_pool_allocations{pool=\"default\"}").as_deref(),
        Some("1")
    );
    assert_eq!(
        value(body, "ferry_ipamd_pool_size_addresses{pool=\"default\"}"),
        Some(usage.size.to_string())
    );
    assert_eq!(
        value(body, "ferry_ipamd_pool_free_addresses{pool=\"default\"}"),
        Some((block.size - 1).to_string()),
        "{body}"
    );

    let resp = get(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    let resp = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 200 ") && resp.ends_with("\r\n\r\n"),
        "{resp}"
    );
    let resp = get(addr, "DELETE /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 405 ") && resp.contains("Allow: GET"),
        "{resp}"
    );

    // A client that connects and says nothing does not hold up stop.
    let _idle = TcpStream::connect(addr).await.unwrap();
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve stops")
        .unwrap();
    assert_eq!(Arc::strong_count(&ipam), 1, "a connection kept the core");
}

#[tokio::test]
async fn a_taken_address_is_a_clear_error() {
    let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = first.local_addr().unwrap();
    let e = bind(addr).await.unwrap_err().to_string();
    assert!(
        e.contains(&addr.to_string()) && e.contains("metrics"),
        "{e}"
    );
}
