//! The operator's metrics endpoint (`[metrics] listen`): `GET /metrics` over HTTP/1.1 in
//! the Prometheus text format 0.0.4, or OpenMetrics 1.0 when the scraper's `Accept`
//! asks for `application/openmetrics-text`. Encoded with the `prometheus-client` crate.
//!
//! A scrape is one request to the daemon's loop (`{"cmd":"metrics"}` on the control
//! channel), answered from the same state as `status`, `assoc`, `xfrm` and `flows` at
//! that moment, so the numbers agree with what those commands show. Counters are the
//! agent's own totals since it started; gauges are the state now.
//!
//! Every metric (all prefixed `hip_`):
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `calls` | gauge | `direction`, `state`, `verification` | calls now (`status` `calls`; state as SIP sees it, verification level of the draft's §4) |
//! | `sip_calls_total` | counter | `direction` (`in`, `out`) | calls received / placed (`status` `stats.calls_in`/`calls_out`) |
//! | `sip_calls_confirmed_total` | counter | | dialogs confirmed by an ACK (`stats.confirmed`) |
//! | `sip_calls_ended_total` | counter | | calls ended (`stats.ended`) |
//! | `sip_rejected_bad_sdp_total` | counter | | INVITEs refused for their SDP (`stats.rejected_bad_sdp`) |
//! | `sip_bad_input_total` | counter | `action` (`answered`, `dropped`) | malformed SIP answered with an error or dropped |
//! | `sip_registered` | gauge | | 1 while the registrar accepted our binding |
//! | `sip_admission_refused_total` | counter | `reason` (`busy`, `rate`) | new INVITEs answered 503 (`limits.sip.refused_busy`/`refused_rate`) |
//! | `sip_stream_timeouts_total` | counter | | connections cut: a message did not complete in time |
//! | `sip_connections` | gauge | | TCP/TLS connections open (`limits.connections.open`) |
//! | `sip_connections_refused_total` | counter | | connections closed at once at a cap |
//! | `sip_connections_idle_closed_total` | counter | | connections closed when idle |
//! | `calls_pending_incoming` | gauge | | incoming calls not yet ACKed (the `[limits]` cap they count against) |
//! | `pool_entries` | gauge | | known-HITs pool entries |
//! | `associations` | gauge | `state` | association records by state (`assoc`) |
//! | `association_outcomes_total` | counter | `outcome` (`established`, `failed`, `lost`, `closed`) | what HIP reported |
//! | `base_exchange_seconds` | histogram | | exchange start (I1 sent, or the call answered) to ESTABLISHED |
//! | `kernel_install_seconds` | histogram | | ESTABLISHED to SAs, policies, route and map entries installed |
//! | `hip_packets_received_total` | counter | | HIP datagrams received on the raw sockets |
//! | `hip_packets_dropped_total` | counter | `reason` | datagrams the endpoint dropped, by reason |
//! | `hip_receive_batches_cut_total` | counter | | receive bursts that hit the batch limit |
//! | `hip_r1_sent_total` | counter | `lane` (`expected`, `unexpected`) | R1s sent |
//! | `hip_r1_rate_limited_total` | counter | `lane` (`address`, `unexpected`, `expected`) | I1s not answered: their lane's budget was spent |
//! | `hip_refused_at_capacity_total` | counter | | new peers refused at `max_associations` |
//! | `hip_unverified_notify_total` | counter | | NOTIFYs that could not be verified (ignored) |
//! | `hip_udp_received_total` | counter | | HIP packets received over UDP (RFC 9028) |
//! | `hip_udp_not_hip_total` | counter | | UDP datagrams on the HIP port that were neither HIP nor ESP |
//! | `hip_nat_keepalives_total` | counter | `direction` (`sent`, `received`) | NAT keepalives sent, and verified ones received |
//! | `hip_endpoint_associations` | gauge | | associations the HIP endpoint holds, every state |
//! | `kernel_sas` | gauge | | hip's XFRM SAs in the kernel (`xfrm`) |
//! | `kernel_policies` | gauge | | hip's XFRM policies in the kernel (`xfrm`) |
//! | `datapath_packets_total`, `datapath_bytes_total` | counter | `direction` (`ingress`, `egress`) | what the tc programs saw |
//! | `datapath_events_total` | counter | `event` | the programs' counters (`esp_in`, `esp_in_unknown_spi`, `esp_out`, `esp_out_unknown_spi`, `rtp_in`, `hit_udp_not_rtp`, `guard_passed`, `guard_dropped`, `malformed`, `locator_changes`, `events_lost`, `flow_insert_failed`, and on the HIP-over-UDP port `esp_udp_hip` for HIP control packets and `esp_udp_keepalive` for 0xFF NAT keepalives, neither ESP nor media) |
//! | `esp_packets_total`, `esp_bytes_total` | counter | `spi`, `direction`, `peer_hit` | per SA, from the SPI map |
//! | `esp_locator_changes_total` | counter | `spi`, `direction`, `peer_hit` | inbound ESP seen from a new outer source |
//! | `guard_dropped_packets_total`, `guard_dropped_bytes_total` | counter | `dst` | clear-text RTP the media guard dropped |
//! | `rtp_flows` | gauge | | entries of the flow table (`flows`) |
//! | `rtp_packets_total`, `rtp_bytes_total` | counter | `src_hit`, `dst_hit`, `src_port`, `dst_port`, `ssrc` | per decrypted RTP flow |
//! | `rtp_lost` | gauge | same | cumulative loss (RFC 3550 A.3) |
//! | `rtp_jitter_seconds` | gauge | same | interarrival jitter (RFC 3550 A.8) |
//! | `scrape_error` | gauge | `source` (`xfrm`, `datapath`) | 1 when that part could not be read for this scrape |
//!
//! The kernel and datapath metrics are absent when `[kernel]` or `[datapath]` is off.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hip_datapath::{DatapathStats, Flow, GuardDrops, SpiCounters};
use prometheus_client::{
    encoding::{prometheus_text, text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};

use crate::{
    control::{Incoming, Request},
    secure::{AssocRecord, Timing},
};

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listening socket could not be bound.
    #[error("[metrics] listen {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

type Labels = Vec<(String, String)>;

/// What is observed as it happens (the rest is read at scrape time): set-up latencies
/// and HIP's outcomes. Owned by the daemon's loop.
#[derive(Debug, Clone)]
pub struct Recorder {
    base_exchange: Histogram,
    kernel_install: Histogram,
    outcomes: Family<Labels, Counter>,
}

impl Default for Recorder {
    fn default() -> Self {
        // 1 ms to about 16 s: a quiet host's exchange takes tens of ms, TCG seconds.
        Self {
            base_exchange: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            kernel_install: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            outcomes: Family::default(),
        }
    }
}

impl Recorder {
    /// An association reached ESTABLISHED with this set-up timing.
    pub fn established(&self, t: &Timing) {
        self.outcome("established");
        if let (Some(s), Some(e)) = (t.started, t.established) {
            self.base_exchange
                .observe(e.saturating_sub(s) as f64 / 1000.0);
        }
        if let (Some(e), Some(o)) = (t.established, t.offloaded) {
            self.kernel_install
                .observe(o.saturating_sub(e) as f64 / 1000.0);
        }
    }

    /// HIP reported `outcome` (`failed`, `lost`, `closed`).
    pub fn outcome(&self, outcome: &str) {
        self.outcomes
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }
}

/// The datapath's maps as one scrape reads them.
#[derive(Debug, Clone, Default)]
pub struct DatapathView {
    /// The programs' counters.
    pub stats: DatapathStats,
    /// Per-SPI counters.
    pub spis: Vec<SpiCounters>,
    /// Media guard drops per destination.
    pub guard: Vec<GuardDrops>,
    /// The flow table.
    pub flows: Vec<Flow>,
}

/// hip's objects in the kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelCounts {
    /// XFRM SAs in hip's reqid range.
    pub sas: usize,
    /// XFRM policies in hip's priority band.
    pub policies: usize,
}

/// Everything one scrape shows.
pub struct Snapshot<'a> {
    /// The reply `status` gives now.
    pub status: &'a Value,
    /// The association records (`assoc`).
    pub associations: &'a [AssocRecord],
    /// The kernel's objects (`None`: no kernel offload; `Err`: the dump failed).
    pub kernel: Option<Result<KernelCounts, String>>,
    /// The datapath's maps (`None`: no datapath).
    pub datapath: Option<Result<DatapathView, String>>,
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_u64()
        .unwrap_or_default()
}

