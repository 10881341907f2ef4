//! Key sources over time: a JWKS URL served by a real HTTP server on 127.0.0.1 (rotation,
//! outage at start, garbage later) and a JWKS file rewritten in place.

use std::time::Duration;

use trellis_jwt::{RefreshOptions, Rejection, Verifier};

use crate::support::*;

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn url_rotation_the_new_kid_is_accepted_after_one_early_refresh() {
    let old = rsa_key(0, "old");
    let new = rsa_key(1, "new");
    let server = JwksServer::start(jwks(&[&old])).await;
    // An hour between refreshes: only the early refresh can bring the new key.
    let v = Verifier::new(&policy(vec![provider(url_source(server.addr, LONG))], true)).unwrap();
    assert!(
        v.wait_for_keys(Duration::from_secs(10)).await,
        "{:?}",
        v.key_status()
    );
    assert_eq!(server.hits(), 1);
    assert!(v.verify(&bearer(&sign(&old, &claims()))).is_ok());

    // The issuer rotates: it publishes the new key and signs with it.
    server.set(200, jwks(&[&old, &new]));
    let token = sign(&new, &claims());
    assert_eq!(v.verify(&bearer(&token)), Err(Rejection::UnknownKey));
    assert!(
        eventually(Duration::from_secs(10), || v
            .verify(&bearer(&token))
            .is_ok())
        .await,
        "the new kid was not accepted after the early refresh: {:?}",
        v.key_status()
    );
    assert_eq!(server.hits(), 2, "one early refresh");

    // More unknown kids within 30 s: no more fetches (the issuer is not hammered).
    let stranger = sign(&rsa_key(2, "stranger"), &claims());
    for _ in 0..20 {
        assert_eq!(v.verify(&bearer(&stranger)), Err(Rejection::UnknownKey));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.hits(), 2, "early refreshes are rate-limited");
}

#[tokio::test]
async fn url_down_at_start_fails_closed_then_keys_arrive_after_backoff() {
    let key = ec_key("k");
    let addr = JwksServer::unused_addr().await;
    let v = Verifier::new(&policy(vec![provider(url_source(addr, LONG))], true)).unwrap();
    let token = sign(&key, &claims());
    assert_eq!(v.verify(&bearer(&token)), Err(Rejection::NoKeys));
    assert!(!v.wait_for_keys(Duration::from_millis(600)).await);
    let status = &v.key_status()[0];
    assert_eq!(status.keys, 0);
    let error = status.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains(&addr.to_string()) && error.contains("request failed"),
        "{error}"
    );
    assert_eq!(
        v.verify(&bearer(&token)),
        Err(Rejection::NoKeys),
        "still closed"
    );

    let server = JwksServer::start_on(addr, jwks(&[&key])).await;
    // Default backoff: 0.5 s doubling with jitter; the server is up after about 0.6 s, so a
    // retry comes within a few seconds.
    assert!(
        v.wait_for_keys(Duration::from_secs(10)).await,
        "{:?}",
        v.key_status()
    );
    assert!(server.hits() >= 1);
    assert!(v.verify(&bearer(&token)).is_ok());
    assert_eq!(v.key_status()[0].last_error, None);
}

#[tokio::test]
async fn url_serving_garbage_later_keeps_the_last_good_keys() {
    let key = rsa_key(0, "k");
    let server = JwksServer::start(jwks(&[&key])).await;
    let options = RefreshOptions {
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
        ..RefreshOptions::default()
    };
    let source = url_source(server.addr, Duration::from_secs(1));
    let v = Verifier::with_options(&policy(vec![provider(source)], true), options).unwrap();
    assert!(v.wait_for_keys(Duration::from_secs(10)).await);
    let token = sign(&key, &claims());

    for (status, body, want) in [
        (200, "<html>oops</html>", "not JSON"),
        (200, r#"{"keys": []}"#, "no keys"),
        (500, "{}", "500"),
    ] {
        server.set(status, body.to_string());
        let hits = server.hits();
        assert!(
            eventually(Duration::from_secs(10), || {
                server.hits() > hits + 1
                    && v.key_status()[0]
                        .last_error
                        .as_deref()
                        .is_some_and(|e| e.contains(want))
            })
            .await,
            "{:?}",
            v.key_status()
        );
        assert!(v.verify(&bearer(&token)).is_ok(), "last good keys verify");
        let error = v.key_status()[0].last_error.clone().unwrap();
        assert!(error.contains(&server.addr.to_string()), "{error}");
    }
    // Good again: the error clears.
    server.set(200, jwks(&[&key]));
    assert!(
        eventually(Duration::from_secs(10), || v.key_status()[0]
            .last_error
            .is_none())
        .await
    );
}

#[tokio::test]
async fn file_rewritten_with_a_new_key_is_used_and_garbage_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let first = rsa_key(0, "first");
    let second = ec_key("second");
    std::fs::write(&path, jwks(&[&first])).unwrap();
    let v = Verifier::new(&policy(vec![provider(file_source(&path))], true)).unwrap();
    // A file is read before `new` returns.
    assert_eq!(v.key_status()[0].kids, ["first"]);
    let first_token = sign(&first, &claims());
    let second_token = sign(&second, &claims());
    assert!(v.verify(&bearer(&first_token)).is_ok());
    assert_eq!(v.verify(&bearer(&second_token)), Err(Rejection::UnknownKey));

    // Rotated: only the second key now.
    write_atomically(&path, &jwks(&[&second]));
    assert!(v.wait_for_reload(ISSUER, Duration::from_secs(10)).await);
    assert!(v.verify(&bearer(&second_token)).is_ok());
    assert_eq!(v.verify(&bearer(&first_token)), Err(Rejection::UnknownKey));

    // Garbage: reported with the path, not applied.
    write_atomically(&path, "{\"keys\": [tru");
    assert!(
        eventually(Duration::from_secs(10), || v.key_status()[0]
            .last_error
            .is_some())
        .await
    );
    let error = v.key_status()[0].last_error.clone().unwrap();
    assert!(
        error.contains(&path.display().to_string()) && error.contains("not JSON"),
        "{error}"
    );
    assert!(
        v.verify(&bearer(&second_token)).is_ok(),
        "the old keys stay"
    );
}

#[tokio::test]
async fn a_missing_file_fails_closed_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.json");
    let v = Verifier::new(&policy(vec![provider(file_source(&path))], false)).unwrap();
    let key = ec_key("k");
    let token = sign(&key, &claims());
    assert_eq!(v.verify(&bearer(&token)), Err(Rejection::NoKeys));
    assert_eq!(v.verify(&http::HeaderMap::new()), Ok(None));
    write_atomically(&path, &jwks(&[&key]));
    assert!(v.wait_for_keys(Duration::from_secs(10)).await);
    assert!(v.verify(&bearer(&token)).is_ok());
}
