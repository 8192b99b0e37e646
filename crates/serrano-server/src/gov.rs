//! The governance gate in front of every route: authenticate the bearer key, bind the tenant,
//! and make sure each request leaves exactly one durable audit record before its response
//! completes (streams write theirs before `[DONE]`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serrano_gov::{GovError, JwtVerifier, Principal, RateInfo, Role, Ticket};
use tracing::Instrument;

use crate::error::{ApiError, ErrorNote};
use crate::state::AppState;

/// Routes anyone may call without a key: the health check and the console's files (which hold
/// no data; see `console`). Everything else, unknown paths included, needs one.
pub const PUBLIC_ROUTES: &[&str] = &[
    "/health",
    "/ui",
    "/ui/console.js",
    "/ui/console.css",
    "/ui/uPlot.iife.min.js",
    "/ui/uPlot.min.css",
];
/// A client-chosen request id; a replayed one is refused (409) and never charged twice.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Lets an admin key act for a tenant (a gateway forwarding its caller); others get 403.
pub const TENANT_HEADER: &str = "x-serrano-tenant";
const MAX_REQUEST_ID_CHARS: usize = 128;

pub async fn gate(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    if req.method() == Method::GET && PUBLIC_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let started = std::time::Instant::now();
    let addr = crate::shield::client_addr(&req);
    let (id, bad_id) = request_id(req.headers());
    // Before authentication nothing durable is written: a refusal is counted, and summarized
    // per address once a minute (`shield::Refusals`); an address past its refusals is turned
    // away without a key lookup.
    let refusals = &st.shield.refusals;
    let authenticated = match bad_id {
        Some(e) => Err(e),
        None if refusals.exhausted(addr) => Err(too_many_refusals()),
        None => authenticate(&st, req.headers()).await,
    };
    let p = match authenticated {
        Ok(p) => p,
        Err(e) => {
            refusals.refused(addr, req.uri().path(), e.status);
            let mut resp = e.into_response();
            set_request_id(&mut resp, &id);
            return resp;
        }
    };
    let ticket = Ticket::new(&st.gov, id.clone(), req.method().as_str(), req.uri().path());
    let span = crate::trace::request_span(req.method().as_str(), req.uri().path(), req.headers());
    ticket.set_span(span.clone());
    // The record names the key even when the key may not do what it asked.
    ticket.set_principal(p.clone());
    let admitted = admit(&st, req.headers(), req.uri().path(), p).await;
    crate::trace::gate(&span, started);
    let resp = match admitted {
        Ok(p) => {
            ticket.set_principal(p);
            req.extensions_mut().insert(ticket.clone());
            next.run(req).instrument(span).await
        }
        Err(e) => e.into_response(),
    };
    finish(&st, &ticket, &id, resp).await
}

/// Writes the record of a request the gate still owns, and adds the response headers every
/// authenticated request gets.
async fn finish(st: &AppState, ticket: &Ticket, id: &str, resp: Response) -> Response {
    // Read before `finish`, which hands the record to the writer.
    let route = ticket.route();
    // The inference pipeline claims its tickets and writes their records itself.
    let mut resp = if ticket.is_claimed() {
        resp
    } else {
        let status = resp.status();
        let note = resp.extensions().get::<ErrorNote>().map(|n| n.0.clone());
        let error = note.or_else(|| (status.as_u16() >= 400).then(|| status.to_string()));
        match ticket.finish(status.as_u16(), error).await {
            Ok(f) => {
                if let Some((backend, _)) = &route {
                    st.routing.metrics.spent(backend, f.cost_nusd);
                }
                resp
            }
            // No audit, no response: the client gets 503, never an unrecorded answer.
            Err(e) => ApiError::from(e).into_response(),
        }
    };
    set_request_id(&mut resp, id);
    if let Some(r) = ticket.rate_info() {
        rate_headers(resp.headers_mut(), &r);
    }
    if let Some((backend, route)) = route {
        for (name, value) in [("x-serrano-backend", backend), ("x-serrano-route", route)] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
    }
    resp
}

fn set_request_id(resp: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
}

fn too_many_refusals() -> ApiError {
    ApiError {
        code: Some("rate_limit_exceeded".into()),
        retry_after_s: Some(crate::shield::SUMMARY_EVERY.as_secs()),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "Too many refused requests from this address (--max-refusals-per-minute); retry after the minute",
        )
    }
}

/// OpenAI's `x-ratelimit-*` headers, for the tightest limit of each kind.
fn rate_headers(h: &mut HeaderMap, r: &RateInfo) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    if let Some(l) = r.limit_requests {
        put("x-ratelimit-limit-requests", l.to_string());
        put(
            "x-ratelimit-remaining-requests",
            r.remaining_requests.to_string(),
        );
        put(
            "x-ratelimit-reset-requests",
            openai_duration(r.reset_requests_s),
        );
    }
    if let Some(l) = r.limit_tokens {
        put("x-ratelimit-limit-tokens", l.to_string());
        put(
            "x-ratelimit-remaining-tokens",
            r.remaining_tokens.to_string(),
        );
        put(
            "x-ratelimit-reset-tokens",
            openai_duration(r.reset_tokens_s),
        );
    }
}

