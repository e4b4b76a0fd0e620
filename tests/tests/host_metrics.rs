//! The operator's metrics endpoint (`[metrics] listen`) between two real agents in
//! namespaces (HIP over raw sockets; no kernel offload on the host, the VM has the SAs):
//! scraped over HTTP during a call and after it, each figure checked against what
//! `status --json` and `assoc --json` say at the same moment; a refused INVITE shows up
//! as an admission refusal; the exchange's latency histogram holds the exchange the
//! association record timed; OpenMetrics on request; other paths and methods refused.

use std::{collections::BTreeMap, net::UdpSocket, time::Duration};

use hip_tests::{
    NetNs,
    metrics::{self, get},
    sip::{Agent, agent_pair, wait_calls_ended},
    wait_until,
};
use serde_json::Value;

const NET: &str = "10.161.0";
const METRICS: &str = metrics::CONFIG;

fn http(ns: &NetNs, request: &str) -> (String, String, String) {
    metrics::http(ns, request).unwrap()
}

fn scrape(ns: &NetNs) -> BTreeMap<String, f64> {
    metrics::scrape(ns).unwrap()
}

fn n(v: &Value) -> f64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}")) as f64
}

/// Checks a scrape taken between `before` and `after` (two `status` replies) against them:
/// gauges equal to both (the state did not move), counters between the two.
fn check_against_status(
    who: &str,
    m: &BTreeMap<String, f64>,
    before: &Value,
    after: &Value,
    assoc: &Value,
) {
    let between = |series: &str, f: &dyn Fn(&Value) -> f64| {
        let (lo, hi, v) = (f(before), f(after), get(m, series));
        assert!(
            lo <= v && v <= hi,
            "{who}: {series} = {v}, status says {lo}..={hi}"
        );
    };
    between("hip_sip_calls_total{direction=\"in\"}", &|s| {
        n(&s["stats"]["calls_in"])
    });
    between("hip_sip_calls_total{direction=\"out\"}", &|s| {
        n(&s["stats"]["calls_out"])
    });
    between("hip_sip_calls_confirmed_total", &|s| {
        n(&s["stats"]["confirmed"])
    });
    between("hip_sip_calls_ended_total", &|s| n(&s["stats"]["ended"]));
    between("hip_sip_admission_refused_total{reason=\"busy\"}", &|s| {
        n(&s["limits"]["sip"]["refused_busy"])
    });
    between("hip_sip_admission_refused_total{reason=\"rate\"}", &|s| {
        n(&s["limits"]["sip"]["refused_rate"])
    });
    between("hip_hip_packets_received_total", &|s| {
        n(&s["limits"]["hip"]["received"])
    });
    between("hip_hip_r1_sent_total{lane=\"expected\"}", &|s| {
        n(&s["limits"]["hip"]["r1_sent_expected"])
    });
    assert_eq!(before["calls"], after["calls"], "{who}: calls moved");
    // Calls by direction, state and level: the same multiset as `status`.
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for c in after["calls"].as_array().unwrap() {
        let key = format!(
            "hip_calls{{direction=\"{}\",state=\"{}\",verification=\"{}\"}}",
            c["direction"].as_str().unwrap(),
            c["state"].as_str().unwrap(),
            c["security"]["verification"].as_str().unwrap()
        );
        *want.entry(key).or_default() += 1.0;
    }
    let got: BTreeMap<String, f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("hip_calls{"))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(got, want, "{who}: calls by state and level");
    // Associations by state: the same multiset as `assoc`.
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for a in assoc.as_array().unwrap() {
        let key = format!(
            "hip_associations{{state=\"{}\"}}",
            a["state"].as_str().unwrap()
        );
        *want.entry(key).or_default() += 1.0;
    }
    let got: BTreeMap<String, f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("hip_associations{"))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(got, want, "{who}: associations by state");
    assert_eq!(
        get(m, "hip_calls_pending_incoming"),
        n(&after["limits"]["pending_incoming_calls"]),
        "{who}"
    );
    assert_eq!(
        get(m, "hip_pool_entries"),
        n(&after["pool_entries"]),
        "{who}"
    );
    assert_eq!(
        get(m, "hip_hip_endpoint_associations"),
        n(&after["limits"]["hip"]["associations"]),
        "{who}"
    );
    // No kernel offload here: no kernel or datapath series, and no scrape error either.
    assert!(
        !m.keys()
            .any(|k| k.starts_with("hip_kernel_sas") || k.starts_with("hip_datapath_")),
        "{who}: {m:#?}"
    );
    assert!(
        !m.keys().any(|k| k.starts_with("hip_scrape_error")),
        "{who}"
    );
}