fn text_of(v: &Value) -> String {
    v.as_str().unwrap_or("unknown").to_owned()
}

/// A small builder: each metric is created, filled and registered in one call.
struct Out {
    reg: Registry,
}

impl Out {
    fn counter(&mut self, name: &str, help: &str, values: impl IntoIterator<Item = (Labels, u64)>) {
        let f = Family::<Labels, Counter>::default();
        for (l, v) in values {
            f.get_or_create(&l).inc_by(v);
        }
        self.reg.register(name, help, f);
    }

    fn counter1(&mut self, name: &str, help: &str, v: u64) {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        self.reg.register(name, help, c);
    }

    fn gauge(&mut self, name: &str, help: &str, values: impl IntoIterator<Item = (Labels, i64)>) {
        let f = Family::<Labels, Gauge>::default();
        for (l, v) in values {
            f.get_or_create(&l).inc_by(v);
        }
        self.reg.register(name, help, f);
    }

    fn gauge1(&mut self, name: &str, help: &str, v: i64) {
        let g = Gauge::<i64>::default();
        g.set(v);
        self.reg.register(name, help, g);
    }

    fn gauge_f(&mut self, name: &str, help: &str, values: impl IntoIterator<Item = (Labels, f64)>) {
        let f = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (l, v) in values {
            f.get_or_create(&l).set(v);
        }
        self.reg.register(name, help, f);
    }
}

