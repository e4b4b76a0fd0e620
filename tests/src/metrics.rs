//! Scraping an agent's metrics endpoint (`[metrics] listen`) from inside its namespace.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::NetNs;

/// The address the tests' agents serve metrics on (each in its own namespace).
pub const LISTEN: &str = "127.0.0.1:9464";

/// `[metrics]` for an agent's configuration.
pub const CONFIG: &str = "[metrics]\nlisten = \"127.0.0.1:9464\"\n";

/// One HTTP request to the endpoint in `ns`: (status line, headers, body).
pub fn http(ns: &NetNs, request: &str) -> Result<(String, String, String)> {
    let request = request.to_owned();
    let raw = ns.run_in(move || -> Result<String> {
        let mut s = TcpStream::connect(LISTEN).context("connecting to the metrics endpoint")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        bail!("not an HTTP response: {raw:?}");
    };
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_owned(), headers.to_owned(), body.to_owned()))
}

/// A scrape in the Prometheus text format, as series (`name{labels}`) → value.
pub fn scrape(ns: &NetNs) -> Result<BTreeMap<String, f64>> {
    let (status, headers, body) = http(ns, "GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")?;
    if status != "HTTP/1.1 200 OK" || !headers.contains("Content-Type: text/plain; version=0.0.4") {
        bail!("{status}\n{headers}\n{body}");
    }
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').with_context(|| format!("line {l:?}"))?;
            Ok((
                k.to_owned(),
                v.parse().with_context(|| format!("line {l:?}"))?,
            ))
        })
        .collect()
}

/// The value of `series` in a scrape (panics with the scrape when it is missing).
pub fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} missing in {m:#?}"))
}
