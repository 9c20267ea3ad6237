//! `--metrics-listen ADDR` of `agent` and `server`: a small HTTP endpoint (the `tiny_http`
//! crate) serving `/metrics` (Prometheus / OpenMetrics text) and `/healthz`.

use std::net::SocketAddr;

use anyhow::Context;

/// The flag, shared by `agent` and `server`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics and a health check on /healthz (e.g.
    /// 127.0.0.1:9100; port 0 picks one: the second stdout line says `metrics on ADDR`).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// The content type of the OpenMetrics text exposition (what `prometheus-client` renders;
/// Prometheus reads it).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl MetricsArgs {
    /// Starts the endpoint if asked for (`render` produces the exposition); returns its
    /// address.
    pub fn serve(
        &self,
        render: impl Fn() -> String + Send + 'static,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let server = tiny_http::Server::http(addr.as_str())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("--metrics-listen {addr}"))?;
        let bound = server
            .server_addr()
            .to_ip()
            .with_context(|| format!("--metrics-listen {addr}: not an IP address"))?;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in server.incoming_requests() {
                    let get = *req.method() == tiny_http::Method::Get;
                    let path = req.url().split('?').next().unwrap_or_default().to_owned();
                    let response = match (get, path.as_str()) {
                        (true, "/metrics") => tiny_http::Response::from_string(render())
                            .with_header(header("Content-Type", CONTENT_TYPE)),
                        (true, "/healthz") => tiny_http::Response::from_string("ok\n")
                            .with_header(header("Content-Type", "text/plain; charset=utf-8")),
                        (false, _) => {
                            tiny_http::Response::from_string("only GET\n").with_status_code(405)
                        }
                        _ => tiny_http::Response::from_string(
                            "not found: try /metrics or /healthz\n",
                        )
                        .with_status_code(404),
                    };
                    // The scraper may be gone: nothing to do about it.
                    let _ = req.respond(response);
                }
            })
            .context("starting the metrics thread")?;
        Ok(Some(bound))
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}