/// Encodes one scrape: Prometheus text 0.0.4, or OpenMetrics 1.0 with `openmetrics`.
/// Returns the body and its `Content-Type`.
pub fn render(rec: &Recorder, s: &Snapshot<'_>, openmetrics: bool) -> (String, &'static str) {
    let mut o = Out {
        reg: Registry::with_prefix("hip"),
    };
    let st = s.status;
    let calls = st["calls"].as_array().cloned().unwrap_or_default();
    o.gauge(
        "calls",
        "Calls now, by direction, SIP state and verification level",
        calls.iter().map(|c| {
            (
                labels(&[
                    ("direction", text_of(&c["direction"])),
                    ("state", text_of(&c["state"])),
                    ("verification", text_of(&c["security"]["verification"])),
                ]),
                1,
            )
        }),
    );
    o.counter(
        "sip_calls",
        "Calls received (in) and placed (out)",
        [
            (
                labels(&[("direction", "in".into())]),
                num(st, &["stats", "calls_in"]),
            ),
            (
                labels(&[("direction", "out".into())]),
                num(st, &["stats", "calls_out"]),
            ),
        ],
    );
    o.counter1(
        "sip_calls_confirmed",
        "Dialogs confirmed by an ACK",
        num(st, &["stats", "confirmed"]),
    );
    o.counter1(
        "sip_calls_ended",
        "Calls ended",
        num(st, &["stats", "ended"]),
    );
    o.counter1(
        "sip_rejected_bad_sdp",
        "INVITEs refused for their SDP",
        num(st, &["stats", "rejected_bad_sdp"]),
    );
    o.counter(
        "sip_bad_input",
        "Malformed SIP input, answered with an error or dropped",
        [
            (
                labels(&[("action", "answered".into())]),
                num(st, &["stats", "bad_input_answered"]),
            ),
            (
                labels(&[("action", "dropped".into())]),
                num(st, &["stats", "bad_input_dropped"]),
            ),
        ],
    );
    o.gauge1(
        "sip_registered",
        "1 while the registrar accepts our binding",
        i64::from(st["registration"]["registered"] == true),
    );
    o.counter(
        "sip_admission_refused",
        "New INVITEs answered 503: too many calls (busy) or their source's rate (rate)",
        [
            (
                labels(&[("reason", "busy".into())]),
                num(st, &["limits", "sip", "refused_busy"]),
            ),
            (
                labels(&[("reason", "rate".into())]),
                num(st, &["limits", "sip", "refused_rate"]),
            ),
        ],
    );
    o.counter1(
        "sip_stream_timeouts",
        "Connections cut because a SIP message did not complete in time",
        num(st, &["limits", "sip", "stream_timeouts"]),
    );
    o.gauge1(
        "sip_connections",
        "SIP TCP/TLS connections open",
        num(st, &["limits", "connections", "open"]) as i64,
    );
    o.counter1(
        "sip_connections_refused",
        "SIP connections closed at once at a cap",
        num(st, &["limits", "connections", "refused"]),
    );
    o.counter1(
        "sip_connections_idle_closed",
        "SIP connections closed when idle",
        num(st, &["limits", "connections", "idle_closed"]),
    );
    o.gauge1(
        "calls_pending_incoming",
        "Incoming calls not yet confirmed by an ACK",
        num(st, &["limits", "pending_incoming_calls"]) as i64,
    );
    o.gauge1(
        "pool_entries",
        "Entries of the known-HITs pool",
        num(st, &["pool_entries"]) as i64,
    );
    o.gauge(
        "associations",
        "HIP association records, by state",
        s.associations.iter().map(|a| {
            (
                labels(&[(
                    "state",
                    text_of(&serde_json::to_value(a.state).unwrap_or_default()),
                )]),
                1,
            )
        }),
    );
    o.reg.register(
        "association_outcomes",
        "What HIP reported for associations: established, failed, lost, closed",
        rec.outcomes.clone(),
    );
    o.reg.register_with_unit(
        "base_exchange",
        "Base exchange start (I1 sent or call answered) to ESTABLISHED",
        prometheus_client::registry::Unit::Seconds,
        rec.base_exchange.clone(),
    );
    o.reg.register_with_unit(
        "kernel_install",
        "ESTABLISHED to SAs, policies, route and map entries installed",
        prometheus_client::registry::Unit::Seconds,
        rec.kernel_install.clone(),
    );
    let hip = &st["limits"]["hip"];
    if hip.is_object() {
        o.counter1(
            "hip_packets_received",
            "HIP datagrams received on the raw sockets",
            num(hip, &["received"]),
        );
        o.counter(
            "hip_packets_dropped",
            "HIP datagrams the endpoint dropped, by reason",
            hip["dropped"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        labels(&[("reason", k.clone())]),
                        v.as_u64().unwrap_or_default(),
                    )
                }),
        );
        o.counter1(
            "hip_receive_batches_cut",
            "Receive bursts that hit the batch limit and yielded",
            num(hip, &["batches_cut"]),
        );
        o.counter(
            "hip_r1_sent",
            "R1s sent, by lane",
            ["expected", "unexpected"].map(|lane| {
                (
                    labels(&[("lane", lane.into())]),
                    num(hip, &[&format!("r1_sent_{lane}")]),
                )
            }),
        );
        o.counter(
            "hip_r1_rate_limited",
            "I1s left unanswered because their lane's budget was spent",
            ["address", "unexpected", "expected"].map(|lane| {
                (
                    labels(&[("lane", lane.into())]),
                    num(hip, &[&format!("r1_rate_limited_{lane}")]),
                )
            }),
        );
        o.counter1(
            "hip_refused_at_capacity",
            "New peers refused at max_associations",
            num(hip, &["refused_at_capacity"]),
        );
        o.counter1(
            "hip_unverified_notify",
            "NOTIFYs that could not be verified",
            num(hip, &["unverified_notify"]),
        );
        o.counter1(
            "hip_udp_received",
            "HIP packets received over UDP (RFC 9028, behind the non-ESP marker)",
            num(hip, &["udp_received"]),
        );
        o.counter1(
            "hip_udp_not_hip",
            "UDP datagrams on the HIP port that were neither HIP nor ESP (dropped)",
            num(hip, &["udp_not_hip"]),
        );
        o.counter(
            "hip_nat_keepalives",
            "NAT keepalives (RFC 9028 §5.3): sent, and verified ones received",
            [
                ("sent", num(hip, &["keepalives_sent"])),
                ("received", num(hip, &["keepalives_received"])),
            ]
            .map(|(d, v)| (labels(&[("direction", d.into())]), v)),
        );
        o.gauge1(
            "hip_endpoint_associations",
            "Associations the HIP endpoint holds, every state",
            num(hip, &["associations"]) as i64,
        );
    }
    let mut errors = Vec::new();
    match &s.kernel {
        Some(Ok(k)) => {
            o.gauge1("kernel_sas", "hip's XFRM SAs in the kernel", k.sas as i64);
            o.gauge1(
                "kernel_policies",
                "hip's XFRM policies in the kernel",
                k.policies as i64,
            );
        }
        Some(Err(_)) => errors.push("xfrm"),
        None => {}
    }
    match &s.datapath {
        Some(Ok(d)) => datapath(&mut o, d),
        Some(Err(_)) => errors.push("datapath"),
        None => {}
    }
    o.gauge(
        "scrape_error",
        "1 when that source could not be read for this scrape",
        errors
            .into_iter()
            .map(|e| (labels(&[("source", e.into())]), 1)),
    );
    let mut body = String::new();
    // Writing into a String cannot fail.
    if openmetrics {
        let _ = text::encode(&mut body, &o.reg);
        (
            body,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        let _ = prometheus_text::encode(&mut body, &o.reg);
        (body, prometheus_text::CONTENT_TYPE)
    }
}

