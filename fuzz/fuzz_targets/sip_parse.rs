//! Untrusted bytes into the SIP user agent, as a UDP datagram and as TCP stream chunks:
//! nothing may panic, and whatever is sent back must itself be a parseable SIP message.
#![no_main]

use std::time::{Duration, Instant};

use hip_sip::sip::{ConnId, Transport, UaConfig, UserAgent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cfg = UaConfig::new("bob", "biloxi.com", "192.0.2.4", 5060);
    cfg.ports.push((Transport::Tcp, 5060));
    let mut ua = UserAgent::new(cfg);
    let t0 = Instant::now();
    let peer = "192.0.2.9:5060".parse().unwrap();
    ua.handle_datagram(t0, Transport::Udp, peer, data);
    // The same bytes split in two on a stream.
    let cut = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
    ua.handle_stream(t0, Transport::Tcp, ConnId(1), peer, &data[..cut]);
    ua.handle_stream(t0, Transport::Tcp, ConnId(1), peer, &data[cut..]);
    // Answer any call it created, then let every timer run out.
    while let Some(ev) = ua.poll_event() {
        if let hip_sip::sip::Event::IncomingCall { call, .. } = ev {
            let _ = ua.answer(t0, call.handle, None);
        }
    }
    ua.handle_timeout(t0 + Duration::from_secs(64));
    while let Some(t) = ua.poll_transmit() {
        assert!(t.data.starts_with(b"SIP/2.0 ") || t.data.windows(8).any(|w| w == b" SIP/2.0"));
    }
});
