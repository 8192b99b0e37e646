//! Walks the route table: every route but the public allowlist refuses a request without a valid
//! key, and every listed route is really served (not the 404 fallback).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serrano_gov::{GovConfig, Governance, NewKey, Retention, Role};
use serrano_server::gov::PUBLIC_ROUTES;
use serrano_server::{router, ServerConfig, ROUTES};
use tower::ServiceExt;

struct Fixture {
    app: axum::Router,
    admin: String,
    user: String,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    serrano_engine::testing::TinyModel::default()
        .write(&model)
        .unwrap();
    let engine = serrano_engine::start(&model, Default::default()).unwrap();
    let gov = Governance::open(GovConfig::new(dir.path().join("gov.db")))
        .await
        .unwrap();
    let admin = gov.bootstrap(None).await.unwrap().unwrap();
    gov.create_tenant("acme", Retention::None).await.unwrap();
    let (_, user) = gov
        .create_key(NewKey {
            tenant: "acme".into(),
            role: Some(Role::Inference),
            ..Default::default()
        })
        .await
        .unwrap();
    let config = serrano_router::config::render(&[serrano_router::config::Backend::local("here")]);
    let engines =
        serrano_server::engines::LocalEngines::new(Some((engine, vec!["default".into()])), None);
    let routing = serrano_server::routing::Routing::start(
        gov.clone(),
        &config,
        "test",
        engines,
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap();
    Fixture {
        app: router(routing, gov, Default::default(), ServerConfig::default()).router,
        admin,
        user,
        _dir: dir,
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> (StatusCode, String) {
    // A key id that does not exist: revoking a real one would lock the test out.
    let path = path
        .replace("{id}", "999")
        .replace("{name}", "nobody")
        .replace("{version}", "999");
    let mut req = Request::builder().method(method).uri(&path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body = if method == "POST" {
        Body::from("{}")
    } else {
        Body::empty()
    };
    let req = req
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_the_allowlist_requires_a_key() {
    let f = fixture().await;
    // The real key with its last character changed (to '1' when it already ends in '0': the
    // key is hex, so one run in sixteen would otherwise send the real key).
    let last = if f.user.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &f.user[..f.user.len() - 1]);
    assert_ne!(wrong, f.user);
    for &(path, methods) in ROUTES {
        for &m in methods {
            if PUBLIC_ROUTES.contains(&path) {
                assert_eq!(
                    call(&f.app, m, path, None).await.0,
                    StatusCode::OK,
                    "{m} {path}"
                );
                continue;
            }
            for key in [None, Some(wrong.as_str()), Some("Bearer"), Some("sk-short")] {
                let (status, body) = call(&f.app, m, path, key).await;
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{m} {path} with {key:?}: {body}"
                );
                assert!(body.contains("invalid_api_key"), "{body}");
            }
            let (status, body) = call(&f.app, m, path, Some(&f.admin)).await;
            assert!(
                !body.contains("Unknown route"),
                "{m} {path} is listed but not routed"
            );
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{m} {path}: {body}");
            if path.starts_with("/admin/") || path == "/metrics" {
                let (status, _) = call(&f.app, m, path, Some(&f.user)).await;
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{m} {path} with an inference key"
                );
            }
        }
    }
    // Unknown paths do not reveal themselves to callers without a key.
    assert_eq!(
        call(&f.app, "GET", "/nope", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&f.app, "GET", "/nope", Some(&f.admin)).await.0,
        StatusCode::NOT_FOUND
    );
}
