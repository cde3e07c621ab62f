//! Injected faults: deciding which one hits a request, and the answers that carry them.
//!
//! Owns the fault settings ([`Faults`]), the dice and the broken responses; [`super::http`] decides which routes
//! are exposed to faults and applies them around the handler.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;

/// Faults injected into the usage endpoints and `currentUser` (the token endpoint only
/// honours `token_endpoint_down`). Rates are probabilities in `0.0..=1.0`, rolled
/// independently in the order server error, dropped connection, slow answer.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Probability of answering 500, 502 or 503 with an HTML body, without changing state.
    pub server_error_rate: f64,
    /// Probability of dropping the connection without an HTTP answer; half of the drops
    /// happen before the change is applied and half after, so the client cannot tell.
    pub drop_rate: f64,
    /// Probability of applying the change, then waiting `slow_delay` before answering.
    pub slow_rate: f64,
    /// How long a slow answer waits; make it longer than the client's timeout.
    pub slow_delay: Duration,
    /// When true the token endpoint answers 503.
    pub token_endpoint_down: bool,
}

/// The fault chosen for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// Answer this 5xx status without touching state.
    ServerError(StatusCode),
    /// Drop the connection before the change is applied.
    DropBefore,
    /// Apply the change, then drop the connection.
    DropAfter,
    /// Apply the change, then wait this long before answering.
    Slow(Duration),
}

/// Rolls the dice for one request.
pub(super) fn roll(faults: &Faults) -> Option<Fault> {
    let mut rng = rand::rng();
    if hit(&mut rng, faults.server_error_rate) {
        let status = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ][rng.random_range(0..3)];
        return Some(Fault::ServerError(status));
    }
    if hit(&mut rng, faults.drop_rate) {
        return Some(if rng.random_bool(0.5) {
            Fault::DropBefore
        } else {
            Fault::DropAfter
        });
    }
    if hit(&mut rng, faults.slow_rate) {
        return Some(Fault::Slow(faults.slow_delay));
    }
    None
}

fn hit(rng: &mut impl Rng, rate: f64) -> bool {
    rate > 0.0 && rng.random_bool(rate.min(1.0))
}

/// A gateway-style error page, as a load balancer in front of the portal would send.
pub(super) fn server_error(status: StatusCode) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let page = format!(
        "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n<center><h1>{code} {reason}</h1></center>\r\n</body>\r\n</html>\r\n",
        code = status.as_u16()
    );
    (status, [(header::CONTENT_TYPE, "text/html")], page).into_response()
}

/// An answer that never arrives: the connection is closed without a response.
///
/// The body stream fails on its first poll, before hyper has flushed the status line,
/// so hyper abandons the connection and the client sees a transport error (connection
/// closed before the message completed), never an HTTP status.
pub(super) fn dropped_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "simulated dropped connection",
        ))
    });
    let mut response = Body::from_stream(failing).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
