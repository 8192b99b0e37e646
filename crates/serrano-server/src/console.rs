//! `/ui`: the web console, a page of the fleet's state for operators. Its files are compiled
//! into the binary (no CDN at run time; charts by uPlot 1.6.32, MIT, vendored from npm in
//! `assets/ui/`) and served without a key: they hold no data. The page asks for an admin key and
//! reads everything it shows from `/metrics` and the admin API with it, so the key, not the
//! page, is what guards the data.

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// Each file of the console: its path, content type and text.
pub const FILES: &[(&str, &str, &str)] = &[
    (
        "/ui",
        "text/html; charset=utf-8",
        include_str!("../assets/ui/index.html"),
    ),
    (
        "/ui/console.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/ui/console.js"),
    ),
    (
        "/ui/console.css",
        "text/css; charset=utf-8",
        include_str!("../assets/ui/console.css"),
    ),
    (
        "/ui/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/ui/uPlot.iife.min.js"),
    ),
    (
        "/ui/uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/ui/uPlot.min.css"),
    ),
];

/// Only the console's own files and requests to this server: no inline script, no other
/// origin, no framing (the page acts with an admin key).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub async fn file(uri: Uri) -> Response {
    let Some((_, kind, text)) = FILES.iter().find(|(path, ..)| *path == uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        *text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_public_and_routed() {
        for (path, ..) in FILES {
            assert!(crate::gov::PUBLIC_ROUTES.contains(path), "{path}");
            assert!(crate::ROUTES.iter().any(|(p, _)| p == path), "{path}");
        }
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        let page = FILES[0].2;
        for (path, ..) in &FILES[1..] {
            assert!(page.contains(&format!("\"{path}\"")), "{path}");
        }
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(
            !page.contains("<script>"),
            "no inline script (the CSP forbids it)"
        );
    }
}