fn datapath(o: &mut Out, d: &DatapathView) {
    let s = &d.stats;
    o.counter(
        "datapath_packets",
        "Packets the tc programs saw",
        [
            (
                labels(&[("direction", "ingress".into())]),
                s.ingress_packets,
            ),
            (labels(&[("direction", "egress".into())]), s.egress_packets),
        ],
    );
    o.counter(
        "datapath_bytes",
        "Bytes the tc programs saw",
        [
            (labels(&[("direction", "ingress".into())]), s.ingress_bytes),
            (labels(&[("direction", "egress".into())]), s.egress_bytes),
        ],
    );
    o.counter(
        "datapath_events",
        "The tc programs' counters; esp_udp_hip and esp_udp_keepalive count HIP control \
         packets and 0xFF NAT keepalives on the HIP-over-UDP port (not ESP, never media)",
        [
            ("esp_in", s.esp_in),
            ("esp_in_unknown_spi", s.esp_in_unknown_spi),
            ("esp_out", s.esp_out),
            ("esp_out_unknown_spi", s.esp_out_unknown_spi),
            ("rtp_in", s.rtp_in),
            ("hit_udp_not_rtp", s.hit_udp_not_rtp),
            ("guard_passed", s.guard_passed),
            ("guard_dropped", s.guard_dropped),
            ("malformed", s.malformed),
            ("locator_changes", s.locator_changes),
            ("events_lost", s.events_lost),
            ("flow_insert_failed", s.flow_insert_failed),
            ("esp_udp_hip", s.esp_udp_hip),
            ("esp_udp_keepalive", s.esp_udp_keepalive),
        ]
        .map(|(e, v)| (labels(&[("event", e.into())]), v)),
    );
    let spi = |c: &SpiCounters| {
        labels(&[
            ("spi", format!("0x{:08x}", c.spi)),
            ("direction", c.direction.into()),
            ("peer_hit", c.peer_hit.to_string()),
        ])
    };
    o.counter(
        "esp_packets",
        "ESP packets per SA",
        d.spis.iter().map(|c| (spi(c), c.packets)),
    );
    o.counter(
        "esp_bytes",
        "ESP bytes per SA",
        d.spis.iter().map(|c| (spi(c), c.bytes)),
    );
    o.counter(
        "esp_locator_changes",
        "Inbound ESP seen from a new outer source, per SA",
        d.spis
            .iter()
            .filter(|c| c.direction == "in")
            .map(|c| (spi(c), c.locator_changes)),
    );
    let dst = |g: &GuardDrops| labels(&[("dst", g.dst.to_string())]);
    o.counter(
        "guard_dropped_packets",
        "Clear-text RTP packets the media guard dropped, per destination",
        d.guard.iter().map(|g| (dst(g), g.packets)),
    );
    o.counter(
        "guard_dropped_bytes",
        "Clear-text RTP bytes the media guard dropped, per destination",
        d.guard.iter().map(|g| (dst(g), g.bytes)),
    );
    o.gauge1(
        "rtp_flows",
        "Entries of the RTP flow table",
        d.flows.len() as i64,
    );
    let flow = |f: &Flow| {
        labels(&[
            ("src_hit", f.src_hit.to_string()),
            ("dst_hit", f.dst_hit.to_string()),
            ("src_port", f.src_port.to_string()),
            ("dst_port", f.dst_port.to_string()),
            ("ssrc", f.ssrc.to_string()),
        ])
    };
    o.counter(
        "rtp_packets",
        "Decrypted RTP packets per flow",
        d.flows.iter().map(|f| (flow(f), f.packets)),
    );
    o.counter(
        "rtp_bytes",
        "Decrypted RTP bytes per flow",
        d.flows.iter().map(|f| (flow(f), f.bytes)),
    );
    o.gauge(
        "rtp_lost",
        "Cumulative RTP packets lost per flow (RFC 3550 A.3)",
        d.flows.iter().map(|f| (flow(f), f.lost)),
    );
    o.gauge_f(
        "rtp_jitter_seconds",
        "Interarrival jitter per flow (RFC 3550 A.8)",
        d.flows.iter().map(|f| (flow(f), f.jitter_ms / 1000.0)),
    );
}

