//! Prometheus metrics (text exposition format 0.0.4) at `GET /metrics`: requests by
//! method, route pattern and status, request durations by route, each projection's
//! position in the log, and how webhook delivery is doing ([`webhooks`]). Route
//! patterns only (`/v1/records/{record_id}/content`), never concrete paths or query
//! strings.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use eventstore::ConsumerHandle;

use crate::webhooks::WebhooksReport;

const BOUNDS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    durations: BTreeMap<String, Histogram>,
}

/// The server's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn record(&self, method: &str, route: &str, status: u16, took: Duration) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        *inner
            .requests
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        let h = inner.durations.entry(route.to_owned()).or_default();
        let secs = took.as_secs_f64();
        for (bucket, bound) in h.buckets.iter_mut().zip(BOUNDS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The exposition text.
    pub fn render(&self, consumers: &[(String, ConsumerHandle)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP afyachain_up Whether the server is running.\n# TYPE afyachain_up gauge\nafyachain_up 1\n");
        if let Ok(inner) = self.inner.lock() {
            out.push_str("# HELP afyachain_http_requests_total HTTP requests answered.\n# TYPE afyachain_http_requests_total counter\n");
            for ((method, route, status), n) in &inner.requests {
                let _ = writeln!(
                    out,
                    "afyachain_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                    escape(route)
                );
            }
            out.push_str("# HELP afyachain_http_request_duration_seconds Time to answer a request.\n# TYPE afyachain_http_request_duration_seconds histogram\n");
            for (route, h) in &inner.durations {
                let route = escape(route);
                for (bucket, bound) in h.buckets.iter().zip(BOUNDS) {
                    let _ = writeln!(
                        out,
                        "afyachain_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {bucket}"
                    );
                }
                let _ = writeln!(
                    out,
                    "afyachain_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    out,
                    "afyachain_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                    h.sum
                );
                let _ = writeln!(
                    out,
                    "afyachain_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    h.count
                );
            }
        }
        out.push_str("# HELP afyachain_consumer_position Last log position a log consumer (a projection or a reactor) has applied in this process.\n# TYPE afyachain_consumer_position gauge\n");
        for (name, handle) in consumers {
            let _ = writeln!(
                out,
                "afyachain_consumer_position{{consumer=\"{}\"}} {}",
                escape(name),
                handle.cursor().position
            );
        }
        out
    }
}

/// The webhook gauges: delivery's status as `/readyz` reports it (1 for the current one
/// of `ok`, `degraded` and `down`, 0 for the others), the webhooks registered, delivered
/// by this instance and failing, the worst lag and the dead letters.
pub fn webhooks(report: &WebhooksReport) -> String {
    let mut out = String::new();
    out.push_str("# HELP afyachain_webhooks_status Webhook delivery's status (1 for the current one of ok, degraded and down).\n# TYPE afyachain_webhooks_status gauge\n");
    for status in ["ok", "degraded", "down"] {
        let _ = writeln!(
            out,
            "afyachain_webhooks_status{{status=\"{status}\"}} {}",
            u8::from(report.status == status)
        );
    }
    out.push_str("# HELP afyachain_webhooks Webhooks registered, delivered by this instance or not answering (active) and whose last attempts failed or that do not answer (failing).\n# TYPE afyachain_webhooks gauge\n");
    for (state, n) in [
        ("registered", report.webhooks),
        ("active", report.active),
        ("failing", report.failing),
    ] {
        let _ = writeln!(out, "afyachain_webhooks{{state=\"{state}\"}} {n}");
    }
    if let Some(lag) = report.lag {
        out.push_str("# HELP afyachain_webhooks_lag The most log positions a webhook's checkpoint is behind the log's end.\n# TYPE afyachain_webhooks_lag gauge\n");
        let _ = writeln!(out, "afyachain_webhooks_lag {lag}");
    }
    out.push_str("# HELP afyachain_webhooks_dead_letters Webhook deliveries parked after their attempts failed, waiting for a replay.\n# TYPE afyachain_webhooks_dead_letters gauge\n");
    let _ = writeln!(
        out,
        "afyachain_webhooks_dead_letters {}",
        report.dead_letters
    );
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_durations_are_exposed_by_route() {
        let m = Metrics::default();
        m.record("GET", "/healthz", 200, Duration::from_millis(3));
        m.record("GET", "/healthz", 200, Duration::from_millis(30));
        let text = m.render(&[]);
        assert!(text.contains(
            "afyachain_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "afyachain_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.005\"} 1"
        ));
        assert!(
            text.contains("afyachain_http_request_duration_seconds_count{route=\"/healthz\"} 2")
        );
    }

    #[test]
    fn webhook_delivery_is_exposed_as_gauges() {
        let report = WebhooksReport {
            status: "degraded",
            webhooks: 3,
            active: 2,
            failing: 1,
            lag: Some(7),
            dead_letters: 4,
        };
        let text = webhooks(&report);
        for line in [
            "afyachain_webhooks_status{status=\"ok\"} 0",
            "afyachain_webhooks_status{status=\"degraded\"} 1",
            "afyachain_webhooks_status{status=\"down\"} 0",
            "afyachain_webhooks{state=\"registered\"} 3",
            "afyachain_webhooks{state=\"active\"} 2",
            "afyachain_webhooks{state=\"failing\"} 1",
            "afyachain_webhooks_lag 7",
            "afyachain_webhooks_dead_letters 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Every sample has its HELP and TYPE.
        for name in [
            "afyachain_webhooks_status",
            "afyachain_webhooks",
            "afyachain_webhooks_lag",
            "afyachain_webhooks_dead_letters",
        ] {
            assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{name}");
        }
        // A lag that could not be read is left out, not shown as 0.
        let unknown = webhooks(&WebhooksReport {
            lag: None,
            ..report
        });
        assert!(!unknown.contains("afyachain_webhooks_lag"), "{unknown}");
    }
}
