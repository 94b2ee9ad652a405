//! The `/metrics` endpoint (hyper): Prometheus text format 0.0.4, or what the scraper's
//! Accept header asks for: OpenMetrics text, or Prometheus protobuf, the one exposition
//! that carries native histograms. Bounded against misbehaving clients: a few
//! connections at once (more wait in the kernel's backlog), a small request buffer, and a
//! deadline for each connection, so a slow, half-closed or hostile client costs a slot for
//! seconds, never memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::auth::BasicAuth;
use super::metrics::Metrics;
use super::web::Tls;

/// How long to wait after accepting a connection failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections served at once.
const CONNECTIONS: usize = 16;
/// A request's head must fit in this (a 1 MB request line is refused, not buffered).
const REQUEST_BUFFER: usize = 16 * 1024;
/// A client must send its request head within this...
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and is done with the connection within this.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_PROTOBUF: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// The expositions a scraper can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exposition {
    PrometheusText,
    OpenMetricsText,
    PrometheusProtobuf,
}

impl Exposition {
    /// What the Accept header asks for: the media type it gives the highest weight of
    /// those served (the first of equals), else the Prometheus text format.
    fn negotiate<'a>(accept: impl Iterator<Item = &'a str>) -> Exposition {
        let mut best = (Exposition::PrometheusText, 0.0);
        for range in accept.flat_map(|v| v.split(',')) {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default().to_ascii_lowercase();
            let mut weight = 1.0;
            let mut proto = None;
            for param in params {
                match param.split_once('=') {
                    Some(("q", q)) => weight = q.parse().unwrap_or(0.0),
                    Some(("proto", p)) => proto = Some(p),
                    _ => {}
                }
            }
            let offered = match media.as_str() {
                "application/vnd.google.protobuf"
                    if proto == Some("io.prometheus.client.MetricFamily") =>
                {
                    Exposition::PrometheusProtobuf
                }
                "application/openmetrics-text" => Exposition::OpenMetricsText,
                "text/plain" => Exposition::PrometheusText,
                _ => continue,
            };
            if weight > best.1 {
                best = (offered, weight);
            }
        }
        best.0
    }

    /// The scrape in this exposition, with its content type.
    fn encode(self, metrics: &Metrics) -> Option<(Vec<u8>, &'static str)> {
        use prometheus_client::encoding::{prometheus_protobuf, prometheus_text, text};
        let registry = &metrics.registry;
        let mut body = String::new();
        match self {
            Exposition::PrometheusText => {
                prometheus_text::encode(&mut body, registry).ok()?;
                Some((body.into_bytes(), PROMETHEUS_TEXT))
            }
            Exposition::OpenMetricsText => {
                text::encode(&mut body, registry).ok()?;
                Some((body.into_bytes(), OPENMETRICS_TEXT))
            }
            Exposition::PrometheusProtobuf => {
                let bytes = prometheus_protobuf::encode_to_vec(registry).ok()?;
                Some((bytes, PROMETHEUS_PROTOBUF))
            }
        }
    }
}

/// Bind the listening socket (before the probes load: a taken port fails fast).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("--serve {addr}: cannot listen there"))
}

/// What guards `/metrics` (`--web-config`): TLS, and users who may scrape.
#[derive(Default)]
pub struct Guard {
    pub tls: Option<Tls>,
    pub auth: Option<BasicAuth>,
}

/// Serve `metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, guard: Arc<Guard>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        // Wait for a slot first: meanwhile new connections queue in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors (EMFILE) or memory: retrying at once would spin. Wait a
            // little (the client waits in the backlog meanwhile), and count it.
            Err(_) => {
                metrics.accept_failed();
                drop(slot);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (metrics, guard) = (metrics.clone(), guard.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + CONNECTION_DEADLINE;
            let _ = tokio::time::timeout_at(deadline, connection(stream, metrics, guard)).await;
            drop(slot);
        });
    }
}

/// One client: its TLS handshake where there is TLS (a client that fails it, plain HTTP
/// included, is simply closed), then its requests.
async fn connection(stream: TcpStream, metrics: Arc<Metrics>, guard: Arc<Guard>) {
    let service = {
        let guard = guard.clone();
        service_fn(move |request| {
            let (metrics, guard) = (metrics.clone(), guard.clone());
            async move { Ok::<_, Infallible>(respond(&request, &metrics, &guard).await) }
        })
    };
    let http = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(REQUEST_BUFFER)
        .clone();
    match &guard.tls {
        None => {
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let Ok(Ok(stream)) = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        }
    }
}

async fn respond(
    request: &Request<Incoming>,
    metrics: &Metrics,
    guard: &Guard,
) -> Response<Full<Bytes>> {
    if let Some(auth) = &guard.auth {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if !auth.allows(given).await {
            let mut response = plain(StatusCode::UNAUTHORIZED, "unauthorized\n");
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tcpconnlat\""),
            );
            return response;
        }
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match request.uri().path() {
        "/metrics" => scrape(request, metrics),
        "/" => plain(StatusCode::OK, "tcpconnlat: metrics at /metrics\n"),
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        ),
    }
}

fn scrape(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let accept = request.headers().get_all(ACCEPT);
    let exposition = Exposition::negotiate(accept.iter().filter_map(|v| v.to_str().ok()));
    let Some((body, kind)) = exposition.encode(metrics) else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::Exposition::{self, *};

    fn negotiated(accept: &[&str]) -> Exposition {
        Exposition::negotiate(accept.iter().copied())
    }

    #[test]
    fn the_scraper_gets_the_exposition_it_weighs_highest() {
        // What Prometheus 2.42 sends with native histograms on, and without.
        let native = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
        let classic = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, want) in [
            (&[native][..], PrometheusProtobuf),
            (&[classic], OpenMetricsText),
            (&["text/plain"], PrometheusText),
            (&[], PrometheusText),
            (&["*/*"], PrometheusText),
            // Another protobuf message is not ours to send.
            (
                &["application/vnd.google.protobuf;proto=other.Message"],
                PrometheusText,
            ),
            (
                &["text/plain;q=0.2", "application/openmetrics-text;q=0.9"],
                OpenMetricsText,
            ),
            (&["application/openmetrics-text;q=0"], PrometheusText),
            (&["garbage;;;q=x,,"], PrometheusText),
        ] {
            assert_eq!(negotiated(accept), want, "{accept:?}");
        }
    }
}