/// Binds the endpoint's socket (at start-up, so that a taken port is a start-up error).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    let err = |source| MetricsError::Bind { addr, source };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(l).map_err(err)
}

/// Scrapes served at once; more connections wait for their turn in the backlog.
const CONCURRENT: usize = 4;
/// A request head must arrive within this time and fit in this many bytes.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 8192;

/// Serves scrapes forever, asking the daemon for each one.
pub async fn serve(listener: TcpListener, to_daemon: mpsc::Sender<Incoming>) {
    let gate = Arc::new(Semaphore::new(CONCURRENT));
    loop {
        let Ok(permit) = gate.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = to_daemon.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(HEAD_TIMEOUT * 6, one(stream, tx)).await;
            drop(permit);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics { openmetrics: bool },
    NotFound,
    BadMethod,
    Bad,
}

fn parse_head(head: &str) -> Ask {
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Ask::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Ask::Bad;
    }
    if method != "GET" && method != "HEAD" {
        return Ask::BadMethod;
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Ask::NotFound;
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept")
                && v.to_ascii_lowercase()
                    .contains("application/openmetrics-text")
        })
    });
    Ask::Metrics { openmetrics }
}

async fn one(mut stream: TcpStream, tx: mpsc::Sender<Incoming>) {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end);
            }
            if buf.len() > MAX_HEAD {
                return None;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let ask = match head {
        Ok(Some(end)) => parse_head(&String::from_utf8_lossy(&buf[..end])),
        _ => Ask::Bad,
    };
    let (status, ctype, body) = match ask {
        Ask::Metrics { openmetrics } => {
            let (otx, orx) = oneshot::channel();
            let reply = if tx
                .send((Request::Metrics { openmetrics }, otx))
                .await
                .is_ok()
            {
                orx.await.unwrap_or_else(|_| json!({"ok": false}))
            } else {
                json!({"ok": false})
            };
            match (reply["text"].as_str(), reply["content_type"].as_str()) {
                (Some(t), Some(c)) => ("200 OK", c.to_owned(), t.to_owned()),
                _ => (
                    "503 Service Unavailable",
                    "text/plain".into(),
                    "agent stopping\n".into(),
                ),
            }
        }
        Ask::NotFound => (
            "404 Not Found",
            "text/plain".into(),
            "metrics are at /metrics\n".into(),
        ),
        Ask::BadMethod => (
            "405 Method Not Allowed",
            "text/plain".into(),
            "GET only\n".into(),
        ),
        Ask::Bad => (
            "400 Bad Request",
            "text/plain".into(),
            "bad request\n".into(),
        ),
    };
    let head_only = buf.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            parse_head("GET /metrics HTTP/1.1\r\nHost: x"),
            Ask::Metrics { openmetrics: false }
        );
        assert_eq!(
            parse_head(
                "GET /metrics?x=1 HTTP/1.0\r\naccept: application/openmetrics-text;version=1.0.0"
            ),
            Ask::Metrics { openmetrics: true }
        );
        assert_eq!(parse_head("GET / HTTP/1.1"), Ask::NotFound);
        assert_eq!(parse_head("POST /metrics HTTP/1.1"), Ask::BadMethod);
        assert_eq!(parse_head("GET /metrics"), Ask::Bad);
        assert_eq!(parse_head("\u{0}\u{1}"), Ask::Bad);
    }

    #[test]
    fn a_status_becomes_metrics() {
        let status = json!({
            "calls": [
                {"direction": "outgoing", "state": "confirmed", "security": {"verification": "mutual"}},
                {"direction": "outgoing", "state": "confirmed", "security": {"verification": "mutual"}},
                {"direction": "incoming", "state": "early", "security": {"verification": "pending"}},
            ],
            "stats": {"calls_in": 1, "calls_out": 7, "confirmed": 6, "ended": 4},
            "registration": {"registered": true},
            "limits": {
                "sip": {"refused_busy": 3, "refused_rate": 5, "stream_timeouts": 0},
                "connections": {"open": 2, "refused": 0, "idle_closed": 1},
                "pending_incoming_calls": 1,
                "hip": {"received": 40, "dropped": {"bad-checksum": 2}, "batches_cut": 0,
                        "r1_sent_expected": 3, "r1_sent_unexpected": 0,
                        "r1_rate_limited_address": 0, "r1_rate_limited_unexpected": 9,
                        "r1_rate_limited_expected": 0, "refused_at_capacity": 0,
                        "unverified_notify": 0, "associations": 2,
                        "udp_received": 12, "udp_not_hip": 1,
                        "keepalives_sent": 4, "keepalives_received": 6},
            },
            "pool_entries": 2,
        });
        let rec = Recorder::default();
        rec.established(&Timing {
            started: Some(1000),
            established: Some(1040),
            offloaded: Some(1045),
        });
        let dp = DatapathView {
            stats: DatapathStats {
                esp_in: 11,
                esp_udp_hip: 3,
                esp_udp_keepalive: 5,
                ..DatapathStats::default()
            },
            spis: vec![SpiCounters {
                spi: 0x6000_0001,
                direction: "in",
                peer_hit: "2001:20::2".parse().unwrap(),
                last_src: None,
                packets: 11,
                bytes: 1100,
                locator_changes: 1,
                last_seen_ns: 0,
            }],
            ..DatapathView::default()
        };
        let snap = Snapshot {
            status: &status,
            associations: &[],
            kernel: Some(Ok(KernelCounts {
                sas: 2,
                policies: 4,
            })),
            datapath: Some(Ok(dp)),
        };
        let (t, ctype) = render(&rec, &snap, false);
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        for line in [
            "hip_calls{direction=\"outgoing\",state=\"confirmed\",verification=\"mutual\"} 2",
            "hip_calls{direction=\"incoming\",state=\"early\",verification=\"pending\"} 1",
            "hip_sip_calls_total{direction=\"out\"} 7",
            "hip_sip_admission_refused_total{reason=\"rate\"} 5",
            "hip_sip_connections 2",
            "hip_sip_registered 1",
            "hip_hip_packets_dropped_total{reason=\"bad-checksum\"} 2",
            "hip_hip_r1_rate_limited_total{lane=\"unexpected\"} 9",
            "hip_hip_udp_received_total 12",
            "hip_hip_udp_not_hip_total 1",
            "hip_hip_nat_keepalives_total{direction=\"sent\"} 4",
            "hip_hip_nat_keepalives_total{direction=\"received\"} 6",
            "hip_kernel_sas 2",
            "hip_kernel_policies 4",
            "hip_datapath_events_total{event=\"esp_in\"} 11",
            "hip_datapath_events_total{event=\"esp_udp_hip\"} 3",
            "hip_datapath_events_total{event=\"esp_udp_keepalive\"} 5",
            "hip_esp_packets_total{spi=\"0x60000001\",direction=\"in\",peer_hit=\"2001:20::2\"} 11",
            "hip_esp_locator_changes_total{spi=\"0x60000001\",direction=\"in\",peer_hit=\"2001:20::2\"} 1",
            "hip_association_outcomes_total{outcome=\"established\"} 1",
            "hip_base_exchange_seconds_count 1",
            "hip_base_exchange_seconds_sum 0.04",
            "hip_kernel_install_seconds_bucket{le=\"0.008\"} 1",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in:\n{t}");
        }
        assert!(
            t.lines()
                .any(|l| l.starts_with("# HELP hip_datapath_events_total ")
                    && l.contains("esp_udp_hip")
                    && l.contains("keepalives")),
            "{t}"
        );
        assert!(!t.contains("hip_scrape_error{"), "{t}");
        let (om, ctype) = render(&rec, &snap, true);
        assert!(ctype.starts_with("application/openmetrics-text"));
        assert!(om.ends_with("# EOF\n"), "{om}");
        // A source that could not be read says so instead of showing zeros.
        let snap = Snapshot {
            kernel: Some(Err("dump failed".into())),
            datapath: None,
            ..snap
        };
        let (t, _) = render(&rec, &snap, false);
        assert!(t.contains("hip_scrape_error{source=\"xfrm\"} 1"), "{t}");
        assert!(!t.contains("hip_kernel_sas"), "{t}");
    }
}
