//! Scraping a gateway's `/metrics` from a namespace, parsed by an independent
//! Prometheus text parser (prometheus-parse).

use std::net::SocketAddr;
use std::time::Duration;

use crate::netns;

/// One scrape of `/metrics`, parsed.
#[derive(Debug)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<prometheus_parse::Sample>,
}

impl Metrics {
    /// The value of the sample `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }
}

/// Scrapes `http://AT/metrics` from namespace `ns`; panics unless the answer is
/// OpenMetrics text that the parser takes line for line.
pub fn scrape(ns: &str, at: SocketAddr) -> Metrics {
    use std::io::{Read, Write};
    let text = netns::join(netns::spawn_in(ns, move || {
        let mut conn = std::net::TcpStream::connect_timeout(&at, Duration::from_secs(5))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        Ok(answer)
    }))
    .expect("scrape /metrics");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let lines: Vec<String> = body.lines().map(str::to_string).collect();
    let parsed = prometheus_parse::Scrape::parse(lines.clone().into_iter().map(Ok))
        .expect("/metrics parses as Prometheus text");
    // The parser skips what it does not understand: every sample line must be one it took.
    let sample_lines = lines.iter().filter(|l| !l.starts_with('#')).count();
    assert_eq!(parsed.samples.len(), sample_lines, "{body}");
    Metrics {
        text: body.to_string(),
        samples: parsed.samples,
    }
}