fn check(who: &str, agent: &Agent, ns: &NetNs) -> BTreeMap<String, f64> {
    let before = agent.status();
    let m = scrape(ns);
    let assoc = agent.json(&["assoc", "--json"]);
    let after = agent.status();
    check_against_status(who, &m, &before, &after, &assoc);
    m
}

#[test]
fn metrics_agree_with_status_during_and_after_a_call() {
    // Bob takes one call at a time: a second INVITE is refused with a stateless 503.
    let (p, alice, bob) = agent_pair(
        "metr",
        NET,
        METRICS,
        &format!("{METRICS}[limits]\nmax_calls = 1\n"),
    );
    // Before any call: zeros, and the histograms empty.
    let m = check("alice idle", &alice, &p.a);
    assert_eq!(get(&m, "hip_base_exchange_seconds_count"), 0.0);
    assert_eq!(get(&m, "hip_sip_calls_total{direction=\"out\"}"), 0.0);

    let call = alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let established = |s: &Value| {
        s["verification"] == "unverified"
            && s["associations"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["state"] == "established"))
    };
    for (who, a) in [("alice", &alice), ("bob", &bob)] {
        a.wait_call_security(
            &format!("{who}: established"),
            Duration::from_secs(30),
            established,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    // A second caller while bob holds his one call: refused, counted.
    let b_ip = format!("{NET}.2");
    let refused =
        p.a.run_in(|| {
            let s = UdpSocket::bind(format!("{NET}.1:5091")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let src = s.local_addr().unwrap();
            s.send_to(invite(src, &b_ip).as_bytes(), format!("{b_ip}:5060"))
                .unwrap();
            let mut buf = [0u8; 4096];
            let (len, _) = s.recv_from(&mut buf).expect("an answer to the INVITE");
            String::from_utf8_lossy(&buf[..len]).into_owned()
        })
        .unwrap();
    assert!(refused.starts_with("SIP/2.0 503"), "{refused}");
    wait_until(Duration::from_secs(5), "bob counting the refusal", || {
        (bob.status()["limits"]["sip"]["refused_busy"] == 1).then_some(())
    })
    .unwrap();

    let ma = check("alice in the call", &alice, &p.a);
    let mb = check("bob in the call", &bob, &p.b);
    assert_eq!(
        get(
            &ma,
            "hip_calls{direction=\"outgoing\",state=\"confirmed\",verification=\"unverified\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &mb,
            "hip_calls{direction=\"incoming\",state=\"confirmed\",verification=\"unverified\"}"
        ),
        1.0
    );
    assert_eq!(
        get(&mb, "hip_sip_admission_refused_total{reason=\"busy\"}"),
        1.0
    );
    assert_eq!(get(&ma, "hip_associations{state=\"established\"}"), 1.0);
    // The initiator timed one exchange: the histogram holds exactly the record's figure.
    let rec = &alice.json(&["assoc", "--json"])[0]["timing_ms"];
    let took = (n(&rec["established"]) - n(&rec["started"])) / 1000.0;
    assert_eq!(get(&ma, "hip_base_exchange_seconds_count"), 1.0);
    assert!(
        (get(&ma, "hip_base_exchange_seconds_sum") - took).abs() < 1e-9,
        "{took} s in the record"
    );
    assert_eq!(
        get(
            &ma,
            "hip_association_outcomes_total{outcome=\"established\"}"
        ),
        1.0
    );
    assert!(get(&mb, "hip_hip_r1_sent_total{lane=\"expected\"}") >= 1.0);

    // OpenMetrics when asked for, and only GET /metrics.
    let (status, headers, body) = http(
        &p.a,
        "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(http(&p.a, "GET / HTTP/1.1\r\n\r\n").0.contains("404"));
    assert!(
        http(&p.a, "POST /metrics HTTP/1.1\r\n\r\n")
            .0
            .contains("405")
    );

    alice.ctl(&["hangup", call.trim()]).unwrap();
    wait_calls_ended(&[&alice, &bob], Duration::from_secs(15)).unwrap();
    let ma = check("alice after the call", &alice, &p.a);
    let mb = check("bob after the call", &bob, &p.b);
    for m in [&ma, &mb] {
        assert!(!m.keys().any(|k| k.starts_with("hip_calls{")), "{m:#?}");
        assert_eq!(get(m, "hip_sip_calls_ended_total"), 1.0);
    }
}

/// An INVITE from `src` that bob would take if he had room.
fn invite(src: std::net::SocketAddr, dst: &str) -> String {
    let body = format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
        ip = src.ip()
    );
    format!(
        "INVITE sip:bob@{dst} SIP/2.0\r\nVia: SIP/2.0/UDP {src};branch=z9hG4bKmetr1\r\n\
         Max-Forwards: 70\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:carol@chicago.com>;tag=c1\r\n\
         Call-ID: metrics-second@chicago.com\r\nCSeq: 1 INVITE\r\nContact: <sip:carol@{src}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}
