//! The `/metrics` endpoint (hyper): Prometheus text format 0.0.4, or OpenMetrics when the
//! scraper's Accept header asks for it. Bounded against misbehaving clients: a few
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
    let openmetrics = request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut body, &metrics.registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut body, &metrics.registry)
    };
    if encoded.is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let kind = if openmetrics {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    };
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