/// Durations as OpenAI writes them in rate-limit headers: `17ms`, `1s`, `6m0s`.
fn openai_duration(secs: f64) -> String {
    let ms = (secs.max(0.0) * 1000.0).round() as u64;
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{}s", ms.div_ceil(1000)),
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000).div_ceil(1000)),
    }
}

/// A fresh request id that sorts by time: milliseconds since the epoch, then 80 random bits.
/// The store keys requests, reservations and usage by request id, and random ids put each
/// request's rows on a random leaf of each of those B-trees: in a big store, a page read per
/// tree and a page written (p99 17-20 ms at 1,000 req/s on a store of a million requests,
/// against 3.6-3.9 ms with these; BENCHMARKS.md). Ids that grow with time append to the last
/// leaf, which stays cached.
fn fresh_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = rand::random::<u128>() & ((1 << 80) - 1);
    format!("req-{:012x}{random:020x}", ms & ((1 << 48) - 1))
}

/// The client's `x-request-id` if valid, else a fresh one (and the reason the client's is bad).
fn request_id(headers: &HeaderMap) -> (String, Option<ApiError>) {
    let fresh = fresh_request_id;
    match headers.get(REQUEST_ID_HEADER).map(|v| v.to_str()) {
        None => (fresh(), None),
        Some(Ok(s))
            if !s.is_empty()
                && s.len() <= MAX_REQUEST_ID_CHARS
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) =>
        {
            (s.to_string(), None)
        }
        Some(_) => (
            fresh(),
            Some(ApiError::invalid(format!(
                "{REQUEST_ID_HEADER} must be 1 to {MAX_REQUEST_ID_CHARS} characters of [A-Za-z0-9._:-]"
            ))),
        ),
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, GovError> {
    let missing = || {
        GovError::Unauthorized(
            "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer YOUR_KEY'.".into(),
        )
    };
    let v = headers
        .get(AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, key) = v.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
        return Err(missing());
    }
    Ok(key.trim())
}

/// Who the bearer credential (or anonymous access) says the caller is; 401 if nobody.
async fn authenticate(st: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    if let (Some(anon), false) = (&st.auth.anonymous, headers.contains_key(AUTHORIZATION)) {
        return Ok(anon.clone());
    }
    let token = bearer(headers)?;
    Ok(match &st.auth.jwt {
        Some(v) if JwtVerifier::looks_like_jwt(token) => {
            st.gov.jwt_principal(&v.verify(token)?).await?
        }
        _ => st.gov.authenticate(token).await?,
    })
}

/// What an authenticated caller may do here: admin routes need an admin key, and an admin key
/// may act for another tenant (`x-serrano-tenant`). Refusals are audited: the key was valid.
async fn admit(
    st: &AppState,
    headers: &HeaderMap,
    path: &str,
    mut p: Principal,
) -> Result<Principal, ApiError> {
    // Metrics name every tenant: operators only.
    if (path.starts_with("/admin/") || path == "/metrics") && p.role != Role::Admin {
        return Err(GovError::Forbidden("This route needs an admin key.".into()).into());
    }
    let Some(t) = headers.get(TENANT_HEADER) else {
        return Ok(p);
    };
    if p.role != Role::Admin {
        return Err(GovError::Forbidden(format!(
            "{TENANT_HEADER} may only be sent with an admin key; a key's tenant is fixed"
        ))
        .into());
    }
    let name = t
        .to_str()
        .map_err(|_| ApiError::invalid(format!("{TENANT_HEADER} is not ASCII")))?;
    let tenant = st.gov.tenant(name).await?;
    p.tenant_id = tenant.id;
    p.tenant = tenant.name;
    p.retention = tenant.retention;
    // The tenant's own filters apply, not the admin key's tenant's.
    p.filter = st.gov.filter(tenant.policy);
    Ok(p)
}

/// The request's principal; the gate guarantees one on every non-public route.
pub fn principal(ticket: &Ticket) -> Result<Principal, ApiError> {
    ticket.principal().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "no API key was checked for this request",
        )
    })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;

    use super::{fresh_request_id, openai_duration, request_id};

    #[test]
    fn durations_read_like_openai_headers() {
        assert_eq!(openai_duration(0.017), "17ms");
        assert_eq!(openai_duration(1.0), "1s");
        assert_eq!(openai_duration(1.2), "2s");
        assert_eq!(openai_duration(360.0), "6m0s");
    }

    #[test]
    fn fresh_request_ids_sort_by_time_and_pass_the_header_check() {
        let a = fresh_request_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = fresh_request_id();
        assert!(a < b, "{a} then {b}");
        assert_ne!(fresh_request_id(), fresh_request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 4 + 32, "{id}");
            let mut headers = HeaderMap::new();
            headers.insert("x-request-id", id.parse().unwrap());
            assert_eq!(request_id(&headers), (id.clone(), None));
        }
    }
}
